"""Dashboard first-render time with 1000 runs in the store, next to a bare `MlflowClient.search_runs`.

    .venv/bin/python bench/bench_dashboard.py [--runs 1000] [--stores sqlite,server]

For each store (the embedded sqlite file, and a team server -- PostgreSQL + `mlflow server` with proxied
artifacts -- that the bench starts on a temporary folder and stops again), in one run:
fills it with `--runs` runs spread over the stages the way the pipelines log them
(train runs with 20-step metric histories, embeddings/prompts parents with child runs, gate decisions...),
plus one run of every stage with its real artifacts (the dashboard test store), then, in one process:
- the floor: a bare `MlflowClient.search_runs` over every flywheel experiment (all runs, paged), best of 3;
- each page's first render (AppTest, Streamlit caches cleared first, so every MLflow query is really made),
  after one warm-up pass that pays Python imports once, as a running server would.
Target: every page < 2 s on both. Writes bench/results/dashboard.json: the sqlite numbers at the top level,
the server's under "server", and server/sqlite ratios per page.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from flywheel.pipelines import tags as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAGES = ["overview", "datasets", "training", "embeddings", "prompt_eval", "ab", "gate"]
TARGET_S = 2.0


def fill(n_runs: int) -> dict[str, int]:
    """Log `n_runs` runs, shaped like each stage's, with batched writes (this is set-up, not measured)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from flywheel.pipelines.tracking import experiment_id, setup

    setup()
    client = MlflowClient()
    share = {"mine": 0.15, "train": 0.25, "embeddings": 0.15, "prompts": 0.15, "ab": 0.10, "gate": 0.15,
             "publish": 0.05}
    counts = {s: int(n_runs * f) for s, f in share.items()}
    counts["train"] += n_runs - sum(counts.values())
    made = {s: 0 for s in counts}
    now = int(time.time() * 1000)

    def run(stage, name, tags=(), metrics=(), params=(), parent=None):
        t = {T.STAGE: stage, **dict(tags)}
        if parent:
            t["mlflow.parentRunId"] = parent
        rid = client.create_run(experiment_id(stage), run_name=name, tags=t).info.run_id
        client.log_batch(rid, metrics=list(metrics), params=[Param(k, str(v)) for k, v in params])
        client.set_terminated(rid)
        made[stage] += 1
        return rid

    for i in range(counts["mine"]):
        run("mine", f"mine-{i}", {T.DATASET_VERSION: f"{i:016x}"},
            [Metric(k, v, now, 0) for k, v in {"read": 1000 + i, "kept": 800, "rejected": 10, "filtered.pii": 5,
                                                "filtered.duplicate": 185 + i, "split.train": 720,
                                                "split.eval": 80}.items()])
    for i in range(counts["train"]):
        ms = [Metric(k, v, now + step, step) for step in range(1, 21)
              for k, v in {"loss": 4.0 / step, "learning_rate": 2e-4, "grad_norm": 1.0 / step,
                           "tokens_per_s": 170.0 + i % 7, **({"eval_loss": 4.2 / step} if step % 5 == 0 else {})
                           }.items()]
        run("train", f"train-{i}", {T.BASE_MODEL: "smollm2-135m-instruct", T.BACKEND: "trl"}, ms,
            [("lora.r", 8), ("max_steps", 20)])
    for stage, kids_per in (("embeddings", 4), ("prompts", 4)):
        parents = counts[stage] // (kids_per + 1)
        for i in range(parents):
            pid = run(stage, f"{stage}-{i}")
            for k in range(kids_per):
                if made[stage] < counts[stage]:
                    run(stage, f"{stage}-{i}-{k}", params=[("model", f"m{k}"), ("task", "stsb"), ("variant", f"v{k}"),
                                                           ("target", "base")],
                        metrics=[Metric("spearman", 0.5 + k / 10, now, 0)], parent=pid)
        while made[stage] < counts[stage]:
            run(stage, f"{stage}-extra-{made[stage]}")
    for i in range(counts["ab"]):
        run("ab", f"ab-{i}", {T.AB_SRM_STATUS: "ok", "flywheel.ab.verdict.v2": "keep running"})
    for i in range(counts["gate"]):
        run("gate", f"gate-{i}", {T.GATE_DECISION: ("pass", "fail", "error")[i % 3],
                                  T.input_tag(T.IN_CANDIDATE): f"runs:/{i:032x}/adapter"})
    for i in range(counts["publish"]):
        run("publish", f"publish-{i}", {T.input_tag(T.IN_MODEL_URI): f"models:/other/{i}"})
    return made


