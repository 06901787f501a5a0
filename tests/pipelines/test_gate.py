"""`flywheel gate` shell: decisions and exit codes, reports, MLflow run + tags, promotion, real eval end to end."""

from __future__ import annotations

import hashlib
import json

import pytest

from flywheel.evals.gate import GateConfig
from flywheel.pipelines import registry, tracking
from flywheel.pipelines.gate import run_gate

MODEL = GateConfig().model_name  # the registered model a gate promotes into by default


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """mlflow.set_registry_uri exports MLFLOW_REGISTRY_URI, and tracking.setup prefers that variable: without
    this, a test would read the previous test's registry."""
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


ZERO_SHA = hashlib.sha256(b"\0").hexdigest()  # fake_adapter_run's weights
BASE_SHA = "ba" * 32


def identities(candidate=ZERO_SHA, baseline=None, base=BASE_SHA):
    """results.json `targets` as `flywheel eval` records them: baseline (None = the base model) and candidate."""
    return [{"name": "champion", "base_sha256": base, "adapter_sha256": baseline},
            {"name": "candidate", "base_sha256": base, "adapter_sha256": candidate}]


def results_file(tmp_path, est=-0.4, ci=(-0.5, -0.3), p=0.001, n=30, nan=False, targets=None):
    def cell(target, mean):
        return {"variant": "concise", "target": target, "metric": "nll", "mean": mean, "ci_low": mean - 0.1,
                "ci_high": mean + 0.1, "n": n, "direction": "lower"}

    res = {"run_id": "e" * 32,
           "variants": [{"name": "concise", "source": "configs/prompts/concise.yaml"}],
           "cells": [cell("champion", 2.0), cell("candidate", float("nan") if nan else 2.0 + est)],
           "comparisons": [{"variant": "candidate/concise", "control": "champion/concise", "metric": "nll",
                            "test": "paired_t", "estimate": est, "ci_low": ci[0], "ci_high": ci[1],
                            "p_value": p, "p_adjusted": p, "n": n, "control_target": "champion",
                            "treatment_target": "candidate", "control_variant": "concise",
                            "treatment_variant": "concise", "direction": "lower"}]}
    if targets is not None:
        res["targets"] = targets
    path = tmp_path / f"results-{est}-{p}-{n}-{nan}-{len(list(tmp_path.glob('results-*')))}.json"
    path.write_text(json.dumps(res))  # json writes NaN as NaN, like a careless producer would
    return str(path)


def fake_adapter_run(tmp_path, weights=b"\0", name="adapter"):
    import mlflow

    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(weights)
    (d / "flywheel_adapter.json").write_text(json.dumps({"base_model": "smollm2-135m-instruct",
                                                         "dataset_version": "ds1"}))
    with tracking.start_run("train") as run:
        mlflow.log_artifacts(str(d), "adapter")
    return run.info.run_id


@pytest.mark.parametrize("kw,decision,code", [
    ({}, "pass", 0),
    ({"p": 0.3, "ci": (-0.9, 0.1)}, "fail", 1),
    ({"est": 0.2, "ci": (0.1, 0.3)}, "fail", 1),
    ({"n": 5}, "error", 2),
    ({"nan": True}, "error", 2),
])
def test_decisions_from_results(mlflow_store, tmp_path, kw, decision, code):
    cfg = GateConfig(results=results_file(tmp_path, **kw), out=str(tmp_path / "gate"))
    out = run_gate(cfg, "candidate")
    assert (out["decision"], out["exit_code"]) == (decision, code)
    gate = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert gate["decision"] == decision and gate["eval_run_id"] == "e" * 32
    report = (tmp_path / "gate" / "gate_report.md").read_text()
    assert f"**{decision.upper()}**" in report and "| primary | nll |" in report

    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(out["run_id"])
    assert run.data.tags["flywheel.gate.decision"] == decision
    assert run.data.tags["flywheel.stage"] == "gate"
    assert run.data.tags["flywheel.input.candidate"] == "candidate"
    assert run.data.tags["flywheel.input.eval_run"] == "e" * 32
    arts = {a.path for a in MlflowClient().list_artifacts(out["run_id"])}
    assert {"gate.json", "gate_report.md"} <= arts


def test_missing_results_and_unreadable_candidate_are_errors(mlflow_store, tmp_path):
    out = run_gate(GateConfig(results=str(tmp_path / "nope.json"), out=str(tmp_path / "g1")), "candidate")
    assert out["exit_code"] == 2 and "no such file" in out["gate"]["reasons"][0]
    out = run_gate(GateConfig(out=str(tmp_path / "g2")), "runs:/" + "1" * 32 + "/adapter")
    assert out["exit_code"] == 2 and "candidate" in out["gate"]["reasons"][0]


