"""`flywheel dashboard`: Streamlit on 127.0.0.1, headless, on the pipelines' own tracking URI."""

from __future__ import annotations

from typer.testing import CliRunner

from flywheel.pipelines import dashboard_cmd


def test_command_binds_localhost_headless():
    cmd = dashboard_cmd.command(port=8765)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("dashboard/app.py")
    opts = dict(zip(cmd[5::2], cmd[6::2]))
    assert opts["--server.address"] == "127.0.0.1"
    assert opts["--server.port"] == "8765"
    assert opts["--server.headless"] == "true"
    assert opts["--browser.gatherUsageStats"] == "false"


def test_environment_uses_pipeline_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    from flywheel.pipelines.tracking import tracking_uri

    assert dashboard_cmd.environment()["MLFLOW_TRACKING_URI"] == tracking_uri() == \
        f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert dashboard_cmd.environment()["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert dashboard_cmd.environment("sqlite:////x.db")["MLFLOW_TRACKING_URI"] == "sqlite:////x.db"


def test_cli_registers_dashboard():
    from flywheel.pipelines.cli import app

    out = CliRunner().invoke(app, ["dashboard", "--help"])
    assert out.exit_code == 0 and "--port" in out.output
    bad = CliRunner().invoke(app, ["dashboard", "--port", "0"])
    assert bad.exit_code == 2
