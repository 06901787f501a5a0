"""Exact + near (MinHash LSH, datasketch) dedupe into clusters; each cluster keeps its best-rated member.

Records arrive one at a time (in input order, so results are deterministic). A record joins:
- the cluster of an earlier record with the same normalised text (`exact`), else
- the cluster whose representative's signature is the most similar above `threshold` among the LSH
  candidates (`near`; the LSH only proposes, the estimated Jaccard on the stored signatures decides, because
  datasketch's banding alone misses or over-reports pairs near the threshold), else
- a new cluster of its own (`new`), whose signature is inserted into the LSH.

Only representatives enter the LSH, so memory is O(clusters), not O(records): a 12-byte key per distinct text,
a uint32[num_perm] signature and the LSH band keys per cluster.

The signatures are datasketch MinHashes (computed in the worker processes); the banding uses datasketch's own
parameter search, weighted towards recall (false negatives cost 4x false positives) because the stored
signatures verify every candidate anyway. The band index itself is a dict per band in this process:
datasketch's `MinHashLSH` wraps every query in a `LeanMinHash` and was the bottleneck of the whole stage.

Who wins is decided at the end (`winner`): highest rating, then the earliest record, so the same input always
keeps the same member.

Across runs (the scheduled loop mines one batch at a time): a `DedupeIndex` holds the exact keys and the
signatures of what earlier batches kept. Given as `prior`, its entries are clusters no new record can win, so a
conversation an earlier batch kept is dropped as `duplicate_earlier_batch`; `Deduper.index()` is the updated index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.foundation.errors import InputError

EARLIER = "duplicate_earlier_batch"


@dataclass
class DedupeIndex:
    """Exact keys and MinHash signatures (uint32[num_perm]) of what earlier batches kept."""
    num_perm: int
    shingle: int
    keys: list[bytes] = field(default_factory=list)
    sigs: list[Any] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        """Write `path` (.npz) atomically: a temp file beside it, then one rename."""
        import numpy as np

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        keys = np.frombuffer(b"".join(self.keys), dtype=np.uint8).reshape(len(self.keys), -1) if self.keys \
            else np.zeros((0, 12), dtype=np.uint8)
        sigs = np.stack(self.sigs).astype(np.uint32) if self.sigs else np.zeros((0, self.num_perm), np.uint32)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, keys=keys, sigs=sigs, meta=np.array([self.num_perm, self.shingle]))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> "DedupeIndex":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as z:
                num_perm, shingle = (int(x) for x in z["meta"])
                return cls(num_perm, shingle, [bytes(k) for k in z["keys"]], list(z["sigs"]))
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: not a readable dedupe index ({e}); delete it to start a fresh one") from None

    def check(self, num_perm: int, shingle: int, path: str | Path = "dedupe index") -> None:
        if (self.num_perm, self.shingle) != (num_perm, shingle):
            raise InputError(f"{path}: built with dedupe num_perm={self.num_perm}, shingle={self.shingle}; this "
                             f"run uses num_perm={num_perm}, shingle={shingle} (signatures would not compare); "
                             "use the same settings or delete it to start a fresh index")


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): datasketch's parameter search, recall weighted 4:1 (see module doc)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.2, 0.8)


class Deduper:
    def __init__(self, near: bool = True, threshold: float = 0.8, num_perm: int = 128,
                 prior: DedupeIndex | None = None):
        self.near = near
        self.threshold = threshold
        self.num_perm = num_perm
        self.by_key: dict[bytes, int] = {}
        self.best_rating: list[int] = []
        self.best_seq: list[int] = []
        self.best_key: list[bytes] = []
        self.rep_id: list[str] = []
        self.rep_group: list[str] = []
        self.sigs: list[Any] = []
        self._bands: list[dict[bytes, list[int]]] = []
        self._r = 0
        if near:
            b, self._r = lsh_bands(threshold, num_perm)
            self._bands = [{} for _ in range(b)]
        self.n_prior = 0
        self._prior_sigs: list[Any] = []
        if prior is not None:
            self._add_prior(prior)

    def _add_prior(self, prior: DedupeIndex) -> None:
        """Earlier batches' clusters: rated above any record (never won by one) and with no member here.
        Cluster 0 holds all their exact keys; each signature is a cluster of its own (with near-dedupe on)."""
        self._prior_sigs = list(prior.sigs)
        self._new_cluster(-1, b"", None, 1 << 30, "", "")
        self.by_key.update(dict.fromkeys(prior.keys, 0))
        for sig in self._prior_sigs if self._bands else []:
            self._new_cluster(-1, b"", sig, 1 << 30, "", "")
        self.n_prior = len(self.best_seq)

    def _new_cluster(self, seq: int, key: bytes, sig: Any, rating: int, rec_id: str, group: str,
                     keys: list[bytes] | None = None) -> int:
        c = len(self.best_seq)
        self.best_rating.append(rating)
        self.best_seq.append(seq)
        self.best_key.append(key)
        self.rep_id.append(rec_id)
        self.rep_group.append(group)
        self.sigs.append(sig if self._bands else None)
        if self._bands and sig is not None:
            for table, k in zip(self._bands, keys or self._band_keys(sig)):
                table.setdefault(k, []).append(c)
        return c

    def __len__(self) -> int:
        return len(self.best_seq)

    def add(self, seq: int, key: bytes, sig: Any, rating: int, rec_id: str, group: str) -> tuple[int, str]:
        """Place record `seq`; returns (cluster index, how it joined: 'new' | 'exact' | 'near')."""
        c, how, keys = self._find(key, sig)
        if c is None:
            c = self._new_cluster(seq, key, sig, rating, rec_id, group, keys)
            self.by_key[key] = c
            return c, "new"
        if rating > self.best_rating[c]:
            self.best_rating[c] = rating
            self.best_seq[c] = seq
            self.best_key[c] = key
        return c, how

    def _find(self, key: bytes, sig: Any) -> tuple[int | None, str, list[bytes] | None]:
        """(the cluster a new record joins or None, 'exact' | 'near', its band keys when computed)."""
        c = self.by_key.get(key)
        how, keys = "exact", None
        if c is None and self._bands and sig is not None:
            keys = self._band_keys(sig)
            c = self._query(sig, keys)
            how = "near"
            if c is not None:
                self.by_key[key] = c  # later exact copies of this variant land in the same cluster directly
        return c, how, keys

    def _band_keys(self, sig: Any) -> list[bytes]:
        r = self._r
        return [sig[i * r:(i + 1) * r].tobytes() for i in range(len(self._bands))]

    def _query(self, sig: Any, keys: list[bytes]) -> int | None:
        cands: set[int] = set()
        for table, k in zip(self._bands, keys):
            hit = table.get(k)
            if hit:
                cands.update(hit)
        best, best_j = None, self.threshold
        for c in sorted(cands):
            j = float((self.sigs[c] == sig).mean())
            if j >= best_j and (best is None or j > best_j):
                best, best_j = c, j
        return best

    def winner(self, cluster: int) -> int:
        return self.best_seq[cluster]

    def duplicate_reason(self, cluster: int, key: bytes) -> str:
        """Why a losing member was dropped: an earlier batch kept it, same normalised text as the winner, or only
        similar."""
        if cluster < self.n_prior:
            return EARLIER
        return "duplicate" if key == self.best_key[cluster] else "near_duplicate"

    def index(self, shingle: int) -> DedupeIndex:
        """The prior index plus this run's clusters: every exact key seen and every representative's signature."""
        new = [s for s in self.sigs[self.n_prior:] if s is not None]
        return DedupeIndex(self.num_perm, shingle, list(self.by_key), self._prior_sigs + new)
