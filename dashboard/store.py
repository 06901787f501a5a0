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
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import streamlit as st

from flywheel.pipelines import lineage as lineage_walk
from flywheel.pipelines import store_read as read
from flywheel.pipelines import tags as T
from flywheel.pipelines.tracking import STAGES, artifact_root, tracking_uri
from flywheel.pipelines.tracking import sanitize_metric_name as sanitize  # noqa: F401  (pages build metric keys)

TTL = 30  # seconds a cached answer stays fresh
MAX_RUNS = 500  # a page lists at most this many runs of a stage (newest first)
MAX_ARTIFACT_BYTES = 20 * 1024 * 1024  # a dashboard shows reports and tables, not model weights
PARENT_ONLY = read.parent_filter()


class ArtifactPathError(ValueError):
    """An artifact path that could leave the run's artifact directory."""


def uri() -> str:
    """The same store as the pipelines: `MLFLOW_TRACKING_URI`, else the embedded `.flywheel/mlflow.db`."""
    return tracking_uri()


def store_missing(tracking: str | None = None) -> bool:
    """True when the embedded sqlite store does not exist yet: nothing to show, and opening it would create
    it (MLflow writes its schema on first connect), which a read-only dashboard must not do."""
    tracking = tracking or uri()
    if tracking.startswith("sqlite:///"):
        return not Path(tracking[len("sqlite:///"):]).exists()
    return False


# ---------------------------------------------------------------------------------------------- runs


@st.cache_data(ttl=TTL, show_spinner=False)
def experiment_ids(store_uri: str) -> dict[str, str]:
    """{stage: experiment_id} for the `flywheel/<stage>` experiments that exist (one search, not eight gets)."""
    if store_missing(store_uri):
        return {}
    return read.experiment_ids(store_uri)


@st.cache_data(ttl=TTL, show_spinner=False)
def _runs(store_uri: str, stage: str, filter_string: str, max_results: int) -> list[dict]:
    exp = experiment_ids(store_uri).get(stage)
    return [] if exp is None else read.search_runs(store_uri, exp, stage, filter_string, max_results)


