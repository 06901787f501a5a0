"""Versioned prompt templates: a system prompt and a user template, variables written `{{ name }}`.

The `{{ name }}` syntax is MLflow's prompt-registry syntax, so the exact text we render is the text we register:
a run can name `prompts:/flywheel-<variant>/<n>` and mean precisely what was sent to the model. Rendering is a
plain substitution (no Jinja, no str.format), so braces in a prompt (JSON examples) need no escaping.

A template file (`configs/prompts/<name>.yaml`):

    name: grounded
    version: 2                       # bump when the text changes; recorded on every eval run
    description: ...
    system: "You are ... Context: {{ context }}"
    user: "{{ question }}"
    defaults: {context: "(no context retrieved)"}   # used when a case lacks the field

Fields a template may name: `question`, `context`, `reference`, `id`, and any key of a case's `vars`.
`check_fields` runs before any generation, so a typo like `{{ contxt }}` fails the run at once, naming the file,
the field and the first case that lacks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from flywheel.foundation.errors import InputError
from flywheel.foundation.io import dumps, sha256_text

VAR_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}\}")
# A `{{` that is not a well-formed variable is almost always a typo (`{{ question }` or `{{ }}`).
OPEN_RE = re.compile(r"\{\{")


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: str
    system: str
    user: str
    description: str = ""
    defaults: Mapping[str, str] = field(default_factory=dict)
    source: str = "<inline>"

    @property
    def fields(self) -> list[str]:
        """Variables named in the template, in order of first appearance."""
        seen: dict[str, None] = {}
        for text in (self.system, self.user):
            for m in VAR_RE.finditer(text):
                seen.setdefault(m.group(1), None)
        return list(seen)

    @property
    def sha256(self) -> str:
        """Identity of the text (not the name): what the registry's de-duplication compares."""
        return sha256_text(dumps({"system": self.system, "user": self.user, "defaults": dict(self.defaults)}))

    def chat_template(self) -> list[dict[str, str]]:
        """The form MLflow's prompt registry stores for chat prompts."""
        msgs = [{"role": "system", "content": self.system}] if self.system.strip() else []
        return msgs + [{"role": "user", "content": self.user}]

    def render(self, values: Mapping[str, Any]) -> list[dict[str, str]]:
        """Messages for one case. `values` is `case.fields()`; missing keys fall back to `defaults`."""
        def sub(text: str) -> str:
            def one(m: re.Match) -> str:
                key = m.group(1)
                v = values.get(key)
                if v is None:
                    v = self.defaults.get(key)
                if v is None:  # check_fields prevents this; keep the message useful if it is skipped
                    raise InputError(f"{self.source}: template {self.name!r} names field {key!r} "
                                     f"that the case does not provide")
                return str(v)
            return VAR_RE.sub(one, text)

        return [{"role": m["role"], "content": sub(m["content"]).strip()} for m in self.chat_template()]


def _check_syntax(part: str, text: str, source: str) -> None:
    stripped = VAR_RE.sub("", text)
    for tok in ("{{", "}}"):
        i = stripped.find(tok)
        if i >= 0:
            near = stripped[max(0, i - 10):i + 20]
            raise InputError(f"{source}: {part}: malformed variable near {near!r} (write {{{{ field }}}})")


def template_from_dict(data: Mapping[str, Any], source: str = "<inline>") -> PromptTemplate:
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: a prompt template must be a mapping, got {type(data).__name__}")
    allowed = {"name", "version", "description", "system", "user", "defaults"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InputError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    for key in ("name", "version", "user"):
        if data.get(key) in (None, ""):
            raise InputError(f"{source}: {key}: required")
    name = str(data["name"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise InputError(f"{source}: name: {name!r} must be letters, digits, '_', '-', '.'")
    system = str(data.get("system") or "")
    user = str(data["user"])
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise InputError(f"{source}: defaults: must be a mapping of field -> text")
    for part, text in (("system", system), ("user", user)):
        _check_syntax(part, text, source)
    return PromptTemplate(name=name, version=str(data["version"]), system=system, user=user,
                          description=str(data.get("description") or ""),
                          defaults={str(k): str(v) for k, v in defaults.items()}, source=source)


def load_template(name_or_path: str | Path, search_dir: str | Path = "configs/prompts") -> PromptTemplate:
    """A YAML file path, or a bare name looked up as `<search_dir>/<name>.yaml`."""
    import yaml

    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = Path(search_dir) / f"{name_or_path}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in Path(search_dir).glob("*.yaml")) if Path(search_dir).is_dir() else []
        raise InputError(f"prompt variant {str(name_or_path)!r}: no file {p} (known: {', '.join(known) or 'none'})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise InputError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    return template_from_dict(data, source=str(p.resolve()))  # absolute: results.json readers (gate) reopen it


def check_fields(templates: Iterable[PromptTemplate], cases: Iterable[Any]) -> None:
    """Every field every template names must be provided by every case (or by the template's defaults).

    Runs before generation: one missing field would otherwise fail every case of a variant, an hour in.
    """
    cases = list(cases)
    for t in templates:
        for f in t.fields:
            if f in t.defaults:
                continue
            for c in cases:
                if c.fields().get(f) is None:
                    known = sorted(k for k, v in c.fields().items() if v is not None)
                    raise InputError(f"{t.source}: template {t.name!r} names field {f!r}, which case {c.id!r} "
                                     f"({c.source}) does not provide (it has: {', '.join(known)}; or add "
                                     f"`defaults: {{{f}: ...}}` to the template)")