def test_crashed_eval_is_an_error(mlflow_store, tmp_path, monkeypatch):
    import flywheel.pipelines.eval

    def boom(cfg, **kw):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(flywheel.pipelines.eval, "run_eval", boom)
    run_id = fake_adapter_run(tmp_path)
    out = run_gate(GateConfig(out=str(tmp_path / "g"), min_cases=4), run_id, promote=True)
    assert out["decision"] == "error" and out["exit_code"] == 2 and out["promoted_version"] is None
    assert "evaluation crashed: RuntimeError" in out["gate"]["reasons"][0]
    assert "ERROR" in open(out["report_path"]).read()


def test_ab_verdict_read_from_the_latest_ab_run(mlflow_store, tmp_path):
    cfg = GateConfig(results=results_file(tmp_path), out=str(tmp_path / "g1"), ab={"require": True})
    assert run_gate(cfg, "c")["decision"] == "error"  # required, none found
    with tracking.start_run("ab", tags={"flywheel.ab.verdict.concise": "don't ship"}):
        pass
    assert run_gate(cfg.model_copy(update={"out": str(tmp_path / "g2")}), "c")["decision"] == "fail"
    with tracking.start_run("ab", tags={"flywheel.ab.verdict.concise": "ship"}):
        pass
    assert run_gate(cfg.model_copy(update={"out": str(tmp_path / "g3")}), "c")["decision"] == "pass"


def test_unreadable_champion_is_an_error_not_no_champion(mlflow_store, tmp_path):
    """A champion whose artifacts vanished must stop the gate, never make it compare against the base."""
    import shutil

    run_id = fake_adapter_run(tmp_path)
    from mlflow.tracking import MlflowClient

    v = registry.register_adapter(MODEL, registry.resolve_model(run_id))
    registry.promote(MODEL, v, None)
    shutil.rmtree(MlflowClient().get_run(run_id).info.artifact_uri.replace("file://", ""))
    out = run_gate(GateConfig(out=str(tmp_path / "g")), str(tmp_path / "adapter"))
    assert out["decision"] == "error" and "champion" in " ".join(out["gate"]["reasons"])


def test_promote_on_pass_only(mlflow_store, tmp_path):
    run_id = fake_adapter_run(tmp_path)
    bad = run_gate(GateConfig(results=results_file(tmp_path, p=0.5, ci=(-1, 0.2), targets=identities()),
                              out=str(tmp_path / "g0")), run_id, promote=True)
    assert bad["exit_code"] == 1 and bad["promoted_version"] is None
    assert registry.champion(MODEL) is None

    out = run_gate(GateConfig(results=results_file(tmp_path, targets=identities()), out=str(tmp_path / "g1")),
                   run_id, promote=True)
    assert out["exit_code"] == 0 and out["promoted_version"] == "1"
    champ = registry.champion(MODEL)
    assert str(champ.version) == "1"
    assert champ.tags[registry.TAG_BY_GATE] == out["run_id"]
    assert champ.tags["flywheel.input.gate_run"] == out["run_id"]
    assert champ.tags["flywheel.input.eval_run"] == "e" * 32
    assert champ.tags["flywheel.dataset_version"] == "ds1"
    assert champ.tags["flywheel.prompt_variant"] == "concise"
    assert "nutrition assistant" in champ.tags["flywheel.system_prompt"]
    from mlflow.tracking import MlflowClient

    assert MlflowClient().get_run(out["run_id"]).data.tags["flywheel.promoted_version"] == "1"
    assert "is now `@champion`" in open(out["report_path"]).read()


