"""On-disk embedding cache keyed by model identity + text hash.

Layout: `$FLYWHEEL_CACHE/embeddings/vectors/<sha256(identity)[:20]>/` holds shards: `<id>.npy` (float32 rows) and
`<id>.keys.json` (the sha256 of each row's text). A shard is written npy-first, keys last, each atomically; the
keys file is the commit point, so a killed run leaves at most an orphan npy and concurrent writers never clash
(shard ids are unique). Lookups are per text: a second benchmark on an overlapping corpus (another `max_docs`,
a grown domain dataset) only encodes the new texts. Cached vectors are the exact float32 values the first run
used, so a warm run reproduces every metric bit for bit.

The model identity is the catalog name + package version + preparation version (or a local directory's weight
fingerprint): a new model version never reads stale vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from flywheel.foundation.io import atomic_write_text


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def vectors_root() -> Path:
    from flywheel.evals.embeddings.models import cache_root

    return cache_root() / "embeddings" / "vectors"


class EmbeddingCache:
    def __init__(self, identity: str, root: Path | None = None, enabled: bool = True):
        self.identity = identity
        self.enabled = enabled
        self.dir = (root or vectors_root()) / hashlib.sha256(identity.encode()).hexdigest()[:20]
        self._index: dict[str, tuple[str, int]] | None = None
        self._arrays: dict[str, np.ndarray] = {}

    # -- index of what is on disk
    def _load_index(self) -> dict[str, tuple[str, int]]:
        if self._index is None:
            self._index = {}
            if self.enabled and self.dir.exists():
                for kf in sorted(self.dir.glob("*.keys.json")):
                    shard = kf.name[: -len(".keys.json")]
                    try:
                        keys = json.loads(kf.read_text())
                    except (OSError, ValueError):
                        continue  # a damaged shard is ignored: its texts are simply encoded again
                    for row, k in enumerate(keys):
                        self._index.setdefault(k, (shard, row))
        return self._index

    def _array(self, shard: str) -> np.ndarray:
        if shard not in self._arrays:
            self._arrays[shard] = np.load(self.dir / f"{shard}.npy", mmap_mode="r")
        return self._arrays[shard]

    def _write_shard(self, keys: list[str], vecs: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "identity.txt").exists():  # for humans browsing the cache
            atomic_write_text(self.dir / "identity.txt", self.identity + "\n")
        shard = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        tmp = self.dir / f".tmp-{shard}.npy"
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(vecs, dtype=np.float32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / f"{shard}.npy")
        atomic_write_text(self.dir / f"{shard}.keys.json", json.dumps(keys))
        index = self._load_index()
        for row, k in enumerate(keys):
            index.setdefault(k, (shard, row))

    def _gather(self, locs: list[tuple[str, int]]) -> np.ndarray:
        if not locs:
            return np.zeros((0, 0), dtype=np.float32)
        by_shard: dict[str, list[int]] = {}
        for pos, (shard, _) in enumerate(locs):
            by_shard.setdefault(shard, []).append(pos)
        dim = self._array(locs[0][0]).shape[1]
        out = np.empty((len(locs), dim), dtype=np.float32)
        for shard, positions in by_shard.items():
            out[positions] = self._array(shard)[[locs[p][1] for p in positions]]
        return out

    def encode(self, texts: Sequence[str], encode_fn: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, dict]:
        """Vectors for `texts` (in order), encoding only the ones not cached. Returns (array, stats).

        stats: `cached`, `encoded` (unique texts), `encode_s` (seconds spent in encode_fn).
        """
        keys = [text_key(t) for t in texts]
        index = self._load_index() if self.enabled else {}
        missing: dict[str, str] = {}
        for k, t in zip(keys, texts):
            if k not in index and k not in missing:
                missing[k] = t
        encode_s = 0.0
        fresh: dict[str, np.ndarray] = {}
        if missing:
            mkeys = list(missing)
            t0 = time.perf_counter()
            vecs = np.asarray(encode_fn([missing[k] for k in mkeys]), dtype=np.float32)
            encode_s = time.perf_counter() - t0
            if self.enabled:
                self._write_shard(mkeys, vecs)
            else:
                fresh = {k: vecs[i] for i, k in enumerate(mkeys)}
        if self.enabled:
            index = self._load_index()
            out = self._gather([index[k] for k in keys])
        else:
            out = np.stack([fresh[k] for k in keys]) if keys else np.zeros((0, 0))
        return np.asarray(out, dtype=np.float32), {"cached": len(set(keys)) - len(missing), "encoded": len(missing),
                                                   "encode_s": encode_s}


class RecordCache:
    """Small JSON records (speed measurements) keyed by a string; same root as the vectors."""

    def __init__(self, root: Path | None = None, enabled: bool = True):
        self.dir = (root or vectors_root().parent) / "records"
        self.enabled = enabled

    def _path(self, key: str) -> Path:
        return self.dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def get(self, key: str) -> dict | None:
        if not self.enabled:
            return None
        try:
            rec = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        return rec.get("value") if rec.get("key") == key else None

    def put(self, key: str, value: dict) -> None:
        if self.enabled:
            atomic_write_text(self._path(key), json.dumps({"key": key, "value": value}, sort_keys=True))
