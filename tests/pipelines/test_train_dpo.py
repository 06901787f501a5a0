"""`flywheel train method=dpo` on CPU: bad input before weights load, the dry-run pair audit, and 2 real DPO steps
whose adapter records dpo, with the base as the reference (no second model copy)."""

from __future__ import annotations

import json

import pytest
import subprocess
import sys

from flywheel.foundation.errors import InputError
from flywheel.training.config import TrainConfig
from flywheel.pipelines.train import run_train
from tests.training.conftest import write_dataset, write_preferences

SMALL = {"method": "dpo", "max_steps": 2, "batch_size": 2, "max_prompt_length": 32, "max_completion_length": 24,
         "learning_rate": 1e-3, "lr_scheduler": "constant", "eval_every": 2, "save_every": 2,
         "eval_max_examples": 4, "generations": 1, "generation_max_new_tokens": 8, "backend": "trl",
         "preference_eval_fraction": 0.25}


def flywheel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flywheel.pipelines", *args], capture_output=True, text=True,
                          timeout=300)


def cfg(**kw) -> TrainConfig:
    return TrainConfig.model_validate({**SMALL, **kw})


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_preferences(tmp_path_factory.mktemp("dpo") / "dataset", n=16)


@pytest.mark.slow
def test_dataset_without_preferences_is_one_line_exit_2(tmp_path):
    ds = write_dataset(tmp_path / "sft")
    res = flywheel("train", "method=dpo", f"dataset={ds}", "backend=trl")
    assert res.returncode == 2, res.stderr
    assert "no preferences.jsonl" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_sft_key_with_dpo_is_exit_2():
    res = flywheel("train", "method=dpo", "packing=true", "dataset=x")
    assert res.returncode == 2 and "packing is a sft-only setting" in res.stderr


def test_init_adapter_on_another_base_is_refused(prefs, tmp_path):
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}", encoding="utf-8")
    (ad / "flywheel_adapter.json").write_text(json.dumps({"base_model": "other", "base_model_sha256": "ab" * 32}),
                                              encoding="utf-8")
    with pytest.raises(InputError, match="init_adapter .*trained on other .*not on base_model"):
        run_train(cfg(dataset=str(prefs), init_adapter=str(ad)), dry_run=True)


@pytest.mark.slow
def test_dry_run_shows_the_pair_audit_and_refuses_identical_pairs(prefs, tmp_path):
    res = run_train(cfg(dataset=str(prefs)), dry_run=True)
    a = res["audit"]
    assert res["dry_run"] and a["ok"] and a["pairs"] + a["eval_pairs"] == 16
    assert set(a["lengths"]) == {"prompt", "chosen", "rejected"}
    bad = tmp_path / "same"
    write_preferences(bad, n=4)
    rows = [json.loads(line) for line in (bad / "preferences.jsonl").read_text().splitlines()]
    (bad / "preferences.jsonl").write_text("".join(json.dumps({**r, "rejected": r["chosen"]}) + "\n" for r in rows))
    out = flywheel("train", "--dry-run", "method=dpo", f"dataset={bad}", "backend=trl")
    assert out.returncode == 2 and "chosen equals rejected" in out.stderr and "pair audit" in out.stdout


@pytest.mark.slow
def test_dpo_trains_two_steps_with_the_base_as_reference(prefs, tmp_path, mlflow_store):
    from peft import PeftModel
    from transformers import TrainerCallback

    seen = {}

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["model"] = model

    res = run_train(cfg(dataset=str(prefs), output_dir=str(tmp_path / "out"), tracking_uri=mlflow_store),
                    callbacks=[Grab()])
    assert res["global_step"] == 2 and res["adapter_dir"]
    assert isinstance(seen["model"], PeftModel)  # the reference is this model with the adapter disabled
    meta = json.loads((tmp_path / "out" / "adapter" / "flywheel_adapter.json").read_text())
    assert meta["method"] == "dpo" and meta["beta"] == 0.1 and meta["reference"].startswith("base model")
    assert meta["base_model_sha256"] == res["base_model"]["sha256"]
    assert res["eval_rewards"] and 0.0 <= res["eval_rewards"][-1]["accuracy"] <= 1.0
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient().get_run(res["run_id"]).data.metrics
    assert "eval_rewards/accuracies" in metrics or "eval_rewards_accuracies" in metrics, sorted(metrics)
