"""`flywheel publish`: folder contents, base hash check, lineage, GGUF conversion and a real llama.cpp load."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.training import modelfile as mf
from flywheel.pipelines import registry, tracking
from flywheel.pipelines.publish import PublishConfig, check_gguf, converters_dir, run_publish


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """mlflow.set_registry_uri exports MLFLOW_REGISTRY_URI; drop it so each test reads its own store."""
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


@pytest.fixture(scope="module")
def base():
    from flywheel.training.models import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, base):
    """A real LoRA adapter for the SmolLM2 base, written directly as PEFT saves it (no model load needed):
    random A, small random B on q_proj/v_proj, the base's tokenizer, and the lineage file training writes."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((base.path / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", hidden // cfg["num_attention_heads"])
    g = torch.Generator().manual_seed(0)
    r = 4
    tensors = {}
    for i in range(layers):
        for mod, out_dim in (("q_proj", hidden), ("v_proj", kv)):
            pre = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(r, hidden, generator=g) * 0.05
            tensors[f"{pre}.lora_B.weight"] = torch.randn(out_dim, r, generator=g) * 0.05
    d = tmp_path_factory.mktemp("pub") / "adapter"
    d.mkdir()
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": "somewhere/relative"}))  # like real adapters: a path publish must not trust
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base.path / f).exists():
            shutil.copy2(base.path / f, d / f)
    (d / "flywheel_adapter.json").write_text(json.dumps({
        "base_model": base.name, "base_model_sha256": base.sha256, "dataset_version": "ds-test",
        "mine_run_id": None, "eos_tokens": ["<|im_end|>"]}))
    return d


def champion_from(adapter: Path, tmp_path: Path, system: str | None = "Answer briefly.",
                  variant: str | None = "concise") -> str:
    """Log the adapter as a train run, register it, make it champion (the state `make demo` leaves)."""
    import mlflow

    src = tmp_path / "adapter-copy"
    shutil.copytree(adapter, src)
    with tracking.start_run("mine", inputs={"logs": "/data/logs-a.jsonl,/data/logs-b.jsonl"},
                            tags={"flywheel.dataset_version": "ds-test"}) as mine:
        pass
    with tracking.start_run("train", inputs={"mine_run": mine.info.run_id}) as run:
        meta = json.loads((src / "flywheel_adapter.json").read_text())
        meta.update(train_run_id=run.info.run_id, mine_run_id=mine.info.run_id)
        (src / "flywheel_adapter.json").write_text(json.dumps(meta))
        mlflow.log_artifacts(str(src), "adapter")
    with tracking.start_run("gate", tags={"flywheel.gate.decision": "pass"}) as gate:
        pass
    v = registry.register_adapter("flywheel-demo", registry.resolve_model(run.info.run_id),
                                  tags={"flywheel.input.gate_run": gate.info.run_id,
                                        "flywheel.system_prompt": system, "flywheel.prompt_variant": variant})
    registry.promote("flywheel-demo", v, gate.info.run_id)
    return "models:/flywheel-demo@champion"


def test_publish_without_converters(mlflow_store, tmp_path, adapter_dir):
    uri = champion_from(adapter_dir, tmp_path)
    out = tmp_path / "Modelfiles" / "demo"
    cfg = PublishConfig(mode="adapter", llama_cpp_dir=str(tmp_path / "no-llama-cpp"))
    res = run_publish(uri, out=out, cfg=cfg)

    assert res["gguf_adapter"] is None
    assert any("GGUF adapter NOT produced" in w for w in res["warnings"])
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json",
                                                                   "adapter_model.safetensors"]
    parsed = mf.parse((out / "Modelfile").read_text())
    assert parsed.get("from") == "smollm2:135m"  # fallback FROM, said in a warning
    assert parsed.get("adapter") == "./adapter"
    assert parsed.get("system").startswith("You are a helpful nutrition assistant. Answer in at most two")
    assert parsed.parameters()["stop"] == ["<|im_start|>", "<|im_end|>"]
    assert parsed.parameters()["temperature"] == ["0.0"]
    assert "<|im_start|>assistant\n" in parsed.get("template")
    assert parsed.get("license").startswith("Apache-2.0")

    readme = (out / "README.md").read_text()
    for needle in ("/data/logs-a.jsonl", "ds-test", "decision: `pass`", "ollama create flywheel-demo",
                   "GGUF adapter NOT produced", "v0.34.1", "| quantization | `f16` |"):
        assert needle in readme, needle
    lin = json.loads((out / "lineage.json").read_text())
    assert lin["version"] == "1" and lin["gate_decision"] == "pass" and lin["base_model_sha256"]

    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(res["run_id"])
    assert run.data.tags["flywheel.modelfile_path"] == str((out / "Modelfile").resolve())
    assert run.data.tags["flywheel.input.model_uri"] == uri
    assert run.data.tags["flywheel.publish.gguf_adapter"] == "no"
    assert {a.path for a in MlflowClient().list_artifacts(res["run_id"])} >= {"Modelfile", "README.md"}


