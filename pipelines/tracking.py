"""MLflow plumbing shared by every stage: where the store is, how runs are named and tagged.

Embedded default: a sqlite store plus an artifact folder under `.flywheel/` in the working directory
(`FLYWHEEL_HOME` moves it). `MLFLOW_TRACKING_URI` (or a stage's `tracking_uri` key) points at a remote server.

Conventions every stage follows, so lineage can be walked from a Modelfile back to the logs:
- experiment `flywheel/<stage>`; tag `flywheel.stage`;
- tag `flywheel.version`: the Flywheel that wrote the run (package version), plus `flywheel.source_commit`, the
  commit of the Flywheel checkout when it is installed editable (`pip install -e`);
- tag `flywheel.git_commit`: the user's repository (the working directory's git checkout), when there is one;
- tags `flywheel.input.<kind>` naming what the run consumed (a run id or a dataset version), e.g.
  `flywheel.input.mine_run`, `flywheel.input.dataset_version`, `flywheel.input.train_run`.
Every tag name is a constant in `pipelines/tags.py`; read-only queries live in `pipelines/store_read.py`.
mlflow is imported lazily: `flywheel --help` must stay instant.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping

from flywheel.foundation.io import protect_paths
from flywheel.pipelines import tags as T

STAGES = ("mine", "train", "embeddings", "prompts", "ab", "gate", "publish", "run")
TAG_STAGE = T.STAGE
TAG_COMMIT = T.GIT_COMMIT
TAG_INPUT = T.INPUT
TAG_VERSION = T.VERSION                # the tool itself
TAG_SOURCE_COMMIT = T.SOURCE_COMMIT    # the Flywheel checkout's commit, when installed editable


# What the user set, read once: mlflow.set_registry_uri() writes MLFLOW_REGISTRY_URI into os.environ itself, so
# reading the variable later would pick up our own earlier call (a previous store) instead of the user's choice.
_USER_REGISTRY_URI = os.environ.get("MLFLOW_REGISTRY_URI")


# One home for everything Flywheel writes by default (FLYWHEEL_HOME); the foundation owns it so that the cores'
# config defaults can name it too.
from flywheel.foundation.io import flywheel_home, home_path  # noqa: E402,F401


def default_tracking_uri() -> str:
    return f"sqlite:///{flywheel_home() / 'mlflow.db'}"


def artifact_root() -> Path:
    return flywheel_home() / "artifacts"


def tracking_uri(configured: str | None = None) -> str:
    """Environment beats config beats the embedded default (same order as MLflow itself)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or default_tracking_uri()


def store_paths() -> list[tuple[Path, bool]]:
    """Paths an output directory must not be or contain; with True, it must not be inside them either."""
    paths = [(flywheel_home(), False), (artifact_root(), True)]
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        paths.append((Path(uri[len("sqlite:///"):]).resolve(), False))
    elif uri.startswith("file:") or ":" not in uri:  # a file store: runs and artifacts live inside it
        paths.append((Path(uri.removeprefix("file://").removeprefix("file:")).resolve(), True))
    return paths


protect_paths(store_paths)  # an output directory never replaces or swallows the store


# sqlite URIs whose schema this process has already created or checked under the store lock.
_READY: set[str] = set()


def setup(configured_uri: str | None = None) -> str:
    """Point mlflow at the store; create `.flywheel/` and the sqlite schema for the embedded one. Returns the URI."""
    import mlflow

    uri = tracking_uri(configured_uri)
    if uri.startswith("sqlite:///"):
        _create_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    # The registry follows the tracking store unless told otherwise.
    mlflow.set_registry_uri(_USER_REGISTRY_URI or uri)
    return uri


def _create_sqlite_store(uri: str) -> None:
    """Create and migrate a sqlite store once, under a file lock.

    MLflow creates the schema on first use without any lock: several processes opening a fresh store at once
    run the alembic migrations concurrently ("duplicate column", a stray `_alembic_tmp_*` table) and leave a
    store every later command fails on. Opening the tracking and registry stores here, one process at a
    time, means the migrations run exactly once; later processes find the tables and only check them.
    """
    if uri in _READY:
        return
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(db.parent / ".store.lock"):
        client = MlflowClient(tracking_uri=uri, registry_uri=_USER_REGISTRY_URI or uri)
        client.search_experiments(max_results=1)  # builds the tracking store: runs its migrations
        if not _USER_REGISTRY_URI:
            client.search_registered_models(max_results=1)  # the registry store checks/creates its tables too
        if uri == default_tracking_uri():
            rehome_artifacts(db)
    _READY.add(uri)


