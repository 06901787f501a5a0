"""Read-only questions to the MLflow store, answered as plain dicts: what the dashboard and the lineage walk ask.

Only `search_*`, `get_*`, `list_artifacts` and artifact downloads: nothing here writes. Every function takes the
tracking URI explicitly (the dashboard may serve several stores over its life; the stages pass
`mlflow.get_tracking_uri()`), and returns picklable values, never MLflow entities, so a caller may cache them.

Artifacts read through a tracking server (`mlflow-artifacts:/`, S3, ...) cost a download each; they are kept in
a small in-process cache (by content size and time) so that re-rendering a page does not download them again.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from cachetools import TTLCache

from flywheel.pipelines import tags as T

ARTIFACT_CACHE_TTL = 300  # seconds; a finished run's artifacts do not change, a running one's may appear
ARTIFACT_CACHE_BYTES = 64 * 1024 * 1024
_artifacts: TTLCache = TTLCache(maxsize=ARTIFACT_CACHE_BYTES, ttl=ARTIFACT_CACHE_TTL,
                                getsizeof=lambda v: max(1, len(v or b"")))
_artifacts_lock = threading.Lock()


def registry_uri(tracking: str) -> str:
    """The registry follows the tracking store unless MLFLOW_REGISTRY_URI says otherwise (as MLflow does)."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking


def client(tracking: str):
    """The store's client; the registry URI is read now, so a changed MLFLOW_REGISTRY_URI gets its own client."""
    return _client(tracking, registry_uri(tracking))


@functools.lru_cache(maxsize=16)
def _client(tracking: str, registry: str):
    """One client per (tracking, registry) pair: safe to share between threads (it only sends requests)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking, registry_uri=registry)


def run_dict(run: Any, experiment: str = "") -> dict:
    info, data = run.info, run.data
    return {
        "run_id": info.run_id, "run_name": info.run_name or info.run_id[:8], "experiment_id": info.experiment_id,
        "experiment": experiment, "status": info.status, "start_time": info.start_time, "end_time": info.end_time,
        "artifact_uri": info.artifact_uri, "params": dict(data.params), "metrics": dict(data.metrics),
        "tags": dict(data.tags),
    }


def version_dict(v: Any) -> dict:
    return {
        "name": v.name, "version": str(v.version), "run_id": v.run_id, "source": v.source, "status": v.status,
        "tags": dict(v.tags or {}), "aliases": list(getattr(v, "aliases", []) or []),
        "creation_timestamp": v.creation_timestamp, "description": v.description or "",
    }


def experiment_ids(tracking: str) -> dict[str, str]:
    """{stage: experiment_id} of the `flywheel/<stage>` experiments that exist (one search)."""
    exps = client(tracking).search_experiments(filter_string="name LIKE 'flywheel/%'", max_results=1000)
    return {e.name.split("/", 1)[1]: e.experiment_id for e in exps}


def search_runs(tracking: str, experiment_id: str, stage: str, filter_string: str = "",
                max_results: int = 500) -> list[dict]:
    """Active runs of one experiment, newest first."""
    from mlflow.entities import ViewType

    found = client(tracking).search_runs(
        [experiment_id], filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
        max_results=max_results, order_by=["attributes.start_time DESC"])
    return [run_dict(r, f"flywheel/{stage}") for r in found]


def stage_runs(tracking: str, stage: str, filter_string: str = "", max_results: int = 500) -> list[dict]:
    """`search_runs` by stage name; [] when the stage never ran."""
    exp = experiment_ids(tracking).get(stage)
    return [] if exp is None else search_runs(tracking, exp, stage, filter_string, max_results)


def get_run(tracking: str, run_id: str | None) -> dict | None:
    """The run, or None when the id is empty or names no run."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return run_dict(client(tracking).get_run(run_id))
    except MlflowException:
        return None


def metric_history(tracking: str, run_id: str, key: str) -> list[dict]:
    """[{step, value, timestamp}] sorted by step."""
    found = client(tracking).get_metric_history(run_id, key)
    return [{"step": m.step, "value": m.value, "timestamp": m.timestamp}
            for m in sorted(found, key=lambda m: (m.step, m.timestamp))]


def list_artifacts(tracking: str, run_id: str, relpath: str | None = None) -> list[dict]:
    from mlflow.exceptions import MlflowException

    try:
        items = client(tracking).list_artifacts(run_id, relpath)
    except (MlflowException, OSError):
        return []
    return [{"path": f.path, "is_dir": f.is_dir, "size": f.file_size} for f in items]


def download_artifact(tracking: str, run_id: str, relpath: str, max_bytes: int) -> bytes | None:
    """One artifact file's bytes through MLflow's artifact repository (works for a local store and a server),
    cached; None when missing or larger than `max_bytes`. `relpath` must already be checked by the caller."""
    key = (tracking, run_id, relpath, max_bytes)
    with _artifacts_lock:
        if key in _artifacts:
            return _artifacts[key]
    data = _download(tracking, run_id, relpath, max_bytes)
    if data is not None and len(data) <= ARTIFACT_CACHE_BYTES // 4:  # never let one file flush the cache
        with _artifacts_lock:
            _artifacts[key] = data
    return data


def _download(tracking: str, run_id: str, relpath: str, max_bytes: int) -> bytes | None:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="flywheel-read-") as tmp:
        try:
            got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=relpath, dst_path=tmp,
                                                           tracking_uri=tracking))
        except (MlflowException, OSError):
            return None
        if not got.resolve().is_relative_to(Path(tmp).resolve()) or not got.is_file():
            return None
        if got.stat().st_size > max_bytes:
            return None
        return got.read_bytes()


def clear_caches() -> None:
    with _artifacts_lock:
        _artifacts.clear()


def registered_models(tracking: str) -> list[dict]:
    from mlflow.exceptions import MlflowException

    try:
        models = client(tracking).search_registered_models(max_results=1000)
    except MlflowException:
        return []
    return [{"name": m.name, "aliases": dict(getattr(m, "aliases", {}) or {}),
             "tags": dict(m.tags or {}), "description": m.description or ""} for m in models]


def model_versions(tracking: str, name: str) -> list[dict]:
    """Newest version first (aliases as `search_model_versions` gives them: often none; see registered_models)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client(tracking).search_model_versions(f"name = '{name.replace(chr(39), '')}'", max_results=1000)
    except MlflowException:
        return []
    return sorted((version_dict(v) for v in found), key=lambda v: int(v["version"]), reverse=True)


def model_version(tracking: str, name: str, version: str) -> dict | None:
    """`name` version `version`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return version_dict(client(tracking).get_model_version(name, str(version)))
    except MlflowException:
        return None


def parent_filter() -> str:
    """MLflow search syntax for top-level runs only."""
    return f"tags.`{T.MLFLOW_PARENT_RUN}` IS NULL"
