"""`flywheel bench-embeddings`: embedding models x tasks, quality and speed, with significance. A recipe.

    flywheel bench-embeddings --config configs/embeddings.yaml [models=[static-64,all-MiniLM-L6-v2] max_docs=300]

What it does, top to bottom (`run_bench_embeddings`):
1. load and validate every task first (BEIR retrieval, STS pairs, a mined dataset), so bad input fails before
   minutes of encoding; resolve every model (offline; preparing catalog models once into the cache);
2. per model x task: embeddings through the on-disk cache (model identity + text hash), exact cosine ranking,
   per-query metrics (retrieval) or per-pair cosines (STS + duplicate-threshold calibration), and a speed probe
   (warm-up apart; cached with the vectors, `speed.refresh=true` re-measures). A model is loaded only when
   something is not cached, which is what makes a warm rerun >= 10x faster with identical numbers;
3. per task: paired comparisons of all model pairs (bootstrap CI, Wilcoxon/permutation, Holm);
4. write `out/` atomically: leaderboard.csv/.md, comparisons.csv, calibration.csv, per_query/*.csv,
   quality_vs_speed.png, summary.json;
5. MLflow (`flywheel/embeddings`): a parent run with the config, the leaderboard and the plot, and a child run per
   model x task (params model/task/dims/size_mb; metrics; per_query.csv).

Features and trade-offs:
- Retrieval is exhaustive cosine: exact, fine for corpora of thousands; an ANN index would blur the comparison.
- `max_docs` keeps every relevant document of the kept queries, so a subsampled corpus is easier, never wrong:
  compare models on the same settings only (the settings are in the run's params).
- Speed numbers are measured once per model x task (key: model identity, the sampled texts, batch size) and then
  cached like the vectors: a warm run reports the cold run's measurement (child param `speed_cached`;
  `speed.refresh=true` or `cache=false` measures again). Compare speed across models measured on one machine.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import Field, field_validator

from flywheel.pipelines.config import StageConfig, flatten, load_config
from flywheel.pipelines.tracking import home_path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

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


class SpeedConfig(StageConfig):
    n_texts: int = Field(256, ge=1, description="texts of the task encoded for throughput")
    n_latency: int = Field(50, ge=1, description="single-text encodes for latency p50/p95")
    refresh: bool = Field(False, description="re-measure even when a cached measurement exists")


class StatsConfig(StageConfig):
    test: Literal["wilcoxon", "permutation"] = "wilcoxon"
    n_boot: int = Field(2000, ge=100)
    alpha: float = Field(0.05, gt=0, lt=1)
    min_queries: int = Field(30, ge=1, description="below this, a non-significant result is 'too few to tell'")


class CalibrationConfig(StageConfig):
    duplicate_min_score: float = Field(4.0, ge=0, le=5, description="STS gold score >= this is a duplicate")
    target_precision: float = Field(0.9, gt=0, le=1)
    fixed_threshold: float = Field(0.95, description="a fixed cosine rule, reported for comparison")


class EmbeddingsConfig(StageConfig):
    # mpnet is optional (`make models-mpnet`): configs/embeddings.yaml adds it.
    models: list[str] = ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "static-64"]
    tasks: list[str] = ["medline", "cranfield", "stsb"]
    out: str = Field(default_factory=lambda: home_path("embeddings"))  # <FLYWHEEL_HOME>/embeddings
    force: bool = False  # replace an existing `out` Flywheel did not write
    data_dir: str | None = None  # default: ../shared/data next to the repo
    qrels_split: str = "test"
    sts_split: str = "dev"
    max_docs: int | None = Field(None, ge=1)
    max_queries: int | None = Field(None, ge=1)
    max_pairs: int | None = Field(None, ge=2)
    title_dedupe: bool = Field(False, description="BEIR: drop a title the text already starts with (Cranfield); "
                               "false embeds title + ' ' + text like BEIR, MTEB and sentence-transformers")
    batch_size: int = Field(32, ge=1)
    cache: bool = True
    cache_dir: str | None = None  # embedding vectors + speed records; default $FLYWHEEL_CACHE/embeddings
    seed: int = 0
    speed: SpeedConfig = SpeedConfig()
    stats: StatsConfig = StatsConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    tracking_uri: str | None = None
    run_name: str | None = None

    @field_validator("models", "tasks")
    @classmethod
    def _non_empty_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one")
        dups = sorted({x for x in v if v.count(x) > 1})
        if dups:
            raise ValueError(f"duplicates: {dups}")
        return v


def demo_config(dataset_dir: str | Path, out: str | Path, **overrides: Any) -> EmbeddingsConfig:
    """The fast version `flywheel demo` runs: the two fastest models on the demo's mined dataset + 200 STS pairs."""
    base = {"models": ["static-64", "paraphrase-MiniLM-L3-v2"], "tasks": [str(dataset_dir), "stsb"],
            "max_pairs": 200, "out": str(out), "speed": {"n_texts": 64, "n_latency": 20},
            "stats": {"n_boot": 500}}
    base.update(overrides)
    return EmbeddingsConfig.model_validate(base)


