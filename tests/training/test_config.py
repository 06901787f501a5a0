"""The train and publish configs: every shipped file validates, every field says what it is, methods don't mix."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from flywheel.foundation.config import StageConfig
from flywheel.pipelines.config import ConfigError, load_config
from flywheel.training.config import TrainConfig
from flywheel.training.export_config import PublishConfig

CONFIGS = sorted(Path("configs/train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_train_config_validates_and_names_its_command(path):
    assert path.read_text(encoding="utf-8").startswith(f"# Run with: flywheel train --config {path.as_posix()}")
    load_config(TrainConfig, path, ["dataset=x"])


def _models(model: type[BaseModel]):
    yield model
    for f in model.model_fields.values():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            yield from _models(f.annotation)


@pytest.mark.parametrize("model", [TrainConfig, PublishConfig])
def test_every_field_has_a_description(model):
    assert issubclass(model, StageConfig)
    for m in _models(model):
        missing = [name for name, f in m.model_fields.items() if not f.description]
        assert not missing, f"{m.__name__}: no description for {missing}"


@pytest.mark.parametrize("overrides, message", [
    (["method=dpo", "packing=true"], "packing is a sft-only setting but method is dpo"),
    (["method=dpo", "max_length=64"], "max_length is a sft-only setting"),
    (["beta=0.5"], "beta is a dpo-only setting but method is sft"),
    (["method=dpo", "loss_type=nope"], "loss_type: Input should be 'sigmoid'"),
])
def test_method_keys_do_not_mix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, overrides)
