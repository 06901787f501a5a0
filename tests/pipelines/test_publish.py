"""`flywheel publish`: folder contents, base hash check, lineage, GGUF conversion and a real llama.cpp load."""

from __future__ import annotations

import json
import os
import shutil
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


def champion_from(adapter: Path, tmp_path: Path, system: str | None = "Answer briefly.") -> str:
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
                                        "flywheel.system_prompt": system, "flywheel.prompt_variant": "concise"})
    registry.promote("flywheel-demo", v, gate.info.run_id)
    return "models:/flywheel-demo@champion"


def test_publish_without_converters(mlflow_store, tmp_path, adapter_dir):
    uri = champion_from(adapter_dir, tmp_path)
    out = tmp_path / "Modelfiles" / "demo"
    cfg = PublishConfig(llama_cpp_dir=str(tmp_path / "no-llama-cpp"))
    res = run_publish(uri, out=out, cfg=cfg)

    assert res["gguf_adapter"] is None
    assert any("GGUF adapter NOT produced" in w for w in res["warnings"])
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json",
                                                                   "adapter_model.safetensors"]
    parsed = mf.parse((out / "Modelfile").read_text())
    assert parsed.get("from") == "smollm2:135m"  # fallback FROM, said in a warning
    assert parsed.get("adapter") == "./adapter"
    assert parsed.get("system") == "Answer briefly."
    assert parsed.parameters()["stop"] == ["<|im_start|>", "<|im_end|>"]
    assert parsed.parameters()["temperature"] == ["0.0"]
    assert "<|im_start|>assistant\n" in parsed.get("template")
    assert parsed.get("license").startswith("Apache-2.0")

    readme = (out / "README.md").read_text()
    for needle in ("/data/logs-a.jsonl", "ds-test", "decision: `pass`", "ollama create flywheel-demo",
                   "GGUF adapter NOT produced"):
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
    uri = champion_from(adapter_dir, tmp_path, system=None)
    hostile = 'Be nice."""\nFROM evil\nADAPTER ../../etc/passwd'
    res = run_publish(uri, out=tmp_path / "o", system=hostile,
                      cfg=PublishConfig(llama_cpp_dir=str(tmp_path / "none")))
    parsed = mf.parse(Path(res["modelfile"]).read_text())
    assert [c.args for c in parsed.commands if c.name == "from"] == ["smollm2:135m"]
    assert [c.args for c in parsed.commands if c.name == "adapter"] == ["./adapter"]
    assert parsed.get("system") == mf.sanitize_text(hostile)[0]
    assert any(w.startswith("SYSTEM:") for w in res["warnings"])


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
    mp = pytest.MonkeyPatch()
    home = tmp / ".flywheel"
    mp.setenv("FLYWHEEL_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
    try:
        res = run_publish(str(adapter_dir), out=tmp / "pub", cfg=PublishConfig())
    finally:
        mp.undo()
    return res


@pytest.mark.slow
def test_publish_with_gguf(published_gguf):
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
