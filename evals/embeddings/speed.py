"""Speed and cost of one model: throughput, single-query latency, peak memory, index build and search time.

Warm-up (the first encode call: lazy allocations, tokenizer caches, thread pools) is timed and reported
separately and excluded from every other number. Throughput is `model.encode` over a sample of the task's own
texts at the benchmark's batch size (document length matters: medline abstracts are ~10x an STS sentence).
Latency is one text per call, the way a semantic cache or a RAG query sees the model.
Memory is the process RSS sampled every 5 ms (psutil): `peak_rss_mb` while the model is loaded and encoding;
`model_rss_mb` is the growth over the RSS before the model was loaded.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import numpy as np


class PeakRSS:
    """Context manager sampling this process's RSS in a thread; `.peak_mb`, `.start_mb`."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.start_mb = self.peak_mb = self._proc.memory_info().rss / 1e6
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 1e6)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 1e6)


def warm_up(model, texts: Sequence[str], batch_size: int) -> float:
    t0 = time.perf_counter()
    model.encode(list(texts[:batch_size]) or ["warm-up"], batch_size=batch_size, show_progress_bar=False)
    return time.perf_counter() - t0


def throughput(model, texts: Sequence[str], batch_size: int) -> dict[str, float]:
    t0 = time.perf_counter()
    model.encode(list(texts), batch_size=batch_size, show_progress_bar=False)
    dt = time.perf_counter() - t0
    return {"texts_per_s": len(texts) / dt if dt > 0 else float("nan"), "throughput_texts": len(texts),
            "throughput_s": dt}


def latency(model, texts: Sequence[str]) -> dict[str, float]:
    times = []
    for t in texts:
        t0 = time.perf_counter()
        model.encode([t], batch_size=1, show_progress_bar=False)
        times.append((time.perf_counter() - t0) * 1000)
    a = np.asarray(times)
    return {"latency_p50_ms": float(np.percentile(a, 50)), "latency_p95_ms": float(np.percentile(a, 95)),
            "latency_n": len(times)}


def index_timing(query_emb: np.ndarray, doc_emb: np.ndarray, k: int = 100) -> dict[str, float]:
    """Exhaustive cosine index: build = normalise + pack the doc matrix; search = top-k for every query."""
    from flywheel.evals.embeddings.retrieval import normalize

    t0 = time.perf_counter()
    d = np.ascontiguousarray(normalize(doc_emb))
    build = time.perf_counter() - t0
    q = normalize(query_emb)
    t0 = time.perf_counter()
    sims = q @ d.T
    kk = min(k, d.shape[0])
    np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    search = time.perf_counter() - t0
    return {"index_build_ms": build * 1000, "search_ms_per_query": search * 1000 / max(len(q), 1)}


def sample_texts(texts: Sequence[str], n: int, seed: int = 0) -> list[str]:
    if len(texts) <= n:
        return list(texts)
    rng = np.random.default_rng(seed)
    return [texts[i] for i in sorted(rng.choice(len(texts), n, replace=False))]
