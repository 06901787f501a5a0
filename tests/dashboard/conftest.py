"""A real MLflow store for the dashboard tests, filled once per session.

The stages' own python entries run where they are cheap: `flywheel.pipelines.mine.run_mine` on the demo logs plus a
300-line slice of ../shared/data/oasst1-en-validation, `flywheel.pipelines.ab.run_ab` twice on growing demo logs (two
looks), `flywheel.pipelines.embeddings.run_bench_embeddings` with the static model on 60 STS-B pairs, and the
registry's `register_adapter` / `promote` for the champion alias history. Stages that need an LLM
(train, eval, gate, publish) are logged through the writers those stages use (`tracking.start_run` with the
tag constants of `pipelines/tags.py`, `tracking.log_metrics`, the registry's functions), with small numbers in
place of a real training (SmolLM2 LoRA, loss 4.07 -> 0.61 in 10 steps, measured on 2 CPU cores): training or
generating in a dashboard fixture costs minutes. Renaming a tag therefore changes what this store holds.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from flywheel.pipelines import tags as T

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()


def shared_path(*parts: str) -> Path:
    """As tests/conftest.py's: a path under ../shared/data, or skip with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} (CI and the dev machine have ../shared/data; a clone may not)")
    return p

EXPECTED: dict = {}


def _log_text(client, run_id: str, path: str, text: str, tmp: Path) -> None:
    local = tmp / run_id / path
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(text, encoding="utf-8")
    client.log_artifact(run_id, str(local), artifact_path=str(Path(path).parent) if "/" in path else None)


def _metrics(client, run_id: str, values: dict, step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    from flywheel.pipelines.tracking import sanitize_metric_name

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(sanitize_metric_name(k), float(v), now, step)
                                      for k, v in values.items()])


def _run(client, stage: str, name: str, inputs: dict | None = None, tags: dict | None = None,
         parent: str | None = None) -> str:
    """A run opened and tagged by the stages' own `tracking.start_run` (stage, commit, `flywheel.input.*`);
    `client` logs its metrics and artifacts afterwards (MLflow accepts them on a finished run)."""
    from flywheel.pipelines import tracking

    extra = {**(tags or {}), **({T.MLFLOW_PARENT_RUN: parent} if parent else {})}
    with tracking.start_run(stage, name, inputs=inputs, tags=extra) as run:
        return run.info.run_id


