"""A real MLflow store for the dashboard tests, filled once per session.

Runs are logged exactly as the cross-stage contracts (README, `pipelines/*.py`) say each stage logs them, with
the real mlflow client, real artifacts and numbers computed from small slices of ../shared/data
(oasst1 counts, persuasion ratings through scipy). Where a stage's python entry exists and is cheap it is called
instead (`pipelines.ab.run_ab`, `pipelines.mine.run_mine`); training is logged train-shaped from numbers measured
on this machine (see /work/shared/notes/offline-models.md), because training an LLM in a dashboard fixture
would cost minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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

    from pipelines.tracking import sanitize_metric_name

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(sanitize_metric_name(k), float(v), now, step)
                                      for k, v in values.items()])


def _run(client, stage: str, name: str, inputs: dict | None = None, tags: dict | None = None,
         parent: str | None = None) -> str:
    from pipelines.tracking import TAG_INPUT, TAG_STAGE, experiment_id

    all_tags = {TAG_STAGE: stage, "flywheel.git_commit": "0" * 40}
    all_tags.update({TAG_INPUT + k: str(v) for k, v in (inputs or {}).items()})
    all_tags.update(tags or {})
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    return client.create_run(experiment_id(stage), run_name=name, tags=all_tags).info.run_id


def build_store(tmp: Path) -> dict:
    """Log one of every stage's runs; returns the numbers the pages must show."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from scipy import stats

    from pipelines.tracking import setup

    setup()
    client = MlflowClient()
    expected: dict = {}

    # ---- mine: counts of a real oasst1 slice (what the mine filters would drop, counted by reason)
    src = shared_path("oasst1-en-validation", "messages.jsonl")
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()[:400]]
    deleted = sum(r["deleted"] for r in rows)
    prompter = sum(1 for r in rows if not r["deleted"] and r["role"] == "prompter")
    short = sum(1 for r in rows if not r["deleted"] and r["role"] == "assistant" and len(r["text"]) < 20)
    kept_rows = [r for r in rows if not r["deleted"] and r["role"] == "assistant" and len(r["text"]) >= 20]
    kept = len(kept_rows)
    n_eval = kept // 10
    mine = _run(client, "mine", "mine-oasst1", tags={"flywheel.dataset_version": "a1b2c3d4e5f6a7b8",
                                                     "flywheel.dataset_path": str(tmp / "dataset")})
    _metrics(client, mine, {"read": len(rows), "kept": kept, "rejected": 0, "filtered.deleted": deleted,
                            "filtered.not_assistant": prompter, "filtered.too_short": short,
                            "split.train": kept - n_eval, "split.eval": n_eval, "preferences": 7})
    samples = []
    for i, r in enumerate(kept_rows[:20]):
        text = r["text"] + (" Write to <EMAIL> or call <PHONE>." if i == 0 else "")
        samples.append({"id": r["message_id"], "messages": [{"role": "user", "content": "question"},
                                                            {"role": "assistant", "content": text}],
                        "rating": 5, "source": "oasst1", "prompt_variant": None, "context": None,
                        "cluster": r["message_id"]})
    _log_text(client, mine, "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples), tmp)
    _log_text(client, mine, "manifest.json", json.dumps({
        "version": "a1b2c3d4e5f6a7b8", "inputs": [{"path": str(src), "format": "oasst", "read": len(rows)}],
        "counts": {"read": len(rows), "kept": kept}, "splits": {"train": kept - n_eval, "eval": n_eval}}), tmp)
    client.set_terminated(mine)
    expected["mine"] = {"read": len(rows), "kept": kept, "deleted": deleted}

    # ---- train: the CPU LoRA numbers measured on this machine (loss 4.07 -> 0.61 in 10 steps, ~3 s/step)
    train_ids = []
    for k, (first, last) in enumerate([(4.07, 0.61), (4.10, 0.92)]):
        run = _run(client, "train", f"smollm2-lora-{k}", inputs={"dataset_version": "a1b2c3d4e5f6a7b8",
                                                                  "mine_run": mine},
                   tags={"flywheel.base_model": "smollm2-135m-instruct", "flywheel.base_model_sha256": "f" * 64,
                         "flywheel.backend": "trl", "flywheel.device": "cpu"})
        for step in range(1, 11):
            loss = first + (last - first) * (step - 1) / 9
            values = {"loss": loss, "learning_rate": 2e-4 * (1 - step / 10), "grad_norm": 3.0 / step,
                      "tokens_per_s": 170.0 + step}
            if step % 5 == 0:
                values["eval_loss"] = loss + 0.2
            _metrics(client, run, values, step=step)
        _log_text(client, run, "audit.json", json.dumps({
            "examples": 50, "zero_trained_examples": 0, "eot_trained": True, "truncated": 2,
            "trained_tokens_mean": 61.5, "trained_tokens_per_example": [60, 63]}), tmp)
        _log_text(client, run, "adapter/flywheel_adapter.json", json.dumps({
            "base_model": "smollm2-135m-instruct", "base_model_sha256": "f" * 64, "dataset_version": "a1b2c3d4e5f6a7b8",
            "mine_run_id": mine, "train_run_id": run, "chat_template": "…", "eos_tokens": ["<|im_end|>"]}), tmp)
        client.log_table(run, pd.DataFrame({"prompt": ["Is tofu a protein?"], "base": ["Tofu is"],
                                            "adapter": ["Yes, tofu is a complete protein."]}), "generations.json")
        client.set_terminated(run)
        train_ids.append(run)
    expected["train"] = {"final_loss": 0.61}

    # ---- embeddings: a parent with leaderboard / comparisons, children with per-query tables
    parent = _run(client, "embeddings", "bench-embeddings")
    board = pd.DataFrame([
        {"model": "static-64", "task": "stsb", "spearman": 0.612, "pearson": 0.598, "texts_per_s": 16000.0,
         "latency_p50_ms": 0.2, "latency_p95_ms": 0.4, "dims": 64},
        {"model": "all-MiniLM-L6-v2", "task": "stsb", "spearman": 0.821, "pearson": 0.827, "texts_per_s": 215.0,
         "latency_p50_ms": 7.0, "latency_p95_ms": 11.0, "dims": 384},
    ])
    _log_text(client, parent, "leaderboard.csv", board.to_csv(index=False), tmp)
    _log_text(client, parent, "comparisons.csv", pd.DataFrame([{
        "task": "stsb", "metric": "spearman", "model_a": "all-MiniLM-L6-v2", "model_b": "static-64",
        "diff": 0.209, "ci_low": 0.15, "ci_high": 0.27, "p_value": 0.0001, "p_adjusted": 0.0002,
        "significant": True}]).to_csv(index=False), tmp)
    for model, score in [("static-64", 0.6), ("all-MiniLM-L6-v2", 0.8)]:
        kid = _run(client, "embeddings", f"{model}-stsb", parent=parent)
        client.log_batch(kid, params=[mlflow.entities.Param(k, v) for k, v in
                                      {"model": model, "task": "stsb", "dims": "64", "size_mb": "1"}.items()])
        _log_text(client, kid, "per_query.csv", pd.DataFrame({
            "query_id": [f"q{i}" for i in range(5)], "spearman": [score + i / 100 for i in range(5)]}
        ).to_csv(index=False), tmp)
        client.set_terminated(kid)
    client.set_terminated(parent)
    expected["embeddings"] = {"best": "all-MiniLM-L6-v2", "spearman": 0.821}

    # ---- ab: Welch t of persuasion ratings by prompt type, computed with scipy
    persuasion = pd.read_csv(shared_path("anthropic-persuasion-vegan-subset", "persuasion.csv"))
    groups = {k: g["persuasiveness_metric"].dropna().to_numpy() for k, g in persuasion.groupby("prompt_type")}
    control, *variants = sorted(groups)
    comparisons, verdicts = [], {}
    for v in variants:
        t = stats.ttest_ind(groups[v], groups[control], equal_var=False)
        ci = t.confidence_interval()
        diff = float(groups[v].mean() - groups[control].mean())
        comparisons.append({"variant": v, "control": control, "metric": "persuasiveness", "test": "welch_t",
                            "estimate": diff, "ci_low": float(ci.low), "ci_high": float(ci.high),
                            "p_value": float(t.pvalue), "p_adjusted": min(1.0, float(t.pvalue) * len(variants)),
                            "chance_to_beat_control": 0.9, "expected_loss": 0.01})
        verdicts[v] = {"verdict": "keep running", "reasons": ["not significant after Holm"]}
    report = {"comparisons": comparisons, "srm": {"p_value": 0.41, "status": "ok"}, "verdicts": verdicts}
    ab = _run(client, "ab", "ab-persuasion", tags={"flywheel.ab.srm_status": "ok",
                                                   **{f"flywheel.ab.verdict.{v}": "keep running" for v in variants}})
    _log_text(client, ab, "report.json", json.dumps(report), tmp)
    client.set_terminated(ab)
    expected["ab"] = {"variant": variants[0], "control": control, "estimate": comparisons[0]["estimate"]}

    # ---- prompts (flywheel eval): cells, comparisons, child runs with cases
    evaluation = _run(client, "prompts", "eval-demo", inputs={"train_run": train_ids[0]})
    cells = [{"variant": v, "target": t, "metric": "rougeL", "mean": m, "ci_low": m - 0.05, "ci_high": m + 0.05,
              "n": 20} for (v, t, m) in [("v1", "base", 0.21), ("v1", "adapter", 0.34), ("v2", "base", 0.25),
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

    # ---- gate + registry: two promotions, so the alias has a history
    client.create_registered_model("flywheel-demo")
    gate_ids = []
    for k, (since, until) in enumerate([("2026-11-20T10:00:00+00:00", "2026-11-25T09:00:00+00:00"),
                                         ("2026-11-25T09:00:00+00:00", None)]):
        gate = _run(client, "gate", f"gate-{k}", inputs={"candidate": f"runs:/{train_ids[k]}/adapter",
                                                           "eval_run": evaluation},
                    tags={"flywheel.gate.decision": "pass", "flywheel.promoted_version": str(k + 1)})
        _log_text(client, gate, "gate_report.md", f"## Gate: PASS\n\n| metric | champion | candidate |\n|---|---|---|\n"
                                                  f"| rougeL | 0.21 | 0.34 |\n", tmp)
        _log_text(client, gate, "gate.json", json.dumps({"decision": "pass"}), tmp)
        client.set_terminated(gate)
        mv = client.create_model_version("flywheel-demo", f"runs:/{train_ids[k]}/adapter", run_id=train_ids[k])
        tags = {"flywheel.champion_since": since, "flywheel.promoted_by_gate_run": gate,
                "flywheel.dataset_version": "a1b2c3d4e5f6a7b8", "flywheel.train_run": train_ids[k],
                "flywheel.eval_run": evaluation}
        if until:
            tags["flywheel.champion_until"] = until
        for key, value in tags.items():
            client.set_model_version_tag("flywheel-demo", mv.version, key, value)
        client.set_registered_model_alias("flywheel-demo", "champion", mv.version)
        gate_ids.append(gate)
    failing = _run(client, "gate", "gate-refused", inputs={"candidate": "runs:/x/adapter"},
                   tags={"flywheel.gate.decision": "fail"})
    _log_text(client, failing, "gate_report.md", "## Gate: FAIL\n\nrougeL did not improve.\n", tmp)
    client.set_terminated(failing)

    publish = _run(client, "publish", "publish-demo", tags={"flywheel.modelfile_path": "Modelfiles/flywheel-demo",
                                                            "flywheel.input.model_uri": "models:/flywheel-demo/2"})
    _log_text(client, publish, "Modelfile", 'FROM smollm2:135m\nADAPTER ./adapter\nPARAMETER stop "<|im_end|>"\n', tmp)
    _log_text(client, publish, "README.md", "# flywheel-demo\n\nLineage: logs → dataset → train → eval → gate.\n", tmp)
    client.set_terminated(publish)
    expected["gate"] = {"champion_version": "2", "gate_run": gate_ids[1], "publish_run": publish,
                        "train_run": train_ids[1], "mine_run": mine}
    return expected


@pytest.fixture(scope="session")
def dash_store(tmp_path_factory):
    """FLYWHEEL_HOME + MLFLOW_TRACKING_URI of a filled store (process env: AppTest runs pages in-process)."""
    shared_path("oasst1-en-validation", "messages.jsonl")
    home = tmp_path_factory.mktemp("dash") / ".flywheel"
    home.mkdir(parents=True)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        expected = build_store(home.parent / "staging")
        yield {"uri": uri, "home": home, "expected": expected}
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def empty_store(tmp_path, monkeypatch):
    """A FLYWHEEL_HOME where nothing has run yet (no mlflow.db: the dashboard must not create one)."""
    home = tmp_path / ".flywheel"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    assert not (home / "mlflow.db").exists(), "the dashboard created the store it should only read"

