"""The train recipe's checks before any weights load (training/recipe.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from flywheel.foundation.errors import InputError
from flywheel.training.config import TrainConfig
from flywheel.training.recipe import check_dataset_version, check_init_adapter, load_dataset, manifest_version

from .conftest import write_dataset


def test_manifest_version_is_none_without_a_readable_manifest(tmp_path):
    d = write_dataset(tmp_path / "ds")
    assert manifest_version(d) is None
    (d / "manifest.json").write_text(json.dumps({"version": "v7"}), encoding="utf-8")
    assert manifest_version(d) == "v7"


def test_a_directory_mined_again_is_not_the_version_asked_for(tmp_path):
    d = write_dataset(tmp_path / "ds")
    (d / "manifest.json").write_text(json.dumps({"version": "v2"}), encoding="utf-8")
    check_dataset_version(d, "v2", "v2")
    check_dataset_version(d, "v2", None)  # no version asked for: nothing to check
    with pytest.raises(InputError, match="holds dataset version v2, not v1"):
        load_dataset(TrainConfig(dataset=str(d), dataset_version="v1"), d)
    with pytest.raises(InputError, match=r"holds dataset version \(no manifest.json\), not v1"):
        check_dataset_version(d, None, "v1")


def test_a_starting_adapter_from_another_base_is_refused():
    info = SimpleNamespace(name="base-a", sha256="a" * 64)
    check_init_adapter("runs:/x/adapter", {"base_model": "base-a", "base_model_sha256": "a" * 64}, info)
    with pytest.raises(InputError, match=r"trained on base-b \(bbbbbbbbbbbb\), not on base_model base-a"):
        check_init_adapter("runs:/x/adapter", {"base_model": "base-b", "base_model_sha256": "b" * 64}, info)
