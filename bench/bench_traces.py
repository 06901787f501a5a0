"""Bench `flywheel mine mlflow-traces:<experiment>`: traces mined per second from a local sqlite store beside the same
conversations mined from chat-log JSONL, and peak RSS at two store sizes (flat: the reader pages through them).

    python bench/bench_traces.py [--sizes 200 800] [--workers 1]

Writing a trace with its feedback into sqlite takes ~0.05 s on the 2 shared dev cores (18.7/s measured), so the
default sizes are 200 and 800 traces for a quick look; bench/results/traces.json is `--sizes 1000 10000` (~12 min).

Each size gets its own temporary store and JSONL file, written by `flywheel.pipelines.applog.ChatLogger` from the
same seeded conversations (a user question, two retrieved documents, an answer; 3 in 4 rated, some by thumbs):
once as traces + feedback, once as JSONL + rating lines. Each mine runs in a fresh subprocess (`workers` processes,
no MLflow run logged) so its peak RSS (ru_maxrss of the child) is its own. Writes bench/results/traces.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("oats beans kale rice tofu lentils apples fibre protein iron breakfast dinner snack portion water salt "
         "sugar vitamin balanced meal plan budget quick vegetarian spicy").split()

MINE = """
import json, resource, sys, time
from flywheel.pipelines.mine import MineConfig, run_mine
t = time.perf_counter()
res = run_mine([sys.argv[1]], sys.argv[2], MineConfig(progress=False, log_mlflow=False, workers=int(sys.argv[3])))
print(json.dumps({"seconds": time.perf_counter() - t, "read": res["counts"]["read"], "kept": res["counts"]["kept"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def conversations(n: int, seed: int = 0):
    rnd = random.Random(seed)
    for i in range(n):
        q = " ".join(rnd.choices(WORDS, k=12)) + f"? ({i})"
        a = " ".join(rnd.choices(WORDS, k=40)) + "."
        r = rnd.random()
        rating = rnd.randint(1, 5) if r < 0.6 else (rnd.random() < 0.7) if r < 0.75 else None
        yield {"user_id": f"u{i % 997}", "messages": [{"role": "user", "content": q}], "answer": a,
               "context": [" ".join(rnd.choices(WORDS, k=30)), " ".join(rnd.choices(WORDS, k=30))],
               "latency_ms": rnd.uniform(200, 900), "tokens": rnd.randint(100, 600), "model": "m-1"}, rating


def write(n: int, work: Path) -> dict:
    from flywheel.pipelines.applog import ChatLogger

    uri = f"sqlite:///{work / 'mlflow.db'}"
    tr = ChatLogger(experiment="assistant", tracking_uri=uri)
    js = ChatLogger(log_path=work / "chat.jsonl", tracking_uri="")
    t_traces = t_jsonl = 0.0
    for conv, rating in conversations(n):
        for log in (tr, js):
            t = time.perf_counter()
            conv["prompt_variant"] = log.variant(conv["user_id"], "prompt-v2", ["v1", "v2"])
            tid = log.interaction(**conv)
            if rating is not None:
                log.rating(tid, rating)
            dt = time.perf_counter() - t
            if log is tr:
                t_traces += dt
            else:
                t_jsonl += dt
    return {"uri": uri, "write_traces_per_s": n / t_traces, "write_jsonl_per_s": n / t_jsonl}


def mine(source: str, out: Path, uri: str, workers: int) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", MINE, source, str(out), str(workers)], capture_output=True, text=True,
                       env=env, cwd=ROOT, check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["records_per_s"] = r["read"] / r["seconds"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 800])
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    runs = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as d:
            work = Path(d)
            w = write(n, work)
            tr = mine("mlflow-traces:assistant", work / "ds_traces", w["uri"], args.workers)
            js = mine(str(work / "chat.jsonl"), work / "ds_jsonl", w["uri"], args.workers)
            # ids differ (trace id vs uuid), so the split differs; what is kept must not
            same = (tr["read"], tr["kept"]) == (js["read"], js["kept"])
            runs.append({"traces": n, "write": {k: round(v, 1) for k, v in w.items() if k != "uri"},
                         "mine_traces": tr, "mine_jsonl": js, "same_read_and_kept": same})
            print(json.dumps(runs[-1]), flush=True)
    res = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
           "workers": args.workers, "runs": runs,
           "peak_rss_mb_by_traces": {r["traces"]: round(r["mine_traces"]["peak_rss_mb"], 1) for r in runs}}
    out = ROOT / "bench" / "results" / "traces.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
