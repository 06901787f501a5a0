"""No process outlives its parent, and a recorded PID is signalled only while it is still the recorded process
(foundation/procs.py), with real processes: a parent is `kill -9`ed and its child must follow."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from flywheel.foundation import procs

# The parent starts a child that ties itself to the parent, reports the child's PID once the child is ready,
# then sleeps until it is killed.
PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]],
                         stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
time.sleep(120)
"""
EXIT_WITH_PARENT = """
import sys, time
from flywheel.foundation.procs import exit_with_parent
exit_with_parent(int(sys.argv[1]), int(sys.argv[2]), poll_s=0.1)
print("ready", flush=True)
time.sleep(120)
"""
PREEXEC = """
import functools, os, signal, subprocess, sys, time
from flywheel.foundation.procs import set_parent_death_signal
child = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(120)"],
                         stdout=subprocess.PIPE, text=True,
                         preexec_fn=functools.partial(set_parent_death_signal, signal.SIGTERM))
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone_after_parent_killed(parent_code: str, *args: str) -> bool:
    parent = subprocess.Popen([sys.executable, "-c", parent_code, *args], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        child = int(parent.stdout.readline())
        started = procs.started_at(child)
        assert procs.alive(child, started)
        parent.kill()
        parent.wait(10)
        return procs.wait_gone(child, started, 5.0)
    finally:  # leave nothing of ours behind, whatever happened
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child and procs.started_at(child) is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("sig", [int(signal.SIGKILL), 0], ids=["death-signal", "watchdog-only"])
def test_a_child_dies_with_its_killed_parent(sig):
    """0 clears the kernel's parent-death signal: the polling thread alone must end the child."""
    assert _gone_after_parent_killed(PARENT, EXIT_WITH_PARENT, str(sig))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_popen_child_gets_the_parent_death_signal():
    assert _gone_after_parent_killed(PREEXEC)


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    out = subprocess.run([sys.executable, "-c", "from flywheel.foundation.procs import exit_with_parent; "
                          "exit_with_parent(1); print('still here')"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "still here" not in out.stdout


def test_identity_is_pid_and_start_time():
    me = procs.started_at(os.getpid())
    assert me is not None and abs(me - time.time()) < 24 * 3600 * 365
    assert procs.alive(os.getpid(), me)
    assert not procs.alive(os.getpid(), me - 60)  # the same PID, reused by another process
    assert not procs.alive(None, me) and not procs.alive(os.getpid(), None)
    psutil = pytest.importorskip("psutil")
    assert abs(psutil.Process().create_time() - me) < 0.02  # records made with psutil stay valid


def test_a_zombie_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = procs.started_at(child.pid)
    deadline = time.monotonic() + 30
    while procs.alive(child.pid, started) and time.monotonic() < deadline:
        time.sleep(0.05)  # it exits, and stays a zombie until we wait() for it
    assert not procs.alive(child.pid, started) and procs.started_at(child.pid) is not None
    child.wait()


@contextlib.contextmanager
def _session_leader(ignore_sigterm: bool):
    """A session leader that started one sleeping child: yields (leader Popen, child pid, child start time)."""
    code = ("import signal, subprocess, sys, time; "
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore_sigterm else "")
            + "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print(c.pid, flush=True); time.sleep(120)")
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        kid = int(leader.stdout.readline())
        yield leader, kid, procs.started_at(kid)
    finally:
        procs.kill_session(leader.pid)
        if leader.poll() is None:
            leader.kill()
            leader.wait(10)


def test_terminate_ends_a_session_that_ignores_sigterm():
    """SIGTERM first; a leader that ignores it loses its whole session (the child it started too)."""
    with _session_leader(ignore_sigterm=True) as (leader, kid, kid_started):
        t0 = time.monotonic()
        procs.terminate(leader.pid, procs.started_at(leader.pid), timeout=0.5)
        assert leader.wait(5) == -signal.SIGKILL and time.monotonic() - t0 < 5
        assert procs.wait_gone(kid, kid_started, 5.0)


def test_terminate_ends_the_children_a_leader_leaves_behind():
    """A leader that exits on SIGTERM without taking its children along (as `mlflow server` leaves its job
    consumers): terminate ends the rest of its session too."""
    with _session_leader(ignore_sigterm=False) as (leader, kid, kid_started):
        procs.terminate(leader.pid, procs.started_at(leader.pid), timeout=5.0)
        assert leader.wait(5) == -signal.SIGTERM
        assert procs.wait_gone(kid, kid_started, 5.0)


def test_terminate_leaves_a_reused_pid_alone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        procs.terminate(child.pid, procs.started_at(child.pid) - 60)  # recorded start != this process's
        assert child.poll() is None
    finally:
        child.kill()
        child.wait(10)
