"""One on-disk cache for small JSON records (generations, NLLs, similarities, speed measurements).

Layout `root/<kind>/<key[:2]>/<key>.json`, one file per key, each written atomically: concurrent runs never see a
half-written record, and a killed run loses at most the record it was writing. A record that cannot be read is a
miss, never an error: the value is simply computed again. Keys are the sha256 of the canonical JSON of everything
that changes the value (`JsonCache.key(...)`), so equal inputs find the same file across runs and machines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
