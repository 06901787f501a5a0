"""Process lifetimes: no process Flywheel starts outlives its parent, and a recorded PID is only ever signalled
while it is still the process that was recorded.

- `set_parent_death_signal` / `exit_with_parent`: a child dies with its parent. Linux delivers a signal when the
  parent dies (`prctl(PR_SET_PDEATHSIG)`); `exit_with_parent` adds a thread that polls the parent id, for other
  systems and for a parent that died before the call.
- `started_at` / `alive`: a process is identified by its PID *and* its start time, so a PID the system reused for
  another process is never taken for ours (the time matches psutil's `create_time`, so records from either agree).
- `wait_gone` / `terminate` / `kill_session`: end a recorded process, its whole session if it lingers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SAME_START_S = 1.0  # start times within this are the same process (records are rounded to clock ticks)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux); False where unsupported.

    Safe as a `subprocess.Popen(preexec_fn=...)`: it imports nothing and starts no thread."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig)) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def exit_with_parent(parent_pid: int, sig: int = signal.SIGKILL, poll_s: float = 0.5) -> None:
    """Make this process end when `parent_pid` (its parent) does: the parent-death signal where the kernel has
    one, and a daemon thread that exits once the parent id changes (reparented to init or a subreaper). A pool
    initializer: a `kill -9` of the parent would otherwise leave its workers running."""
    set_parent_death_signal(sig)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(1)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


# -- identity: PID + start time -------------------------------------------------------------------------------

def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text(encoding="utf-8").splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("/proc/stat has no btime")


def _linux_state(pid: int) -> tuple[float, bool] | None:
    """(start time as seconds since the epoch, is a zombie), or None when there is no such process."""
    fields = _proc_stat(pid)
    if fields is None:
        return None
    # After the name: state is field 3 of proc(5), starttime (clock ticks since boot) field 22.
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK"), fields[0] == "Z"


def _psutil_state(pid: int) -> tuple[float, bool] | None:
    import psutil  # systems without /proc

    try:
        p = psutil.Process(pid)
        return p.create_time(), p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return None


def _state(pid: int) -> tuple[float, bool] | None:
    if pid <= 0:
        return None
    return _linux_state(pid) if Path("/proc/self/stat").exists() else _psutil_state(pid)


def started_at(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is no such process."""
    st = _state(pid)
    return st[0] if st else None


def alive(pid: int | None, started: float | None) -> bool:
    """Process `pid` is still the one that started at `started`, and is not a zombie."""
    if not pid or started is None:
        return False
    st = _state(pid)
    return st is not None and abs(st[0] - started) < SAME_START_S and not st[1]


def wait_gone(pid: int, started: float | None, timeout: float) -> bool:
    """Wait up to `timeout` s for the recorded process to end; True when it has."""
    deadline = time.monotonic() + timeout
    while alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid, started)


def kill_session(pid: int) -> None:
    """SIGKILL the session (process group) led by `pid`, e.g. workers left behind by a server started with
    `start_new_session=True` that died; nothing when it is gone or not ours."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(pid: int, started: float | None, timeout: float = 30.0) -> None:
    """SIGTERM the recorded process (a session leader), then the rest of its session: children that do not follow
    their leader (the job consumers `mlflow server` starts) must not outlive it. SIGKILL whatever lingers after
    `timeout` s. Nothing when it is no longer the recorded process."""
    if not alive(pid, started):
        return
    os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, started, timeout):
        kill_session(pid)
        wait_gone(pid, started, 5.0)
        return
    # The leader is gone; its group id cannot be reused while members are left, so this reaches only them.
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    kill_session(pid)

