"""Read-only access to the Flywheel MLflow store: the only module of the dashboard that talks to MLflow.

Why a module of its own: every page needs the same few questions answered (the last runs of a stage, one
run's metric history, one artifact, the registry's champion), and each answer is cached with
`st.cache_data` so that a page re-render (every widget click) costs nothing. The cache lives `TTL` seconds:
long enough that clicking around is instant, short enough that a run finished a moment ago shows up.

Read-only by construction: only `search_*` / `get_*` / artifact reads are called here. Artifact paths come
from the page (and from the URL through query params), so they are checked before use: relative, no `..`,
and, for local stores, the resolved file must stay inside the run's artifact directory (symlinks included).

Values returned are plain dicts and lists (picklable, what `st.cache_data` stores), never MLflow entities.
Every cached function takes the store URI as its first argument (not `_`-prefixed: Streamlit does not hash
those), so two stores never share an answer.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import streamlit as st

from flywheel.pipelines.tracking import STAGES, TAG_INPUT, TAG_STAGE, tracking_uri
from flywheel.pipelines.tracking import sanitize_metric_name as sanitize  # noqa: F401  (pages build metric keys)

TTL = 30  # seconds a cached answer stays fresh
MAX_RUNS = 500  # a page lists at most this many runs of a stage (newest first)
MAX_ARTIFACT_BYTES = 20 * 1024 * 1024  # a dashboard shows reports and tables, not model weights
PARENT_ONLY = "tags.`mlflow.parentRunId` IS NULL"


class ArtifactPathError(ValueError):
    """An artifact path that could leave the run's artifact directory."""


def uri() -> str:
    """The same store as the pipelines: `MLFLOW_TRACKING_URI`, else the embedded `.flywheel/mlflow.db`."""
    return tracking_uri()


@st.cache_resource(show_spinner=False)
def _client(tracking: str, registry: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking, registry_uri=registry)


def store_missing(tracking: str | None = None) -> bool:
    """True when the embedded sqlite store does not exist yet: nothing to show, and opening it would create
    it (MLflow writes its schema on first connect), which a read-only dashboard must not do."""
    tracking = tracking or uri()
    if tracking.startswith("sqlite:///"):
        return not Path(tracking[len("sqlite:///"):]).exists()
    return False


def client():
    tracking = uri()
    return _client(tracking, os.environ.get("MLFLOW_REGISTRY_URI") or tracking)


# ---------------------------------------------------------------------------------------------- runs


def _run_dict(run: Any, experiment: str = "") -> dict:
    info, data = run.info, run.data
    return {
        "run_id": info.run_id,
        "run_name": info.run_name or info.run_id[:8],
        "experiment_id": info.experiment_id,
        "experiment": experiment,
        "status": info.status,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "artifact_uri": info.artifact_uri,
        "params": dict(data.params),
        "metrics": dict(data.metrics),
        "tags": dict(data.tags),
    }


@st.cache_data(ttl=TTL, show_spinner=False)
def experiment_ids(store_uri: str) -> dict[str, str]:
    """{stage: experiment_id} for the `flywheel/<stage>` experiments that exist (one search, not eight gets)."""
    if store_missing(store_uri):
        return {}
    exps = client().search_experiments(filter_string="name LIKE 'flywheel/%'", max_results=1000)
    return {e.name.split("/", 1)[1]: e.experiment_id for e in exps}


@st.cache_data(ttl=TTL, show_spinner=False)
def _runs(store_uri: str, stage: str, filter_string: str, max_results: int) -> list[dict]:
    exp = experiment_ids(store_uri).get(stage)
    return [] if exp is None else _search(client(), exp, stage, filter_string, max_results)


def _search(cl, exp: str, stage: str, filter_string: str, max_results: int) -> list[dict]:
    """Uncached, client passed in: safe to call from worker threads (no Streamlit context needed)."""
    from mlflow.entities import ViewType

    found = cl.search_runs(
        [exp], filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
        max_results=max_results, order_by=["attributes.start_time DESC"],
    )
    return [_run_dict(r, f"flywheel/{stage}") for r in found]


