"""Dataset loading and validation for SFT: a mined dataset directory (or one JSONL file) -> checked conversations.

Records are the chat format of `flywheel mine` (see README): `{"id", "messages": [{"role", "content"}, ...], ...}`.
Every problem is an `InputError` naming file, line and field, because a bad record found by the trainer an hour in
(or worse, silently skipped) is the failure we are here to prevent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.foundation.errors import InputError
from flywheel.foundation.io import iter_jsonl
from flywheel.mining.dataset import open_dataset

ROLES = ("system", "user", "assistant")


@dataclass
class SFTDataset:
    """What training needs from a mined dataset: the split records plus where they came from."""

    train: list[dict]
    eval: list[dict]
    path: Path
    version: str                     # manifest version when there is a manifest, else a content hash
    manifest: dict | None = None
    files: dict[str, str] = field(default_factory=dict)  # split -> file


def load_sft_dataset(path: str | Path) -> SFTDataset:
    """A directory with `train.jsonl` (and usually `eval.jsonl`, `manifest.json`), or a single JSONL file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: dataset does not exist (give a `flywheel mine` output directory or a .jsonl file)")
    manifest = None
    if p.is_dir():
        ds = open_dataset(p, need=("train",))
        manifest = ds.manifest
        train = read_conversations(ds.files["train"])
        evals = read_conversations(ds.files["eval"], allow_empty=True) if "eval" in ds.files else []
        files = {s: str(ds.files[s]) for s in ("train", "eval") if s in ds.files}
    else:
        train, evals, files = read_conversations(p), [], {"train": str(p)}
    version = (manifest or {}).get("version") or _content_hash([Path(f) for f in files.values()])
    return SFTDataset(train=train, eval=evals, path=p.resolve(), version=str(version), manifest=manifest,
                      files=files)


def read_conversations(path: str | Path, allow_empty: bool = False) -> list[dict]:
    path = Path(path)
    rows: list[dict] = []
    for lineno, rec in iter_jsonl(path):  # bad JSON or a non-object: an InputError naming file:line
        validate_record(rec, f"{path}:{lineno}")
        rows.append(rec)
    if not rows and not allow_empty:
        raise InputError(f"{path}: dataset is empty (no records)")
    return rows


def validate_record(rec: object, where: str) -> None:
    """Roles must read like a chat: optional system first, then user/assistant alternating, ending with assistant.

    The last message must be the assistant's: it is what we train on. Anything else is an error with the index
    of the offending message.
    """
    if not isinstance(rec, dict):
        raise InputError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
    if "messages" not in rec:
        raise InputError(f"{where}: messages: missing (every record needs a `messages` list)")
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{where}: messages: must be a non-empty list")
    expected = "user"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise InputError(f"{where}: messages[{i}]: must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"{where}: messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"{where}: messages[{i}].content: must be a string, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise InputError(f"{where}: messages[{i}].role: 'system' is only allowed as the first message")
            continue
        if role != expected:
            prev = msgs[i - 1]["role"] if i else "start"
            raise InputError(f"{where}: messages[{i}].role: roles out of order, expected {expected!r} after "
                             f"{prev!r}, got {role!r}")
        expected = "assistant" if role == "user" else "user"
    if msgs[-1].get("role") != "assistant":
        raise InputError(f"{where}: messages[{len(msgs) - 1}].role: the last message must be 'assistant' "
                         f"(nothing to train on otherwise), got {msgs[-1].get('role')!r}")


def _content_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]