def build_store(tmp: Path) -> dict:
    """Log one of every stage's runs; returns the numbers the pages must show."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from flywheel.pipelines.tracking import setup

    setup()
    client = MlflowClient()
    expected: dict = {}

    # ---- mine: the real stage on the demo logs (planted PII, duplicates, malformed lines) + an oasst1 slice
    from flywheel.mining.demo_logs import write_demo_logs
    from flywheel.pipelines.mine import MineConfig, run_mine

    src = shared_path("oasst1-en-validation", "messages.jsonl")
    tmp.mkdir(parents=True, exist_ok=True)
    oasst = tmp / "oasst1-en-validation-slice.jsonl"
    oasst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:300]), encoding="utf-8")
    demo = tmp / "demo-logs.jsonl"
    write_demo_logs(demo, n=200, seed=0)
    mined = run_mine([demo, oasst], tmp / "dataset", MineConfig(workers=1, progress=False))
    mine = mined["run_id"]
    c = mined["counts"]
    expected["mine"] = {"read": c["read"], "kept": c["kept"], "filtered": c["filtered"], "version": mined["version"]}
    dataset_version = mined["version"]

    # ---- train: the CPU LoRA numbers measured on this machine (loss 4.07 -> 0.61 in 10 steps, ~3 s/step)
    train_ids = []
    for k, (first, last) in enumerate([(4.07, 0.61), (4.10, 0.92)]):
        run = _run(client, "train", f"smollm2-lora-{k}", inputs={T.IN_DATASET_VERSION: dataset_version,
                                                                  T.IN_MINE_RUN: mine},
                   tags={T.BASE_MODEL: "smollm2-135m-instruct", T.BASE_MODEL_SHA256: "f" * 64,
                         T.BACKEND: "trl", T.DEVICE: "cpu"})
        for step in range(1, 11):
            loss = first + (last - first) * (step - 1) / 9
            values = {"loss": loss, "learning_rate": 2e-4 * (1 - step / 10), "grad_norm": 3.0 / step,
                      "tokens_per_s": 170.0 + step}
            if step % 5 == 0:
                values["eval_loss"] = loss + 0.2
            _metrics(client, run, values, step=step)
        _log_text(client, run, "audit.json", json.dumps({  # the shape training/audit.py writes
            "template": "smollm2-chatml training variant (renders the dataset byte-identically)",
            "examples": 50, "examples_used": 50, "tokens_total": 9120, "tokens_trained": 3075,
            "trained_fraction": 0.3372, "trained_per_example": {"min": 18, "mean": 61.5, "max": 141},
            "zero_trained_examples": 0, "zero_trained_ids": [], "eot_token": "<|im_end|>", "eot_in_input": 150,
            "eot_trained": 50, "examples_with_eot_trained": 50, "truncated": 2, "dropped_overlong": 0,
            "dropped_truncated_to_nothing": 0, "max_length_seen": 256, "problems": [], "ok": True}), tmp)
        _log_text(client, run, "adapter/flywheel_adapter.json", json.dumps({
            "base_model": "smollm2-135m-instruct", "base_model_sha256": "f" * 64, "dataset_version": dataset_version,
            "mine_run_id": mine, "train_run_id": run, "chat_template": "…", "eos_tokens": ["<|im_end|>"]}), tmp)
        _log_text(client, run, "adapter/adapter_config.json", json.dumps({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}), tmp)
        client.log_table(run, pd.DataFrame({"prompt": ["Is tofu a protein?"], "base": ["Tofu is"],
                                            "adapter": ["Yes, tofu is a complete protein."]}), "generations.json")
        client.set_terminated(run)
        train_ids.append(run)
    expected["train"] = {"final_loss": 0.61}

    # ---- embeddings (1): a two-model retrieval benchmark logged as the stage logs it (nDCG per query on cranfield
    # is what the stage writes), so the page's significance marks, CIs and A-vs-B drill-down have two models
    parent = _run(client, "embeddings", "bench-embeddings-two-models")
    board = pd.DataFrame([
        {"model": "paraphrase-MiniLM-L3-v2", "task": "cranfield", "ndcg@10": 0.5249, "mrr@10": 0.7192,
         "texts_per_s": 57.3, "latency_p50_ms": 38.7, "latency_p95_ms": 111.3, "dims": 384, "vs_best": "best"},
        {"model": "static-64", "task": "cranfield", "ndcg@10": 0.2397, "mrr@10": 0.4126, "texts_per_s": 16181.0,
         "latency_p50_ms": 0.69, "latency_p95_ms": 24.8, "dims": 64, "vs_best": "worse* (p_adj=3.11e-05)"},
    ])
    _log_text(client, parent, "leaderboard.csv", board.to_csv(index=False), tmp)
    _log_text(client, parent, "comparisons.csv", pd.DataFrame([{
        "task": "cranfield", "metric": "ndcg@10", "model_a": "static-64", "model_b": "paraphrase-MiniLM-L3-v2",
        "n": 5, "estimate": -0.285, "ci_low": -0.37, "ci_high": -0.199, "test": "wilcoxon", "p_value": 3.1e-05,
        "p_adjusted": 3.1e-05, "significant": True, "verdict": "paraphrase-MiniLM-L3-v2 better"}]).to_csv(index=False),
        tmp)
    for model, score in [("static-64", 0.24), ("paraphrase-MiniLM-L3-v2", 0.52)]:
        kid = _run(client, "embeddings", f"{model} x cranfield", parent=parent)
        client.log_batch(kid, params=[mlflow.entities.Param(k, v) for k, v in
                                      {"model": model, "task": "cranfield", "dims": "64", "size_mb": "1"}.items()])
        _log_text(client, kid, "per_query.csv", pd.DataFrame({
            "query_id": [str(13 + 10 * i) for i in range(5)], "ndcg@10": [score + (i - 2) / 20 for i in range(5)]}
        ).to_csv(index=False), tmp)
        client.set_terminated(kid)
    client.set_terminated(parent)
    expected["embeddings_two"] = {"run_id": parent, "best": "paraphrase-MiniLM-L3-v2"}

    # ---- embeddings (2): the real stage with the fast static model on a slice of STS-B (newest: shown first)
    from flywheel.pipelines.embeddings import EmbeddingsConfig, run_bench_embeddings

    bench = run_bench_embeddings(EmbeddingsConfig(
        models=["static-64"], tasks=["stsb"], out=str(tmp / "embeddings"), cache_dir=str(tmp / "emb-cache"),
        max_pairs=60, speed={"n_texts": 32, "n_latency": 5}, stats={"n_boot": 200}), quiet=True)
    row = next(r for r in bench["leaderboard"] if r["model"] == "static-64")
    expected["embeddings"] = {"run_id": bench["run_id"], "model": "static-64", "spearman": row["spearman"]}

    # ---- ab: the real stage, twice on growing demo logs: two looks of the same experiment
    from flywheel.evals.ab.config import AbConfig
    from flywheel.pipelines.ab import run_ab

    for n in (120, 200):
        looks = tmp / f"ab-logs-{n}.jsonl"
        write_demo_logs(looks, n=n, seed=0)
        analysed = run_ab([looks], AbConfig())
    report = analysed["report"]
    first = next(c for c in report["comparisons"] if c["metric"] == report["primary_metric"])
    expected["ab"] = {"variant": first["variant"], "control": report["control"], "estimate": first["estimate"],
                      "srm": report["srm"]["status"], "decision": report["verdicts"][first["variant"]]["decision"],
                      "run_id": analysed["run_id"]}

    # ---- prompts (flywheel eval): cells, comparisons, child runs with cases
    evaluation = _run(client, "prompts", "eval-demo", inputs={T.IN_TRAIN_RUN: train_ids[0]})
    cells = [{"variant": v, "target": t, "metric": "rougeL", "mean": m, "ci_low": m - 0.05, "ci_high": m + 0.05,
              "n": 20, "direction": "higher"}
             for (v, t, m) in [("v1", "base", 0.21), ("v1", "adapter", 0.34), ("v2", "base", 0.25),
                                         ("v2", "adapter", 0.37)]]
    _log_text(client, evaluation, "results.json", json.dumps({"cells": cells, "comparisons": [
        {"variant": "v1/adapter", "control": "v1/base", "metric": "rougeL", "test": "paired_t", "estimate": 0.13,
         "ci_low": 0.05, "ci_high": 0.21, "p_value": 0.003, "p_adjusted": 0.006}]}), tmp)
    for v in ("v1", "v2"):
        for t in ("base", "adapter"):
            kid = _run(client, "prompts", f"{v}-{t}", parent=evaluation)
            client.log_batch(kid, params=[mlflow.entities.Param("variant", v), mlflow.entities.Param("target", t),
                                          mlflow.entities.Param("prompt_version", "1")])
            client.log_table(kid, pd.DataFrame({"case_id": ["c1", "c2"], "prompt": ["Is kale healthy?"] * 2,
                                                "output": [f"{v}-{t} says kale is great", "ok"],
                                                "rougeL": [0.3, 0.2]}), "cases.json")
            client.set_terminated(kid)
    client.set_terminated(evaluation)
    expected["prompts"] = {"mean": 0.34}

    # ---- gate + registry: two promotions through the registry's own code, so the alias has a history
    from flywheel.pipelines import registry

    gate_ids = []
    for k in range(2):
        gate = _run(client, "gate", f"gate-{k}", inputs={T.IN_CANDIDATE: f"runs:/{train_ids[k]}/adapter",
                                                           T.IN_EVAL_RUN: evaluation, T.IN_TRAIN_RUN: train_ids[k],
                                                           T.IN_DATASET_VERSION: dataset_version},
                    tags={T.GATE_DECISION: "pass"})
        _log_text(client, gate, "gate_report.md", "## Gate: PASS\n\n| metric | champion | candidate |\n|---|---|---|\n"
                                                  "| rougeL | 0.21 | 0.34 |\n", tmp)
        _log_text(client, gate, "gate.json", json.dumps({"decision": "pass"}), tmp)
        model = registry.resolve_model(f"runs:/{train_ids[k]}/adapter", "candidate")
        version = registry.register_adapter("flywheel-demo", model, tags={
            T.input_tag(T.IN_EVAL_RUN): evaluation, T.input_tag(T.IN_GATE_RUN): gate})
        registry.promote("flywheel-demo", version, gate)
        client.set_tag(gate, T.PROMOTED_VERSION, version)
        client.set_terminated(gate)
        gate_ids.append(gate)
    failing = _run(client, "gate", "gate-refused", inputs={T.IN_CANDIDATE: "runs:/x/adapter"},
                   tags={T.GATE_DECISION: "fail"})
    _log_text(client, failing, "gate_report.md", "## Gate: FAIL\n\nrougeL did not improve.\n", tmp)
    client.set_terminated(failing)

    publish = _run(client, "publish", "publish-demo",
                   inputs={T.IN_MODEL_URI: "models:/flywheel-demo@champion", T.IN_GATE_RUN: gate_ids[1],
                           T.IN_TRAIN_RUN: train_ids[1], T.IN_DATASET_VERSION: dataset_version},
                   tags={T.MODELFILE_PATH: "Modelfiles/flywheel-demo/Modelfile"})
    _log_text(client, publish, "Modelfile", 'FROM smollm2:135m\nADAPTER ./adapter\nPARAMETER stop "<|im_end|>"\n',
              tmp)
    _log_text(client, publish, "README.md", "# flywheel-demo\n\nLineage: logs → dataset → train → eval → gate.\n",
              tmp)
    client.set_terminated(publish)
    loop = _run(client, "run", "loop-1",
                inputs={T.IN_MINE_RUN: mine, T.IN_TRAIN_RUN: train_ids[1], T.IN_GATE_RUN: gate_ids[1]})
    client.set_terminated(loop)
    expected["gate"] = {"champion_version": "2", "gate_run": gate_ids[1], "publish_run": publish,
                        "train_run": train_ids[1], "mine_run": mine, "dataset_version": dataset_version}
    return expected


@pytest.fixture(scope="session")
def dash_store_built(tmp_path_factory):
    """Build the store once per session; the environment is restored right after, so tests of other packages
    that run later in the same session never see it (tests use `dash_store`, which points at it per test)."""
    shared_path("oasst1-en-validation", "messages.jsonl")
    home = tmp_path_factory.mktemp("dash") / ".flywheel"
    home.mkdir(parents=True)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp, _mlflow_uris_restored():
        mp.setenv("FLYWHEEL_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        expected = build_store(home.parent / "staging")
    return {"uri": uri, "home": home, "expected": expected}


@pytest.fixture
def dash_store(dash_store_built, monkeypatch):
    """FLYWHEEL_HOME + MLFLOW_TRACKING_URI of the filled store for one test (AppTest runs pages in-process)."""
    monkeypatch.setenv("FLYWHEEL_HOME", str(dash_store_built["home"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dash_store_built["uri"])
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with _mlflow_uris_restored():
        yield dash_store_built


@contextlib.contextmanager
def _mlflow_uris_restored():
    """mlflow keeps the tracking/registry URI in module globals once set: put back what was there."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    try:
        yield
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved


@pytest.fixture
def empty_store(tmp_path, monkeypatch):
    """A FLYWHEEL_HOME where nothing has run yet (no mlflow.db: the dashboard must not create one)."""
    home = tmp_path / ".flywheel"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    assert not (home / "mlflow.db").exists(), "the dashboard created the store it should only read"


@pytest.fixture
def bare_runs_store(tmp_path, monkeypatch):
    """One run per stage with no metrics, no artifacts (a crashed or foreign run): pages must not fail."""
    home = tmp_path / ".flywheel"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    from mlflow.tracking import MlflowClient

    from flywheel.pipelines.tracking import STAGES, experiment_id, setup

    with _mlflow_uris_restored():
        setup()
        client = MlflowClient()
        for stage in STAGES:
            run = client.create_run(experiment_id(stage), run_name=f"bare-{stage}", tags={T.STAGE: stage})
            client.set_terminated(run.info.run_id, status="FAILED")
        client.create_registered_model("half-registered")
        yield home
