"""`flywheel eval` end to end on real oasst1 cases: SmolLM2 base vs a LoRA adapter, two prompt variants.

The adapter is a random-init LoRA made with PEFT in the test (seconds, and its effect on NLL is certain), logged
as a run artifact so the target resolves through `runs:/<id>/adapter` like a trained one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flywheel.foundation.errors import InputError
from flywheel.evals.prompts.config import EvalConfig
from flywheel.pipelines.eval import register, run_eval
from tests.evals.openai_stub import Behaviour, StubServer

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = str(ROOT / "configs" / "prompts")


@pytest.fixture(scope="module")
def base():
    from flywheel.training.models import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def adapter_dir(base, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    (out / "flywheel_adapter.json").write_text(json.dumps({
        "base_model": "smollm2-135m-instruct", "base_model_sha256": base.sha256, "dataset_version": "test",
        "mine_run_id": None, "train_run_id": None, "chat_template": None, "eos_tokens": ["<|im_end|>"]}))
    return out


def _cfg(tmp_path, cases, adapter_uri, **kw) -> EvalConfig:
    data = dict(name="it", cases=str(cases), limit=4, variants=["concise", "grounded"], prompts_dir=PROMPTS,
                targets=[{"name": "base", "base": "smollm2-135m-instruct"}, {"name": "adapter", "adapter": adapter_uri}],
                out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                generation={"max_new_tokens": 12, "batch_size": 8}, nll_max_length=192,
                assertions=[{"type": "max-length", "value": 4000}])
    data.update(kw)
    return EvalConfig.model_validate(data)


@pytest.mark.slow
def test_eval_base_vs_adapter_on_oasst(mlflow_store, shared_data, tmp_path, adapter_dir):
    import mlflow
    from mlflow.tracking import MlflowClient

    cases = shared_data("oasst1-en-validation", "messages.jsonl")
    with mlflow.start_run(run_name="fake-train") as train_run:
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
    uri = f"runs:/{train_run.info.run_id}/adapter"

    res = run_eval(_cfg(tmp_path, cases, uri), show_progress=False)
    results = json.loads(Path(res["results_path"]).read_text())
    assert results == json.loads(json.dumps(res["results"]))  # what was returned is what the gate reads
    n = results["cases"]["n"]
    assert n == 4 and results["cases"]["kind"] == "oasst"

    # the matrix: every variant x target x metric, NLL direction explicit
    cells = {(c["variant"], c["target"], c["metric"]): c for c in results["cells"]}
    for v in ("concise", "grounded"):
        for t in ("base", "adapter"):
            nll = cells[(v, t, "nll")]
            assert {"mean", "ci_low", "ci_high", "n"} <= set(nll) and 1 <= nll["n"] <= n
            assert 0 < nll["mean"] < 20 and nll["ci_low"] <= nll["mean"] <= nll["ci_high"]
            for m in ("rouge_l", "embedding_similarity", "pass_rate", "error_rate", "generated_tokens"):
                assert cells[(v, t, m)]["n"] >= 1, m
    assert results["metrics"]["nll"]["direction"] == "lower" and results["primary_metric"] == "nll"
    # a random LoRA moves the reference NLL
    assert cells[("concise", "adapter", "nll")]["mean"] != pytest.approx(cells[("concise", "base", "nll")]["mean"])

    # paired comparisons on the same cases, adapter vs base per variant and grounded vs concise per target
    comps = [c for c in results["comparisons"] if c["metric"] == "nll"]
    assert {(c["control"], c["variant"]) for c in comps} == {
        ("base/concise", "base/grounded"), ("adapter/concise", "adapter/grounded"),
        ("base/concise", "adapter/concise"), ("base/grounded", "adapter/grounded")}
    for c in comps:
        assert c["p_adjusted"] >= c["p_value"] and c["n"] == cells[("concise", "base", "nll")]["n"]
        assert {"test", "estimate", "ci_low", "ci_high", "direction", "outcome"} <= set(c)

    # per-case table, nothing dropped
    rows = [json.loads(x) for x in (Path(res["out"]) / "cases.jsonl").read_text().splitlines()]
    assert len(rows) == n * 4 and all(f["failed"] == 0 for f in results["failures"].values())

    # MLflow: parent + one child per cell, prompt versions linked, lineage to the adapter's run
    client = MlflowClient()
    parent = client.get_run(res["run_id"])
    assert parent.info.experiment_id == client.get_experiment_by_name("flywheel/prompts").experiment_id
    assert parent.data.tags["flywheel.input.train_run"] == train_run.info.run_id
    assert "results.json" in {a.path for a in client.list_artifacts(res["run_id"])}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{res['run_id']}'")
    assert len(children) == 4
    for ch in children:
        assert {"variant", "target", "prompt_version", "prompt_uri"} <= set(ch.data.params)
        assert ch.data.params["prompt_uri"].startswith(f"prompts:/flywheel-{ch.data.params['variant']}/")
        assert "nll" in ch.data.metrics
        assert "cases.json" in {a.path for a in client.list_artifacts(ch.info.run_id)}
    assert client.search_prompt_versions("flywheel-grounded")[0].tags["flywheel.version"] == "1"

    # second run: served from the cache, same numbers, no new prompt version
    res2 = run_eval(_cfg(tmp_path, cases, uri), show_progress=False)
    r2 = res2["results"]
    assert r2["generated"] == 0 and r2["cache"]["misses"] == 0 and r2["cache"]["hits"] > 0
    assert [c["mean"] for c in r2["cells"] if c["metric"] == "nll"] == \
        [c["mean"] for c in results["cells"] if c["metric"] == "nll"]
    assert len(client.search_prompt_versions("flywheel-concise")) == 1


@pytest.mark.slow
def test_adapter_on_another_base_is_refused_before_generation(mlflow_store, tmp_path, adapter_dir, base):
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(adapter_dir, wrong)
    meta = json.loads((wrong / "flywheel_adapter.json").read_text())
    meta["base_model_sha256"] = "0" * 64
    (wrong / "flywheel_adapter.json").write_text(json.dumps(meta))
    cfg = _cfg(tmp_path, ROOT / "evals" / "prompts" / "demo_cases.yaml", str(wrong))
    with pytest.raises(InputError, match=r"target 'adapter': adapter .* was trained on base .*000000000000"):
        run_eval(cfg, show_progress=False)
    assert not (tmp_path / "cache").exists()  # nothing was generated


def test_cli_errors_are_one_line(tmp_path, mlflow_store):
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer from collapsing the app into `eval`
        pass

    runner = CliRunner()
    r = runner.invoke(app, ["eval", "limt=3"])
    assert isinstance(r.exception, Exception) and "limt: unknown key" in str(r.exception)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nversion: 1\nuser: '{{ question }} {{ audiense }}'\n")
    r = runner.invoke(app, ["eval", f"variants=[{broken}]", f"out={tmp_path / 'o'}"])
    assert isinstance(r.exception, InputError) and "'audiense'" in str(r.exception)
    assert not (tmp_path / "o").exists()


def test_demo_config_and_shipped_configs_validate():
    from flywheel.pipelines.config import load_config
    from flywheel.pipelines.eval import demo_config

    cfg = demo_config("/data/demo", "runs:/abc/adapter", "/tmp/out", limit=5)
    assert (cfg.cases, cfg.candidate, cfg.out, cfg.limit) == ("/data/demo", "runs:/abc/adapter", "/tmp/out", 5)
    assert cfg.variants == ["concise", "grounded"] and cfg.primary_metric == "nll"
    for p in sorted((ROOT / "configs" / "eval").glob("*.yaml")):
        assert p.read_text().startswith("# Run with: flywheel eval --config"), p
        load_config(EvalConfig, p)
    for p in sorted((ROOT / "configs" / "prompts").glob("*.yaml")):
        assert p.read_text().startswith("# "), p


def _ep_cfg(tmp_path, url, **kw) -> EvalConfig:
    data = dict(name="ep", limit=3, prompts_dir=PROMPTS, out=str(tmp_path / "out"), cache_dir=str(tmp_path / "c"),
                targets=[{"name": "ollama", "endpoint": url, "model": "stub"}],
                metrics=["rouge_l", "nll", "pii", "latency_ms"], primary_metric="rouge_l", register_prompts=False,
                endpoints={"max_retries": 0})
    data.update(kw)
    return EvalConfig.model_validate(data)


def test_endpoint_target_with_judge_end_to_end(mlflow_store, tmp_path):
    """No local model: an OpenAI-compatible server answers and judges; NLL is absent and said so."""
    with StubServer(Behaviour(prefix="Protein: 9 g. ", judge_reply="Score: 3")) as srv:
        res = run_eval(_ep_cfg(tmp_path, srv.url, judge={"endpoint": srv.url}), show_progress=False)
    r = res["results"]
    cells = {(c["variant"], c["metric"]): c for c in r["cells"]}
    assert cells[("concise", "judge_score")]["mean"] == 3.0 and cells[("concise", "rouge_l")]["n"] == 3
    assert not any(c["metric"] == "nll" for c in r["cells"])
    assert any("nll not available for target 'ollama'" in n for n in r["notes"])
    # every sampling parameter as sent, recorded
    assert {k: r["generation"][k] for k in ("temperature", "top_k", "repeat_penalty", "max_tokens")} == {
        "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0, "max_tokens": 48}
    assert r["failures"]["ollama/concise"]["failed"] == 0
    comps = [c for c in r["comparisons"] if c["metric"] in ("rouge_l", "judge_score", "latency_ms")]
    assert {c["metric"] for c in comps} >= {"rouge_l", "judge_score"}
    assert all(c["control"] == "ollama/concise" and c["variant"] == "ollama/grounded" for c in comps)


def test_unreachable_target_fails_before_the_mlflow_run(mlflow_store, tmp_path):
    import mlflow

    with pytest.raises(InputError, match="target 'ollama': endpoint http://127.0.0.1:9/v1 is unreachable"):
        run_eval(_ep_cfg(tmp_path, "http://127.0.0.1:9/v1"), show_progress=False)
    assert mlflow.search_runs(search_all_experiments=True).empty  # no FAILED parent run left behind


def test_a_target_that_dies_mid_run_is_an_error_with_counted_failures(mlflow_store, tmp_path):
    """The server fails from the 4th request on: results are written, failures are per cell and in the summary,
    failed rows have no value anywhere, and the command exits 2."""
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:
        pass

    with StubServer() as srv:
        real_post = srv.srv.RequestHandlerClass.do_POST

        def dying(handler):
            if len(srv.b.calls) >= 3:
                srv.b.always_fail = True
            real_post(handler)
        srv.srv.RequestHandlerClass.do_POST = dying
        out = tmp_path / "out"
        r = CliRunner().invoke(app, ["eval", f"targets=[{{name: ollama, endpoint: '{srv.url}', model: stub}}]",
                                     f"prompts_dir={PROMPTS}", f"out={out}", f"cache_dir={tmp_path / 'c'}", "limit=3",
                                     "metrics=[rouge_l, exact_match, latency_ms]", "primary_metric=rouge_l",
                                     "register_prompts=false", "endpoints.max_retries=0"])
    assert r.exit_code != 0 and getattr(r.exception, "exit_code", None) == 2, r.output
    assert "generations failed above max_failure_rate=0" in str(r.exception)
    assert "failures: ollama/grounded: 3 of 3 generations failed" in r.output
    results = json.loads((out / "results.json").read_text())
    assert results["failures"]["ollama/concise"]["failed"] == 0
    assert results["failures"]["ollama/grounded"]["failure_rate"] == 1.0
    cells = {(c["variant"], c["metric"]): c for c in results["cells"]}
    assert cells[("grounded", "rouge_l")]["mean"] is None and cells[("grounded", "rouge_l")]["n_failed"] == 3
    assert cells[("grounded", "latency_ms")]["n"] == 0  # not dropped silently: counted as failed
    assert not any(c["metric"] == "rouge_l" for c in results["comparisons"])
    assert any("3 of 3 cases left out of every comparison" in n for n in results["notes"])


def test_published_parameters_are_the_evaluated_sampling():
    """`flywheel publish` pins exactly what `flywheel eval` sent: no server default (repeat_penalty 1.1) slips in."""
    from flywheel.evals.prompts.suite import gen_params
    from flywheel.pipelines.publish import PublishConfig, _eval_sampling

    evaluated = gen_params(EvalConfig()).modelfile_parameters()
    assert PublishConfig().parameters is None  # the default: filled by publish with the eval's sampling
    shipped = _eval_sampling()
    assert {k: shipped[k] for k in evaluated} == evaluated
    assert evaluated["repeat_penalty"] == 1.0 and evaluated["temperature"] == 0.0 and evaluated["top_k"] == 1


@pytest.mark.slow
def test_greedy_outputs_of_peft_and_a_llama_cpp_server_agree(mlflow_store, tmp_path, adapter_dir, base):
    """The same adapter in PEFT and merged to GGUF behind `python -m llama_cpp.server`: with every sampling
    parameter sent (repeat_penalty 1 above all), greedy outputs match."""
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed (make llama-cpp)")
    from flywheel.pipelines.publish import converters_dir
    from flywheel.training.export import convert_hf, merge_lora

    conv = converters_dir()
    if conv is None:
        pytest.skip("llama.cpp converters not installed (make llama-cpp-converters)")
    merge_lora(base.path, adapter_dir, tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "model.gguf", conv, "f16")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(tmp_path / "model.gguf"),
                             "--model_alias", "cand", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        cfg = EvalConfig.model_validate(dict(
            name="parity", limit=8, prompts_dir=PROMPTS, out=str(tmp_path / "out"), cache=False,
            targets=[{"name": "peft", "adapter": str(adapter_dir)},
                     {"name": "gguf", "endpoint": url, "model": "cand", "revision": "test"}],
            metrics=["exact_match"], primary_metric="exact_match", register_prompts=False,
            generation={"max_new_tokens": 16}))
        rows = run_eval(cfg, show_progress=False)["results"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = [json.loads(x) for x in (tmp_path / "out" / "cases.jsonl").read_text().splitlines()]
    by = {(r["variant"], r["case_id"], r["target"]): r["output"] for r in out}
    keys = {(v, c) for v, c, _ in by}
    same = sum(by[(v, c, "peft")] == by[(v, c, "gguf")] for v, c in keys)
    assert rows["failures"]["gguf/concise"]["failed"] == 0
    assert same >= len(keys) - 1, f"{same}/{len(keys)} greedy outputs equal"


def test_log_traces_one_trace_per_generation_with_scores(mlflow_store, tmp_path):
    """`log_traces: true`: each generated cell row is a trace of the eval run, its scores as assessments (the
    judge's as LLM_JUDGE, the rest as CODE)."""
    from mlflow import MlflowClient

    with StubServer(Behaviour(prefix="Protein: 9 g. ", judge_reply="Score: 3")) as srv:
        res = run_eval(_ep_cfg(tmp_path, srv.url, judge={"endpoint": srv.url, "model": "judge-m"}, log_traces=True),
                       show_progress=False)
    client = MlflowClient()
    run = client.get_run(res["run_id"])
    traces = client.search_traces(locations=[run.info.experiment_id], max_results=100)
    rows = [json.loads(x) for x in (Path(res["out"]) / "cases.jsonl").read_text().splitlines()]
    assert len(traces) == len(rows) == 6  # 3 cases x 2 variants x 1 target
    assert {(t.info.tags["target"], t.info.tags["variant"], t.info.tags["case_id"]) for t in traces} == {
        (r["target"], r["variant"], r["case_id"]) for r in rows}
    assert all(t.info.trace_metadata["mlflow.sourceRun"] == res["run_id"] for t in traces)
    by_key = {(r["variant"], r["case_id"]): r for r in rows}
    for t in traces:
        row = by_key[(t.info.tags["variant"], t.info.tags["case_id"])]
        root = t.data.spans[0]
        assert root.inputs["messages"] == row["prompt"]
        assert root.outputs["choices"][0]["message"]["content"] == row["output"]
        scores = {a.name: a for a in t.info.assessments}
        expected = {k for k, v in row["metrics"].items() if v is not None}
        assert set(scores) == expected and "judge_score" in expected and "rouge_l" in expected
        assert scores["judge_score"].value == 3.0 and scores["judge_score"].source.source_type == "LLM_JUDGE"
        assert scores["judge_score"].source.source_id == "judge-m"
        assert scores["rouge_l"].value == pytest.approx(row["metrics"]["rouge_l"])
        assert scores["rouge_l"].source.source_type == "CODE"