def runs(stage: str, filter_string: str = "", max_results: int = MAX_RUNS, parents_only: bool = False) -> list[dict]:
    """Newest first. `filter_string` is MLflow's search syntax; `parents_only` drops nested (child) runs."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if parents_only:
        filter_string = f"{filter_string} AND {PARENT_ONLY}" if filter_string else PARENT_ONLY
    return _runs(uri(), stage, filter_string, max_results)


def children(stage: str, parent_run_id: str, max_results: int = MAX_RUNS) -> list[dict]:
    return runs(stage, f"tags.`mlflow.parentRunId` = '{_quote(parent_run_id)}'", max_results)


def latest_of(stages: list[str], parents_only: bool = True) -> dict[str, dict | None]:
    """The newest run of each stage, the searches overlapped (the overview asks for all of them at once)."""
    return _latest_of(uri(), tuple(stages), parents_only)


@st.cache_data(ttl=TTL, show_spinner=False)
def _latest_of(store_uri: str, stages: tuple[str, ...], parents_only: bool) -> dict[str, dict | None]:
    from concurrent.futures import ThreadPoolExecutor

    exps = experiment_ids(store_uri)
    if not exps:  # nothing logged yet (and no client: opening a missing sqlite store would create it)
        return {stage: None for stage in stages}
    filt = PARENT_ONLY if parents_only else ""
    cl = client()

    def one(stage: str) -> dict | None:
        found = _search(cl, exps[stage], stage, filt, 1) if stage in exps else []
        return found[0] if found else None

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(stages)))) as pool:
        return dict(zip(stages, pool.map(one, stages)))


def latest(stage: str, parents_only: bool = True) -> dict | None:
    found = runs(stage, max_results=1, parents_only=parents_only)
    return found[0] if found else None


@st.cache_data(ttl=TTL, show_spinner=False)
def _get_run(store_uri: str, run_id: str) -> dict | None:
    from mlflow.exceptions import MlflowException

    if store_missing(store_uri):
        return None
    try:
        return _run_dict(client().get_run(run_id))
    except MlflowException:
        return None


def get_run(run_id: str | None) -> dict | None:
    if not run_id or not _looks_like_id(run_id):
        return None
    return _get_run(uri(), run_id)


@st.cache_data(ttl=TTL, show_spinner=False)
def _metric_histories(store_uri: str, pairs: tuple[tuple[str, str], ...]) -> list[list[dict]]:
    from concurrent.futures import ThreadPoolExecutor

    if store_missing(store_uri):
        return [[] for _ in pairs]
    cl = client()  # resolved here, in the script thread; the workers only query
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(pairs)))) as pool:
        return list(pool.map(lambda p: [{"step": m.step, "value": m.value, "timestamp": m.timestamp} for m in
                                        sorted(cl.get_metric_history(*p), key=lambda m: (m.step, m.timestamp))],
                             pairs))


def metric_history(run_id: str, key: str) -> list[dict]:
    """[{step, value, timestamp}] sorted by step."""
    return metric_histories([({"run_id": run_id}, key)])[1][0]


def metric_histories(pairs: list[tuple[dict, str]]) -> tuple[list[tuple[dict, str]], list[list[dict]]]:
    """Histories of several (run, key) pairs, fetched concurrently: one round trip each, overlapped (a page
    overlaying 3 runs x 5 curves would otherwise wait for 15 sequential queries)."""
    if not pairs:
        return pairs, []
    return pairs, _metric_histories(uri(), tuple((r["run_id"], k) for r, k in pairs))


def _quote(value: str) -> str:
    return value.replace("'", "")


def _looks_like_id(value: str) -> bool:
    return 0 < len(value) <= 64 and value.replace("-", "").isalnum()


# ---------------------------------------------------------------------------------------------- artifacts


def safe_relpath(path: str) -> str:
    """Normalise an artifact path or refuse it: relative, no `..`, no drive, no backslash, no NUL."""
    if not isinstance(path, str) or not path.strip():
        raise ArtifactPathError("empty artifact path")
    if "\\" in path or "\x00" in path or ":" in path:
        raise ArtifactPathError(f"artifact path {path!r} has a forbidden character")
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or path.startswith("~"):
        raise ArtifactPathError(f"artifact path {path!r} leaves the artifact root")
    parts = [part for part in p.parts if part not in ("", ".")]
    if not parts:
        raise ArtifactPathError(f"artifact path {path!r} names no file")
    return "/".join(parts)


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The run's artifact folder when the store keeps artifacts on this machine's disk, else None."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and artifact_uri.startswith("/"):
        return Path(artifact_uri)
    return None


def resolve_local(root: Path, relpath: str) -> Path:
    """`root/relpath`, refusing anything whose real path (symlinks followed) is outside `root`."""
    real_root = root.resolve()
    target = (real_root / safe_relpath(relpath)).resolve()
    if not target.is_relative_to(real_root):
        raise ArtifactPathError(f"artifact path {relpath!r} leaves the artifact root")
    return target


@st.cache_data(ttl=TTL, show_spinner=False, max_entries=256)
def _artifact_bytes(store_uri: str, run_id: str, relpath: str) -> bytes | None:
    run = _get_run(store_uri, run_id)
    if run is None:
        return None
    local = local_artifact_dir(run["artifact_uri"])
    if local is not None:
        target = resolve_local(local, relpath)
        if not target.is_file() or target.stat().st_size > MAX_ARTIFACT_BYTES:
            return None
        return target.read_bytes()
    # Remote artifact store (a tracking server, S3...): download the one file into a temp dir.
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="flywheel-dash-") as tmp:
        try:
            got = Path(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=relpath, dst_path=tmp, tracking_uri=store_uri))
        except (MlflowException, OSError):
            return None
        if not got.resolve().is_relative_to(Path(tmp).resolve()) or not got.is_file():
            return None
        if got.stat().st_size > MAX_ARTIFACT_BYTES:
            return None
        return got.read_bytes()


def artifact_bytes(run_id: str | None, path: str) -> bytes | None:
    """The artifact's bytes, or None when the run or the file is missing. Raises ArtifactPathError."""
    relpath = safe_relpath(path)
    if not run_id or not _looks_like_id(run_id):
        return None
    return _artifact_bytes(uri(), run_id, relpath)


