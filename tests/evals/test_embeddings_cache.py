"""Embedding cache: identical vectors on reuse, per-text reuse across overlapping sets, concurrent-safe shards."""

from __future__ import annotations

import numpy as np

from flywheel.evals.embeddings.cache import EmbeddingCache, RecordCache


class Encoder:
    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, texts):
        self.seen += texts
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts]).astype("f4")


def test_second_lookup_encodes_nothing_and_returns_identical_vectors(tmp_path):
    enc = Encoder()
    a, s = EmbeddingCache("m|1", root=tmp_path).encode(["x", "y", "x"], enc)
    assert s == {"cached": 0, "encoded": 2, "encode_s": s["encode_s"]} and enc.seen == ["x", "y"]
    b, s2 = EmbeddingCache("m|1", root=tmp_path).encode(["x", "y", "x"], enc)  # a fresh instance reads the disk
    assert s2["encoded"] == 0 and s2["cached"] == 2 and len(enc.seen) == 2
    assert np.array_equal(a, b) and np.array_equal(a[0], a[2])


def test_partial_reuse_and_model_identity(tmp_path):
    enc = Encoder()
    EmbeddingCache("m|1", root=tmp_path).encode(["x", "y"], enc)
    _, s = EmbeddingCache("m|1", root=tmp_path).encode(["y", "z"], enc)
    assert s["encoded"] == 1 and enc.seen[-1] == "z"
    _, s = EmbeddingCache("m|2", root=tmp_path).encode(["y"], enc)  # another model version: nothing shared
    assert s["encoded"] == 1
    # a killed writer's orphan npy (no keys file) is ignored
    d = EmbeddingCache("m|1", root=tmp_path).dir
    (d / "orphan.npy").write_bytes(b"junk")
    _, s = EmbeddingCache("m|1", root=tmp_path).encode(["x", "y", "z"], enc)
    assert s["encoded"] == 0


def test_disabled_cache_writes_nothing(tmp_path):
    v, s = EmbeddingCache("m", root=tmp_path, enabled=False).encode(["a", "b", "a"], Encoder())
    assert v.shape == (3, 8) and s["encoded"] == 2 and not any(tmp_path.iterdir())


def test_record_cache(tmp_path):
    rc = RecordCache(root=tmp_path)
    assert rc.get("k") is None
    rc.put("k", {"texts_per_s": 1.5})
    assert RecordCache(root=tmp_path).get("k") == {"texts_per_s": 1.5}
    assert RecordCache(root=tmp_path, enabled=False).get("k") is None
