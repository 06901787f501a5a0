"""Flywheel's on-disk caches: small JSON records (`JsonCache`) and prepared models (`build_once`).

JSON records (generations, NLLs, similarities, speed measurements):
Layout `root/<kind>/<key[:2]>/<key>.json`, one file per key, each written atomically: concurrent runs never see a
half-written record, and a killed run loses at most the record it was writing. A record that cannot be read is a
miss, never an error: the value is simply computed again. Keys are the sha256 of the canonical JSON of everything
that changes the value (`JsonCache.key(...)`), so equal inputs find the same file across runs and machines.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from flywheel.foundation.io import atomic_write_text, dumps, sha256_text


class JsonCache:
    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return sha256_text(dumps(list(parts)))

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.json"

    def get(self, kind: str, key: str) -> Any:
        if not self.enabled:
            self.misses += 1
            return None
        try:
            value = json.loads(self._path(kind, key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, kind: str, key: str, value: Any) -> None:
        if self.enabled:
            atomic_write_text(self._path(kind, key), json.dumps(value, ensure_ascii=False))


# -- prepared models: built once per machine, shared by every process ------------------------------------------

def cache_root() -> Path:
    """Where prepared models, embedding vectors and records live: `$FLYWHEEL_CACHE`, default ~/.cache/flywheel."""
    env = os.environ.get("FLYWHEEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flywheel"


def build_once(final: Path, ready: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """Return `final`, building it first if `ready(final)` is false, exactly once across processes.

    The build writes into a temp dir beside `final` and is published by one rename, so a reader sees no directory
    or a complete one; a killed build leaves only a `.tmp-*` sibling. Concurrent first users wait on a file lock
    (the `filelock` package; the kernel releases it when its holder dies, kill -9 included) and then find the
    finished directory. A `final` that exists but is not ready (an older preparation, a corrupt file) lives inside
    Flywheel's own cache and is rebuilt.
    """
    from filelock import FileLock

    final = Path(final)
    if ready(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if ready(final):  # another process finished it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is shared by the user's processes and tools
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