# ------------------------------------------------------------------------------------------------ one model


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


def _speed(lazy: LazyModel, info, task, q_emb, d_emb, cfg: EmbeddingsConfig, records) -> tuple[dict, bool]:
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


def bench_one(lazy: LazyModel, info, task, cfg: EmbeddingsConfig, cache, records) -> dict:
    """Quality + speed of one model on one task; plain data out (MLflow happens later)."""
    import numpy as np

    from flywheel.evals.embeddings import calibration, compare, retrieval, sts

    enc = lazy.encode_fn(cfg.batch_size)
    res: dict[str, Any] = {"model": info.name, "task": task.name, "kind": task.kind}
    if task.kind == "retrieval":
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
        dims = d_emb.shape[1]
    else:
        e1, s1 = cache.encode(task.s1, enc)
        e2, s2 = cache.encode(task.s2, enc)
        q_emb = d_emb = None
        cos = sts.pair_cosines(e1, e2)
        res.update(sts.sts_metrics(cos, task.scores))
        gold = np.asarray(task.scores)
        labels = (np.asarray(task.labels, bool) if task.labels is not None
                  else gold >= cfg.calibration.duplicate_min_score)
        cal = calibration.calibrate(cos, labels, cfg.calibration.target_precision, cfg.calibration.fixed_threshold)
        res.update({f"dup_{k}": v for k, v in cal.items() if k not in ("pairs", "positives")})
        res["dup_positives"] = cal["positives"]
        curve = calibration.pr_curve(cos, labels)
        res["curve"] = {k: v.tolist() for k, v in curve.items()}
        res["per_query"] = {"pair_id": list(range(len(cos))), "cosine": cos.tolist(), "gold": task.scores}
        res["vector"] = cos
        res["spearman_ci_low"], res["spearman_ci_high"] = compare.correlation_ci(
            cos, gold, "spearman", min(cfg.stats.n_boot, 1000), cfg.seed, cfg.stats.alpha)
        res["n"] = len(cos)
        dims = e1.shape[1]
    res["encoded"] = s1["encoded"] + s2["encoded"]
    res["cached"] = s1["cached"] + s2["cached"]
    res["encode_s"] = s1["encode_s"] + s2["encode_s"]
    speed, speed_cached = _speed(lazy, info, task, q_emb, d_emb, cfg, records)
    res.update({k: v for k, v in speed.items() if k not in res})
    res.update(dims=dims, size_mb=info.size_mb, speed_cached=speed_cached)
    return res


# ------------------------------------------------------------------------------------------------ the stage