def test_system_override_and_hostile_prompt(mlflow_store, tmp_path, adapter_dir):
    uri = champion_from(adapter_dir, tmp_path, system=None, variant=None)
    hostile = 'Be nice."""\nFROM evil\nADAPTER ../../etc/passwd'
    res = run_publish(uri, out=tmp_path / "o", system=hostile,
                      cfg=PublishConfig(mode="adapter", llama_cpp_dir=str(tmp_path / "none")))
    parsed = mf.parse(Path(res["modelfile"]).read_text())
    assert [c.args for c in parsed.commands if c.name == "from"] == ["smollm2:135m"]
    assert [c.args for c in parsed.commands if c.name == "adapter"] == ["./adapter"]
    assert parsed.get("system") == mf.sanitize_text(hostile)[0]
    assert any(w.startswith("SYSTEM:") for w in res["warnings"])


def test_adapter_mode_caveat_is_one_warning(mlflow_store, tmp_path, adapter_dir):
    uri = champion_from(adapter_dir, tmp_path)
    res = run_publish(uri, out=tmp_path / "o", cfg=PublishConfig(mode="adapter", llama_cpp_dir=str(tmp_path / "n")))
    assert sum("v0.34.1" in w for w in res["warnings"]) == 1


def test_system_split_keeps_context_out_of_system():
    from flywheel.pipelines.publish import split_system, variant_system

    static, dynamic, full = variant_system("grounded")
    assert static.startswith("You are a helpful nutrition assistant. Use the context below")
    assert "{{" not in static and "no context was retrieved" not in static and "Context:" not in static
    assert dynamic == "Context:\n{{ context }}"
    assert split_system("Hello {name}.\n\nBe brief.") == ("Be brief.", "Hello {name}.")


def test_refuses_system_with_fields(mlflow_store, tmp_path, adapter_dir):
    from flywheel.foundation.errors import InputError

    uri = champion_from(adapter_dir, tmp_path)
    with pytest.raises(InputError, match="template field"):
        run_publish(uri, out=tmp_path / "x", system="Context:\n{{ context }}",
                    cfg=PublishConfig(mode="adapter", llama_cpp_dir=str(tmp_path / "none")))
    assert not (tmp_path / "x").exists()


def test_merged_needs_the_converter(mlflow_store, tmp_path, adapter_dir):
    from flywheel.foundation.errors import InputError

    uri = champion_from(adapter_dir, tmp_path)
    with pytest.raises(InputError, match="make llama-cpp-converters") as e:
        run_publish(uri, out=tmp_path / "x", cfg=PublishConfig(llama_cpp_dir=str(tmp_path / "none")))
    assert e.value.exit_code == 2
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".tmp-x-*"))


@pytest.mark.parametrize("value, needle", [("q4_k_m", "llama-quantize"), ("int3", "not a GGUF type")])
def test_quantize_the_converter_cannot_write(value, needle):
    from flywheel.pipelines.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(PublishConfig, None, [f"quantize={value}"])


def test_unresolvable_model_uri(mlflow_store, tmp_path):
    from flywheel.foundation.errors import FlywheelError

    with pytest.raises(FlywheelError):
        run_publish("models:/no-such-model@champion", out=tmp_path / "x", cfg=PublishConfig())
    assert not (tmp_path / "x").exists()


