"""Eval cases: a question, an optional reference answer and context, optional per-case assertions.

Three sources, told apart by shape, so `cases=` can point at whatever the user has:
- a mined dataset directory (`flywheel mine` output): its `eval.jsonl`, chat records whose last user turn is the
  question and whose final assistant turn is the reference; the dataset version comes from `manifest.json`;
- a cases file, JSONL or YAML (a list, or `{cases: [...]}`), one case per record:
  `{id?, question, reference?, context?, assert?: [{type: contains, value: ...}, ...], vars?: {...}}`;
- an oasst1 flat message table (`message_id`/`parent_id`/`role`/`rank` per line, as in ../shared/data): each
  root prompt becomes a case whose reference is its best-ranked assistant reply. This lets a suite run on the
  real data before (or without) a mining step;
- preference pairs (TRL's conversational format, as `flywheel mine` writes them: `{id, prompt: [messages],
  chosen: [assistant message], rejected: [assistant message]}`): a pairs .jsonl file, told apart by shape, or a
  mined dataset directory's `preferences_eval.jsonl` when `preferences=True` (the eval stage asks for it when the
  metrics include `preference_accuracy`). The prompt's last user turn is the question, the chosen answer is the
  reference (so reference NLL reads the chosen answers), and both answers are kept for teacher-forced scoring.

Every case remembers `file:line`, so an error about it names where to look.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.foundation.errors import InputError
from flywheel.mining.dataset import open_dataset
from flywheel.foundation.io import iter_jsonl

CASE_KEYS = {"id", "question", "input", "prompt", "reference", "expected", "context", "assert", "assertions",
             "vars", "metadata", "history"}


@dataclass
class Case:
    id: str
    question: str
    reference: str | None = None
    context: str | None = None
    history: list[dict] = field(default_factory=list)  # earlier turns (user/assistant) before the question
    assertions: list[dict] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # file:line
    chosen: str | None = None    # a preference case: the preferred answer (also its reference) ...
    rejected: str | None = None  # ... and the dispreferred one

    @property
    def is_pair(self) -> bool:
        return self.chosen is not None and self.rejected is not None

    def fields(self) -> dict[str, Any]:
        """What a template may name. `None` means absent (a template's `defaults` may fill it)."""
        out: dict[str, Any] = {"id": self.id, "question": self.question, "reference": self.reference,
                               "context": self.context or None}
        out.update(self.vars)
        return out


@dataclass
class CaseSet:
    cases: list[Case]
    path: str
    kind: str  # "dataset" | "cases" | "oasst" | "preferences"
    dataset_version: str | None = None


def load_cases(path: str | Path, limit: int | None = None, preferences: bool = False) -> CaseSet:
    """`preferences`: from a mined dataset directory, read the preference pairs' eval split instead of eval.jsonl
    (a file is read by its shape either way)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: cases not found (a mined dataset directory, or a .jsonl/.yaml cases file)")
    version = None
    kind = "cases"
    if p.is_dir():
        split = "preferences_eval" if preferences else "eval"
        ds = open_dataset(p, need=(split,))
        version = ds.version
        records = list(_read_jsonl(ds.files[split]))
        kind = "dataset"
    elif p.suffix in (".yaml", ".yml"):
        records = _read_yaml(p)
    elif p.suffix in (".jsonl", ".json"):
        records = list(_read_jsonl(p))
    else:
        raise InputError(f"{p}: unknown cases format {p.suffix!r} (use a dataset dir, .jsonl or .yaml)")

    if records and "message_id" in records[0][1] and "role" in records[0][1]:
        cases = _oasst_cases(records)
        kind = "oasst"
    elif records and "chosen" in records[0][1] and "rejected" in records[0][1]:
        cases = [_case_from_pair(rec, where) for where, rec in records]
        kind = "preferences"
    else:
        cases = [_case_from_record(rec, where) for where, rec in records]
    if not cases:
        raise InputError(f"{p}: no cases")
    seen: dict[str, str] = {}
    for c in cases:
        if c.id in seen:
            raise InputError(f"{c.source}: id: duplicate case id {c.id!r} (first at {seen[c.id]})")
        seen[c.id] = c.source
    if limit is not None:
        cases = cases[: max(0, int(limit))]
    return CaseSet(cases=cases, path=str(p.resolve()), kind=kind, dataset_version=version)


def _read_jsonl(p: Path):
    for i, rec in iter_jsonl(p):
        yield f"{p}:{i}", rec


def _read_yaml(p: Path) -> list[tuple[str, dict]]:
    import yaml

    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(f"{p}{':' + str(mark.line + 1) if mark else ''}: invalid YAML") from None
    if isinstance(data, dict) and "cases" in data:
        data = data["cases"]
    if not isinstance(data, list):
        raise InputError(f"{p}: expected a list of cases (or a mapping with `cases:`)")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise InputError(f"{p}: case #{i + 1}: expected a mapping")
        out.append((f"{p}#case{i + 1}", rec))
    return out


def _text(rec: dict, key: str, where: str, required: bool = False) -> str | None:
    v = rec.get(key)
    if v is None:
        if required:
            raise InputError(f"{where}: {key}: required")
        return None
    if not isinstance(v, str):
        raise InputError(f"{where}: {key}: expected text, got {type(v).__name__}")
    return v


def _case_from_record(rec: dict, where: str) -> Case:
    if "messages" in rec:
        return _case_from_chat(rec, where)
    unknown = sorted(set(rec) - CASE_KEYS)
    if unknown:
        raise InputError(f"{where}: {unknown[0]}: unknown case field (known: question, reference, context, "
                         f"assert, vars, id)")
    qkey = next((k for k in ("question", "input", "prompt") if k in rec), "question")
    question = _text(rec, qkey, where, required=True)
    if not question.strip():
        raise InputError(f"{where}: {qkey}: empty")
    assertions = rec.get("assert", rec.get("assertions")) or []
    if not isinstance(assertions, list) or not all(isinstance(a, dict) for a in assertions):
        raise InputError(f"{where}: assert: expected a list of mappings like {{type: contains, value: ...}}")
    vars_ = rec.get("vars") or {}
    if not isinstance(vars_, dict):
        raise InputError(f"{where}: vars: expected a mapping")
    history = rec.get("history") or []
    _check_messages(history, where, "history")
    rid = rec.get("id")
    return Case(id=str(rid) if rid is not None else where.rsplit("/", 1)[-1], question=question,
                reference=_text(rec, "reference", where) if "reference" in rec else _text(rec, "expected", where),
                context=_text(rec, "context", where), history=list(history),
                assertions=[dict(a) for a in assertions], vars=dict(vars_), source=where)


def _check_messages(msgs: Any, where: str, key: str) -> None:
    if not isinstance(msgs, list):
        raise InputError(f"{where}: {key}: expected a list of {{role, content}}")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: {key}[{j}]: expected {{role: system|user|assistant, content: text}}")


def _case_from_chat(rec: dict, where: str) -> Case:
    """A mined record: [system(context)], user, assistant, ... The final user turn is the question."""
    msgs = rec["messages"]
    _check_messages(msgs, where, "messages")
    last_user = max((j for j, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if last_user is None:
        raise InputError(f"{where}: messages: no user turn")
    after = [m for m in msgs[last_user + 1:] if m["role"] == "assistant"]
    context = rec.get("context") if "context" in rec else next(
        (m["content"] for m in msgs if m["role"] == "system"), None)
    if context is not None and not isinstance(context, str):
        raise InputError(f"{where}: context: expected text or null")
    history = [m for m in msgs[:last_user] if m["role"] != "system"]
    rid = rec.get("id")
    return Case(id=str(rid) if rid is not None else where.rsplit("/", 1)[-1],
                question=msgs[last_user]["content"], reference=after[0]["content"] if after else None,
                context=context, history=history,
                vars={k: rec[k] for k in ("rating", "source", "prompt_variant", "cluster") if rec.get(k) is not None},
                source=where)


def _completion(rec: dict, key: str, where: str) -> str:
    msgs = rec.get(key)
    _check_messages(msgs, where, key)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise InputError(f"{where}: {key}: expected one assistant message (multi-turn completions are not scored)")
    return msgs[0]["content"]


def _case_from_pair(rec: dict, where: str) -> Case:
    """A preference pair: the prompt read like a mined chat record, plus both answers."""
    prompt = rec.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise InputError(f"{where}: prompt: expected a non-empty list of {{role, content}} (TRL conversational "
                         f"preference format)")
    chosen, rejected = _completion(rec, "chosen", where), _completion(rec, "rejected", where)
    case = _case_from_chat({k: v for k, v in rec.items() if k not in ("prompt", "chosen", "rejected")}
                           | {"messages": prompt + [{"role": "assistant", "content": chosen}]}, where)
    case.chosen, case.rejected = chosen, rejected
    return case


def _oasst_cases(records: list[tuple[str, dict]]) -> list[Case]:
    """Root prompts with their best-ranked live assistant reply as the reference."""
    replies: dict[str, list[tuple[int, dict]]] = {}
    roots = []
    for where, r in records:
        if r.get("deleted"):
            continue
        if r.get("parent_id") is None and r.get("role") == "prompter":
            roots.append((where, r))
        elif r.get("role") == "assistant" and r.get("parent_id"):
            rank = r.get("rank")
            replies.setdefault(r["parent_id"], []).append((rank if isinstance(rank, int) else 1 << 30, r))
    cases = []
    for where, r in roots:
        text = r.get("text")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: text: missing or empty")
        best = sorted(replies.get(r["message_id"], []), key=lambda x: x[0])
        cases.append(Case(id=str(r["message_id"]), question=text,
                          reference=best[0][1].get("text") if best else None, source=where))
    return cases