def test_promote_on_results_checks_what_was_evaluated(mlflow_store, tmp_path):
    """--results --promote: the results must be about this candidate's weights and about the champion of now."""
    run1 = fake_adapter_run(tmp_path)
    run2 = fake_adapter_run(tmp_path, weights=b"\1", name="adapter2")
    sha2 = hashlib.sha256(b"\1").hexdigest()

    def gate(targets, cand, out):
        return run_gate(GateConfig(results=results_file(tmp_path, targets=targets), out=str(tmp_path / out)),
                        cand, promote=True)

    no_ids = gate(None, run1, "g0")
    assert no_ids["exit_code"] == 2 and "record no adapter sha256" in no_ids["gate"]["reasons"][0]
    other = gate(identities(candidate=sha2), run1, "g1")  # the results are about run2's adapter
    assert other["exit_code"] == 2 and "not the candidate being promoted" in other["gate"]["reasons"][0]
    assert len(other["gate"]["reasons"]) == 1 and "\n" not in other["gate"]["reasons"][0]
    assert registry.champion(MODEL) is None

    assert gate(identities(), run1, "g2")["promoted_version"] == "1"
    # run2 evaluated against the base model: an old evaluation once the champion exists.
    stale = gate(identities(candidate=sha2), run2, "g3")
    assert stale["exit_code"] == 2 and stale["promoted_version"] is None
    assert "champion moved" in stale["gate"]["reasons"][0] and "v1" in stale["gate"]["reasons"][0]
    assert str(registry.champion(MODEL).version) == "1"
    fresh = gate(identities(candidate=sha2, baseline=ZERO_SHA), run2, "g4")  # evaluated against v1
    assert fresh["exit_code"] == 0 and fresh["promoted_version"] == "2"
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient().search_model_versions(f"name = '{MODEL}'")) == 2  # no orphan versions


def test_champion_moved_during_evaluation_is_not_overwritten(mlflow_store, tmp_path, monkeypatch):
    """The gate evaluates against the base; meanwhile another gate promotes. This one must not replace it."""
    import flywheel.pipelines.eval

    rival = registry.resolve_model(fake_adapter_run(tmp_path, weights=b"\2", name="rival"))
    results = json.loads(open(results_file(tmp_path)).read().replace('"champion', '"base'))

    def eval_while_someone_promotes(cfg, **kw):
        registry.promote(MODEL, registry.register_adapter(MODEL, rival), "rival-gate")
        return {"results": results, "run_id": "e" * 32}

    monkeypatch.setattr(flywheel.pipelines.eval, "run_eval", eval_while_someone_promotes)
    out = run_gate(GateConfig(out=str(tmp_path / "g"), min_cases=4, sample_generations={"n_cases": 0}),
                   fake_adapter_run(tmp_path),
                   promote=True)
    assert out["exit_code"] == 2 and out["promoted_version"] is None
    assert any(r.startswith("champion moved") and "v1" in r for r in out["gate"]["reasons"]), out["gate"]["reasons"]
    assert "is now `@champion`" not in open(out["report_path"]).read()
    assert str(registry.champion(MODEL).version) == "1"
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient().search_model_versions(f"name = '{MODEL}'")) == 1  # the loser left no version
    assert [r["gate_run"] for r in registry.history(MODEL)] == ["rival-gate"]


