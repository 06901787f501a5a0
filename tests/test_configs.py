"""Every stage config documents every field: walks the config of each stage module registered in pipelines/cli.py
(and every model nested in it) and fails on a field without a description. `flywheel config show` prints them."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from pydantic import BaseModel

from flywheel.pipelines.cli import STAGE_MODULES
from flywheel.pipelines.config_cmd import STAGE_CONFIGS, config_class, nested_models


def _walk(model: type[BaseModel], seen: dict[str, type[BaseModel]]) -> None:
    key = f"{model.__module__}.{model.__qualname__}"
    if key in seen:
        return
    seen[key] = model
    for field in model.model_fields.values():
        for sub in nested_models(field.annotation):
            _walk(sub, seen)


def all_config_models() -> dict[str, type[BaseModel]]:
    seen: dict[str, type[BaseModel]] = {}
    for stage in STAGE_CONFIGS:
        _walk(config_class(stage), seen)
    for name in STAGE_MODULES:  # and any other model a stage module holds (its sections, a stage's own config)
        for obj in vars(importlib.import_module(name)).values():
            if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__.startswith("flywheel."):
                _walk(obj, seen)
    return seen


def test_every_stage_with_a_config_is_listed():
    found = {m.__name__ for m in all_config_models().values() if m.__name__.endswith("Config")
             and m.__name__ not in ("StageConfig",)}
    listed = {config_class(s).__name__ for s in STAGE_CONFIGS}
    assert listed <= found and {"EmbeddingsConfig", "EvalConfig", "GateConfig", "AbConfig"} <= listed


def test_every_config_field_has_a_description():
    missing = {}
    for key, model in sorted(all_config_models().items()):
        bad = [n for n, f in model.model_fields.items() if not (f.description or "").strip()]
        if bad:
            missing[key] = bad
    assert not missing, f"fields without a description (Field(..., description=...)): {missing}"


@pytest.mark.parametrize("stage", ["gate", "bench-embeddings", "eval"])
def test_config_show_prints_every_field(stage):
    p = subprocess.run([sys.executable, "-m", "flywheel.pipelines", "config", "show", stage], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    model = config_class(stage)
    for name, field in model.model_fields.items():
        assert f"\n{name}: " in p.stdout and field.description in p.stdout
    assert "(undocumented)" not in p.stdout


def test_config_show_unknown_stage_is_one_line_exit_2():
    p = subprocess.run([sys.executable, "-m", "flywheel.pipelines", "config", "show", "nope"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "unknown stage 'nope'" in p.stderr