def test_refuses_another_base(mlflow_store, tmp_path, adapter_dir):
    from flywheel.foundation.errors import InputError

    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    meta = json.loads((bad / "flywheel_adapter.json").read_text())
    meta["base_model_sha256"] = "0" * 64
    (bad / "flywheel_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="refusing to publish on another base"):
        run_publish(str(bad), out=tmp_path / "x", cfg=PublishConfig(llama_cpp_dir=str(tmp_path / "none")))
    assert not (tmp_path / "x").exists()


def _converters_or_skip():
    d = converters_dir()
    if d is None:
        pytest.skip("llama.cpp converters not installed (make llama-cpp-converters, or FLYWHEEL_LLAMA_CPP)")
    return d


@pytest.fixture(scope="module")
def published_gguf(tmp_path_factory, adapter_dir):
    """One publish with GGUF adapter and base, shared by the checks below (conversion is the slow part)."""
    _converters_or_skip()
    tmp = tmp_path_factory.mktemp("gguf")
    with _scratch_home(tmp):
        return run_publish(str(adapter_dir), out=tmp / "pub", cfg=PublishConfig(mode="adapter"))


@contextlib.contextmanager
def _scratch_home(tmp: Path):
    """A module-scoped MLflow store and FLYWHEEL_HOME (function-scoped fixtures cannot serve module fixtures)."""
    mp = pytest.MonkeyPatch()
    home = tmp / ".flywheel"
    mp.setenv("FLYWHEEL_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
    try:
        yield
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def published_merged(tmp_path_factory, adapter_dir):
    """One merged f16 publish of a champion with the grounded variant, shared by the merged-mode checks."""
    _converters_or_skip()
    tmp = tmp_path_factory.mktemp("merged")
    with _scratch_home(tmp):
        uri = champion_from(adapter_dir, tmp, system="filled at promotion: (no context was retrieved for this)",
                            variant="grounded")
        return run_publish(uri, out=tmp / "pub", cfg=PublishConfig())


@pytest.mark.slow
def test_merged_publish(published_merged, base):
    from flywheel.training.export import read_gguf

    out = Path(published_merged["out"])
    assert sorted(p.name for p in out.iterdir()) == [".flywheel-output.json", ".gitignore", "Modelfile", "README.md",
                                                     "lineage.json", "model.gguf"]
    text = (out / "Modelfile").read_text()
    parsed = mf.parse(text)
    assert parsed.get("from") == "./model.gguf" and parsed.get("adapter") is None
    assert "\nADAPTER" not in text
    system = parsed.get("system")
    assert system.startswith("You are a helpful nutrition assistant. Use the context below")
    assert "no context was retrieved" not in system and "{{" not in system and "Context:" not in system

    info = read_gguf(out / "model.gguf")
    assert info["type"] in (None, "model") and info["architecture"] == "llama"
    assert info["chat_template"] == (base.path / "chat_template.jinja").read_text()
    assert {"<|im_start|>", "<|im_end|>"} <= set(info["tokens"])
    types = {t["type"] for t in info["tensors"].values()}
    assert types == {"F16", "F32"} and len(info["tensors"]) == 272  # 30 layers x 9 + embeddings + final norm

    readme = (out / "README.md").read_text()
    lin = json.loads((out / "lineage.json").read_text())
    for needle in ("| quantization | `f16` |", "| mode | `merged` |", lin["dataset_version"], lin["train_run"],
                   lin["gate_run"], "llama-quantize model.gguf", "/api/chat", "<context for this request>"):
        assert needle in readme, needle
    assert lin["gguf_check"]["tensors"] == 272
    assert published_merged["model_gguf"] and published_merged["gguf_adapter"] is None
    assert not any("v0.34.1" in w for w in published_merged["warnings"])
    # memory: neither the merge nor the converter holds two copies of the fp32 base
    fp32 = sum(f.stat().st_size for f in base.path.glob("*.safetensors"))
    for k in ("merge", "convert"):
        assert published_merged["peak_rss"][k] < 2 * fp32, (k, published_merged["peak_rss"][k])


def _greedy_prompts(tok):
    prompts = ["What is a good breakfast for an athlete?", "Explain what a LoRA adapter is in one sentence.",
               "List three vegetables high in iron."]
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def _kl(p, q):
    import torch

    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


@pytest.mark.slow
def test_merged_gguf_matches_peft_in_transformers(published_merged, adapter_dir, base):
    """Without llama.cpp: transformers dequantizes the published GGUF; greedy tokens must follow PEFT's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(published_merged["out"])
    tok = AutoTokenizer.from_pretrained(str(base.path))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32),
                                     str(adapter_dir)).eval()
    gguf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    same = total = 0
    kls = []
    for prompt in _greedy_prompts(tok):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            a = peft.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
            b = gguf.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
            kls.append(_kl(peft(ids).logits[0, -1], gguf(ids).logits[0, -1]))
        same += int((a == b).sum())
        total += len(a)
    print(f"transformers-on-GGUF vs PEFT: {same}/{total} greedy tokens, next-token KL {max(kls):.2e}")
    assert total == 60 and same >= 58
    assert max(kls) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("quantize, min_same", [("f16", 58), ("q8_0", None)])
def test_merged_gguf_in_llama_cpp_matches_peft(quantize, min_same, tmp_path, adapter_dir, base, monkeypatch):
    """llama.cpp greedy on the merged GGUF vs PEFT through the same chat template; q8_0 only reports."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (make llama-cpp)")
    d = _converters_or_skip()
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.training.export import convert_hf, merge_lora

    merge_lora(base.path, adapter_dir, tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "model.gguf", d, quantize)
    tok = AutoTokenizer.from_pretrained(str(base.path))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32),
                                     str(adapter_dir)).eval()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), n_ctx=512, n_threads=1, logits_all=True,
                          verbose=False, seed=0)
    same = total = 0
    kls = []
    for prompt in _greedy_prompts(tok):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            a = peft.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
            ref = peft(torch.tensor([ids])).logits[0, -1]
        b = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            b.append(t)
            if len(b) >= 20:
                break
        llm.reset()
        llm.eval(ids)
        kls.append(_kl(ref, torch.tensor(np.asarray(llm.scores[len(ids) - 1]))))
        same += sum(int(x == y) for x, y in zip(a, b))
        total += len(a)
    print(f"llama.cpp {quantize} vs PEFT: {same}/{total} greedy tokens, next-token KL max {max(kls):.2e}")
    if min_same is not None:
        assert same >= min_same