def runs(stage: str, filter_string: str = "", max_results: int = MAX_RUNS, parents_only: bool = False) -> list[dict]:
    """Newest first. `filter_string` is MLflow's search syntax; `parents_only` drops nested (child) runs."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if parents_only:
        filter_string = f"{filter_string} AND {PARENT_ONLY}" if filter_string else PARENT_ONLY
    return _runs(uri(), stage, filter_string, max_results)


def children(stage: str, parent_run_id: str, max_results: int = MAX_RUNS) -> list[dict]:
    return runs(stage, f"tags.`{T.MLFLOW_PARENT_RUN}` = '{_quote(parent_run_id)}'", max_results)


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

    def one(stage: str) -> dict | None:  # worker threads: no Streamlit context, so the uncached shell call
        found = read.search_runs(store_uri, exps[stage], stage, filt, 1) if stage in exps else []
        return found[0] if found else None

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(stages)))) as pool:
        return dict(zip(stages, pool.map(one, stages)))


def latest(stage: str, parents_only: bool = True) -> dict | None:
    found = runs(stage, max_results=1, parents_only=parents_only)
    return found[0] if found else None


@st.cache_data(ttl=TTL, show_spinner=False)
def _get_run(store_uri: str, run_id: str) -> dict | None:
    if store_missing(store_uri):
        return None
    return read.get_run(store_uri, run_id)


def get_run(run_id: str | None) -> dict | None:
    if not run_id or not _looks_like_id(run_id):
        return None
    return _get_run(uri(), run_id)


@st.cache_data(ttl=TTL, show_spinner=False)
def _metric_histories(store_uri: str, pairs: tuple[tuple[str, str], ...]) -> list[list[dict]]:
    from concurrent.futures import ThreadPoolExecutor

    if store_missing(store_uri):
        return [[] for _ in pairs]
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(pairs)))) as pool:
        return list(pool.map(lambda p: read.metric_history(store_uri, *p), pairs))


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


def check_run_dir(local: Path, store_root: Path | None = None) -> Path:
    """Refuse a run artifact folder that is, or sits under, a symlink.

    `resolve_local` confines a file to its run's folder, but resolving that folder first would follow a run
    folder that is itself a symlink (to /etc, to another user's files) and then "confine" reads to wherever
    it points. So: under the store's artifact root, no folder from the root down to the run's may be a symlink
    and the real run folder must be inside the real root; elsewhere (a store with another layout) at least
    the run folder and its parent must be real folders.
    """
    local = Path(os.path.abspath(local))
    chain = [local, local.parent]
    if store_root is not None:
        root = Path(os.path.abspath(store_root))
        if local.is_relative_to(root):
            chain = [root / Path(*local.relative_to(root).parts[:i + 1])
                     for i in range(len(local.relative_to(root).parts))]
            if not local.resolve().is_relative_to(root.resolve()):
                raise ArtifactPathError(f"run artifact folder {local} leaves the artifact root {root}")
    for p in chain:
        if p.is_symlink():
            raise ArtifactPathError(f"run artifact folder {local}: {p} is a symlink")
    return local


def resolve_local(root: Path, relpath: str, store_root: Path | None = None) -> Path:
    """`root/relpath`, refusing anything whose real path (symlinks followed) is outside `root`, and a `root`
    that is a symlink itself (`check_run_dir`)."""
    real_root = check_run_dir(root, store_root).resolve()
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
        target = resolve_local(local, relpath, artifact_root())
        if not target.is_file() or target.stat().st_size > MAX_ARTIFACT_BYTES:
            return None
        return target.read_bytes()
    # Remote artifact store (a tracking server, S3...): one download, cached by the shell across re-renders.
    return read.download_artifact(store_uri, run_id, relpath, MAX_ARTIFACT_BYTES)


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
    if store_missing(store_uri):
        return []
    run = _get_run(store_uri, run_id)
    local = local_artifact_dir(run["artifact_uri"]) if run else None
    if local is not None:
        check_run_dir(local, artifact_root())  # a symlinked run folder would list somebody else's files
    return read.list_artifacts(store_uri, run_id, relpath)


def list_artifacts(run_id: str | None, path: str | None = None) -> list[dict]:
    relpath = safe_relpath(path) if path else None
    if not run_id or not _looks_like_id(run_id):
        return []
    return _list_artifacts(uri(), run_id, relpath)


# ---------------------------------------------------------------------------------------------- registry


@st.cache_data(ttl=TTL, show_spinner=False)
def _registered_models(store_uri: str) -> list[dict]:
    return [] if store_missing(store_uri) else read.registered_models(store_uri)


def registered_models() -> list[dict]:
    return _registered_models(uri())


@st.cache_data(ttl=TTL, show_spinner=False)
def _model_versions(store_uri: str, name: str) -> list[dict]:
    return [] if store_missing(store_uri) else read.model_versions(store_uri, name)


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
    return T.inputs_of((run or {}).get("tags"))


def stage_of(run: dict | None) -> str | None:
    return (run or {}).get("tags", {}).get(T.STAGE)


def refresh() -> None:
    """Forget every cached answer (the sidebar's Refresh button)."""
    st.cache_data.clear()
    read.clear_caches()


@st.cache_data(ttl=TTL, show_spinner=False)
def _lineage(store_uri: str, version: dict) -> dict[str, Any]:
    if store_missing(store_uri):
        return {"logs": [], "dataset_version": None, "mine": None, "train": None, "eval": None, "gate": None,
                "publish": None}
    return asdict(lineage_walk.walk(store_uri, version, find_publish=True))


def lineage(version: dict) -> dict[str, Any]:
    """A registered model version walked back to the logs (pipelines/lineage.py, the walk `flywheel publish`
    writes into the Modelfile's README): {logs, dataset_version, mine, train, eval, gate, publish, ...}."""
    return _lineage(uri(), version)
