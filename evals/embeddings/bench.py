"""The embedding benchmark's core: one model on one task (quality + speed), all pairs compared, a leaderboard.

Plain functions over plain data; the `flywheel bench-embeddings` shell adds config loading, progress bars and
MLflow. `run_matrix` is the whole computation: resolve tasks and models, bench every model x task through the
vector cache, then compare and rank.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flywheel.evals.embeddings.config import DEFAULT_DATA_DIR, EmbeddingsConfig
from flywheel.foundation.errors import InputError

# Leaderboard columns in contract order; extras follow.
METRIC_COLUMNS = ["ndcg@10", "mrr@10", "map@100", "recall@1", "recall@5", "recall@10", "recall@100", "spearman",
                  "pearson", "texts_per_s", "latency_p50_ms", "latency_p95_ms", "dims"]
EXTRA_COLUMNS = ["vs_best", "ndcg@10_ci_low", "ndcg@10_ci_high", "spearman_ci_low", "spearman_ci_high", "n",
                 "size_mb", "peak_rss_mb", "model_rss_mb", "load_s", "warmup_s", "index_build_ms",
                 "search_ms_per_query", "dup_threshold_at_target", "dup_recall_at_target", "dup_best_f1",
                 "dup_best_f1_threshold", "dup_precision_at_fixed", "dup_recall_at_fixed"]
COLUMNS = ["model", "task"] + METRIC_COLUMNS + EXTRA_COLUMNS
PRIMARY = {"retrieval": "ndcg@10", "sts": "spearman"}
SPEED_VERSION = 2  # bump when what a speed record means changes: old records are then re-measured
WARMUP_TEXTS = ["warm-up", "a second, somewhat longer warm-up sentence for the tokenizer and the pools"] * 4

# progress(description, done): called before each model x task with done=False and after it with done=True
Progress = Callable[[str, bool], None]


class LazyModel:
    """Loads the SentenceTransformer on first use only: a fully cached run never pays the load."""

    def __init__(self, name: str):
        self.name = name
        self.model = None
        self.load_s: float | None = None
        self.model_rss_mb: float | None = None
        self.warmup_s: float | None = None

    def get(self):
        if self.model is None:
            from flywheel.evals.embeddings.models import load_with_info
            from flywheel.evals.embeddings.speed import PeakRSS

            t0 = time.perf_counter()
            with PeakRSS() as mem:
                self.model, _ = load_with_info(self.name)
            self.load_s = time.perf_counter() - t0
            self.model_rss_mb = mem.peak_mb - mem.start_mb
            # The very first encode pays lazy allocations and thread-pool start-up: timed here, reported as
            # warmup_s, and kept out of every throughput/latency number.
            t0 = time.perf_counter()
            self.model.encode(WARMUP_TEXTS, show_progress_bar=False)
            self.warmup_s = time.perf_counter() - t0
        return self.model

    def encode_fn(self, batch_size: int):
        return lambda texts: self.get().encode(texts, batch_size=batch_size, show_progress_bar=False,
                                               convert_to_numpy=True)

    def close(self) -> None:
        self.model = None
        gc.collect()


def speed_probe(lazy: LazyModel, info, task, q_emb, d_emb, cfg: EmbeddingsConfig, records) -> tuple[dict, bool]:
    """The speed probe of one model on one task, or its cached result. Returns (record, was_cached)."""
    from flywheel.evals.embeddings.speed import PeakRSS, index_timing, latency, sample_texts, throughput, warm_up
    from flywheel.foundation.io import sha256_text

    if task.kind == "retrieval":
        texts, singles = list(task.corpus.values()) + list(task.queries.values()), list(task.queries.values())
    else:
        texts, singles = task.s1 + task.s2, task.s1
    sample = sample_texts(texts, cfg.speed.n_texts, cfg.seed)
    single = sample_texts(singles, cfg.speed.n_latency, cfg.seed + 1)
    key = "|".join([f"speed{SPEED_VERSION}", info.identity, sha256_text("\n".join(sample + ["--"] + single)),
                    f"bs{cfg.batch_size}"])
    if not cfg.speed.refresh and (rec := records.get("speed", records.key(key))) is not None:
        return rec, True
    model = lazy.get()
    with PeakRSS() as mem:
        warm_up(model, sample, cfg.batch_size)  # this task's shapes (long abstracts vs sentences), untimed
        rec: dict[str, Any] = throughput(model, sample, cfg.batch_size)
        rec.update(latency(model, single))
    rec.update(peak_rss_mb=mem.peak_mb, model_rss_mb=lazy.model_rss_mb, load_s=lazy.load_s,
               warmup_s=lazy.warmup_s)
    if q_emb is not None:
        rec.update(index_timing(q_emb, d_emb))
    records.put("speed", records.key(key), rec)
    return rec, False


def _bench_retrieval(res: dict, task, cfg: EmbeddingsConfig, cache, enc) -> tuple:
    from flywheel.evals.embeddings import compare, retrieval

    doc_ids, q_ids = list(task.corpus), list(task.queries)
    d_emb, s1 = cache.encode([task.corpus[d] for d in doc_ids], enc)
    q_emb, s2 = cache.encode([task.queries[q] for q in q_ids], enc)
    ranking = retrieval.rank(q_emb, d_emb, q_ids, doc_ids, k=100)
    per_query = retrieval.per_query_metrics(ranking, task.qrels)
    res.update(retrieval.mean_metrics(per_query))
    res["per_query"] = {"query_id": q_ids, **{m: v.tolist() for m, v in per_query.items()}}
    res["vector"] = per_query[PRIMARY["retrieval"]]
    res["ndcg@10_ci_low"], res["ndcg@10_ci_high"] = compare.mean_ci(res["vector"], cfg.stats.n_boot,
                                                                    cfg.seed, cfg.stats.alpha)
    res["n"] = len(q_ids)
    return q_emb, d_emb, d_emb.shape[1], (s1, s2)


def _bench_sts(res: dict, task, cfg: EmbeddingsConfig, cache, enc) -> tuple:
    import numpy as np

    from flywheel.evals.embeddings import calibration, compare, sts

    e1, s1 = cache.encode(task.s1, enc)
    e2, s2 = cache.encode(task.s2, enc)
    cos = sts.pair_cosines(e1, e2)
    res.update(sts.sts_metrics(cos, task.scores))
    gold = np.asarray(task.scores)
    labels = (np.asarray(task.labels, bool) if task.labels is not None
              else gold >= cfg.calibration.duplicate_min_score)
    cal = calibration.calibrate(cos, labels, cfg.calibration.target_precision, cfg.calibration.fixed_threshold)
    res.update({f"dup_{k}": v for k, v in cal.items() if k not in ("pairs", "positives")})
    res["dup_positives"] = cal["positives"]
    res["curve"] = {k: v.tolist() for k, v in calibration.pr_curve(cos, labels).items()}
    res["per_query"] = {"pair_id": list(range(len(cos))), "cosine": cos.tolist(), "gold": task.scores}
    res["vector"] = cos
    res["spearman_ci_low"], res["spearman_ci_high"] = compare.correlation_ci(
        cos, gold, "spearman", min(cfg.stats.n_boot, 1000), cfg.seed, cfg.stats.alpha)
    res["n"] = len(cos)
    return None, None, e1.shape[1], (s1, s2)


def bench_one(lazy: LazyModel, info, task, cfg: EmbeddingsConfig, cache, records) -> dict:
    """Quality + speed of one model on one task; plain data out (tracking happens in the shell)."""
    enc = lazy.encode_fn(cfg.batch_size)
    res: dict[str, Any] = {"model": info.name, "task": task.name, "kind": task.kind}
    bench = _bench_retrieval if task.kind == "retrieval" else _bench_sts
    q_emb, d_emb, dims, stats = bench(res, task, cfg, cache, enc)
    for k in ("encoded", "cached", "encode_s"):
        res[k] = sum(s[k] for s in stats)
    speed, speed_cached = speed_probe(lazy, info, task, q_emb, d_emb, cfg, records)
    res.update({k: v for k, v in speed.items() if k not in res})
    res.update(dims=dims, size_mb=info.size_mb, speed_cached=speed_cached)
    return res


def compare_all(results: list[dict], tasks, cfg: EmbeddingsConfig) -> list[dict]:
    """Paired comparisons of every model pair within each task (Holm across the task's pairs)."""
    import numpy as np

    from flywheel.evals.embeddings.compare import compare_correlations, compare_models

    rows: list[dict] = []
    for task in tasks:
        rs = [r for r in results if r["task"] == task.name]
        if len(rs) < 2:
            continue
        if task.kind == "retrieval":
            rows += compare_models({r["model"]: r["vector"] for r in rs}, task=task.name, metric="ndcg@10",
                                   test=cfg.stats.test, n_boot=cfg.stats.n_boot, alpha=cfg.stats.alpha,
                                   min_queries=cfg.stats.min_queries, seed=cfg.seed)
        else:
            rows += compare_correlations({r["model"]: r["vector"] for r in rs}, np.asarray(task.scores),
                                         task=task.name, n_boot=min(cfg.stats.n_boot, 1000),
                                         alpha=cfg.stats.alpha, seed=cfg.seed)
    return rows


def leaderboard(results: list[dict], comparisons: list[dict], tasks) -> list[dict]:
    """One row per model x task (COLUMNS keys), best first within a task, with the `vs_best` verdict."""
    from flywheel.evals.embeddings.compare import vs_best

    rows = []
    for task in tasks:
        rs = [r for r in results if r["task"] == task.name]
        metric = PRIMARY[task.kind]
        best = max(rs, key=lambda r: r[metric])["model"]
        cmp = [c for c in comparisons if c["task"] == task.name]
        for r in sorted(rs, key=lambda r: -r[metric]):
            row = {c: r.get(c, "") for c in COLUMNS}
            row["vs_best"] = vs_best(cmp, best, r["model"]) if len(rs) > 1 else ""
            rows.append(row)
    return rows


@dataclass
class Inputs:
    """Everything validated before the first encode."""

    tasks: list
    models: list
    data_dir: Path
    paths: list[Path]  # the input paths the output check protects


def resolve_inputs(cfg: EmbeddingsConfig) -> Inputs:
    """Load and validate every task and resolve every model (offline), so bad input fails before encoding."""
    from flywheel.evals.embeddings.models import resolve_model
    from flywheel.evals.embeddings.tasks import resolve_task

    data_dir = Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_DIR
    tasks = [resolve_task(t, data_dir, split=cfg.qrels_split, sts_split=cfg.sts_split, max_docs=cfg.max_docs,
                          max_queries=cfg.max_queries, max_pairs=cfg.max_pairs, seed=cfg.seed,
                          title_dedupe=cfg.title_dedupe) for t in cfg.tasks]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise InputError(f"tasks: two tasks have the same name ({names}); give distinct directories")
    paths = [data_dir] + [Path(t) for t in cfg.tasks if Path(t).exists()]
    return Inputs(tasks=tasks, models=[resolve_model(m) for m in cfg.models], data_dir=data_dir, paths=paths)


def run_matrix(cfg: EmbeddingsConfig, inputs: Inputs, progress: Progress | None = None) -> list[dict]:
    """Bench every model x task through the vector cache; each model is loaded at most once, then dropped."""
    from flywheel.evals.embeddings.cache import EmbeddingCache, vectors_root
    from flywheel.foundation.cache import JsonCache

    progress = progress or (lambda desc, done: None)
    vec_root = Path(cfg.cache_dir) / "vectors" if cfg.cache_dir else None
    records = JsonCache((vec_root or vectors_root()).parent / "records", enabled=cfg.cache)
    results: list[dict] = []
    for info in inputs.models:
        lazy = LazyModel(info.path if info.source == "local" else info.name)
        for task in inputs.tasks:
            progress(f"{info.name} x {task.name}", False)
            cache = EmbeddingCache(info.identity, root=vec_root, enabled=cfg.cache)
            results.append(bench_one(lazy, info, task, cfg, cache, records))
            progress(f"{info.name} x {task.name}", True)
        lazy.close()
    return results
