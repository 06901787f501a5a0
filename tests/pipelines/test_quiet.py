"""Third-party chatter is off by default and `flywheel -v` brings it back: real CLI runs in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.mining.demo_logs import write_demo_logs
from flywheel.pipelines.quiet import QUIET_ENV

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV and not k.startswith("MLFLOW_")}
    env["FLYWHEEL_HOME"] = str(tmp_path / "home")  # a fresh sqlite store: MLflow logs its INFO lines creating it
    return env


def _mine(tmp_path: Path, *global_opts: str) -> subprocess.CompletedProcess:
    logs = tmp_path / "logs.jsonl"
    if not logs.exists():
        write_demo_logs(logs, n=20)
    out = tmp_path / f"out{len(global_opts)}"
    env = _env(tmp_path / f"h{len(global_opts)}")
    return subprocess.run([sys.executable, "-m", "flywheel.pipelines", *global_opts, "mine", str(logs), "--out", str(out),
                           "workers=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_mine_is_quiet_by_default_and_verbose_shows_mlflow_logs(tmp_path):
    quiet = _mine(tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert " INFO " not in quiet.stderr, quiet.stderr
    assert "mlflow run" in quiet.stdout  # Flywheel's own summary is still there
    loud = _mine(tmp_path, "-v")
    assert loud.returncode == 0, loud.stderr
    assert "INFO mlflow" in loud.stderr


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_library_switches(tmp_path, verbose):
    """What the switches do inside the libraries: transformers/datasets verbosity and bars, tqdm, hub bars."""
    code = """
import os
from flywheel.pipelines.quiet import quiet_third_party
if not {verbose}:
    quiet_third_party()
import datasets, transformers, tqdm, huggingface_hub.utils as hu
from transformers.utils import logging as tl
print(tl.get_verbosity() == tl.ERROR, tl.is_progress_bar_enabled(), datasets.is_progress_bar_enabled(),
      hu.are_progress_bars_disabled(), tqdm.tqdm(range(1)).disable)
""".format(verbose=verbose)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    expect = "False True True False False" if verbose else "True False False True True"
    assert r.stdout.split()[-5:] == expect.split()