@pytest.mark.slow
def test_racing_gate_processes_promote_exactly_one(mlflow_store, tmp_path):
    """Several `flywheel gate --promote` processes at once, all evaluated against "no champion": one wins, the
    others exit 2 "champion moved"; the history has one open interval and no orphan version."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    n = 3
    procs = []
    for i in range(n):
        run = fake_adapter_run(tmp_path, weights=bytes([i + 1]), name=f"adapter{i}")
        res = results_file(tmp_path, targets=identities(candidate=hashlib.sha256(bytes([i + 1])).hexdigest()))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "flywheel.pipelines", "gate", "--candidate", run, "--results", res, "--promote",
             f"out={tmp_path / f'gate{i}'}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    codes = sorted(c for c, _ in outs)
    assert codes == [0] + [2] * (n - 1), outs
    assert sum("is now `@champion`" in o for _, o in outs) == 1
    assert all("champion moved" in o for c, o in outs if c == 2)
    rows = registry.history(MODEL)
    assert len(rows) == 1 and rows[0]["current"] and rows[0]["until"] is None
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient().search_model_versions(f"name = '{MODEL}'")) == 1


def _no_eval(cfg, **kw):
    raise AssertionError("the gate must not start an evaluation that cannot reach min_cases")


def test_too_few_cases_is_an_error_before_evaluating(mlflow_store, tmp_path, monkeypatch):
    import flywheel.pipelines.eval

    monkeypatch.setattr(flywheel.pipelines.eval, "run_eval", _no_eval)
    fake_adapter_run(tmp_path)
    out = run_gate(GateConfig(out=str(tmp_path / "g")), str(tmp_path / "adapter"))  # 6 built-in cases vs 20
    assert out["exit_code"] == 2 and out["eval_run_id"] is None
    assert out["gate"]["reasons"][0].startswith("min_cases 20: the eval suite has only 6 cases")


def test_shipped_gate_config_gates_on_the_candidates_dataset(mlflow_store, tmp_path, monkeypatch):
    """configs/gate.yaml as documented: the eval runs on the candidate's own held-out split (>= min_cases), so a
    good candidate can pass; a dataset directory re-mined since is refused."""
    import mlflow

    import flywheel.pipelines.eval
    from flywheel.pipelines.config import load_config
    from flywheel.mining.demo_logs import write_demo_logs
    from flywheel.pipelines.mine import MineConfig, run_mine
    from tests.conftest import ROOT

    write_demo_logs(tmp_path / "logs.jsonl", n=500, seed=0)  # 300 give 19 eval cases
    mined = run_mine([tmp_path / "logs.jsonl"], tmp_path / "ds", MineConfig(progress=False, workers=1))
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"\0")
    (d / "flywheel_adapter.json").write_text(json.dumps({"base_model": "smollm2-135m-instruct",
                                                         "dataset_version": mined["version"],
                                                         "mine_run_id": mined["run_id"]}))
    with tracking.start_run("train") as run:
        mlflow.log_artifacts(str(d), "adapter")
    seen = {}
    results = json.loads(open(results_file(tmp_path)).read().replace('"champion', '"base'))
    for c in list(results["cells"]):  # the shipped config's guardrail: no PII leaks, on either side
        results["cells"].append({**c, "metric": "pii", "mean": 0.0, "ci_low": 0.0, "ci_high": 0.0})
    results["comparisons"].append({**results["comparisons"][0], "metric": "pii", "estimate": 0.0, "ci_low": 0.0,
                                   "ci_high": 0.0, "p_value": 1.0, "p_adjusted": 1.0})

    def fake_eval(cfg, **kw):  # the real eval is tested in test_real_eval_refuses_a_harmful_adapter
        seen.update(cases=cfg.cases, limit=cfg.limit)
        return {"results": results, "run_id": "e" * 32}

    monkeypatch.setattr(flywheel.pipelines.eval, "run_eval", fake_eval)
    # (no display sample: the fake eval stands for the gate's own evaluation only)
    cfg = load_config(GateConfig, ROOT / "configs" / "gate.yaml", [f"out={tmp_path / 'g'}",
                                                                   "sample_generations.n_cases=0"])
    out = run_gate(cfg, f"runs:/{run.info.run_id}/adapter")
    assert out["decision"] == "pass", out["gate"]["reasons"]
    assert seen == {"cases": mined["out"], "limit": 40}

    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps({**manifest, "version": "other"}))
    out = run_gate(cfg.model_copy(update={"out": str(tmp_path / "g2")}), f"runs:/{run.info.run_id}/adapter")
    assert out["exit_code"] == 2 and "holds dataset version other" in out["gate"]["reasons"][0]


def test_cli_exit_codes(mlflow_store, tmp_path):
    from typer.testing import CliRunner

    from flywheel.pipelines.cli import app

    ok = CliRunner().invoke(app, ["gate", "--candidate", "c", "--results", results_file(tmp_path),
                                  f"out={tmp_path / 'a'}"])
    assert ok.exit_code == 0, ok.output
    assert "gate pass" in ok.output
    bad = CliRunner().invoke(app, ["gate", "--candidate", "c", "--results", results_file(tmp_path, n=3),
                                   f"out={tmp_path / 'b'}"])
    assert bad.exit_code == 2 and "fewer than the minimum" in bad.output
    typo = CliRunner().invoke(app, ["gate", "--candidate", "c", "min_casez=3"])
    assert typo.exit_code != 0


# -- the real thing: eval on SmolLM2 with a deliberately harmful adapter ------------------------------------

@pytest.fixture(scope="module")
def harmful_adapter(tmp_path_factory):
    """Random LoRA on the real base (q/v of every layer), large enough to hurt: a candidate the gate must
    refuse. Written directly in PEFT's format, so the fixture loads no model."""
    import torch
    from safetensors.torch import save_file

    from flywheel.training.models import resolve_base_model

    info = resolve_base_model("smollm2-135m-instruct")
    cfg = json.loads((info.path / "config.json").read_text())
    hidden = cfg["hidden_size"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", hidden // cfg["num_attention_heads"])
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for mod, out_dim in (("q_proj", hidden), ("v_proj", kv)):
            pre = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(4, hidden, generator=g) * 0.05
            tensors[f"{pre}.lora_B.weight"] = torch.randn(out_dim, 4, generator=g) * 0.1
    out = tmp_path_factory.mktemp("harmful") / "adapter"
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "base_model_name_or_path": str(info.path)}))
    (out / "flywheel_adapter.json").write_text(json.dumps({
        "base_model": info.name, "base_model_sha256": info.sha256, "dataset_version": "harmful"}))
    return out


