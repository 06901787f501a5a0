"""Bench: `flywheel ab`'s engine on 1M and 10M synthetic outcome rows, next to a pandas groupby of the same rows.

    OMP_NUM_THREADS=1 python bench/bench_ab.py [--sizes 1000000 10000000] [--repeat 2]

The floor is what any analysis must at least do: one pandas groupby computing count/mean/variance per variant
for each metric. The engine does that plus the tests (Mann-Whitney from histograms, Welch, two-proportion),
bootstrap, sequential, Bayes, SRM and verdicts. Rows are in memory (a DataFrame: variant categorical, rating
1-5, latency) as after loading; reading files is not timed. Both are timed in the same process, side by side,
best of `--repeat`. Writes bench/results/ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flywheel.evals.ab.config import AbConfig, MetricConfig  # noqa: E402
from flywheel.evals.ab.engine import analyze  # noqa: E402

METRICS = [
    MetricConfig(name="rating", kind="ordinal", min=1, max=5),
    MetricConfig(name="success", column="rating", kind="rate", threshold=4, min=1, max=5),
    MetricConfig(name="latency_ms", kind="mean", guardrail=True, higher_is_better=False, margin=0.1, min=0),
]


def make_rows(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    arm = (rng.random(n) < 0.5).astype(np.int8)
    rating = np.clip(np.round(rng.normal(3.4, 1.1, n) + 0.05 * arm), 1, 5).astype(np.int8)
    latency = rng.lognormal(6.8, 0.3, n).astype(np.float64)
    return pd.DataFrame({"prompt_variant": pd.Categorical.from_codes(arm, ["v1", "v2"]), "rating": rating,
                         "latency_ms": latency})


def floor(df: pd.DataFrame) -> pd.DataFrame:
    g = df.assign(success=df["rating"] >= 4).groupby("prompt_variant", observed=True)
    return g.agg(n=("rating", "size"), rating_mean=("rating", "mean"), rating_var=("rating", "var"),
                 success=("success", "mean"), lat_mean=("latency_ms", "mean"), lat_var=("latency_ms", "var"))


def engine(df: pd.DataFrame) -> dict:
    return analyze(df, AbConfig(metrics=METRICS, unit=None, control="v1"))


def best(fn, df, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(df)
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/ab.json"))
    args = ap.parse_args()
    engine(make_rows(10_000))  # warm imports (scipy, statsmodels) outside the timing
    floor(make_rows(10_000))
    results = []
    for n in args.sizes:
        df = make_rows(n)
        t_floor, f = best(floor, df, args.repeat)
        t_eng, rep = best(engine, df, args.repeat)
        c = next(x for x in rep["comparisons"] if x["metric"] == "rating")
        # the engine's means equal the floor's
        assert abs(c["mean_control"] - f.loc["v1", "rating_mean"]) < 1e-9
        row = {"rows": n, "engine_s": round(t_eng, 3), "pandas_groupby_floor_s": round(t_floor, 3),
               "ratio_engine_over_floor": round(t_eng / t_floor, 2), "rows_per_s": round(n / t_eng),
               "verdict_v2": rep["verdicts"]["v2"]["decision"], "rating_p": c["p_value"]}
        results.append(row)
        print(f"{n:>11,} rows: engine {t_eng:6.2f} s   pandas groupby floor {t_floor:6.2f} s   "
              f"ratio {t_eng / t_floor:5.2f}x   ({n / t_eng / 1e6:.1f} M rows/s)", flush=True)
        del df
    out = {"bench": "ab", "python": platform.python_version(), "cpus": os.cpu_count(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "repeat": args.repeat,
           "note": "same process, side by side, best of repeat; machine shared by other jobs", "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
