"""Base-model resolution: the catalog cache (race-safe, checksummed), local dirs, clear errors."""

import json
import threading
import time

import pytest

from flywheel.foundation.errors import InputError
from flywheel.training import models


@pytest.mark.slow
def test_catalog_model_is_a_plain_safetensors_dir_with_chat_template():
    info = models.resolve_base_model("smollm2-135m-instruct")
    assert (info.path / "model.safetensors").exists() and (info.path / "tokenizer.json").exists()
    cfg = json.loads((info.path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert "<|im_start|>" in (info.path / "chat_template.jinja").read_text()
    assert len(info.sha256) == 64 and models.resolve_base_model("smollm2").sha256 == info.sha256
    # A local directory resolves to itself with the same weight hash (its checksum file was verified).
    local = models.resolve_base_model(str(info.path))
    assert local.path == info.path and local.sha256 == info.sha256 and local.source == "local"
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"} <= models.linear_module_names(info.path)


def _fake_dequantize(calls):
    def fake(entry, out):
        calls.append(1)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        (out / "model.safetensors").write_bytes(b"weights" * 100)
        (out / "config.json").write_text("{}")
    return fake


def test_concurrent_first_use_builds_once_and_nobody_sees_half_a_dir(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(models, "_dequantize_gguf", _fake_dequantize(calls))
    results, errors = [], []

    def go():
        try:
            results.append(models.resolve_base_model("smollm2-135m-instruct", cache_dir=tmp_path))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    assert len({r.sha256 for r in results}) == 1 and len({r.path for r in results}) == 1
    assert not list(tmp_path.glob(".tmp-*"))


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(models, "_dequantize_gguf", _fake_dequantize(calls))
    first = models.resolve_base_model("smollm2-135m-instruct", cache_dir=tmp_path)
    (first.path / "model.safetensors").write_bytes(b"weightz" * 100)  # same size, different bytes
    models._VERIFIED.clear()
    again = models.resolve_base_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert len(calls) == 2 and again.sha256 == first.sha256


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not a catalog name"):
        models.resolve_base_model("./no/such/dir")
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        models.resolve_base_model("nobody/no-such-model-xyz")
    with pytest.raises(InputError, match="no config.json"):
        models.resolve_base_model(str(tmp_path))
