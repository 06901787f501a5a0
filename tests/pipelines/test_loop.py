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
                           publish_config={"mode": "adapter", "base": "ollama", "gguf_adapter": False})  # GGUF: test_publish
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


# -- checked before any work ----------------------------------------------------------------------------------

def _logs(tmp_path, n=40, seed=1):
    from flywheel.mining.demo_logs import write_demo_logs

    logs = tmp_path / "logs"
    write_demo_logs(logs / "day1.jsonl", n=n, seed=seed)
    return logs


@pytest.mark.parametrize("section,match", [
    ({"train": {"max_stepz": 3}}, "section train .*max_stepz"),
    ({"gate": {"min_casez": 3}}, "section gate .*min_casez"),
    ({"gate": {"eval": {"limt": 3}}}, "section gate.eval.*limt"),
    ({"mine": {"min_ratin": 3}}, "section mine.*min_ratin"),
    ({"publish_config": {"quantize": "q4_k_m"}}, "section publish_config.*quantize"),
])
def test_a_typo_in_any_section_stops_before_mining(mlflow_store, tmp_path, section, match):
    from flywheel.foundation.errors import FlywheelError

    cfg = LoopConfig(inputs=[str(_logs(tmp_path))], work_dir=str(tmp_path / "work"), **section)
    with pytest.raises(FlywheelError, match=match):
        run_loop(cfg)
    assert not (tmp_path / "work" / "state.json").exists()  # nothing read, mined or trained


def test_a_plan_that_cannot_reach_a_decision_is_refused_up_front(mlflow_store, tmp_path):
    from flywheel.foundation.errors import InputError

    logs = _logs(tmp_path)
    cfg = LoopConfig(inputs=[str(logs)], work_dir=str(tmp_path / "work"), min_new_records=100,
                     mine={"eval_fraction": 0.1})
    with pytest.raises(InputError, match=r"min_new_records=100 .*~10 eval cases .*eval_fraction=0.1\).*"
                                         r"gate.min_cases=20.*min_new_records>=200"):
        run_loop(cfg)
    with pytest.raises(InputError, match=r"gate.eval.limit=10 .*gate.min_cases=20"):
        run_loop(cfg.model_copy(update={"mine": {}, "gate": {"eval": {"limit": 10}}}))
    assert not (tmp_path / "work" / "state.json").exists()


def test_shipped_loop_config_passes_its_own_plan_check_on_the_demo_logs(mlflow_store, tmp_path):
    """configs/flywheel.yaml: validated, and the demo logs (what CI falls back to) give enough eval cases."""
    from flywheel.pipelines.config import load_config
    from flywheel.pipelines.loop import ROOT, check_plan, stage_configs

    cfg = load_config(LoopConfig, ROOT / "configs" / "flywheel.yaml", [f"work_dir={tmp_path / 'w'}"])
    plan = stage_configs(cfg, tmp_path / "w", "b", tmp_path / "w" / "datasets" / "b")
    check_plan(cfg, plan)
    from flywheel.mining.demo_logs import write_demo_logs
    from flywheel.pipelines.mine import mine_to_dir

    write_demo_logs(tmp_path / "demo.jsonl", n=300, seed=0)
    mined = mine_to_dir([tmp_path / "demo.jsonl"], tmp_path / "mined",
                        plan["mine"].model_copy(update={"workers": 1, "progress": False}))
    kept, n_eval = mined["counts"]["kept"], mined["splits"]["eval"]
    assert kept >= cfg.min_new_records and min(n_eval, plan["eval"].limit) >= plan["gate"].min_cases


