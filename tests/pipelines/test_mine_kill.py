"""No process outlives `flywheel mine`: `kill -9` of a running mine takes its pool workers with it, and the next
run removes the temp directory the killed one left."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from flywheel.mining.config import usable_cpus
from flywheel.mining.demo_logs import write_demo_logs
from flywheel.pipelines.mine import MineConfig, mine_to_dir


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.skipif(usable_cpus() < 2, reason="a pool needs 2 usable CPUs (workers=2 is refused on fewer)")
def test_kill_9_takes_the_workers_along_and_the_next_run_cleans_up(tmp_path):
    small = tmp_path / "small.jsonl"
    write_demo_logs(small, n=300, seed=2)
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:  # enough batches that the pool is busy for a while
        for _ in range(60):
            f.write(small.read_bytes())
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.pipelines", "mine", str(big), "--out", str(out),
                             "workers=2", "batch_size=64", "progress=false", "log_mlflow=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    workers: list[psutil.Process] = []
    try:
        assert _wait(lambda: len(parent.children()) >= 2 and any(tmp_path.glob(".tmp-ds-*")), 60), \
            "the mine never started its workers"
        workers = parent.children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert _wait(lambda: not any(_alive(w) for w in workers), 5), \
            [(w.pid, w.status()) for w in workers if _alive(w)]
    finally:  # whatever happened above, leave no process of ours behind
        for w in workers:
            if _alive(w):
                w.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert list(tmp_path.glob(".tmp-ds-*"))  # the killed run's temp dir is still there ...
    mine_to_dir([small], out, MineConfig(progress=False, workers=1))
    assert not list(tmp_path.glob(".tmp-ds-*"))  # ... and the next run removed it
    assert (out / "manifest.json").exists()
