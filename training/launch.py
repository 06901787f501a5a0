"""Multi-process (DDP) training on one machine: how many ranks fit, and torchrun as a child that dies with us.

torchrun rather than `accelerate launch`: it ships with torch (no config file to keep in sync), its agent stops
every rank as soon as one fails, and the Trainer reads the env it sets. The child stays in our process group
(Ctrl-C reaches every rank), gets SIGTERM if we die, and SIGTERM/SIGHUP sent to us are forwarded.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Sequence

from flywheel.foundation.config import ConfigError
from flywheel.foundation.procs import set_parent_death_signal


def available_workers(device: str) -> tuple[int, str]:
    """How many DDP ranks this machine can host: one per GPU, or one per CPU core this process may use."""
    if device == "cuda":
        import torch

        return torch.cuda.device_count(), "CUDA devices"
    try:
        return len(os.sched_getaffinity(0)), "CPU cores"
    except AttributeError:  # not Linux
        return os.cpu_count() or 1, "CPU cores"


def check_nproc(nproc: int, device: str) -> None:
    if device == "mps":
        raise ConfigError("nproc: multi-process training needs CPU (gloo) or CUDA (nccl); MPS has no DDP backend")
    have, what = available_workers(device)
    if nproc > have:
        raise ConfigError(f"nproc: {nproc} processes but this machine has {have} {what}; use nproc<={have}, or "
                          "run torchrun on several nodes (README, Stage: train)")


def run_torchrun(nproc: int, module: str, args: Sequence[str], env: dict[str, str]) -> int:
    """Run `python -m <module> <args>` as `nproc` ranks under torchrun with `env`; wait and return its exit code.

    Ranks run with this interpreter, so they import this very installed `flywheel`. Unless `env` says otherwise,
    each rank gets one core's share of OpenMP threads: N ranks x all cores each would oversubscribe the CPU.
    """
    env = dict(env)
    env.setdefault("OMP_NUM_THREADS", str(max(1, available_workers("cpu")[0] // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "-m", module, *args]
    proc = subprocess.Popen(cmd, env=env, start_new_session=False,
                            # SIGTERM when we die: torchrun then stops its ranks, so none is orphaned
                            preexec_fn=functools.partial(set_parent_death_signal, signal.SIGTERM))
    previous = _forward_signals(proc)
    try:
        return proc.wait()
    finally:
        _restore_signals(previous)
        if proc.poll() is None:
            proc.terminate()  # torchrun stops its ranks on SIGTERM
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _forward_signals(proc: Any) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda s, _f: proc.send_signal(s)) for sig in (signal.SIGTERM, signal.SIGHUP)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