# Where a sqlite store keeps absolute artifact locations (MLflow makes a relative artifact_location absolute
# when the experiment is created, so a relative one cannot be stored).
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "source"),
                     ("model_versions", "storage_location"))


def rehome_artifacts(db: Path) -> int:
    """A copied or moved home: point the embedded store's artifact locations at *this* home's `artifacts/`.

    The store records absolute paths; after `cp -r .flywheel /elsewhere` the copy would otherwise read (and
    write new runs into) the original folder. The old root is read off the `flywheel/<stage>` experiments, whose
    artifacts always live in `<home>/artifacts/<stage>`. Returns the number of rows rewritten."""
    import sqlite3
    from urllib.parse import unquote

    new_root = artifact_root()
    con = sqlite3.connect(db)
    try:
        exps = con.execute("SELECT name, artifact_location FROM experiments WHERE name LIKE 'flywheel/%'").fetchall()
        olds = set()
        for name, loc in exps:
            stage = "/" + name.split("/", 1)[1]
            if loc and loc.startswith("file://") and loc.endswith(stage):
                olds.add(Path(unquote(loc[len("file://"):-len(stage)])))
        changed = 0
        for old in olds - {new_root}:
            for o, n in ((old.as_uri(), new_root.as_uri()), (str(old), str(new_root))):
                for table, col in _LOCATION_COLUMNS:
                    try:
                        changed += con.execute(
                            f"UPDATE {table} SET {col} = ? || substr({col}, ?) "
                            f"WHERE {col} = ? OR substr({col}, 1, ?) = ?",
                            (n, len(o) + 1, o, len(o) + 1, o + "/")).rowcount
                    except sqlite3.OperationalError:  # a table this MLflow version does not have
                        pass
        con.commit()
        return changed
    finally:
        con.close()


def experiment_id(stage: str) -> str:
    """Get or create `flywheel/<stage>`; embedded stores keep artifacts under `.flywheel/artifacts/`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name = f"flywheel/{stage}"
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = (artifact_root() / stage).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created by a concurrent process between the get and the create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _git(cwd: str | Path | None, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the git checkout `cwd` (default: the working directory) is in, or None."""
    return _git(cwd, "rev-parse", "HEAD")


@functools.lru_cache(maxsize=1)
def tool_version() -> dict[str, str]:
    """{flywheel.version, flywheel.source_commit?}: which Flywheel wrote a run, whatever directory it ran in.
    The commit only when the package is an editable checkout (its source folder is a repository's root)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        out = {TAG_VERSION: version("flywheel")}
    except PackageNotFoundError:
        out = {TAG_VERSION: "unknown"}
    src = Path(__file__).resolve().parents[1]
    top = _git(src, "rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == src:
        commit = git_commit(src)
        if commit:
            dirty = _git(src, "status", "--porcelain", "--untracked-files=no")
            out[TAG_SOURCE_COMMIT] = commit + ("-dirty" if dirty else "")
    return out


@contextlib.contextmanager
def start_run(stage: str, run_name: str | None = None, *, inputs: Mapping[str, str] | None = None,
              tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
              nested: bool = False, configured_uri: str | None = None) -> Iterator[Any]:
    """Open a run in `flywheel/<stage>` tagged with stage, commit and consumed inputs; params logged at once."""
    import mlflow

    if not nested:
        setup(configured_uri)
    all_tags = {TAG_STAGE: stage, **tool_version()}
    commit = git_commit()
    if commit:
        all_tags[TAG_COMMIT] = commit
    for k, v in (inputs or {}).items():
        if v is not None:
            all_tags[TAG_INPUT + k] = str(v)
    all_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
    exp = experiment_id(stage)
    with mlflow.start_run(experiment_id=exp, run_name=run_name, nested=nested, tags=all_tags) as run:
        if params:
            log_params(params)
        yield run


def log_params(params: Mapping[str, Any]) -> None:
    """Batched: one call, values cut to MLflow's 6000-char limit."""
    import mlflow

    clean = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
    if clean:
        mlflow.log_params(clean)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Batched: one call; NaN/None dropped (MLflow stores NaN but charts choke on it)."""
    import math

    import mlflow

    clean = {}
    for k, v in metrics.items():
        if v is None:
            continue
        fv = float(v)
        if math.isfinite(fv):
            clean[sanitize_metric_name(k)] = fv
    if clean:
        mlflow.log_metrics(clean, step=step)


def sanitize_metric_name(name: str) -> str:
    """MLflow keys allow [A-Za-z0-9_\\-. /]; `ndcg@10` becomes `ndcg_at_10`."""
    import re

    name = name.replace("@", "_at_")
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)