def artifact_text(run_id: str | None, path: str) -> str | None:
    data = artifact_bytes(run_id, path)
    return None if data is None else data.decode("utf-8", errors="replace")


def artifact_json(run_id: str | None, path: str) -> Any:
    """Parsed JSON, or None when missing or unparsable (a page shows "missing", it does not crash)."""
    text = artifact_text(run_id, path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def artifact_jsonl(run_id: str | None, path: str) -> list[dict]:
    text = artifact_text(run_id, path)
    rows = []
    for line in (text or "").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def artifact_csv(run_id: str | None, path: str):
    """A pandas DataFrame, or None."""
    import io

    import pandas as pd

    data = artifact_bytes(run_id, path)
    if data is None:
        return None
    try:
        return pd.read_csv(io.BytesIO(data))
    except (ValueError, pd.errors.ParserError):
        return None


def table_artifact(run_id: str | None, path: str):
    """An `mlflow.log_table` artifact ({"columns": [...], "data": [[...]]}) as a DataFrame, or None."""
    import pandas as pd

    obj = artifact_json(run_id, path)
    if isinstance(obj, dict) and "columns" in obj and "data" in obj:
        return pd.DataFrame(obj["data"], columns=obj["columns"])
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        return pd.DataFrame(obj)
    return None


@st.cache_data(ttl=TTL, show_spinner=False)
def _list_artifacts(store_uri: str, run_id: str, relpath: str | None) -> list[dict]:
    from mlflow.exceptions import MlflowException

    if store_missing(store_uri):
        return []
    try:
        items = client().list_artifacts(run_id, relpath)
    except (MlflowException, OSError):
        return []
    return [{"path": f.path, "is_dir": f.is_dir, "size": f.file_size} for f in items]


def list_artifacts(run_id: str | None, path: str | None = None) -> list[dict]:
    relpath = safe_relpath(path) if path else None
    if not run_id or not _looks_like_id(run_id):
        return []
    return _list_artifacts(uri(), run_id, relpath)


# ---------------------------------------------------------------------------------------------- registry


def _version_dict(v: Any) -> dict:
    return {
        "name": v.name,
        "version": str(v.version),
        "run_id": v.run_id,
        "source": v.source,
        "status": v.status,
        "tags": dict(v.tags or {}),
        "aliases": list(getattr(v, "aliases", []) or []),
        "creation_timestamp": v.creation_timestamp,
        "description": v.description or "",
    }


@st.cache_data(ttl=TTL, show_spinner=False)
def _registered_models(store_uri: str) -> list[dict]:
    from mlflow.exceptions import MlflowException

    if store_missing(store_uri):
        return []
    try:
        models = client().search_registered_models(max_results=1000)
    except MlflowException:
        return []
    return [{"name": m.name, "aliases": dict(getattr(m, "aliases", {}) or {}),
             "tags": dict(m.tags or {}), "description": m.description or ""} for m in models]


def registered_models() -> list[dict]:
    return _registered_models(uri())


@st.cache_data(ttl=TTL, show_spinner=False)
def _model_versions(store_uri: str, name: str) -> list[dict]:
    from mlflow.exceptions import MlflowException

    if store_missing(store_uri):
        return []
    try:
        found = client().search_model_versions(f"name = '{_quote(name)}'", max_results=1000)
    except MlflowException:
        return []
    return sorted((_version_dict(v) for v in found), key=lambda v: int(v["version"]), reverse=True)


def model_versions(name: str) -> list[dict]:
    """Newest version first. Aliases come from the registered model: `search_model_versions` leaves them out."""
    by_version: dict[str, list[str]] = {}
    for m in registered_models():
        if m["name"] == name:
            for alias, version in m["aliases"].items():
                by_version.setdefault(str(version), []).append(alias)
    return [{**v, "aliases": sorted(set(v["aliases"]) | set(by_version.get(v["version"], [])))}
            for v in _model_versions(uri(), name)]


def champions() -> list[dict]:
    """The model version holding alias `champion`, one per registered model that has one."""
    out = []
    for m in registered_models():
        version = m["aliases"].get("champion")
        if version is None:
            continue
        for v in model_versions(m["name"]):
            if v["version"] == str(version):
                out.append(v)
    return out


# ---------------------------------------------------------------------------------------------- lineage


def inputs_of(run: dict | None) -> dict[str, str]:
    """{kind: value} from the run's `flywheel.input.<kind>` tags."""
    if not run:
        return {}
    return {k[len(TAG_INPUT):]: v for k, v in run["tags"].items() if k.startswith(TAG_INPUT)}


def stage_of(run: dict | None) -> str | None:
    return (run or {}).get("tags", {}).get(TAG_STAGE)


def refresh() -> None:
    """Forget every cached answer (the sidebar's Refresh button)."""
    st.cache_data.clear()


def _first_tag(tags: dict, *names: str) -> str | None:
    for name in names:
        for key in (name, f"flywheel.{name}", f"{TAG_INPUT}{name}"):
            if tags.get(key):
                return tags[key]
    return None


def lineage(version: dict) -> dict[str, Any]:
    """Walk a registered model version back to the logs: {logs, dataset_version, mine, train, eval, gate, publish}.

    Each stage records what it consumed as `flywheel.input.<kind>` tags, so every hop is one `get_run`;
    where a hop is missing (a stage not run, an older run without the tag) the value is None and the page
    says so instead of guessing.
    """
    tags = version.get("tags", {})
    gate = get_run(_first_tag(tags, "promoted_by_gate_run", "gate_run"))
    source = get_run(version.get("run_id"))
    if gate is None and stage_of(source) == "gate":
        gate = source
    train = get_run(_first_tag(tags, "train_run") or inputs_of(gate).get("train_run")
                    or (version.get("run_id") if stage_of(source) == "train" else None))
    if train is None and gate is not None:
        candidate = inputs_of(gate).get("candidate", "")
        train = get_run(candidate.split("runs:/")[-1].split("/")[0]) if candidate.startswith("runs:/") else None
    evaluation = get_run(_first_tag(tags, "eval_run") or inputs_of(gate).get("eval_run"))
    mine = get_run(_first_tag(tags, "mine_run") or inputs_of(train).get("mine_run"))
    dataset_version = (_first_tag(tags, "dataset_version") or inputs_of(train).get("dataset_version")
                       or (mine or {}).get("tags", {}).get("flywheel.dataset_version"))
    logs = inputs_of(mine).get("logs")
    if logs is None and mine is not None:
        manifest = artifact_json(mine["run_id"], "manifest.json") or {}
        inputs = manifest.get("inputs") or []
        logs = ", ".join(str(i.get("path", i)) if isinstance(i, dict) else str(i) for i in inputs) or None
    # The Modelfile published from this promotion: its publish run names the gate run it came through;
    # failing that, one published from this exact version, then one published from `@champion`.
    name, number = version.get("name", ""), version.get("version")
    publish = None
    if gate is not None:
        found = runs("publish", f"tags.`flywheel.input.gate_run` = '{_quote(gate['run_id'])}'", max_results=1)
        publish = found[0] if found else None
    if publish is None:
        published = [r for r in runs("publish", max_results=100)
                     if name and name in r["tags"].get("flywheel.input.model_uri", "")]
        publish = next((r for r in published if r["tags"]["flywheel.input.model_uri"].endswith(f"/{number}")),
                       next((r for r in published if r["tags"]["flywheel.input.model_uri"].endswith("@champion")),
                            None))
    return {"logs": logs, "dataset_version": dataset_version, "mine": mine, "train": train,
            "eval": evaluation, "gate": gate, "publish": publish}
