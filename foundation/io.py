"""Small I/O helpers every stage shares: atomic outputs, hashing, JSONL."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def flywheel_home() -> Path:
    """Where Flywheel writes by default: `FLYWHEEL_HOME`, else `.flywheel` in the working directory."""
    return Path(os.environ.get("FLYWHEEL_HOME", ".flywheel")).resolve()


def home_path(*parts: str) -> str:
    """A default output path: everything Flywheel writes by default lives under one home (FLYWHEEL_HOME)."""
    return str(flywheel_home().joinpath(*parts))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dumps(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces, UTF-8 kept) so equal content gives equal bytes."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# Every directory atomic_dir writes carries this file: it is how Flywheel knows a directory is its own output and
# may be replaced. Anything without it (a thesis folder, a repo root, another model's Modelfile) is left alone.
MARKER = ".flywheel-output.json"

# errno values that mean "the output location cannot take the write", whatever file was being written.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def is_flywheel_output(path: str | Path) -> bool:
    try:
        m = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("tool") == "flywheel"


def mark_output(path: str | Path, stage: str | None = None) -> None:
    """Write the marker that lets a later run replace `path` (atomic_dir does this itself)."""
    (Path(path) / MARKER).write_text(dumps({"tool": "flywheel", "stage": stage}) + "\n", encoding="utf-8")


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(out: str | Path, *, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse an output directory Flywheel must not replace; returns it resolved.

    Always refused: a file or symlink; the current directory or one of its parents; a git checkout's root; a
    directory that contains, or is inside, an input or the tracking store. A non-empty directory without
    Flywheel's marker is refused unless `force`. An empty directory or an earlier Flywheel output is fine.
    """
    from flywheel.foundation.errors import InputError

    p = Path(out)
    if p.is_symlink():
        raise InputError(f"{out}: is a symlink; give a directory path for the output")
    if p.exists() and not p.is_dir():
        raise InputError(f"{out}: is a file; give a directory path for the output")
    res = p.resolve()
    if _within(Path.cwd().resolve(), res):
        raise InputError(f"{out}: is the current directory or contains it; give a new directory for the output")
    for i in inputs:
        ip = Path(i).resolve()
        if _within(ip, res) or _within(res, ip):
            raise InputError(f"{out}: overlaps the input {i}; write the output somewhere else")
    for sp, no_inside in _store_paths():
        if _within(sp, res) or (no_inside and _within(res, sp)):
            raise InputError(f"{out}: overlaps the tracking store {sp}; write the output somewhere else")
    if p.is_dir():
        if (p / ".git").exists():
            raise InputError(f"{out}: is a git checkout; write the output somewhere else")
        if not force and not is_flywheel_output(p) and any(p.iterdir()):
            raise InputError(f"{out}: exists and was not written by Flywheel (no {MARKER}); "
                             "choose a new or empty directory, or pass --force to replace it")
    return res


# Where the tracking store lives is the shell's business (FLYWHEEL_HOME, MLFLOW_TRACKING_URI): the shell's tracking
# module registers a function here when it is imported, so this layer never imports the one above it.
_PROTECTED: list[Callable[[], list[tuple[Path, bool]]]] = []


def protect_paths(fn: Callable[[], list[tuple[Path, bool]]]) -> None:
    """Register `fn() -> [(path, no_inside)]`: outputs must not be or contain `path` (with no_inside, nor be in it)."""
    if fn not in _PROTECTED:
        _PROTECTED.append(fn)


def _store_paths() -> list[tuple[Path, bool]]:
    return [p for fn in _PROTECTED for p in fn()]


def _clean_stale(final: Path) -> None:
    """Remove `.tmp-*`/`.old-*` siblings a killed or failed earlier write of `final` left (only marked ones)."""
    for pattern in (f".tmp-{final.name}-*", f".old-{final.name}-*"):
        for d in final.parent.glob(pattern):
            if d.is_dir() and not d.is_symlink() and is_flywheel_output(d):
                shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = True, *, force: bool = False,
               inputs: Iterable[str | Path] = (), stage: str | None = None) -> Iterator[Path]:
    """Yield a temp dir next to `final`; on success it replaces `final` in one rename, on error it vanishes.

    `final` is checked first (`check_output_dir`): only an empty directory or an earlier Flywheel output is
    replaced unless `force`. Writers of the same `final` are serialised by a lock file `.<name>.output.lock`
    beside it.
    A killed run leaves at most a marked `.tmp-*`/`.old-*` sibling, never a half-written `final`; the next write
    removes those. A full disk or read-only location is a one-line FlywheelError naming `final`.
    """
    from filelock import FileLock

    from flywheel.foundation.errors import FlywheelError

    final = Path(final)
    inputs = list(inputs)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(final.parent / f".{final.name}.output.lock")
        lock.acquire()
    except OSError as e:
        raise FlywheelError(f"{final}: cannot write the output here: {e.strerror or e}") from None
    try:
        check_output_dir(final, inputs=inputs, force=force)
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} already exists")
        _clean_stale(final)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
            mark_output(tmp, stage)
        except OSError as e:
            raise FlywheelError(f"{final}: cannot write the output here: {e.strerror or e}") from None
        try:
            yield tmp
            if not (tmp / MARKER).exists():  # the stage emptied its temp dir: the output is still ours
                mark_output(tmp, stage)
            if final.exists():
                old = final.with_name(f".old-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                final.rename(old)
                try:
                    tmp.rename(final)
                except BaseException:
                    old.rename(final)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and (e.errno in _WRITE_ERRNOS or _names_inside(e, tmp)):
                raise FlywheelError(f"{final}: cannot write the output: {e.strerror or e}") from None
            raise
    finally:
        lock.release()


def _names_inside(e: OSError, tmp: Path) -> bool:
    """Whether the failed call was on a file of the output being written (not, say, an input being read)."""
    return any(f is not None and _within(Path(os.path.abspath(f)), tmp.absolute())
               for f in (e.filename, e.filename2))


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as canonical JSONL (atomically); returns the count."""
    n = 0
    lines = []
    for r in rows:
        lines.append(dumps(r))
        n += 1
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return n


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad JSON or a non-object is an InputError naming file:line."""
    from flywheel.foundation.errors import InputError

    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            yield i, obj


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file of objects; errors name file and line."""
    return [obj for _, obj in iter_jsonl(path)]


def read_json(path: str | Path, *, expect: type = dict) -> Any:
    """Parse a JSON file: a missing file, bad JSON (with its line) or another top-level type is one InputError."""
    from flywheel.foundation.errors import InputError

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read ({e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, expect):
        raise InputError(f"{p}: expected a JSON {expect.__name__}, got {type(obj).__name__}")
    return obj
