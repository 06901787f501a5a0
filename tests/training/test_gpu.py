"""GPU paths (Unsloth backend, QLoRA): need CUDA and the `gpu` extra; skipped elsewhere with the reason shown."""

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = {"max_steps": 4, "batch_size": 2, "max_length": 128, "learning_rate": 2e-3, "lr_scheduler": "constant",
         "eval_every": 2, "save_every": 2, "eval_max_examples": 4, "generations": 1,
         "generation_max_new_tokens": 8}


@pytest.fixture
def dataset(tmp_path):
    from tests.training.conftest import write_dataset

    return write_dataset(tmp_path / "ds")


@pytest.mark.parametrize("backend, four_bit", [("unsloth", False), ("unsloth", True), ("trl", True)])
def test_gpu_backends_train_and_save_an_adapter(dataset, tmp_path, mlflow_store, backend, four_bit):
    if backend == "unsloth":
        pytest.importorskip("unsloth", reason="the gpu extra (unsloth) is not installed")
    if four_bit:
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from flywheel.pipelines.train import TrainConfig, run_train

    cfg = TrainConfig.model_validate({**SMALL, "dataset": str(dataset), "backend": backend,
                                      "load_in_4bit": four_bit, "output_dir": str(tmp_path / "out")})
    r = run_train(cfg)
    assert r["backend"] == backend and r["device"] == "cuda" and r["global_step"] == 4
    assert r["final_loss"] < r["first_loss"]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
