"""`flywheel dashboard [--port N]`: the Streamlit app over the pipelines' own MLflow store, read-only.

Bound to 127.0.0.1 unless `--host` says otherwise: the dashboard has no login, and artifacts can hold user
text. It reads the same tracking URI as every stage (`flywheel.pipelines.tracking.tracking_uri()`), handed to
Streamlit's process through `MLFLOW_TRACKING_URI` so the app and the pipelines can never disagree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


def command(port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line (headless, no usage stats, no file watcher)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--theme.base", "light", "--client.toolbarMode", "viewer",
    ]


def environment(uri: str | None = None) -> dict[str, str]:
    from flywheel.pipelines.tracking import tracking_uri

    env = dict(os.environ)
    # An explicit --tracking-uri wins; otherwise exactly what the stages would use.
    env["MLFLOW_TRACKING_URI"] = uri or tracking_uri()
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_dashboard(port: int = 8501, host: str = "127.0.0.1", uri: str | None = None) -> None:
    """Replace this process with Streamlit (exec): Ctrl-C and SIGTERM reach the server itself, and no
    orphaned server is left behind when a supervisor stops `flywheel dashboard`."""
    env = environment(uri)
    typer.echo(f"Flywheel dashboard on http://{host}:{port}  (store: {env['MLFLOW_TRACKING_URI']})")
    sys.stdout.flush()
    cmd = command(port, host)
    os.execve(cmd[0], cmd, env)


def register(app: typer.Typer) -> None:
    @app.command("dashboard")
    def dashboard(
        port: int = typer.Option(8501, "--port", min=1, max=65535, help="Port to serve on."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
        tracking_uri: str = typer.Option(None, "--tracking-uri",
                                         help="MLflow store; default: MLFLOW_TRACKING_URI or .flywheel/mlflow.db."),
    ) -> None:
        """Open the read-only dashboard (Streamlit) over the pipelines' MLflow store."""
        run_dashboard(port, host, tracking_uri)
