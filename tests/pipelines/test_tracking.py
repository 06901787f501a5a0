"""The embedded store: several processes opening a fresh one at once all succeed, and it stays usable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Imports first (slow, uneven), then all processes wait for one signal so their first store access collides.
CHILD = """
import os, sys, time
from pathlib import Path
import mlflow
from flywheel.pipelines import tracking
go = Path(sys.argv[1])
Path(sys.argv[2]).touch()
while not go.exists():
    time.sleep(0.01)
with tracking.start_run("mine", run_name="p" + sys.argv[3]):
    tracking.log_metrics({"x": 1.0})
"""


@pytest.mark.slow  # four interpreters importing mlflow
def test_concurrent_first_use_of_a_fresh_store(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_REGISTRY_URI", None)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(go), str(tmp_path / f"ready{i}"), str(i)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    deadline = time.time() + 240
    while not all((tmp_path / f"ready{i}").exists() for i in range(3)) and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    # and the store works afterwards for a later command, registry included
    later = subprocess.run([sys.executable, "-c", "from flywheel.pipelines import tracking; import mlflow; "
                            "tracking.setup(); c = mlflow.MlflowClient(); "
                            "print(len(c.search_runs([tracking.experiment_id('mine')]))); "
                            "print(len(c.search_registered_models()))"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert later.returncode == 0, later.stderr[-2000:]
    assert later.stdout.split() == ["3", "0"]


def test_runs_record_the_tool_version_and_the_users_commit_apart(mlflow_store, tmp_path, monkeypatch):
    """`flywheel.git_commit` is the user's repository (cwd), `flywheel.version`/`source_commit` is Flywheel."""
    from importlib.metadata import version

    from mlflow.tracking import MlflowClient

    from flywheel.pipelines import tracking

    user_repo = tmp_path / "user-repo"
    user_repo.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=user_repo, check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], cwd=user_repo, check=True)
    user_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=user_repo, capture_output=True,
                                 text=True).stdout.strip()
    monkeypatch.chdir(user_repo)
    with tracking.start_run("mine") as run:
        pass
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["flywheel.git_commit"] == user_commit
    assert tags["flywheel.version"] == version("flywheel")
    flywheel_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if flywheel_commit.returncode == 0:  # an editable checkout (this repository)
        assert tags["flywheel.source_commit"].startswith(flywheel_commit.stdout.strip())
        assert tags["flywheel.source_commit"] != user_commit

    monkeypatch.chdir(tmp_path)  # not a git checkout: no user commit, still the tool's version
    with tracking.start_run("mine") as run:
        pass
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert "flywheel.git_commit" not in tags and tags["flywheel.version"] == version("flywheel")


def test_a_copied_home_reads_its_artifacts_and_writes_new_ones_inside_the_copy(tmp_path, monkeypatch):
    """Moving a store = copy the folder + FLYWHEEL_HOME; the absolute artifact locations are rewritten on open."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from flywheel.pipelines import registry, tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setattr(tracking, "_USER_REGISTRY_URI", None)
    old, new = tmp_path / "old home", tmp_path / "new-home"
    monkeypatch.setenv("FLYWHEEL_HOME", str(old))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "flywheel_adapter.json").write_text('{"base_model": "smollm2-135m-instruct"}')
    with tracking.start_run("train") as run:
        mlflow.log_text("first", "note.txt")
        mlflow.log_artifacts(str(adapter), "adapter")
    version = registry.register_adapter("m", registry.resolve_model(run.info.run_id))

    shutil.copytree(old, new)
    shutil.rmtree(old)  # nothing may still point at the original
    monkeypatch.setenv("FLYWHEEL_HOME", str(new))
    monkeypatch.setattr(tracking, "_READY", set())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exported the old one
    tracking.setup()
    client = MlflowClient()
    assert client.get_run(run.info.run_id).info.artifact_uri.startswith((new / "artifacts").as_uri())
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/note.txt") == "first"
    assert registry.resolve_model(f"models:/m/{version}").adapter_dir.exists()
    with tracking.start_run("train") as run2:
        mlflow.log_text("second", "note.txt")
    assert (new / "artifacts" / "train" / run2.info.run_id / "artifacts" / "note.txt").read_text() == "second"
    assert not old.exists()