def run_bench_embeddings(cfg: EmbeddingsConfig | None = None, *, quiet: bool = False) -> dict:
    """Run the benchmark. Returns {`run_id`, `out` (Path), `leaderboard` (rows as dicts, COLUMNS keys),
    `comparisons` (rows), `elapsed_s`}."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flywheel.evals.embeddings.cache import EmbeddingCache, vectors_root
    from flywheel.foundation.cache import JsonCache
    from flywheel.evals.embeddings.models import resolve_model
    from flywheel.evals.embeddings.tasks import resolve_task
    from flywheel.foundation.io import check_output_dir

    cfg = cfg or EmbeddingsConfig()
    t_start = time.perf_counter()
    data_dir = Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_DIR
    # 1. Everything validated before any encoding.
    tasks = [resolve_task(t, data_dir, split=cfg.qrels_split, sts_split=cfg.sts_split, max_docs=cfg.max_docs,
                          max_queries=cfg.max_queries, max_pairs=cfg.max_pairs, seed=cfg.seed,
                          title_dedupe=cfg.title_dedupe) for t in cfg.tasks]
    inputs = [data_dir] + [t for t in cfg.tasks if Path(t).exists()]
    check_output_dir(cfg.out, inputs=inputs, force=cfg.force)  # now, not after the benchmark
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        from flywheel.foundation.errors import InputError

        raise InputError(f"tasks: two tasks have the same name ({names}); give distinct directories")
    infos = [resolve_model(m) for m in cfg.models]
    vec_root = Path(cfg.cache_dir) / "vectors" if cfg.cache_dir else None
    records = JsonCache((vec_root.parent if vec_root else vectors_root().parent) / "records", enabled=cfg.cache)

    # 2. Model x task.
    results: list[dict] = []
    with _progress(quiet) as progress:
        bar = progress.add_task("bench-embeddings", total=len(infos) * len(tasks))
        for info in infos:
            lazy = LazyModel(info.path if info.source == "local" else info.name)
            for task in tasks:
                progress.update(bar, description=f"{info.name} x {task.name}")
                cache = EmbeddingCache(info.identity, root=vec_root, enabled=cfg.cache)
                results.append(bench_one(lazy, info, task, cfg, cache, records))
                progress.advance(bar)
            lazy.close()

    # 3. Statistics per task, 4. outputs, 5. tracking.
    comparisons = _compare(results, tasks, cfg)
    leaderboard = _leaderboard(results, comparisons, tasks)
    out = Path(cfg.out)
    _write_outputs(out, cfg, results, leaderboard, comparisons, tasks, inputs)
    run_id = _track(cfg, out, results, tasks, leaderboard)
    elapsed = time.perf_counter() - t_start
    if not quiet:
        _print_leaderboard(leaderboard, out, run_id, elapsed)
    return {"run_id": run_id, "out": out, "leaderboard": leaderboard, "comparisons": comparisons,
            "elapsed_s": elapsed}


def _compare(results: list[dict], tasks, cfg: EmbeddingsConfig) -> list[dict]:
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


def _leaderboard(results: list[dict], comparisons: list[dict], tasks) -> list[dict]:
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


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return ""
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def _write_outputs(out: Path, cfg, results, leaderboard, comparisons, tasks, inputs=()) -> None:
    import csv
    import io

    from flywheel.foundation.io import atomic_dir, write_json

    def csv_text(rows: list[dict], cols: list[str]) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c), 6) for c in cols})
        return buf.getvalue()

    with atomic_dir(out, force=cfg.force, inputs=inputs, stage="embeddings") as tmp:
        (tmp / "leaderboard.csv").write_text(csv_text(leaderboard, COLUMNS))
        (tmp / "leaderboard.md").write_text(_markdown(leaderboard, comparisons, tasks, cfg))
        cmp_cols = ["task", "metric", "model_a", "model_b", "n", "mean_a", "mean_b", "estimate", "ci_low", "ci_high",
                    "test", "p_value", "p_adjusted", "significant", "verdict", "detectable_diff", "note"]
        (tmp / "comparisons.csv").write_text(csv_text(comparisons, cmp_cols))
        cal_rows = [{"model": r["model"], "task": r["task"], "threshold": t, "precision": p, "recall": rc, "f1": f}
                    for r in results if "curve" in r
                    for t, p, rc, f in zip(*(r["curve"][k] for k in ("threshold", "precision", "recall", "f1")))]
        if cal_rows:
            (tmp / "calibration.csv").write_text(csv_text(cal_rows, ["model", "task", "threshold", "precision",
                                                                     "recall", "f1"]))
        (tmp / "per_query").mkdir()
        for r in results:
            cols = list(r["per_query"])
            n = len(r["per_query"][cols[0]])
            rows = [{c: r["per_query"][c][i] for c in cols} for i in range(n)]
            (tmp / "per_query" / _per_query_name(r)).write_text(csv_text(rows, cols))
        _plot(tmp / "quality_vs_speed.png", results, tasks)
        write_json(tmp / "summary.json", {
            "config": cfg.model_dump(),
            "tasks": {t.name: {"kind": t.kind, "source": t.source, **t.info} for t in tasks},
            "leaderboard": leaderboard, "comparisons": comparisons})


def _per_query_name(r: dict) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{r['model']}__{r['task']}") + ".csv"


def _markdown(leaderboard, comparisons, tasks, cfg) -> str:
    lines = ["# Embedding benchmark", ""]
    for task in tasks:
        metric_cols = (["ndcg@10", "mrr@10", "map@100", "recall@1", "recall@10", "recall@100"]
                       if task.kind == "retrieval" else
                       ["spearman", "pearson", "dup_threshold_at_target", "dup_recall_at_target", "dup_best_f1"])
        cols = ["model"] + metric_cols + ["texts_per_s", "latency_p50_ms", "latency_p95_ms", "dims", "vs_best"]
        n = task.info.get("queries", task.info.get("pairs"))
        unit = "queries" if task.kind == "retrieval" else "pairs"
        lines += [f"## {task.name} ({task.kind}, {n} {unit}, {task.info.get('docs', '-')} docs)", ""]
        if task.info.get("doc_text"):
            lines += [f"Documents embedded as `{task.info['doc_text']}`.", ""]
        if task.kind == "retrieval" and n < cfg.stats.min_queries:
            lines += [f"> {n} queries: differences between models smaller than the `detectable_diff` column of "
                      "comparisons.csv cannot be told apart; a non-significant result here is not evidence of "
                      "equality.", ""]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in leaderboard:
            if r["task"] == task.name:
                r = dict(r)
                for m in ("ndcg@10", "spearman"):  # "0.7257 [0.65, 0.80]": the bootstrap CI next to the mean
                    if r.get(f"{m}_ci_low") not in ("", None):
                        r[m] = f"{r[m]:.4f} [{r[f'{m}_ci_low']:.3f}, {r[f'{m}_ci_high']:.3f}]"
                lines.append("| " + " | ".join(_fmt(r.get(c), 4 if c not in ("texts_per_s",) else 1) for c in cols)
                             + " |")
        lines.append("")
    lines += ["Brackets: 95% bootstrap CI over the task's queries (pairs). `vs_best`: paired comparison with the task's best model (retrieval: Wilcoxon on per-query nDCG@10 "
              f"(`stats.test={cfg.stats.test}`); STS: paired bootstrap of the Spearman difference), Holm-corrected "
              f"across all pairs of the task; `*` = significant at alpha={cfg.stats.alpha}. "
              f"Duplicate threshold: lowest cosine reaching precision {cfg.calibration.target_precision} on pairs "
              f"with gold >= {cfg.calibration.duplicate_min_score}. All pairs: comparisons.csv.", ""]
    return "\n".join(lines)


def _plot(path: Path, results: list[dict], tasks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = PRIMARY[task.kind]
        for r in (r for r in results if r["task"] == task.name):
            ax.scatter(r["texts_per_s"], r[metric], s=30 + r["dims"] / 8)
            ax.annotate(r["model"], (r["texts_per_s"], r[metric]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.margins(x=0.3, y=0.15)  # room for the labels
        ax.set_xlabel("texts/s (encode, batch; log)")
        ax.set_ylabel(metric)
        ax.set_title(task.name, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("quality vs speed (marker size ~ dims)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _track(cfg: EmbeddingsConfig, out: Path, results: list[dict], tasks, leaderboard) -> str:
    import shutil
    import tempfile

    import mlflow

    from flywheel.pipelines import tracking

    inputs = {}
    versions = sorted({t.info["dataset_version"] for t in tasks if t.info.get("dataset_version")})
    if versions:
        inputs["dataset_version"] = ",".join(versions)
    with tracking.start_run("embeddings", cfg.run_name, inputs=inputs, configured_uri=cfg.tracking_uri,
                            params=flatten(cfg.model_dump()), tags={"flywheel.embeddings.tasks": ",".join(
                                t.name for t in tasks)}) as parent:
        for name in ("leaderboard.csv", "leaderboard.md", "comparisons.csv", "quality_vs_speed.png", "summary.json",
                     "calibration.csv"):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name))
        for r in results:
            task = next(t for t in tasks if t.name == r["task"])
            with tracking.start_run("embeddings", f"{r['model']} x {r['task']}", nested=True, params={
                    "model": r["model"], "task": r["task"], "kind": r["kind"], "dims": r["dims"],
                    "size_mb": r["size_mb"], "n": r["n"], "speed_cached": r["speed_cached"],
                    "encoded": r["encoded"], "cached": r["cached"], "task_source": task.source},
                    inputs={"dataset_version": task.info.get("dataset_version")}):
                row = next(x for x in leaderboard if x["model"] == r["model"] and x["task"] == r["task"])
                tracking.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float))
                                      and not isinstance(v, bool)})
                mlflow.set_tag("flywheel.embeddings.vs_best", row["vs_best"])
                # The contract names the child's artifact per_query.csv.
                with tempfile.TemporaryDirectory() as d:
                    shutil.copy(out / "per_query" / _per_query_name(r), Path(d) / "per_query.csv")
                    mlflow.log_artifact(str(Path(d) / "per_query.csv"))
        return parent.info.run_id


def _progress(quiet: bool):
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet:
        class _Null:
            def add_task(self, *a, **k):
                return 0

            def update(self, *a, **k):
                pass

            def advance(self, *a, **k):
                pass
        return contextlib.nullcontext(_Null())
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def _print_leaderboard(rows: list[dict], out: Path, run_id: str, elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ["model", "task", "ndcg@10", "mrr@10", "recall@10", "spearman", "texts_per_s", "latency_p50_ms", "dims",
            "vs_best"]
    table = Table(title="embedding leaderboard")
    for c in cols:
        table.add_column(c, justify="left" if c in ("model", "task", "vs_best") else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c), 1 if c in ("texts_per_s", "latency_p50_ms") else 3) for c in cols])
    console = Console()
    if not console.is_terminal:  # piped into a log: do not squeeze the table to 80 columns
        console = Console(width=160)
    console.print(table)
    console.print(f"{out}/leaderboard.csv  (mlflow run {run_id}, experiment flywheel/embeddings)  {elapsed:.1f}s")


# ------------------------------------------------------------------------------------------------ the CLI


def register(app: typer.Typer) -> None:
    @app.command("bench-embeddings")
    def bench_embeddings(
        config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (configs/embeddings.yaml)"),
        overrides: list[str] = typer.Argument(
            None, help="key=value overrides, e.g. max_docs=300 speed.refresh=true (lists: models=\\[a,b])"),
        force: bool = typer.Option(False, "--force", help="replace an existing out= directory Flywheel did not write"),
    ) -> None:
        """Embedding models x tasks: retrieval, STS, duplicate threshold, speed; leaderboard + MLflow."""
        cfg = load_config(EmbeddingsConfig, config, (overrides or []) + (["force=true"] if force else []))
        run_bench_embeddings(cfg)
