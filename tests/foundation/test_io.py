"""Output directories: Flywheel replaces only what it wrote, never an input or the store, one writer at a time,
and a full or read-only disk is a one-line error."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel.foundation.errors import FlywheelError, InputError
from flywheel.foundation.io import MARKER, atomic_dir, check_output_dir, is_flywheel_output

ROOT = Path(__file__).resolve().parents[2]


def _write(out, name="a.txt", text="new", **kw):
    with atomic_dir(out, **kw) as tmp:
        (tmp / name).write_text(text)


def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith((".tmp-", ".old-")))


@pytest.fixture
def store(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    (home / "artifacts").mkdir(parents=True)
    (home / "mlflow.db").write_text("")
    return home


def test_foreign_directory_is_refused_and_kept(store, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "t.txt").write_text("thesis")
    with pytest.raises(InputError, match="not written by Flywheel.*--force"):
        _write(d)
    assert (d / "t.txt").read_text() == "thesis" and not _siblings(d)
    _write(d, force=True)  # asked for explicitly
    assert sorted(p.name for p in d.iterdir()) == [MARKER, "a.txt"]


def test_own_output_and_empty_dir_are_replaced(store, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _write(d, text="1", stage="mine")  # empty directory: fine
    assert is_flywheel_output(d) and (d / "a.txt").read_text() == "1"
    _write(d, name="b.txt", text="2")
    assert sorted(p.name for p in d.iterdir()) == [MARKER, "b.txt"] and not _siblings(d)


def test_file_and_symlink_are_errors(store, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    link = tmp_path / "link"
    target = tmp_path / "target"
    target.mkdir()
    link.symlink_to(target)
    for out, what in ((f, "is a file"), (link, "is a symlink")):
        with pytest.raises(InputError, match=what):
            _write(out, force=True)
    assert f.read_text() == "x" and link.is_symlink() and not any(target.iterdir())


def test_inputs_and_store_are_never_outputs(store, tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "l.jsonl").write_text("{}\n")
    for out in (logs, logs / "sub", tmp_path):
        with pytest.raises(InputError, match="overlaps the input"):
            check_output_dir(out, inputs=[logs / "l.jsonl"] if out == tmp_path else [logs], force=True)
    for out in (store, store / "artifacts", store / "artifacts" / "mine" / "x", tmp_path):
        with pytest.raises(InputError, match="overlaps the tracking store"):
            _write(out, force=True)
    assert (store / "mlflow.db").exists() and (logs / "l.jsonl").exists()
    check_output_dir(store / "eval" / "demo")  # beside the store (the default eval/gate outputs): fine
    monkeypatch.chdir(logs)
    with pytest.raises(InputError, match="current directory"):
        check_output_dir(".", force=True)


def test_git_checkout_is_never_replaced(store, tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    with pytest.raises(InputError, match="git checkout"):
        _write(repo, force=True)
    assert (repo / ".git").is_dir()


def test_stale_siblings_from_a_failed_swap_do_not_break_later_writes(store, tmp_path):
    d = tmp_path / "d"
    _write(d)
    # What a killed swap left before: `.old-<name>-<pid>` (the old fixed name) and a `.tmp-` dir, both ours.
    for stale in (f".old-d-{os.getpid()}", ".tmp-d-zz"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / MARKER).write_text('{"tool": "flywheel"}')
        (tmp_path / stale / "x").write_text("x")
    foreign = tmp_path / ".old-d-mine"
    foreign.mkdir()
    (foreign / "keep").write_text("k")
    _write(d, text="2")
    assert (d / "a.txt").read_text() == "2"
    assert _siblings(d) == [".old-d-mine"] and (foreign / "keep").exists()


def test_failed_write_leaves_old_output(store, tmp_path):
    d = tmp_path / "d"
    _write(d, text="1")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (d / "a.txt").read_text() == "1" and not _siblings(d)


def _slow_writer(out: str, tag: str, log: str) -> None:
    with atomic_dir(out) as tmp:
        with open(log, "a") as f:
            f.write(f"enter {tag}\n")
        (tmp / "who").write_text(tag)
        time.sleep(0.5)
        with open(log, "a") as f:
            f.write(f"leave {tag}\n")


def test_two_writers_are_serialised(store, tmp_path):
    out, log = tmp_path / "d", tmp_path / "log"
    ctx = mp.get_context("fork")
    ps = [ctx.Process(target=_slow_writer, args=(str(out), t, str(log))) for t in "ab"]
    for p in ps:
        p.start()
    for p in ps:
        p.join(30)
    assert [p.exitcode for p in ps] == [0, 0]
    events = log.read_text().split()
    # enter/leave pairs never interleave
    assert events[0::2] == ["enter", "leave", "enter", "leave"] and events[1] == events[3]
    assert (out / "who").read_text() == events[5] and not _siblings(out)


@pytest.fixture
def tiny_mount(tmp_path):
    """A 64 KiB tmpfs (needs root); yields (path, mount options applier)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(opts: str) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        return mnt

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_full_disk_is_one_error_naming_the_output(store, tiny_mount):
    mnt = tiny_mount("size=64k")
    with pytest.raises(FlywheelError, match=f"{mnt / 'd'}: cannot write the output: No space left"):
        _write(mnt / "d", text="x" * (1 << 20))
    assert not any(p.name.startswith(".tmp-") for p in mnt.iterdir())


