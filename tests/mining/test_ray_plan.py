"""The Ray engine's pieces that need no Ray: line blocks, and the near-dedupe rule replayed from pairs."""

from __future__ import annotations

import random

import numpy as np

from flywheel.mining import readers
from flywheel.mining.config import MineConfig
from flywheel.mining.dedupe import Deduper, lsh_bands
from flywheel.mining.ray_engine import PlannedDeduper, plan_near


def test_line_blocks_cover_the_file_as_iter_raw_lines_counts_it(tmp_path):
    p = tmp_path / "x.jsonl"
    # blank lines, a giant line and no final newline: the numbering must match a whole-file read
    p.write_bytes(b'{"a": 1}\n\n' + b"x" * 5000 + b'\n{"b": 2}\n   \n{"c": 3}\n{"d": 4}')
    whole = list(readers.iter_raw_lines(p, 1000))
    for size in (1, 7, 64, 10_000):
        parts = [x for a, f, n in readers.line_blocks(p, size)
                 for x in readers.iter_raw_lines(p, 1000, a, f, n)]
        assert parts == whole


def _sigs(n: int, num_perm: int, seed: int) -> list[np.ndarray]:
    """Families of signatures at varying distances, so chains a~b~c with a !~ c occur."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if out and rng.random() < 0.7:
            s = out[rng.integers(len(out))].copy()
            flip = rng.choice(num_perm, size=rng.integers(0, num_perm // 4), replace=False)
            s[flip] = rng.integers(0, 2**32, size=len(flip), dtype=np.uint32)
        else:
            s = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)
        out.append(s.astype(np.uint32))
    return out


def test_planned_clusters_equal_the_incremental_deduper():
    """Pairs from LSH buckets with verified Jaccard, replayed by `plan_near`, give the local engine's clusters and
    winners: same function, not connected components."""
    cfg = MineConfig()
    num_perm, thr = cfg.dedupe.num_perm, cfg.dedupe.threshold
    bands, rows = lsh_bands(thr, num_perm)
    for seed in range(3):
        rnd = random.Random(seed)
        sigs = _sigs(400, num_perm, seed)
        recs = [(f"k{rnd.randrange(380)}".encode(), s, rnd.randint(1, 5)) for s in sigs]  # some exact repeats
        local = Deduper(near=True, threshold=thr, num_perm=num_perm)
        want = [local.add(q, k, s, r, f"id{q}", "g") for q, (k, s, r) in enumerate(recs, 1)]
        first: dict[bytes, tuple[int, np.ndarray]] = {}
        for q, (k, s, _) in enumerate(recs):
            first.setdefault(k, (q, s))
        buckets: dict[bytes, list] = {}
        for k, (q, s) in first.items():
            for b in range(bands):
                buckets.setdefault(b.to_bytes(2, "big") + s[b * rows:(b + 1) * rows].tobytes(), []).append((q, k, s))
        pairs = [{"u_ord": u[0], "u_key": u[1], "v_ord": v[0], "v_key": v[1], "j": float((v[2] == u[2]).mean())}
                 for members in buckets.values() for u in members for v in members
                 if v[0] < u[0] and float((v[2] == u[2]).mean()) >= thr]
        planned = PlannedDeduper(plan_near(iter(pairs)), cfg)
        got = [planned.add(q, k, s.tobytes(), r, f"id{q}", "g") for q, (k, s, r) in enumerate(recs, 1)]
        assert got == want
        assert sum(how == "near" for _, how in want) > 10  # the case is not trivial
        assert [local.winner(c) for c in range(len(local))] == [planned.winner(c) for c in range(len(planned))]
