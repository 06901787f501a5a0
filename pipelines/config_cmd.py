"""`flywheel config show <stage>`: every setting of a stage, with its default, type and description, read from the
stage's config model (so it cannot drift from what the stage accepts).

    flywheel config show gate
    flywheel config show bench-embeddings
"""

from __future__ import annotations

import importlib
import json
import re
import typing

import typer
from pydantic import BaseModel

# command -> (the stage module that loads it, the config class it imports); the shell module is the one place a
# stage's config is known to live, wherever the core keeps the class itself.
STAGE_CONFIGS: dict[str, tuple[str, str]] = {
    "mine": ("flywheel.pipelines.mine", "MineConfig"),
    "train": ("flywheel.pipelines.train", "TrainConfig"),
    "bench-embeddings": ("flywheel.pipelines.embeddings", "EmbeddingsConfig"),
    "eval": ("flywheel.pipelines.eval", "EvalConfig"),
    "ab": ("flywheel.pipelines.ab", "AbConfig"),
    "gate": ("flywheel.pipelines.gate", "GateConfig"),
    "publish": ("flywheel.pipelines.publish", "PublishConfig"),
    "run": ("flywheel.pipelines.loop", "LoopConfig"),
}


def config_class(stage: str) -> type[BaseModel]:
    from flywheel.foundation.errors import InputError

    if stage not in STAGE_CONFIGS:
        raise InputError(f"config show: unknown stage {stage!r}; one of {', '.join(STAGE_CONFIGS)}")
    module, name = STAGE_CONFIGS[stage]
    return getattr(importlib.import_module(module), name)


def nested_models(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation: `list[GuardrailRule] | None` -> [GuardrailRule]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in nested_models(a)]


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(typing|flywheel(\.\w+)*)\.", "", str(annotation))  # list[flywheel.x.Rule] -> list[Rule]


def _default(field) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json", exclude_defaults=True) for v in value]
    return json.dumps(value, default=str)


def describe(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every field, sections expanded after their own line."""
    rows = []
    for name, field in model.model_fields.items():
        rows.append((prefix + name, _type_name(field.annotation), _default(field), field.description or ""))
        for sub in nested_models(field.annotation):
            is_list = typing.get_origin(field.annotation) is list
            rows += describe(sub, f"{prefix}{name}{'[]' if is_list else ''}.")
    return rows


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Inspect stage configs.", no_args_is_help=True)
    app.add_typer(config_app, name="config")

    @config_app.command("show")
    def show(stage: str = typer.Argument(..., help=f"one of: {', '.join(STAGE_CONFIGS)}")) -> None:
        """Every setting of a stage: key, type, default and description, from its config model."""
        model = config_class(stage)
        typer.echo(f"# {stage}: {model.__module__}.{model.__qualname__}")
        for key, type_, default, desc in describe(model):
            typer.echo(f"{key}: {type_} = {default}")
            typer.echo(f"    {desc or '(undocumented)'}")
