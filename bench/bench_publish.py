"""Wall time and peak memory of `flywheel publish`, per mode and quantization. One run each.

    python bench/bench_publish.py [--out bench/results/publish.json]

Publishes a seeded random LoRA (r=8, q/k/v/o) on the SmolLM2-135M base into a scratch FLYWHEEL_HOME, as
mode=merged f16, mode=merged q8_0 and mode=adapter f16, each in a fresh process (so imports and memory do not
carry over). Peak RSS is the publish process's own (`ru_maxrss`) and each child's (merge, converter) from
`os.wait4`; the budget is 2x the fp32 base on disk. Needs llama.cpp's converters (`make llama-cpp-converters`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CASES = [("merged", "f16"), ("merged", "q8_0"), ("adapter", "f16")]

ONE = """
import json, sys
from flywheel.pipelines.publish import PublishConfig, run_publish
res = run_publish(sys.argv[1], out=sys.argv[2], cfg=PublishConfig(mode=sys.argv[3], quantize=sys.argv[4]))
print("RESULT " + json.dumps({k: res[k] for k in ("seconds", "peak_rss", "mode", "quantize")}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "publish.json"))
    args = ap.parse_args()

    from bench.bench_llamacpp import random_adapter
    from flywheel.pipelines.publish import converters_dir
    from flywheel.training.models import resolve_base_model

    if converters_dir() is None:
        print("skipped: llama.cpp converters not installed (make llama-cpp-converters)")
        return 0
    info = resolve_base_model("smollm2-135m-instruct")
    fp32 = sum(f.stat().st_size for f in info.path.glob("*.safetensors"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as td:
        tmp = Path(td)
        adapter = random_adapter(info.path, tmp / "adapter")
        meta = {"base_model": "smollm2-135m-instruct", "base_model_sha256": info.sha256, "eos_tokens": ["<|im_end|>"]}
        (adapter / "flywheel_adapter.json").write_text(json.dumps(meta))
        env = {**os.environ, "FLYWHEEL_HOME": str(tmp / "home"), "OMP_NUM_THREADS": "1",
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'home' / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
        (tmp / "home").mkdir()
        for mode, q in CASES:
            # The adapter mode's base.gguf is cached per base hash: clear it so each case converts from scratch.
            for f in (tmp / "home" / "cache" / "gguf").glob("*.gguf"):
                f.unlink()
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", ONE, str(adapter), str(tmp / f"pub-{mode}-{q}"), mode, q],
                                  capture_output=True, text=True, env=env, cwd=str(ROOT))
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
                return 1
            res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
            rss = {k: (v or 0) / 2**20 for k, v in res["peak_rss"].items()}
            row = {"mode": mode, "quantize": q, "publish_s": res["seconds"], "process_wall_s": wall,
                   "peak_rss_mb": rss, "peak_rss_over_fp32_base": max(rss.values()) * 2**20 / fp32,
                   "folder_bytes": sum(p.stat().st_size for p in (tmp / f"pub-{mode}-{q}").rglob("*") if p.is_file())}
            rows.append(row)
            print(f"{mode:8s} {q:5s} publish {res['seconds']:.1f} s (process {wall:.1f} s); peak RSS MB "
                  + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()) + f"; {row['folder_bytes'] / 1e6:.0f} MB")
    out = {"what": "flywheel publish of a random LoRA on SmolLM2-135M, one fresh process per case",
           "fp32_base_mb": fp32 / 2**20, "rss_budget_mb": 2 * fp32 / 2**20, "cases": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