def _cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "flywheel.pipelines", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_refusals_are_one_line_exit_2(tmp_path, tiny_mount):
    """`mine --out` on someone's folder, on the input folder, on the store, on a read-only disk."""
    from flywheel.mining.demo_logs import write_demo_logs

    home = tmp_path / "home"
    env = {"FLYWHEEL_HOME": str(home), "MLFLOW_TRACKING_URI": ""}
    logs = tmp_path / "logs"
    write_demo_logs(logs / "small.jsonl", n=50, seed=0)
    d = tmp_path / "d"
    d.mkdir()
    (d / "t.txt").write_text("thesis")
    home.mkdir()
    (home / "registry-like").write_text("keep")
    ro = tiny_mount("ro,size=64k")
    for out, msg in ((d, "not written by Flywheel"), (logs, "overlaps the input"), (home, "tracking store"),
                     (ro / "x", "cannot write the output here: Read-only file system")):
        r = _cli("mine", str(logs), "--out", str(out), "progress=false", env=env)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], r.stderr
    assert (d / "t.txt").read_text() == "thesis" and (logs / "small.jsonl").exists()
    assert (home / "registry-like").read_text() == "keep"


def test_demo_refuses_a_work_dir_it_did_not_write(tmp_path):
    from flywheel.pipelines.demo import run_demo

    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not written by Flywheel"):
        run_demo(work, publish_out=tmp_path / "pub", say=lambda m: None)
    assert (work / "notes.txt").read_text() == "mine"


@pytest.mark.slow  # three interpreters importing mlflow
def test_full_store_disk_is_one_line_exit_2(tmp_path, tiny_mount):
    """The store (sqlite + artifacts) on a full disk: one line naming the problem, not a traceback."""
    from flywheel.mining.demo_logs import write_demo_logs

    mnt = tiny_mount("size=4m")
    env = {"FLYWHEEL_HOME": str(mnt / "home"), "MLFLOW_TRACKING_URI": ""}
    logs = tmp_path / "logs"
    write_demo_logs(logs / "small.jsonl", n=50, seed=0)
    r = _cli("mine", str(logs), "--out", str(tmp_path / "d1"), "progress=false", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(mnt / "filler", "wb", buffering=0) as f:  # leave the store no room
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    r = _cli("mine", str(logs), "--out", str(tmp_path / "d2"), "progress=false", env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert "full" in lines[0] or "No space" in lines[0], lines[0]
