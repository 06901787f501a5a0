"""How many DDP ranks fit, and the torchrun child that dies with its parent (training/launch.py)."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from flywheel.foundation.config import ConfigError
from flywheel.training.launch import available_workers, check_nproc, run_torchrun


def test_workers_are_the_cores_this_process_may_use():
    n, what = available_workers("cpu")
    assert n >= 1 and what == "CPU cores"


def test_nproc_beyond_the_cores_and_mps_are_config_errors():
    with pytest.raises(ConfigError, match=r"nproc: 512 processes but this machine has \d+ CPU cores"):
        check_nproc(512, "cpu")
    with pytest.raises(ConfigError, match="MPS has no DDP backend"):
        check_nproc(2, "mps")
    check_nproc(1, "cpu")


@pytest.mark.slow
def test_torchrun_exit_code_comes_back_and_signal_handlers_are_restored(tmp_path):
    """A failing rank's exit code is what the parent sees; our SIGTERM/SIGHUP handlers are ours again after."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    (tmp_path / "fail_rank.py").write_text("import sys; sys.exit(3)\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    assert run_torchrun(1, "fail_rank", [], env) != 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before
