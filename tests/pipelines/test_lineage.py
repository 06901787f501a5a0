"""pipelines/lineage.py: one walk from a model version back to the logs, on a store the stages' writers filled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.pipelines import lineage, registry, store_read, tracking
from flywheel.pipelines import tags as T


@pytest.fixture
def promoted(mlflow_store, tmp_path):
    """mine (the real stage) -> train -> eval -> gate run that registers and promotes -> publish run."""
    import mlflow

    from flywheel.mining.demo_logs import write_demo_logs
    from flywheel.pipelines.mine import MineConfig, run_mine

    logs = tmp_path / "chat-logs.jsonl"
    write_demo_logs(logs, n=60, seed=0)
    mined = run_mine([logs], tmp_path / "dataset", MineConfig(workers=1, progress=False))
    with tracking.start_run("train", "train", inputs={T.IN_DATASET_VERSION: mined["version"],
                                                      T.IN_MINE_RUN: mined["run_id"]},
                            tags={T.BASE_MODEL: "smollm2-135m-instruct"}) as run:
        train = run.info.run_id
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
        (adapter / registry.META_FILE).write_text(json.dumps({
            "base_model": "smollm2-135m-instruct", "dataset_version": mined["version"],
            "mine_run_id": mined["run_id"], "train_run_id": train}))
        mlflow.log_artifacts(str(adapter), "adapter")
    with tracking.start_run("prompts", "eval", inputs={T.IN_TRAIN_RUN: train}) as run:
        evaluation = run.info.run_id
    with tracking.start_run("gate", "gate", inputs={T.IN_CANDIDATE: f"runs:/{train}/adapter",
                                                    T.IN_EVAL_RUN: evaluation, T.IN_TRAIN_RUN: train}) as run:
        gate = run.info.run_id
        model = registry.resolve_model(f"runs:/{train}/adapter", "candidate")
        version = registry.register_adapter("demo", model, tags={
            T.input_tag(T.IN_EVAL_RUN): evaluation, T.input_tag(T.IN_GATE_RUN): gate, T.PROMPT_VARIANT: "concise"})
        registry.promote("demo", version, gate)
        mlflow.set_tag(T.GATE_DECISION, "pass")
    with tracking.start_run("publish", "publish", inputs={T.IN_MODEL_URI: "models:/demo@champion",
                                                          T.IN_GATE_RUN: gate}) as run:
        publish = run.info.run_id
    return {"uri": mlflow_store, "logs": logs, "mine": mined["run_id"], "dataset_version": mined["version"],
            "train": train, "eval": evaluation, "gate": gate, "publish": publish, "version": version}


def test_walk_from_the_champion_back_to_the_logs(promoted):
    version = store_read.model_version(promoted["uri"], "demo", promoted["version"])
    lin = lineage.walk(promoted["uri"], version, find_publish=True)
    assert [(hop or {}).get("run_id") for hop in (lin.gate, lin.eval, lin.train, lin.mine, lin.publish)] == [
        promoted[k] for k in ("gate", "eval", "train", "mine", "publish")]
    assert lin.dataset_version == promoted["dataset_version"]
    assert [Path(p).name for p in lin.logs] == [promoted["logs"].name]
    assert (lin.gate_decision, lin.prompt_variant, lin.base_model) == ("pass", "concise", "smollm2-135m-instruct")
    assert lin.ids()["train_run"] == promoted["train"]


def test_publish_and_dashboard_name_the_same_log_slices(promoted):
    """`flywheel run` mines byte slices and names the real logs on the mine run; both readers must show them
    (the dashboard used to read the mine manifest, which names the slice files)."""
    from mlflow.tracking import MlflowClient

    from flywheel.dashboard import store
    from flywheel.pipelines.publish import lineage as publish_lineage

    sources = [{"path": "/logs/chat.jsonl", "start": 0, "end": 4096}]
    MlflowClient().set_tag(promoted["mine"], T.LOOP_SOURCES, json.dumps(sources))
    from_publish = publish_lineage(registry.resolve_model("models:/demo@champion"))
    store.refresh()
    (champion,) = store.champions()
    from_dashboard = store.lineage(champion)
    assert from_publish["logs"] == from_dashboard["logs"] == ["/logs/chat.jsonl (bytes 0-4096)"]
    assert from_publish["gate_run"] == from_dashboard["gate"]["run_id"] == promoted["gate"]
    assert from_publish["mine_run"] == from_dashboard["mine"]["run_id"] == promoted["mine"]


def test_a_missing_hop_is_unknown_not_a_guess(promoted):
    lin = lineage.walk(promoted["uri"], {"run_id": promoted["train"]})
    assert lin.train["run_id"] == promoted["train"] and lin.mine["run_id"] == promoted["mine"]
    assert lin.gate is None and lin.eval is None and lin.gate_decision is None
    gone = lineage.walk(promoted["uri"], {"tags": {T.PROMOTED_BY_GATE_RUN: "0" * 32}})
    assert gone.gate is None and gone.train is None and gone.logs == []


def test_readme_lists_every_tag():
    """The README's tracking table is generated from pipelines/tags.py: regenerate it when a tag changes."""
    from flywheel.pipelines.tags import markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- tags:begin -->\n", 1)[1].split("\n<!-- tags:end -->", 1)[0]
    assert block == markdown_table(), "README tag table is stale: python -m flywheel.pipelines.tags"
