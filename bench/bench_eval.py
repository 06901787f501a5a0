"""Eval stage speed: what the generation cache and batching buy, measured side by side in one run.

    python bench/bench_eval.py [--cases N] [--max-new-tokens T]

After a warm-up run (one-time import and checksum costs), three runs of `run_eval` on the built-in cases (2 variants x the base model), each in a fresh MLflow store:
  cold      empty cache, batch_size 8
  warm      same config again: everything (generations, NLL, similarities) from the cache, no model load
  unbatched empty cache, batch_size 1 (what batching saves)
Prints the ratios and writes bench/results/eval.json. Run it on an idle machine: on a shared box the absolute
numbers move, the ratios much less.
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


def _run(tmp: Path, tag: str, cache_dir: Path, batch_size: int, n: int, max_new_tokens: int) -> dict:
    from flywheel.evals.prompts.config import EvalConfig
    from flywheel.pipelines.eval import run_eval

    home = tmp / f"home-{tag}"
    os.environ["FLYWHEEL_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    cfg = EvalConfig(name=f"bench-{tag}", limit=n, out=str(tmp / f"out-{tag}"), cache_dir=str(cache_dir),
                     metrics=["exact_match", "rouge_l", "nll", "pii", "latency_ms", "generated_tokens"],
                     generation={"max_new_tokens": max_new_tokens, "batch_size": batch_size})
    t0 = time.perf_counter()
    res = run_eval(cfg, show_progress=False)
    wall = time.perf_counter() - t0
    r = res["results"]
    return {"wall_s": round(wall, 2), "generated": r["generated"], "cache_hits": r["cache"]["hits"],
            "cache_misses": r["cache"]["misses"], "cells": len(r["cells"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as d:
        tmp = Path(d)
        # Warm-up (own cache, 1 case): pays the one-time costs (imports, the base model's checksum, MLflow's
        # schema) so that they do not land on whichever measured run happens to go first.
        _run(tmp, "warmup", tmp / "cache-warmup", 8, 1, 4)
        cold = _run(tmp, "cold", tmp / "cache", 8, args.cases, args.max_new_tokens)
        warm = _run(tmp, "warm", tmp / "cache", 8, args.cases, args.max_new_tokens)
        unbatched = _run(tmp, "unbatched", tmp / "cache-b1", 1, args.cases, args.max_new_tokens)
    out = {
        "cases": args.cases, "variants": 2, "targets": 1, "max_new_tokens": args.max_new_tokens,
        "cold": cold, "warm": warm, "unbatched": unbatched,
        "ratio_cold_over_warm": round(cold["wall_s"] / warm["wall_s"], 2),
        "ratio_unbatched_over_batched": round(unbatched["wall_s"] / cold["wall_s"], 2),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0], "omp_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "eval.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"cold / warm (cached) wall time: {out['ratio_cold_over_warm']}x; "
          f"batch 1 / batch 8: {out['ratio_unbatched_over_batched']}x")


if __name__ == "__main__":
    main()
