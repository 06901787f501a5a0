"""Tracking throughput and a stage's tracking overhead: team server (PostgreSQL) vs the embedded sqlite store.

    .venv/bin/python bench/bench_tracking.py [--runs 25] [--writers 1,8] [--workers 2]

Starts a team server (`flywheel.pipelines.server`, PostgreSQL + `mlflow server`, temporary folder, free ports), then for
each store (server over HTTP, local sqlite) and each writer count, starts that many processes that log
`--runs` runs each, the way a stage does (`flywheel.pipelines.tracking.start_run` with params and tags, 5 batched
`log_metrics` calls of 20 metrics, one artifact). Writers import mlflow first and then wait for a common start
time, so only the logging is timed. Per run the writer records its whole tracking time (open, params,
metrics, artifact, close): that is a stage's tracking overhead, reported as p50/p95. Errors are counted, not
hidden. Writes bench/results/tracking.json, with the machine's load average (2 shared cores: read the numbers
against it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METRICS_PER_BATCH, BATCHES = 20, 5

WRITER = """
import json, os, sys, tempfile, time
import mlflow
from flywheel.pipelines import tracking
writer, n_runs, start_at = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
tracking.setup()
tracking.experiment_id("bench")  # created before the clock starts, like a stage's second run
times, errors = [], []
with tempfile.TemporaryDirectory() as tmp:
    art = os.path.join(tmp, "report.json")
    open(art, "w").write(json.dumps({"writer": writer, "pad": "x" * 2000}))
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    for i in range(n_runs):
        t = time.perf_counter()
        try:
            with tracking.start_run("bench", f"w{writer}-r{i}", params={"writer": writer, "i": i, "lr": 1e-3}):
                for step in range(%d):
                    tracking.log_metrics({f"m{k}": (i + k) / (step + 1) for k in range(%d)}, step=step)
                mlflow.log_artifact(art)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
print(json.dumps({"times": times, "errors": errors, "wall": wall}))
""" % (BATCHES, METRICS_PER_BATCH)


def measure(uri: str, home: Path, writers: int, runs: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=uri, FLYWHEEL_HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # The schema first, from one process: 8 writers creating a fresh sqlite store at once race in its
    # migrations (alembic "expected to match one row"), which is not what this bench measures.
    subprocess.run([sys.executable, "-c", "from flywheel.pipelines import tracking; tracking.setup(); "
                    "tracking.experiment_id('bench')"], cwd=ROOT, env=env, check=True, capture_output=True)
    start_at = time.time() + 8 + 2 * writers  # time for every writer to import mlflow first
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(w), str(runs), str(start_at)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(writers)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=900)
            if p.returncode != 0:
                raise RuntimeError(f"writer failed: {err[-1000:]}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    late = start_at > time.time()
    times = sorted(t for o in outs for t in o["times"])
    wall = max(o["wall"] for o in outs)
    n = len(times)
    q = statistics.quantiles(times, n=100)
    return {"writers": writers, "runs": n, "errors": sum(len(o["errors"]) for o in outs),
            "error_examples": [e for o in outs for e in o["errors"]][:3], "wall_s": round(wall, 2),
            "runs_per_s": round(n / wall, 1), "metrics_per_s": round(n * BATCHES * METRICS_PER_BATCH / wall),
            "run_overhead_p50_ms": round(q[49] * 1000, 1), "run_overhead_p95_ms": round(q[94] * 1000, 1),
            "start_missed": late}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=25, help="runs per writer")
    ap.add_argument("--writers", default="1,8")
    ap.add_argument("--workers", default="1,2", help="mlflow server worker processes (one server per value)")
    args = ap.parse_args()
    writer_counts = [int(x) for x in args.writers.split(",")]

    from flywheel.pipelines import server
    from flywheel.foundation.io import write_json

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    tmp.chmod(0o755)  # as root, PostgreSQL runs as `postgres`, which must reach its data folder
    results, servers = [], []
    try:
        for workers in (int(x) for x in args.workers.split(",")):
            d = tmp / f"server-{workers}"
            t = time.perf_counter()
            state = server.start(server.ServerConfig(dir=str(d), port=0, pg_port=0, workers=workers))
            servers.append({"workers": workers, "start_s": round(time.perf_counter() - t, 1),
                            "postgres": state["postgres"]["which"]})
            try:
                for writers in writer_counts:
                    home = tmp / f"server-{workers}-{writers}"
                    r = {"store": f"server ({workers} workers)", **measure(state["mlflow"]["url"], home, writers,
                                                                           args.runs)}
                    print(json.dumps(r))
                    results.append(r)
            finally:
                server.stop(d)
        for writers in writer_counts:
            home = tmp / f"sqlite-{writers}"
            r = {"store": "sqlite", **measure(f"sqlite:///{home / 'mlflow.db'}", home, writers, args.runs)}
            print(json.dumps(r))
            results.append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"what": "runs/s and metrics/s logged through the team server (PostgreSQL, proxied artifacts) vs the "
                   "embedded sqlite store; per-run tracking overhead = open + params + "
                   f"{BATCHES} batched log_metrics of {METRICS_PER_BATCH} + one artifact + close",
           "runs_per_writer": args.runs, "servers": servers, "results": results,
           "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "load_avg_1m_before": round(load_before[0], 2),
                       "load_avg_1m_after": round(os.getloadavg()[0], 2)}}
    print(f"wrote {write_json(ROOT / 'bench' / 'results' / 'tracking.json', out)}")


if __name__ == "__main__":
    main()
