"""Exact + near (MinHash LSH, datasketch) dedupe into clusters; each cluster keeps its best-rated member.

Records arrive one at a time (in input order, so results are deterministic). A record joins:
- the cluster of an earlier record with the same normalised text (`exact`), else
- the cluster whose representative's signature is the most similar above `threshold` among the LSH
  candidates (`near`; the LSH only proposes, the estimated Jaccard on the stored signatures decides, because
  datasketch's banding alone misses or over-reports pairs near the threshold), else
- a new cluster of its own (`new`), whose signature is inserted into the LSH.

Only representatives enter the LSH, so memory is O(clusters), not O(records): a 12-byte key per distinct text,
a uint32[num_perm] signature and the LSH band keys per cluster. Who wins is decided at the end (`winner`):
highest rating, then the earliest record, so the same input always keeps the same member.
"""

from __future__ import annotations

from typing import Any

SCHEME = "affine32"  # datasketch 2.x default MinHash scheme (uint32 hash values); signatures come from it


class Deduper:
    def __init__(self, near: bool = True, threshold: float = 0.8, num_perm: int = 128):
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
        self._lsh = None
        if near:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def __len__(self) -> int:
        return len(self.best_seq)

    def add(self, seq: int, key: bytes, sig: Any, rating: int, rec_id: str, group: str) -> tuple[int, str]:
        """Place record `seq`; returns (cluster index, how it joined: 'new' | 'exact' | 'near')."""
        c = self.by_key.get(key)
        how = "exact"
        if c is None and self._lsh is not None and sig is not None:
            c = self._query(sig)
            how = "near"
            if c is not None:
                self.by_key[key] = c  # later exact copies of this variant land in the same cluster directly
        if c is None:
            c = len(self.best_seq)
            self.by_key[key] = c
            self.best_rating.append(rating)
            self.best_seq.append(seq)
            self.best_key.append(key)
            self.rep_id.append(rec_id)
            self.rep_group.append(group)
            if self._lsh is not None and sig is not None:
                from datasketch import LeanMinHash

                self.sigs.append(sig)
                self._lsh.insert(c, LeanMinHash(seed=1, hashvalues=sig, scheme=SCHEME), check_duplication=False)
            else:
                self.sigs.append(None)
            return c, "new"
        if rating > self.best_rating[c]:
            self.best_rating[c] = rating
            self.best_seq[c] = seq
            self.best_key[c] = key
        return c, how

    def _query(self, sig: Any) -> int | None:
        from datasketch import LeanMinHash

        cands = self._lsh.query(LeanMinHash(seed=1, hashvalues=sig, scheme=SCHEME))
        best, best_j = None, self.threshold
        for c in sorted(cands):
            j = float((self.sigs[c] == sig).mean())
            if j >= best_j and (best is None or j > best_j):
                best, best_j = c, j
        return best

    def winner(self, cluster: int) -> int:
        return self.best_seq[cluster]

    def duplicate_reason(self, cluster: int, key: bytes) -> str:
        """Why a losing member was dropped: same normalised text as the winner, or only similar."""
        return "duplicate" if key == self.best_key[cluster] else "near_duplicate"
