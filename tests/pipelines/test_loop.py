"""`flywheel run`: only new logs, the threshold, idempotent re-runs, and the whole loop end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.pipelines import registry
from flywheel.pipelines.loop import LoopConfig, demo_loop_config, new_slices, run_loop


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """mlflow.set_registry_uri exports MLFLOW_REGISTRY_URI; drop it so each test reads its own store."""
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def test_new_slices_appends_rewrites_and_partial_lines(tmp_path):
    from flywheel.pipelines.loop import _prefix_sha

    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"x":1}\n{"x":2}\n{"x":3')  # last line still being written
    s = new_slices([f], {"files": {}})
    assert s == [{"path": str(f), "start": 0, "end": 16, "reason": "new file"}]
    state = {"files": {str(f): {"bytes": 16, "sha256": _prefix_sha(f, 16)}}}
    assert new_slices([f], state) == []  # only the unfinished line is left: nothing new yet
    with open(f, "ab") as fh:
        fh.write(b'}\n{"x":4}\n')
    assert new_slices([f], state) == [{"path": str(f), "start": 16, "end": 32, "reason": "appended"}]
    f.write_bytes(b'{"y":1}\n{"y":2}\n{"y":3}\n')  # rotated / rewritten: all of it is new
    assert new_slices([f], state)[0] == {"path": str(f), "start": 0, "end": 24, "reason": "rewritten"}


def test_threshold_skip_then_nothing_to_do(mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    from flywheel.mining.demo_logs import write_demo_logs

    logs = tmp_path / "logs"
    write_demo_logs(logs / "day1.jsonl", n=40, seed=1)
    cfg = LoopConfig(inputs=[str(logs)], work_dir=str(tmp_path / "work"), min_new_records=1000,
                     mine={"workers": 1, "progress": False})
    said: list[str] = []
    first = run_loop(cfg, log=said.append)
    assert first["status"] == "skipped" and "min_new_records=1000" in first["message"]
    kept1 = first["mine"]["kept"]
    assert 0 < kept1 < 1000 and "train" not in first
    run = MlflowClient().get_run(first["run_id"])
    assert run.data.tags["flywheel.stage"] == "run" and run.data.tags["flywheel.run.status"] == "skipped"
    assert run.data.tags["flywheel.input.mine_run"] == first["mine"]["run_id"]
    sources = json.loads(MlflowClient().get_run(first["mine"]["run_id"]).data.tags["flywheel.loop.sources"])
    assert sources[0]["path"] == str((logs / "day1.jsonl").resolve()) and sources[0]["start"] == 0

    again = run_loop(cfg, log=said.append)
    assert again["status"] == "no_new_logs" and "nothing to do" in said[-1]

    # More logs arrive: the pending ones are mined again with them, so small trickles add up.
    write_demo_logs(logs / "day2.jsonl", n=40, seed=2)
    third = run_loop(cfg, log=said.append)
    assert third["status"] == "skipped" and third["mine"]["kept"] > kept1
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert len(state["pending"]) == 2 and len(state["files"]) == 2


def test_bad_inputs_are_clear_errors(tmp_path):
    from flywheel.foundation.errors import InputError

    with pytest.raises(InputError, match="no such file"):
        run_loop(LoopConfig(inputs=[str(tmp_path / "missing")], work_dir=str(tmp_path / "w")))
    with pytest.raises(InputError, match="no log files"):
        run_loop(LoopConfig(inputs=[], work_dir=str(tmp_path / "w")))


@pytest.mark.slow
def test_demo_loop_end_to_end(mlflow_store, tmp_path, monkeypatch):
    """Demo logs -> mine -> train (8 CPU steps) -> eval + gate vs the base -> promote -> publish; re-run: nothing."""
    from flywheel.mining.demo_logs import write_demo_logs
    from flywheel.training.modelfile import parse

    monkeypatch.chdir(tmp_path)
    write_demo_logs(tmp_path / "logs" / "demo.jsonl", n=300, seed=0)
    cfg = demo_loop_config(tmp_path / "logs", tmp_path / "work",
                           publish_config={"base": "ollama", "gguf_adapter": False})  # GGUF: test_publish
    res = run_loop(cfg)
    assert res["status"] == "pass", res["gate"]
    assert res["gate"]["promoted_version"] == "1"
    champ = registry.champion("flywheel-demo")
    assert champ.tags["flywheel.input.train_run"] == res["train"]["run_id"]
    assert champ.tags["flywheel.dataset_version"] == res["mine"]["version"]
    mf = parse(Path(res["publish"]["modelfile"]).read_text())
    assert mf.get("adapter") == "./adapter"
    assert mf.get("system").startswith("You are a helpful nutrition assistant")  # the winning variant's
    readme = (Path(res["publish"]["out"]) / "README.md").read_text()
    assert res["mine"]["version"] in readme and res["gate"]["run_id"] in readme
    assert f"{tmp_path / 'logs' / 'demo.jsonl'} (bytes 0-" in readme  # the real log file, not the batch slice
    assert registry.history("flywheel-demo")[0]["gate_run"] == res["gate"]["run_id"]
    assert run_loop(cfg)["status"] == "no_new_logs"