@pytest.mark.slow
def test_publish_adapter_mode_with_gguf(published_gguf):
    out = Path(published_gguf["out"])
    assert check_gguf(out / "adapter.gguf", "adapter")["type"] == "adapter"
    assert check_gguf(out / "base.gguf", "model")["size"] > 100_000_000
    parsed = mf.parse((out / "Modelfile").read_text())
    assert parsed.get("from") == "./base.gguf" and parsed.get("adapter") == "./adapter.gguf"
    assert not [w for w in published_gguf["warnings"] if "NOT produced" in w]


@pytest.mark.slow
def test_llama_cpp_loads_and_follows_peft(published_gguf, adapter_dir, base):
    """The published GGUF pair in llama.cpp: the adapter loads, changes the output, and agrees with PEFT."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (make llama-cpp)")
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(published_gguf["out"])
    tok = AutoTokenizer.from_pretrained(str(base.path))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is a good breakfast?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        peft_logits = peft(torch.tensor([ids])).logits[0, -1].numpy()

    def last_logits(lora_scale):
        llm = llama_cpp.Llama(model_path=str(out / "base.gguf"), lora_path=str(out / "adapter.gguf"),
                              lora_scale=lora_scale, n_ctx=256, n_threads=1, logits_all=True, verbose=False,
                              seed=0)
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1])

    with_adapter, without = last_logits(1.0), last_logits(0.0)
    assert int(with_adapter.argmax()) == int(peft_logits.argmax())
    assert np.corrcoef(with_adapter, peft_logits)[0, 1] > 0.99
    assert np.abs(with_adapter - without).max() > 1e-3  # the adapter does something
    os.environ.pop("LLAMA_CPP_LIB", None)


@pytest.mark.parametrize("name", ["a b", "x;touch y", "-rf"])
def test_invalid_ollama_name_fails_before_any_work(tmp_path, name):
    """One line, exit 2, and nothing written: no store, no output folder, no `y` from `touch y`."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path / ".flywheel"), "PYTHONPATH": str(root),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / '.flywheel' / 'mlflow.db'}"}
    env.pop("MLFLOW_REGISTRY_URI", None)
    proc = subprocess.run([sys.executable, "-m", "flywheel.pipelines", "publish", "models:/flywheel-demo@champion",
                           f"name={name}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not a valid Ollama name part" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ollama_create_line_is_quoted(mlflow_store, tmp_path, adapter_dir):
    uri = champion_from(adapter_dir, tmp_path)
    out = tmp_path / "my models" / "demo;x"
    res = run_publish(uri, out=out, cfg=PublishConfig(mode="adapter", llama_cpp_dir=str(tmp_path / "no-llama-cpp"),
                                                      name="team/flywheel-demo:v1"))
    modelfile = str((out / "Modelfile").resolve())
    assert shlex.split(res["ollama_create"]) == ["ollama", "create", "team/flywheel-demo:v1", "-f", modelfile]
    assert res["ollama_create"] in (out / "README.md").read_text()