@pytest.mark.slow
def test_real_eval_refuses_a_harmful_adapter(mlflow_store, tmp_path, harmful_adapter):
    cfg = GateConfig(out=str(tmp_path / "gate"), min_cases=4,
                     eval={"limit": 6, "variants": ["concise"], "cache_dir": str(tmp_path / "cache"),
                           "register_prompts": False})
    out = run_gate(cfg, str(harmful_adapter), promote=True)
    assert out["decision"] == "fail" and out["exit_code"] == 1, out["gate"]["reasons"]
    primary = out["gate"]["checks"][0]
    assert primary["metric"] == "nll" and primary["difference"] > 0  # NLL went up: worse
    assert primary["n"] == 6 and out["eval_run_id"]
    assert out["gate"]["baseline"].startswith("base model smollm2-135m-instruct")
    assert registry.champion(MODEL) is None  # refused: nothing promoted
    assert (tmp_path / "gate" / "eval" / "results.json").exists()


@pytest.mark.slow
def test_nll_only_gate_keeps_a_readable_sample(mlflow_store, tmp_path, harmful_adapter):
    """An NLL-only gate generates one token per case; reviewers get real answers on a few cases, in a linked run."""
    from mlflow.tracking import MlflowClient

    cfg = GateConfig(out=str(tmp_path / "gate"), min_cases=4, guardrails=[],
                     sample_generations={"n_cases": 2, "max_new_tokens": 12},
                     eval={"limit": 4, "variants": ["concise"], "cache_dir": str(tmp_path / "cache"),
                           "register_prompts": False})
    out = run_gate(cfg, str(harmful_adapter))
    gate_eval = [json.loads(x) for x in (tmp_path / "gate" / "eval" / "cases.jsonl").read_text().splitlines()]
    sample = [json.loads(x) for x in (tmp_path / "gate" / "sample" / "cases.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "gate" / "eval" / "results.json").read_text())["generation"]["max_tokens"] == 1
    assert len(sample) == 2 * 2  # 2 cases x (base, candidate)
    assert max(len(r["output"].split()) for r in sample) > max(len(r["output"].split()) for r in gate_eval)
    sid = out["gate"]["sample_eval_run_id"]
    client = MlflowClient()
    assert client.get_run(out["eval_run_id"]).data.tags["flywheel.eval.sample_run"] == sid
    assert client.get_run(sid).data.tags["flywheel.eval.sample_of"] == out["eval_run_id"]
    assert out["decision"] == "fail"  # the sample decides nothing


def test_regate_reads_what_flywheel_eval_writes_with_the_defaults(mlflow_store, tmp_path):
    """`flywheel eval candidate=...` names its targets `base` and `candidate`; the default config gates it."""
    raw = open(results_file(tmp_path)).read().replace('"champion"', '"base"')
    res = json.loads(raw)
    res["targets"] = [{"name": "base", "base": "smollm2-135m-instruct"}, {"name": "candidate", "adapter": "x"}]
    path = tmp_path / "eval-results.json"
    path.write_text(json.dumps(res))
    out = run_gate(GateConfig(results=str(path), out=str(tmp_path / "g")), "candidate")
    assert (out["decision"], out["exit_code"]) == ("pass", 0), out["gate"]["reasons"]
    assert out["gate"]["baseline"] == "base"


def test_ab_require_without_a_variant_uses_the_single_treatment_or_says_which(mlflow_store, tmp_path):
    cfg = GateConfig(results=results_file(tmp_path), out=str(tmp_path / "g1"), ab={"require": True})
    with tracking.start_run("ab", tags={"flywheel.ab.verdict.v2": "ship"}):  # A/B variants are the logs' names
        pass
    assert run_gate(cfg, "c")["decision"] == "pass"
    with tracking.start_run("ab", tags={"flywheel.ab.verdict.v2": "ship", "flywheel.ab.verdict.v3": "ship"}):
        pass
    out = run_gate(cfg.model_copy(update={"out": str(tmp_path / "g2")}), "c")
    assert out["decision"] == "error" and "set ab.variant" in " ".join(out["gate"]["reasons"])


def dpo_results_file(tmp_path, nll_ci=(0.0, 0.04), n=64):
    """results.json of the preference suite: the candidate prefers the chosen answers more often (McNemar), and
    its reference NLL moved by `nll_ci` (baseline 2.5: the 2 % margin of configs/gate-dpo.yaml is 0.05)."""
    def cell(target, metric, mean, direction):
        return {"variant": "plain", "target": target, "metric": metric, "mean": mean, "ci_low": mean - 0.1,
                "ci_high": mean + 0.1, "n": n, "direction": direction}

    def comp(metric, test, est, ci, p, direction):
        return {"variant": "candidate/plain", "control": "champion/plain", "metric": metric, "test": test,
                "estimate": est, "ci_low": ci[0], "ci_high": ci[1], "p_value": p, "p_adjusted": p, "n": n,
                "control_target": "champion", "treatment_target": "candidate", "control_variant": "plain",
                "treatment_variant": "plain", "direction": direction}

    nll_est = sum(nll_ci) / 2
    res = {"run_id": "e" * 32, "variants": [{"name": "plain", "source": "configs/prompts/plain.yaml"}],
           "cells": [cell("champion", "preference_accuracy", 0.55, "higher"),
                     cell("candidate", "preference_accuracy", 0.70, "higher"),
                     cell("champion", "nll", 2.5, "lower"), cell("candidate", "nll", 2.5 + nll_est, "lower")],
           "comparisons": [comp("preference_accuracy", "mcnemar_exact", 0.15, (0.05, 0.25), 0.004, "higher"),
                           comp("nll", "paired_t", nll_est, nll_ci, 0.2, "lower")]}
    path = tmp_path / f"results-dpo-{nll_ci[1]}.json"
    path.write_text(json.dumps(res))
    return str(path)


@pytest.mark.parametrize("nll_ci,decision", [((0.0, 0.04), "pass"), ((0.03, 0.09), "fail")])
def test_dpo_gate_wants_preference_gains_without_breaking_nll(mlflow_store, tmp_path, nll_ci, decision):
    from flywheel.pipelines.config import load_config
    from flywheel.pipelines.gate import ROOT

    cfg = load_config(GateConfig, ROOT / "configs" / "gate-dpo.yaml",
                      [f"results={dpo_results_file(tmp_path, nll_ci)}", f"out={tmp_path / 'g'}"])
    assert cfg.primary.metric == "preference_accuracy" and [g.metric for g in cfg.guardrails] == ["nll"]
    out = run_gate(cfg, "candidate")
    assert out["decision"] == decision
    checks = {c["metric"]: c for c in out["gate"]["checks"]}
    assert checks["preference_accuracy"]["status"] == "pass"
    assert checks["nll"]["status"] == decision
    if decision == "fail":
        assert any("nll: may have got worse" in r for r in out["gate"]["reasons"])


def test_dpo_gate_eval_is_teacher_forced_on_the_preference_split(tmp_path):
    from flywheel.pipelines.config import load_config
    from flywheel.pipelines.gate import ROOT, _eval_config

    cfg = load_config(GateConfig, ROOT / "configs" / "gate-dpo.yaml")
    ecfg = _eval_config(cfg, {"name": "champion", "base": "smollm2-135m-instruct"}, "runs:/x/adapter", tmp_path)
    assert ecfg.metrics == ["preference_accuracy", "nll"] and ecfg.primary_metric == "preference_accuracy"
    assert ecfg.generation.max_new_tokens == 1 and ecfg.variants == ["plain"]


def test_dpo_gate_counts_the_preference_pairs_not_eval_jsonl(tmp_path):
    """min_cases is checked on the cases the eval will read: the preference split when it scores pairs."""
    from flywheel.pipelines.config import load_config
    from flywheel.evals.prompts.suite import check_enough_cases
    from flywheel.pipelines.gate import ROOT, _eval_config
    from tests.evals.test_prompts_preference import fluent_vs_shuffled, write_jsonl

    d = tmp_path / "mined"
    d.mkdir()
    (d / "eval.jsonl").write_text("")  # hh-rlhf mines pairs only
    pairs = [{**p, "id": f"{p['id']}-{k}"} for k in range(2) for p in fluent_vs_shuffled()]
    write_jsonl(d / "preferences_eval.jsonl", pairs)
    cfg = load_config(GateConfig, ROOT / "configs" / "gate-dpo.yaml", [f"eval.cases={d}"])
    check_enough_cases(_eval_config(cfg, {"name": "champion"}, "runs:/x/adapter", tmp_path), cfg.min_cases)