# The experiments each page searches (the overview looks at every stage).
PAGE_STAGES = {"overview": None, "datasets": ["mine"], "training": ["train"], "embeddings": ["embeddings"],
               "prompt_eval": ["prompts"], "ab": ["ab"], "gate": ["gate", "publish"]}


def bare_search(stages: list[str] | None = None) -> tuple[float, int]:
    """The floor: every run of the given flywheel experiments (all when None) via MlflowClient.search_runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    t0 = time.perf_counter()
    exps = [e.experiment_id for e in client.search_experiments(filter_string="name LIKE 'flywheel/%'")
            if stages is None or e.name.split("/", 1)[1] in stages]
    n, token = 0, None
    while True:
        page = client.search_runs(exps, max_results=1000, page_token=token)
        n += len(page)
        token = page.token
        if not token:
            break
    return time.perf_counter() - t0, n


def render(page: str, app: str, clear: bool = True) -> float:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from flywheel.pipelines import store_read

    st.cache_data.clear()
    st.cache_resource.clear()
    store_read.clear_caches()  # the artifact bytes a server proxied: a first render downloads them again
    at = AppTest.from_file(app, default_timeout=120)
    if page == "overview":
        t0 = time.perf_counter()
        at.run()
    else:
        at.run()
        if clear:  # the overview's answers must not serve this page
            st.cache_data.clear()
            st.cache_resource.clear()
            store_read.clear_caches()
        t0 = time.perf_counter()
        at.switch_page(f"pages/{page}.py").run()
    dt = time.perf_counter() - t0
    if at.exception:
        raise RuntimeError(f"{page}: {[e.value for e in at.exception]}")
    return dt


def measure(n_runs: int, tmp: Path) -> dict:
    """Fill the store MLFLOW_TRACKING_URI names, then the floor and every page's first render."""
    t0 = time.perf_counter()
    made = fill(n_runs)
    # One run of every stage with its artifacts on top (newest, so every page shows real content).
    spec = importlib.util.spec_from_file_location("dash_fixture", ROOT / "tests" / "dashboard" / "conftest.py")
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    try:
        fixture.build_store(tmp / "staging")
        with_artifacts = True
    except BaseException as e:  # pytest.skip when ../shared/data is absent
        print(f"note: no artifact runs ({e}); pages render their tables only")
        with_artifacts = False
    fill_s = time.perf_counter() - t0

    bare = [bare_search() for _ in range(3)]
    bare_s, total_runs = min(b[0] for b in bare), bare[0][1]

    app = str(ROOT / "dashboard" / "app.py")
    t0 = time.perf_counter()
    for page in PAGES:  # warm-up: imports (plotly, pandas, mlflow stores) paid once, as by a running server
        render(page, app)
    warmup_s = time.perf_counter() - t0
    pages, same = {}, {}
    for page in PAGES:
        pages[page] = min(render(page, app) for _ in range(2))
        same[page] = min(bare_search(PAGE_STAGES[page])[0] for _ in range(3))
    print(f"{os.environ['MLFLOW_TRACKING_URI']}: {total_runs} runs (fill {fill_s:.0f} s); bare search_runs "
          f"{bare_s:.3f} s")
    for p, s in pages.items():
        print(f"  {p:12s} first render {s:6.3f} s  ({s / bare_s:5.2f}x bare search of all runs, "
              f"{s / same[p]:5.2f}x of this page's {same[p]:.3f} s)  {'ok' if s < TARGET_S else 'SLOW'}")
    return {
        "runs_in_store": total_runs, "bulk_runs": made, "artifact_runs": with_artifacts,
        "fill_s": round(fill_s, 1), "warmup_all_pages_s": round(warmup_s, 2),
        "bare_search_runs_s": round(bare_s, 3),
        "first_render_s": {p: round(s, 3) for p, s in pages.items()},
        "ratio_to_bare_search": {p: round(s / bare_s, 2) for p, s in pages.items()},
        "bare_search_same_runs_s": {p: round(s, 3) for p, s in same.items()},
        "ratio_to_bare_search_same_runs": {p: round(pages[p] / s, 2) for p, s in same.items()},
        "max_first_render_s": round(max(pages.values()), 3), "target_s": TARGET_S,
        "meets_target": max(pages.values()) < TARGET_S,
    }


