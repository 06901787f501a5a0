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
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from flywheel.foundation.errors import FlywheelError

M = TypeVar("M", bound=BaseModel)


class ConfigError(FlywheelError, ValueError):
    """A config problem a user can fix; the CLI prints it in one line and exits 2."""


class StageConfig(BaseModel):
    """Base for every stage config: unknown keys are errors, assignments are validated too, no NaN/inf floats,
    no booleans where a number is expected (pydantic would read `epochs: true` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, v, info: ValidationInfo):
        if isinstance(v, bool):
            kinds = _scalar_types(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("expected a number, got a boolean")
        elif isinstance(v, int) and not -(2 ** 63) <= v < 2 ** 63:
            # no setting needs more; a 1000-digit step count is a typo or an attack, not a plan
            raise ValueError(f"integer out of range (about {int(v.bit_length() * 0.30103)} digits; "
                             "the limit is 2**63)")
        return v


def _scalar_types(tp) -> set:
    """The plain types an annotation admits at its top level: `int | None` -> {int, NoneType}."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _scalar_types(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_scalar_types(a) for a in typing.get_args(tp)))
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(tp)}
    return {tp} if isinstance(tp, type) else set()


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases and duplicate keys, naming the file and line."""

    source = "config"

    def compose_node(self, parent, index):
        ev = self.peek_event()
        if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None):
            kind = f"alias *{ev.anchor}" if isinstance(ev, yaml.AliasEvent) else f"anchor &{ev.anchor}"
            raise ConfigError(f"{self.source}:{ev.start_mark.line + 1}: YAML {kind}: anchors and aliases are not "
                              "allowed in configs (write the value out)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: the base constructor reports it
                continue
            if first is not None:
                raise ConfigError(f"{self.source}:{line}: duplicate key {key!r} (first given on line {first}); "
                                  "each key may appear once")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _first_clause(e: Exception) -> str:
    # Python's "Exceeds the limit (4300 digits) ...; use sys.set_int_max_str_digits()" advice is for programmers
    return str(e).split(";")[0]


def _yaml_load(text: str, source: str):
    loader = _StrictLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


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


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file does not exist")
    if not p.is_file():
        raise ConfigError(f"{p}: config path is not a file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "a config is YAML text") from None
    try:
        data = _yaml_load(text, str(p))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except ConfigError:
        raise
    except ValueError as e:  # e.g. an integer of more than 4300 digits (Python refuses to convert it)
        raise ConfigError(f"{p}: a value cannot be read ({_first_clause(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(data).__name__}")
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