def test_too_few_eval_records_for_the_gate_means_no_training(tmp_path):
    """The plan check works on expectations; the mined batch's real eval split is checked before training."""
    from flywheel.pipelines.loop import _too_little, stage_configs

    cfg = LoopConfig(work_dir=str(tmp_path / "w"), min_new_records=100)
    plan = stage_configs(cfg, tmp_path / "w", "b", tmp_path / "w" / "d")
    msg = _too_little(cfg, plan, kept=120, n_eval=15)
    assert "15 eval records" in msg and "gate.min_cases=20" in msg and "stay pending" in msg
    assert _too_little(cfg, plan, kept=120, n_eval=25) is None
    assert "min_new_records=100" in _too_little(cfg, plan, kept=99, n_eval=25)


def test_a_per_turn_logged_conversation_is_mined_once(mlflow_store, tmp_path):
    """A chat app that logs the conversation after every turn: the same conversation_id, growing. The loop
    mines the later line together with the pending earlier one; the dataset holds the conversation once."""
    logs = tmp_path / "logs"
    logs.mkdir()
    f = logs / "chat.jsonl"

    def line(cid, turns):
        msgs = []
        for t in range(turns):
            msgs += [{"role": "user", "content": f"Question {t} of {cid}: how much fibre is in oats?"},
                     {"role": "assistant", "content": f"Answer {t} for {cid}: about 10 g of fibre per 100 g of "
                                                      f"rolled oats, part of it beta-glucan ({t})."}]
        return json.dumps({"conversation_id": cid, "messages": msgs, "rating": 5}) + "\n"

    f.write_text("".join(line(f"c{i}", 1) for i in range(6)))
    cfg = LoopConfig(inputs=[str(logs)], work_dir=str(tmp_path / "work"), min_new_records=1000,
                     mine={"workers": 1, "progress": False, "dedupe": {"near": False}})
    assert run_loop(cfg)["status"] == "skipped"
    with open(f, "a") as fh:  # the next turn of every conversation arrives
        fh.write("".join(line(f"c{i}", 2) for i in range(6)))
    res = run_loop(cfg)
    assert res["status"] == "skipped"
    out = Path(res["mine"]["out"])
    rows = [json.loads(x) for name in ("train.jsonl", "eval.jsonl") for x in (out / name).read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 6, ids  # one record per conversation: its latest, longest version
    assert all(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in rows)


def test_nothing_to_do_after_a_gate_error_points_at_retry(tmp_path):
    from flywheel.pipelines.loop import _nothing_to_do, _record_gate

    state = {"files": {}, "pending": ["b/000-a.jsonl"], "sources": {"b/000-a.jsonl": {}}, "runs": []}
    said: list[str] = []
    _record_gate(state, "b1", 30, "t" * 32, {"decision": "error", "exit_code": 2, "run_id": "g" * 32}, said.append)
    assert state["pending"] == ["b/000-a.jsonl"] and "--retry" in said[0]
    assert "--retry" in _nothing_to_do(LoopConfig(), [Path("a")], state)
    _record_gate(state, "b2", 30, "t" * 32, {"decision": "fail", "exit_code": 1, "run_id": "g" * 32}, said.append)
    assert state["pending"] == [] and state["sources"] == {}
    assert "nothing to do" in _nothing_to_do(LoopConfig(), [Path("a")], state)


def test_flywheel_demo_cli_leaves_a_work_dir_it_did_not_write(tmp_path):
    """`flywheel demo --work-dir DIR`: a folder without Flywheel's output marker is refused (exit 2, one line)."""
    import os
    import subprocess
    import sys

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "flywheel.pipelines", "demo", "--work-dir", str(mine),
                        "--publish-out", str(tmp_path / "pub")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and not (tmp_path / "pub").exists()


def test_demo_exit_code_is_the_gates():
    from flywheel.pipelines.demo import exit_code

    assert [exit_code({"loop": {"gate": {"exit_code": c}}}) for c in (0, 1, 2)] == [0, 1, 2]
    assert exit_code({"loop": {"status": "skipped"}}) == 2  # the demo never reached its gate


@pytest.mark.slow
def test_a_gate_error_keeps_the_batch_and_a_retry_gates_the_same_slice(mlflow_store, tmp_path, monkeypatch):
    """Scenario: the champion's files vanished -> gate error (exit 2): nothing consumed; the next run without new
    logs says so and points at --retry; once fixed, `--retry` mines the same slice and the gate decides."""
    import shutil

    from mlflow.tracking import MlflowClient

    from flywheel.mining.demo_logs import write_demo_logs
    from flywheel.pipelines import tracking

    monkeypatch.chdir(tmp_path)
    write_demo_logs(tmp_path / "logs" / "demo.jsonl", n=300, seed=0)
    # An unreadable champion: registered, then its artifacts deleted.
    adapter = tmp_path / "fake-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "flywheel_adapter.json").write_text(json.dumps({"base_model": "smollm2-135m-instruct"}))
    import mlflow

    with tracking.start_run("train") as run:
        mlflow.log_artifacts(str(adapter), "adapter")
    v = registry.register_adapter("flywheel-demo", registry.resolve_model(run.info.run_id))
    registry.promote("flywheel-demo", v, None)
    shutil.rmtree(MlflowClient().get_run(run.info.run_id).info.artifact_uri.replace("file://", ""))

    cfg = demo_loop_config(tmp_path / "logs", tmp_path / "work", train={"max_steps": 1}, publish=False,
                           gate={"eval": {"limit": 8, "variants": ["concise"]}, "sample_generations": {"n_cases": 0}})
    said: list[str] = []
    first = run_loop(cfg, log=said.append)
    assert first["status"] == "error" and first["gate"]["exit_code"] == 2
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert len(state["pending"]) == 1 and state["runs"][-1]["status"] == "error"
    assert any("pending slice(s) are kept" in m and "--retry" in m for m in said)

    again = run_loop(cfg, log=said.append)
    assert again["status"] == "no_new_logs" and "--retry" in again["message"]

    MlflowClient().delete_registered_model("flywheel-demo")  # fixed: no champion, the base is the baseline
    retried = run_loop(cfg.model_copy(update={"retry_pending": True}), log=said.append)
    assert retried["status"] in ("pass", "fail"), retried.get("gate")
    assert retried["mine"]["version"] == first["mine"]["version"]  # the same slice, mined again
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert state["pending"] == [] and [r["status"] for r in state["runs"]] == ["error", retried["status"]]
    assert run_loop(cfg)["status"] == "no_new_logs"


# -- mlflow-traces:<experiment> inputs --------------------------------------------------------------------------

def _log_chats(uri: str, start: int, n: int, experiment: str = "app") -> None:
    """`n` rated conversations logged as traces the way an application does."""
    from flywheel.pipelines.applog import ChatLogger

    log = ChatLogger(experiment=experiment, tracking_uri=uri)
    for i in range(start, start + n):
        q = f"Question {i}: how much protein is in {['lentils', 'tofu', 'oats', 'eggs'][i % 4]}, portion {i}?"
        log.interaction(messages=[{"role": "user", "content": q}], session_id=f"c{i}", rating=4 + i % 2,
                        answer=f"Answer {i}: about {i % 9 + 5} g of protein per portion {i}; pair it with "
                               "vegetables and whole grains for a balanced meal.")


def _trace_input(res: dict) -> dict:
    manifest = json.loads((Path(res["mine"]["out"]) / "manifest.json").read_text())
    return next(i for i in manifest["inputs"] if i["path"] == "mlflow-traces:app")


@pytest.mark.slow  # traces in sqlite: ~0.2 s each
def test_traces_are_new_logs_until_mined_and_pending_until_decided(mlflow_store, tmp_path):
    """Beside a log file: new traces are new logs; mined but undecided (skipped) ones are mined again with the
    next ones, yet alone they are not new logs."""
    logs = _logs(tmp_path, n=10)
    _log_chats(mlflow_store, 0, 6)
    cfg = LoopConfig(inputs=[str(logs), "mlflow-traces:app"], work_dir=str(tmp_path / "work"),
                     min_new_records=1000, mine={"workers": 1, "progress": False})
    first = run_loop(cfg)
    assert first["status"] == "skipped" and _trace_input(first)["read"] == 6
    said: list[str] = []
    again = run_loop(cfg, log=said.append)
    assert again["status"] == "no_new_logs" and "1 trace experiment(s)" in said[-1]
    _log_chats(mlflow_store, 6, 2)  # only traces arrive: new logs; the skipped batch's traces come along
    third = run_loop(cfg)
    assert third["status"] == "skipped" and _trace_input(third)["read"] == 8
    marks = json.loads((tmp_path / "work" / "state.json").read_text())["traces"]["mlflow-traces:app"]
    assert marks["consumed_ms"] is None and marks["mined_ms"] == _trace_input(third)["newest_trace_ms"]
    assert run_loop(cfg)["status"] == "no_new_logs"
    from flywheel.foundation.errors import InputError

    with pytest.raises(InputError, match="mlflow-traces:nope: no such experiment"):
        run_loop(cfg.model_copy(update={"inputs": ["mlflow-traces:nope"]}))


@pytest.mark.slow
def test_trace_watermark_moves_only_on_a_gate_decision(mlflow_store, tmp_path, monkeypatch):
    """A gate error keeps the traces' watermark: the next batch mines them again with the new ones. After a
    decision, the next batch mines only the traces logged since."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from flywheel.pipelines import tracking

    monkeypatch.chdir(tmp_path)
    _log_chats(mlflow_store, 0, 40)
    adapter = tmp_path / "fake-adapter"  # an unreadable champion: registered, then its artifacts deleted
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "flywheel_adapter.json").write_text(json.dumps({"base_model": "smollm2-135m-instruct"}))
    with tracking.start_run("train") as run:
        mlflow.log_artifacts(str(adapter), "adapter")
    registry.promote("flywheel-demo", registry.register_adapter("flywheel-demo",
                                                                registry.resolve_model(run.info.run_id)), None)
    shutil.rmtree(MlflowClient().get_run(run.info.run_id).info.artifact_uri.replace("file://", ""))

    cfg = demo_loop_config("mlflow-traces:app", tmp_path / "work", train={"max_steps": 1}, publish=False,
                           min_new_records=20, mine={"eval_fraction": 0.25, "dedupe": {"near": False}},
                           gate={"min_cases": 4, "eval": {"limit": 4, "variants": ["concise"]},
                                 "sample_generations": {"n_cases": 0}})
    first = run_loop(cfg)
    assert first["status"] == "error" and _trace_input(first)["read"] == 40
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert state["traces"]["mlflow-traces:app"]["consumed_ms"] is None  # nothing decided: nothing consumed

    MlflowClient().delete_registered_model("flywheel-demo")  # fixed: the base is the baseline
    _log_chats(mlflow_store, 40, 3)
    decided = run_loop(cfg)
    assert decided["status"] in ("pass", "fail"), decided.get("gate")
    assert _trace_input(decided)["read"] == 43  # the errored batch's traces again, with the new ones
    newest = _trace_input(decided)["newest_trace_ms"]
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert state["traces"]["mlflow-traces:app"]["consumed_ms"] == newest
    # Lineage names the trace window that was mined (what a published model's README lists as its logs).
    from flywheel.pipelines import lineage

    mine_run = MlflowClient().get_run(decided["mine"]["run_id"])
    logs = lineage.log_sources(mlflow_store, {"run_id": mine_run.info.run_id, "tags": mine_run.data.tags})
    assert logs == [f"mlflow-traces:app (traces all, newest {newest} ms)"]

    assert run_loop(cfg)["status"] == "no_new_logs"
    _log_chats(mlflow_store, 43, 4)
    later = run_loop(cfg.model_copy(update={"min_new_records": 1000}))
    assert later["status"] == "skipped" and _trace_input(later)["read"] == 4  # only the traces since
    assert _trace_input(later)["since_ms"] == newest
