"""What every stage config is: a strict pydantic model, read from strict YAML.

The models themselves live with the code they configure (each core owns its stage's config); the shell
(`flywheel.pipelines.config`) loads a YAML file plus `key=value` overrides into them. Strict where YAML and pydantic
are lenient: a key given twice, an anchor or alias (`&a` / `*a`: a 600-byte "billion laughs" file expands to
gigabytes), a boolean for a number (`true` is not 1), NaN/inf floats and unknown keys are all errors naming the file
and line or the key.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from flywheel.foundation.errors import FlywheelError


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


