"""Speed targets of `flywheel bench-embeddings`, measured side by side in one run.

1. Overhead of the benchmark's encode path (cache lookup + hashing + shard write, cold cache) over a raw
   `model.encode` on the same texts, same model, same batch size. Target <= 1.1x.
2. Warm/cold: the same `flywheel bench-embeddings` command run twice in fresh processes (empty vector cache, then
   warm). Target >= 10x, with an identical leaderboard.

    python bench/bench_embeddings.py [--model all-MiniLM-L6-v2] [--n 512] [--repeats 3]

Writes bench/results/embeddings.json. On a shared 2-core machine absolute numbers wander; the ratios are what
matter, which is why both sides are measured interleaved in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def overhead(model_name: str, n: int, repeats: int, batch_size: int) -> dict:
    import numpy as np

    from flywheel.evals.embeddings.cache import EmbeddingCache
    from flywheel.evals.embeddings.models import load_with_info
    from flywheel.evals.embeddings.tasks import load_beir

    task = load_beir(ROOT.parent / "shared" / "data" / "medline-beir")
    texts = list(task.corpus.values())[:n]
    model, info = load_with_info(model_name)
    model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up, excluded
    raw_t, ours_t = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        raw = model.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)
        raw_t.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as d:  # cold cache each time: the path a first run takes
            cache = EmbeddingCache(info.identity, root=Path(d))
            t0 = time.perf_counter()
            ours, _ = cache.encode(texts, lambda ts: model.encode(ts, batch_size=batch_size,
                                                                   show_progress_bar=False, convert_to_numpy=True))
            ours_t.append(time.perf_counter() - t0)
        assert np.allclose(raw, ours, atol=1e-5)
    return {"model": info.name, "texts": len(texts), "batch_size": batch_size, "repeats": repeats,
            "raw_encode_s": raw_t, "bench_encode_s": ours_t,
            "ratio_median": float(np.median(ours_t) / np.median(raw_t)), "target": "<= 1.1"}


def warm_cold(models: list[str], tasks: list[str]) -> dict:
    """Two fresh `flywheel bench-embeddings` processes, as a user runs them: the warm one pays its imports too."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, FLYWHEEL_HOME=str(Path(d) / "home"))
        env.pop("MLFLOW_TRACKING_URI", None)
        out = Path(d) / "out"
        cmd = [sys.executable, "-c", "from flywheel.pipelines.cli import main; main()", "bench-embeddings",
               f"models=[{','.join(models)}]", f"tasks=[{','.join(tasks)}]", f"out={out}",
               f"cache_dir={Path(d) / 'cache'}"]
        times, boards = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if p.returncode != 0:
                raise SystemExit(f"bench-embeddings failed:\n{p.stderr[-2000:]}")
            boards.append((out / "leaderboard.csv").read_bytes())
    return {"models": models, "tasks": tasks, "cold_s": times[0], "warm_s": times[1], "ratio": times[0] / times[1],
            "identical_leaderboard": boards[0] == boards[1], "target": ">= 10",
            "note": "wall time of two fresh CLI processes (imports included), vector cache empty before the first"}


