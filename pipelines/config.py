"""Config loading: YAML file + `key=value` overrides, validated by a pydantic model before any work starts.

Poor man's Hydra. Each stage declares its own pydantic model (defaults live there, so a stage runs with no
config file at all); a YAML file overrides the defaults; `key=value` arguments override the file. Values are
parsed as YAML (`models=[a,b]`, `lora.r=16`, `min_rating=5`), dotted keys reach into nested sections.
Every model forbids unknown keys, so a typo is an error naming the key, never a silently ignored setting.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from flywheel.foundation.errors import FlywheelError

M = TypeVar("M", bound=BaseModel)


class ConfigError(FlywheelError, ValueError):
    """A config problem a user can fix; the CLI prints it in one line and exits 2."""


class StageConfig(BaseModel):
    """Base for every stage config: unknown keys are errors, assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e.problem})") from None
    # YAML reads `a,b` as the string "a,b"; keep it a string: lists need brackets, as the brief says.
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        got_s = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r:.80})"
        lines.append(f"{source}: {loc}: {msg}{got_s}")
    return "\n".join(lines)


def load_config(model: type[M], path: str | Path | None = None, overrides: Iterable[str] = (),
                base: dict | None = None) -> M:
    """Defaults (the model) <- `base` (code-supplied) <- YAML file <- overrides. Raises ConfigError."""
    data: dict = copy.deepcopy(base or {})
    source = "config"
    if path is not None:
        source = str(path)
        data = _deep_merge(data, read_yaml(path))
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    if overrides:
        source = f"{path} + overrides" if path is not None else "overrides"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}; for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
