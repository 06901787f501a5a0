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
