"""Bench `flywheel mine`: records/s with and without near-dedupe against the plain-JSON-parse floor, and peak RSS
at 100k and 1M records, all measured in one run on the same machine.

    python bench/bench_mine.py [--sizes 100000 1000000] [--workers 2] [--engine ray]

The log is built by resampling real oasst conversations (../shared/data: oasst1 threads and oasst2 trees; each
text cut to <= 800 characters at a word boundary), with random ratings/variants/users and PII planted into 5%
of user turns, written in the canonical chat-log JSONL shape. Resampling keeps the number of distinct
conversations bounded (~2k plus the PII-planted ones), which is what "flat RSS" is about: dedupe state is
O(distinct texts) by design; everything else streams (spill files on disk, bounded in-flight batches).

Targets (issue 2): mine >= 1/8 of the floor without near-dedupe, >= 1/30 with it; peak RSS flat in input size.
Writes bench/results/mine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def _cut(text: str, n: int = 800) -> str:
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0]


def real_pairs() -> list[tuple[str, str]]:
    """(prompt, reply) pairs from real oasst threads (first turn of each)."""
    pairs = []
    msgs = [json.loads(x) for x in open(SHARED / "oasst1-en-validation" / "messages.jsonl", encoding="utf-8")]
    by_id = {m["message_id"]: m for m in msgs}
    for m in msgs:
        p = by_id.get(m["parent_id"]) if m["parent_id"] else None
        if m["role"] == "assistant" and p is not None:
            pairs.append((p["text"], m["text"]))
    for line in open(SHARED / "oasst2-vegan-filtered-trees" / "trees.jsonl", encoding="utf-8"):
        root = json.loads(line)["prompt"]
        for r in root.get("replies") or []:
            pairs.append((root["text"], r["text"]))
    return [(_cut(a), _cut(b)) for a, b in pairs]


def build_log(path: Path, n: int, seed: int = 0) -> None:
    from flywheel.mining.demo_logs import PII_SENTENCES, _pii

    rng = random.Random(seed)
    pairs = real_pairs()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q, a = pairs[rng.randrange(len(pairs))]
            if rng.random() < 0.05:
                kind, value = _pii(rng, i)
                q = q + " " + PII_SENTENCES[kind].format(v=value)
            rec = {"conversation_id": f"b{i}", "messages": [{"role": "user", "content": q},
                                                              {"role": "assistant", "content": a}],
                   "rating": rng.randint(1, 5), "prompt_variant": "v1" if i % 2 else "v2", "user_id": f"u{i % 5000}",
                   "model": "bench", "timestamp": "2026-10-01T00:00:00Z"}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def floor(path: Path) -> tuple[float, float]:
    """Plain json.loads of every line, one process: (records per wall second, records per CPU second)."""
    t, c = time.perf_counter(), time.process_time()
    n = 0
    with open(path, "rb") as f:
        for line in f:
            json.loads(line)
            n += 1
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def _peak_rss(proc: subprocess.Popen, out: dict) -> None:
    """Sample the RSS of the process tree (parent + pool workers) every 0.1 s; keep the peak sum."""
    import psutil

    peak = 0
    try:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                total = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                parent = p.memory_info().rss
            except psutil.Error:
                break
            peak = max(peak, total)
            out["parent"] = max(out.get("parent", 0), parent)
            time.sleep(0.1)
    except psutil.Error:
        pass
    out["tree"] = peak


def mine(path: Path, out: Path, near: bool, workers: int, engine: str = "local") -> dict:
    code = ("import json,sys,time; from flywheel.pipelines.mine import MineConfig, mine_to_dir; "
            f"cfg = MineConfig(workers={workers}, progress=False, log_mlflow=False, dedupe={{'near': {near}}}); "
            f"t = time.perf_counter(); m = mine_to_dir([{str(path)!r}], {str(out)!r}, cfg); "
            "print(json.dumps({'s': time.perf_counter() - t, 'counts': m['counts']}))")
    if engine == "ray":  # the clock includes starting the local Ray: a user pays it too
        code = ("import json,os,time; os.environ.setdefault('RAY_AUTH_MODE', 'disabled'); "
                "from flywheel.mining.config import MineConfig; from flywheel.mining.ray_engine import mine; "
                f"cfg = MineConfig(engine='ray', ray={{'num_cpus': {workers}}}, progress=False, log_mlflow=False, "
                f"dedupe={{'near': {near}}}); t = time.perf_counter(); m = mine([{str(path)!r}], {str(out)!r}, cfg); "
                "print(json.dumps({'s': time.perf_counter() - t, 'counts': m.manifest['counts'], "
                "'version': m.manifest['version'], 'stats': m.stats}))")
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    rss: dict = {}
    th = threading.Thread(target=_peak_rss, args=(proc, rss))
    th.start()
    stdout, _ = proc.communicate()
    th.join()
    if proc.returncode:
        raise SystemExit(f"mine failed ({proc.returncode})")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the mine process and its pool workers, all reaped
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res = json.loads(stdout.strip().splitlines()[-1])
    c = res["counts"]
    return {**({"ray": res["stats"]} if "stats" in res else {}), "seconds": round(res["s"], 2), "records_per_s": round(c["read"] / res["s"], 1), "read": c["read"],
            "cpu_seconds_all_processes": round(cpu, 2), "records_per_cpu_s": round(c["read"] / cpu, 1),
            "kept": c["kept"], "filtered": c["filtered"], "peak_rss_tree_mib": round(rss.get("tree", 0) / 2**20, 1),
            "peak_rss_parent_mib": round(rss.get("parent", 0) / 2**20, 1)}


def main_ray(args: argparse.Namespace) -> None:
    """The Ray engine beside the local one (near-dedupe on), same log, same output bytes checked."""
    import filecmp

    results: dict = {"machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
                     "workers_or_ray_cpus": args.workers, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-mine-ray-") as tmp:
        for n in args.sizes:
            log = Path(tmp) / f"log-{n}.jsonl"
            build_log(log, n)
            row = {}
            for e in ("local", "ray"):
                row[e] = mine(log, Path(tmp) / f"out-{n}-{e}", True, args.workers, e)
                row[e]["load_avg_after"] = os.getloadavg()  # the machine is shared: how busy it was
            row["identical_outputs"] = all(filecmp.cmp(Path(tmp) / f"out-{n}-local" / f, Path(tmp) / f"out-{n}-ray" / f,
                                                       shallow=False)
                                           for f in ("train.jsonl", "eval.jsonl", "preferences.jsonl",
                                                     "preferences_eval.jsonl", "rejects.jsonl", "manifest.json"))
            print(f"[{n}] local {row['local']['records_per_s']:.0f} rec/s, ray {row['ray']['records_per_s']:.0f} "
                  f"rec/s, identical {row['identical_outputs']}", flush=True)
            results["sizes"][str(n)] = row
            log.unlink()
            shutil.rmtree(Path(tmp) / f"out-{n}-local")
            shutil.rmtree(Path(tmp) / f"out-{n}-ray")
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="ray: the Ray engine beside the local one -> bench/results/mine-ray.json")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mine.json")
    args = ap.parse_args()
    if args.engine == "ray":
        if args.out == ROOT / "bench" / "results" / "mine.json":
            args.out = ROOT / "bench" / "results" / "mine-ray.json"
        return main_ray(args)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "load_avg_at_start": os.getloadavg()}, "workers": args.workers, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-mine-") as tmp:
        for n in args.sizes:
            log = Path(tmp) / f"log-{n}.jsonl"
            t = time.perf_counter()
            build_log(log, n)
            print(f"[{n}] built {log.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t:.0f} s", flush=True)
            row: dict = {"file_mib": round(log.stat().st_size / 2**20, 1)}
            wall_rate, cpu_rate = floor(log)
            row["floor_records_per_s"] = round(wall_rate, 1)
            row["floor_records_per_cpu_s"] = round(cpu_rate, 1)
            print(f"[{n}] floor (json.loads) {wall_rate:.0f} rec/s ({cpu_rate:.0f} per CPU s)", flush=True)
            for near in (False, True):
                key = "mine_near_dedupe" if near else "mine_exact_only"
                row[key] = mine(log, Path(tmp) / f"out-{n}-{near}", near, args.workers)
                row[key]["ratio_to_floor"] = round(row[key]["records_per_s"] / row["floor_records_per_s"], 4)
                # Work per record, independent of how many other processes share the 2 cores right now.
                row[key]["cpu_ratio_to_floor"] = round(row[key]["records_per_cpu_s"] / row["floor_records_per_cpu_s"], 4)
                print(f"[{n}] {key}: {row[key]['records_per_s']:.0f} rec/s = 1/"
                      f"{1 / row[key]['ratio_to_floor']:.1f} of floor (CPU work: 1/"
                      f"{1 / row[key]['cpu_ratio_to_floor']:.1f}), peak RSS {row[key]['peak_rss_tree_mib']} MiB "
                      f"(parent {row[key]['peak_rss_parent_mib']} MiB)", flush=True)
            results["sizes"][str(n)] = row
            log.unlink()
    big = results["sizes"][str(max(args.sizes))]
    small = results["sizes"][str(min(args.sizes))]
    results["targets"] = {
        "exact_only_ratio_ge_1_8": big["mine_exact_only"]["ratio_to_floor"] >= 1 / 8,
        "near_dedupe_ratio_ge_1_30": big["mine_near_dedupe"]["ratio_to_floor"] >= 1 / 30,
        "rss_growth_small_to_big": {k: round(big[k]["peak_rss_tree_mib"] / max(small[k]["peak_rss_tree_mib"], 1), 2)
                                    for k in ("mine_exact_only", "mine_near_dedupe")},
    }
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    results["note"] = ("measured on a 2-core machine shared with ~7 engineers' jobs (see load averages): wall-clock "
                       "ratios penalise the multi-process mine (3 processes competing for 2 busy cores) against the "
                       "single-process floor; cpu_ratio_to_floor compares work per record (CPU seconds of all "
                       "processes), which does not depend on the load; with both cores free the wall rate can exceed it")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["targets"], indent=2))


if __name__ == "__main__":
    main()
