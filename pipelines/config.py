"""Config loading: YAML file + `key=value` overrides, validated by a pydantic model before any work starts.

Poor man's Hydra. Each stage declares its own pydantic model (defaults live there, so a stage runs with no
config file at all); a YAML file overrides the defaults; `key=value` arguments override the file. Values are
parsed as YAML (`models=[a,b]`, `lora.r=16`, `min_rating=5`), dotted keys reach into nested sections.
Every model forbids unknown keys, so a typo is an error naming the key, never a silently ignored setting.

Strict where YAML is lenient: a key given twice, an anchor or alias (`&a` / `*a`: a 600-byte "billion laughs"
file expands to gigabytes), a boolean for a number (`true` is not 1), and NaN/inf floats are all errors
naming the file and line or the key.
"""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

# The config types live in the foundation, so that each core can own its stage's config; this module loads them.
from flywheel.foundation.config import ConfigError, StageConfig, _first_clause, _yaml_load, read_yaml  # noqa: F401

M = TypeVar("M", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = _yaml_load(raw, f"override {key}") if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {_short(raw)} is not valid YAML "
                          f"({getattr(e, 'problem', None) or e})") from None
    except ConfigError:
        raise
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"override {key}: value {_short(raw)} cannot be read ({_first_clause(e)})") from None
    # YAML reads `a,b` as the string "a,b"; keep it a string: lists need brackets, so a comma inside a value never splits it.
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


class _ShortRepr(reprlib.Repr):
    """reprlib with a bounded cost for every input: repr() of a 10**5-digit int is itself an error."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxtuple, self.maxstring, self.maxother = 2, 4, 4, 4, 60, 60

    def repr_int(self, x, level):
        return repr(x) if x.bit_length() < 200 else f"<integer of about {int(x.bit_length() * 0.30103)} digits>"


_short = _ShortRepr().repr
MAX_ERROR_LINES = 10


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem (at most MAX_ERROR_LINES), values shown in bounded form."""
    lines = []
    for e in err.errors(include_url=False)[:MAX_ERROR_LINES]:
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        got_s = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {_short(got)})"
        lines.append(f"{source}: {loc}: {msg}{got_s}")
    if err.error_count() > MAX_ERROR_LINES:
        lines.append(f"{source}: ... and {err.error_count() - MAX_ERROR_LINES} more problems")
    return "\n".join(lines)


def split_args(args: Iterable[str]) -> tuple[list[str], list[str]]:
    """CLI positionals -> (input paths, key=value overrides). An existing path wins over the '=' rule, so
    `logs_v=2.jsonl` is read as a file, not as the override `logs_v`."""
    paths, overrides = [], []
    for a in args:
        (overrides if "=" in a and not Path(a).exists() else paths).append(a)
    return paths, overrides


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