def on_sqlite(n_runs: int, tmp: Path) -> dict:
    home = tmp / ".flywheel"
    home.mkdir(parents=True)
    os.environ["FLYWHEEL_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    return measure(n_runs, tmp)


def on_server(n_runs: int, tmp: Path) -> dict:
    """A team server of the bench's own (one worker, the default), stopped again whatever happens."""
    from flywheel.pipelines import server

    d = tmp / "server"
    d.mkdir(parents=True)
    tmp.chmod(0o755)  # as root, PostgreSQL runs as `postgres`, who must reach its data folder
    d.chmod(0o755)
    home = tmp / ".flywheel-client"
    home.mkdir()
    try:
        t0 = time.perf_counter()
        state = server.start(server.ServerConfig(dir=str(d), port=0, pg_port=0), log=lambda _m: None)
        start_s = time.perf_counter() - t0
        os.environ["FLYWHEEL_HOME"] = str(home)
        os.environ["MLFLOW_TRACKING_URI"] = state["mlflow"]["url"]
        return {**measure(n_runs, tmp), "server_start_s": round(start_s, 1),
                "server": {"workers": server.ServerConfig().workers, "postgres": state["postgres"]["which"]}}
    finally:
        server.stop(d, log=lambda _m: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--stores", default="sqlite,server", help="comma-separated: sqlite, server")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dashboard.json"))
    args = ap.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not stores or set(stores) - {"sqlite", "server"}:
        ap.error(f"--stores: sqlite and/or server, not {args.stores!r}")
    from flywheel.foundation.io import write_json

    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    measured = {}
    for store in stores:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-dashboard-{store}-"))
        measured[store] = (on_sqlite if store == "sqlite" else on_server)(args.runs, tmp)
    result = dict(measured.get("sqlite", {}))
    if "server" in measured:
        srv = result["server"] = measured["server"]
        if "sqlite" in measured:
            result["server_to_sqlite_first_render"] = {p: round(srv["first_render_s"][p] / s, 2)
                                                       for p, s in measured["sqlite"]["first_render_s"].items()}
    result.update(
        stores=stores,
        meets_target_all_stores=all(m["meets_target"] for m in measured.values()),
        method="AppTest in-process; st.cache_data/cache_resource and the proxied-artifact cache cleared before "
               "each page; best of 2; bare = MlflowClient.search_runs over all flywheel experiments, paged, best "
               "of 3; the server: PostgreSQL + mlflow server started by the bench, artifacts proxied",
        machine={"python": platform.python_version(), "cpus": os.cpu_count(),
                 "load_avg_1m": round(os.getloadavg()[0], 2)})
    write_json(args.out, result)
    for store, m in measured.items():
        print(f"{store}: max first render {m['max_first_render_s']:.3f} s (target < {TARGET_S} s)")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
