"""`flywheel train` end to end on CPU: config/data errors before the model loads, the dry-run audit, and one
small real training run (interrupted at step 5, resumed to 6) shared by the asserts on loss, adapter, resume
and MLflow. Frugal on purpose: 6 steps of batch 2 at max_length 128."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flywheel.pipelines.config import ConfigError, load_config
from flywheel.foundation.errors import InputError
from flywheel.pipelines.train import TrainConfig, demo_config, run_train
from tests.training.conftest import write_dataset

SMALL = {"max_steps": 6, "batch_size": 2, "max_length": 128, "learning_rate": 2e-3, "lr_scheduler": "constant",
         "eval_every": 3, "save_every": 2, "eval_max_examples": 4, "generations": 1,
         "generation_max_new_tokens": 12, "backend": "trl"}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("sft") / "dataset")


def cfg(**kw) -> TrainConfig:
    return TrainConfig.model_validate({**SMALL, **kw})


# -- config and data errors: all before any weights load ------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=8"], "lora.rank: unknown key"),
    (["lora.r=0"], "lora.r: Input should be greater than 0"),
    (["backend=gpu"], "backend: Input should be"),
    (["max_lenght=5"], "max_lenght: unknown key"),
])
def test_invalid_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(TrainConfig, None, overrides)


def test_config_file_first_line_is_its_command():
    first = open("configs/train/smollm2-lora.yaml", encoding="utf-8").readline()
    assert first.startswith("# Run with: flywheel train --config configs/train/smollm2-lora.yaml")
    load_config(TrainConfig, "configs/train/smollm2-lora.yaml", ["dataset=x"])


@pytest.mark.slow
def test_unknown_target_module_fails_before_loading(tiny_dataset):
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['qkv'\] not in smollm2-135m-instruct"):
        run_train(cfg(dataset=str(tiny_dataset), lora={"target_modules": ["q_proj", "qkv"]}))


def test_unsloth_or_qlora_without_cuda_is_an_error_not_a_fallback(tiny_dataset):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="'unsloth' needs a CUDA GPU"):
        run_train(cfg(dataset=str(tiny_dataset), backend="unsloth"))
    with pytest.raises(ConfigError, match="load_in_4bit: QLoRA"):
        run_train(cfg(dataset=str(tiny_dataset), load_in_4bit=True))


@pytest.mark.slow
@pytest.mark.parametrize("content, message", [
    ("", "dataset is empty"),
    ('{"id": "a"}\n', "train.jsonl:1: messages: missing"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
     '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}\n',
     "train.jsonl:2: messages[0].role: roles out of order"),
])
def test_dataset_errors_name_the_line(tmp_path, content, message):
    (tmp_path / "train.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_train(cfg(dataset=str(tmp_path)), dry_run=True)


@pytest.mark.slow
def test_dry_run_prints_audit_and_masked_example(tiny_dataset, mlflow_store, tmp_path):
    from flywheel.pipelines.cli import app

    res = CliRunner().invoke(app, ["train", f"dataset={tiny_dataset}", f"output_dir={tmp_path / 'o'}",
                                   "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "loss-mask audit" in res.output and "<|im_end|>" in res.output
    assert "[[<|im_start|>system" in res.output and "]]Flywheel fact" in res.output
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def mined_dir(root, version):
    """A dataset directory as `flywheel mine` leaves it: the files plus a manifest naming its version."""
    d = write_dataset(root)
    (d / "manifest.json").write_text(json.dumps({"version": version}))
    return d


@pytest.mark.slow
def test_dataset_by_version_is_found_through_the_mine_run(tmp_path, mlflow_store):
    from flywheel.pipelines import tracking

    tiny_dataset = mined_dir(tmp_path / "ds", "v123")
    with tracking.start_run("mine", tags={"flywheel.dataset_version": "v123",
                                          "flywheel.dataset_path": str(tiny_dataset)}) as run:
        pass
    r = run_train(cfg(dataset_version="v123"), dry_run=True)
    assert r["dataset_path"] == str(tiny_dataset) and r["mine_run_id"] == run.info.run_id
    assert r["dataset_version"] == "v123"
    with pytest.raises(InputError, match="no run in flywheel/mine has flywheel.dataset_version='nope'"):
        run_train(cfg(dataset_version="nope"), dry_run=True)
    with pytest.raises(ConfigError, match="dataset: give"):
        run_train(cfg(), dry_run=True)


def test_dataset_version_must_be_what_the_directory_holds(tmp_path, mlflow_store):
    """The directory of v1 was mined again into v2: training must refuse, before the base model is touched."""
    from flywheel.pipelines import tracking

    d = mined_dir(tmp_path / "ds", "v2")
    with tracking.start_run("mine", tags={"flywheel.dataset_version": "v1", "flywheel.dataset_path": str(d)}):
        pass
    for kw in ({"dataset_version": "v1"}, {"dataset": str(d), "dataset_version": "v1"}):
        with pytest.raises(InputError, match="holds dataset version v2, not v1"):
            run_train(cfg(base_model=str(tmp_path / "no-such-model"), **kw), dry_run=True)
    import subprocess
    import sys

    from tests.conftest import ROOT

    res = subprocess.run([sys.executable, "-m", "flywheel.pipelines", "train", "dataset_version=v1",
                          f"base_model={tmp_path / 'no-such-model'}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "holds dataset version v2" in res.stderr and "Traceback" not in res.stderr


def test_failed_mine_runs_are_not_used_for_the_lookup(tmp_path, mlflow_store):
    from flywheel.pipelines import tracking
    from flywheel.pipelines.train import resolve_dataset

    good = mined_dir(tmp_path / "good", "v3")
    with tracking.start_run("mine", tags={"flywheel.dataset_version": "v3", "flywheel.dataset_path": str(good)}) as ok:
        pass
    with pytest.raises(RuntimeError):
        with tracking.start_run("mine", tags={"flywheel.dataset_version": "v3",
                                              "flywheel.dataset_path": str(tmp_path / "half-written")}):
            raise RuntimeError("disk full")  # the newer run failed: its directory is not a dataset
    assert resolve_dataset(cfg(dataset_version="v3")) == (str(good), ok.info.run_id)


def test_demo_config_is_small():
    c = demo_config("d", "o")
    assert c.max_steps == 8 and c.max_length <= 256 and c.dataset == "d"


# -- one real training run, interrupted and resumed, shared by the asserts below ------------------------------

class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run 1 crashes at the start of step 5 (checkpoint-4 on disk); run 2 resumes to step 6."""
    import os

    from transformers import TrainerCallback

    root = tmp_path_factory.mktemp("train")
    home = root / ".flywheel"
    old = {k: os.environ.get(k) for k in ("FLYWHEEL_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["FLYWHEEL_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    dataset = write_dataset(root / "dataset")
    c = cfg(dataset=str(dataset), output_dir=str(root / "out"))

    class CrashAt5(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 4:
                raise Crash("simulated crash")

    seen: dict = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            if "step" not in seen:
                p = next(p for g in optimizer.param_groups for p in g["params"] if p in optimizer.state)
                seen.update(step=state.global_step, opt_step=int(optimizer.state[p]["step"]),
                            n_state=len(optimizer.state))

    try:
        with pytest.raises(Crash):
            run_train(c, callbacks=[CrashAt5()])
        ckpts = sorted(p.name for p in (root / "out" / "checkpoints").glob("checkpoint-*"))
        result = run_train(c, resume=True, callbacks=[Probe()])
        yield {"result": result, "ckpts_after_crash": ckpts, "probe": seen, "root": root, "cfg": c}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_resume_continues_at_the_checkpoint_step_with_its_optimizer_state(trained):
    r = trained["result"]
    assert trained["ckpts_after_crash"] == ["checkpoint-2", "checkpoint-4"]
    assert r["resumed_from"].endswith("checkpoint-4") and r["global_step"] == 6
    # AdamW state came back from the checkpoint: 4 updates already counted, for every LoRA tensor.
    assert trained["probe"] == {"step": 4, "opt_step": 4, "n_state": 30 * 4 * 2}


@pytest.mark.slow
def test_loss_falls(trained):
    r = trained["result"]
    steps = [s for s, _ in r["losses"]]
    assert steps == [1, 2, 3, 4, 5, 6]  # history from the checkpoint + the resumed steps
    assert r["final_loss"] < 0.6 * r["first_loss"]
    assert r["eval_losses"][-1][1] < r["eval_losses"][0][1]


@pytest.mark.slow
def test_adapter_reloads_with_peft_and_changes_greedy_output(trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = trained["result"]
    meta = json.loads(open(f"{r['adapter_dir']}/flywheel_adapter.json").read())
    assert meta["base_model"] == "smollm2-135m-instruct" and len(meta["base_model_sha256"]) == 64
    assert meta["train_run_id"] == r["run_id"] and meta["eos_tokens"] == ["<|im_end|>"]
    assert "{% generation %}" not in meta["chat_template"]  # the inference template ships, not the training one
    tok = AutoTokenizer.from_pretrained(r["adapter_dir"])
    base = AutoModelForCausalLM.from_pretrained(r["base_model"]["path"])
    msgs = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        before = base.generate(**enc, **kw)[0].tolist()
        model = PeftModel.from_pretrained(base, r["adapter_dir"])
        after = model.generate(**enc, **kw)[0].tolist()
    assert before != after
    assert "Flywheel" in tok.decode(after[enc["input_ids"].shape[1]:])


@pytest.mark.slow
def test_mlflow_run_has_the_contract(trained):
    import mlflow
    from mlflow.tracking import MlflowClient

    r = trained["result"]
    mlflow.set_tracking_uri(f"sqlite:///{trained['root'] / '.flywheel' / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(r["run_id"])
    tags = run.data.tags
    assert tags["flywheel.stage"] == "train" and tags["flywheel.backend"] == "trl"
    assert tags["flywheel.device"] == "cpu" and tags["flywheel.base_model"] == "smollm2-135m-instruct"
    assert tags["flywheel.base_model_sha256"] == r["base_model"]["sha256"]
    assert tags["flywheel.input.dataset_version"] == r["dataset_version"]
    assert tags["flywheel.train.resumed_from_checkpoint"] == "checkpoint-4"
    assert run.data.params["lora.r"] == "8"
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "eval_loss"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(r["run_id"], "loss")] == [5, 6]
    arts = {a.path for a in client.list_artifacts(r["run_id"])}
    assert {"adapter", "audit.json", "config.yaml", "generations.json"} <= arts
    adapter = {a.path.split("/")[-1] for a in client.list_artifacts(r["run_id"], "adapter")}
    assert {"adapter_model.safetensors", "adapter_config.json", "flywheel_adapter.json", "tokenizer.json",
            "chat_template.jinja"} <= adapter
    crashed = [x for x in client.search_runs([run.info.experiment_id]) if x.info.run_id != r["run_id"]]
    assert len(crashed) == 1 and crashed[0].info.status == "FAILED"
    assert tags["flywheel.train.resumed_from_run"] == crashed[0].info.run_id