def verify(out_dir: Path) -> dict:
    """Recompute a leaderboard's retrieval metrics with independent references on the same (cached) vectors.

    sentence-transformers' InformationRetrievalEvaluator (binary relevance: MRR@10, and everything on binary
    tasks) and trec_eval via pytrec_eval (graded nDCG@10, Recall@k, MAP@100). Needs the vectors in the cache.
    """
    import csv

    import pytrec_eval
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from flywheel.evals.embeddings import retrieval
    from flywheel.evals.embeddings.cache import EmbeddingCache
    from flywheel.evals.embeddings.models import resolve_model
    from flywheel.evals.embeddings.tasks import resolve_task
    from flywheel.pipelines.embeddings import DEFAULT_DATA_DIR

    summary = json.loads((out_dir / "summary.json").read_text())
    cfg = summary["config"]
    rows = list(csv.DictReader(open(out_dir / "leaderboard.csv")))
    worst, checked = 0.0, 0

    def not_cached(texts):
        raise SystemExit("verify needs the benchmark's vectors in the cache: run the benchmark first")

    for spec in cfg["tasks"]:
        task = resolve_task(spec, cfg["data_dir"] or DEFAULT_DATA_DIR, split=cfg["qrels_split"],
                            max_docs=cfg["max_docs"], max_queries=cfg["max_queries"], seed=cfg["seed"])
        if task.kind != "retrieval":
            continue
        for model in cfg["models"]:
            info = resolve_model(model)
            cache = EmbeddingCache(info.identity, root=Path(cfg["cache_dir"]) / "vectors" if cfg["cache_dir"] else None)
            doc_ids, q_ids = list(task.corpus), list(task.queries)
            d, _ = cache.encode([task.corpus[i] for i in doc_ids], not_cached)
            q, _ = cache.encode([task.queries[i] for i in q_ids], not_cached)
            r = retrieval.rank(q, d, q_ids, doc_ids, k=100)
            ev = InformationRetrievalEvaluator(task.queries, task.corpus, {k: set(v) for k, v in task.qrels.items()},
                                               precision_recall_at_k=[1, 5, 10, 100], map_at_k=[100],
                                               write_csv=False)
            st = ev.compute_metrics([[{"corpus_id": c, "score": s} for c, s in zip(ids, sc)]
                                     for ids, sc in zip(r.top_ids, r.top_scores)])
            run = {qq: {c: float(100 - i) for i, c in enumerate(ids)} for qq, ids in zip(r.query_ids, r.top_ids)}
            te = pytrec_eval.RelevanceEvaluator(task.qrels, {"ndcg_cut_10", "map_cut_100", "recall_1", "recall_5",
                                                             "recall_10", "recall_100"}).evaluate(run)
            mean = lambda k: sum(v[k] for v in te.values()) / len(te)  # noqa: E731
            ref = {"ndcg@10": mean("ndcg_cut_10"), "mrr@10": st["mrr@k"][10], "map@100": mean("map_cut_100"),
                   **{f"recall@{k}": mean(f"recall_{k}") for k in (1, 5, 10, 100)}}
            row = next(x for x in rows if x["model"] == info.name and x["task"] == task.name)
            for m, v in ref.items():
                worst = max(worst, abs(float(row[m]) - v))
                checked += 1
    return {"out": str(out_dir), "values_checked": checked, "max_abs_diff": worst,
            "references": "trec_eval (pytrec_eval) for nDCG@10/MAP@100/Recall@k, sentence-transformers "
                          "InformationRetrievalEvaluator for MRR@10; leaderboard CSV rounds to 6 decimals"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--models", default="static-64,all-MiniLM-L6-v2")
    ap.add_argument("--tasks", default="medline,stsb")
    ap.add_argument("--verify", type=Path, help="only check OUT_DIR's leaderboard against the references")
    args = ap.parse_args()
    if args.verify:
        res = verify(args.verify)
        print(json.dumps(res, indent=2))
        sys.exit(0 if res["max_abs_diff"] < 1e-5 else 1)
    ov = overhead(args.model, args.n, args.repeats, args.batch_size)
    print(f"encode overhead ({ov['model']}, {ov['texts']} medline docs): raw model.encode "
          f"{min(ov['raw_encode_s']):.2f}s vs benchmark path {min(ov['bench_encode_s']):.2f}s (min of "
          f"{args.repeats}); median ratio {ov['ratio_median']:.3f}x (target <= 1.1x)")
    wc = warm_cold(args.models.split(","), args.tasks.split(","))
    print(f"warm/cold ({','.join(wc['models'])} x {','.join(wc['tasks'])}): cold {wc['cold_s']:.1f}s, warm "
          f"{wc['warm_s']:.1f}s -> {wc['ratio']:.1f}x (target >= 10x); identical leaderboard: "
          f"{wc['identical_leaderboard']}")
    result = {"overhead": ov, "warm_cold": wc,
              "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "python": platform.python_version(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = ROOT / "bench" / "results" / "embeddings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out.relative_to(ROOT)}")
    ok = ov["ratio_median"] <= 1.1 and wc["ratio"] >= 10 and wc["identical_leaderboard"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
