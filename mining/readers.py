"""Streaming readers: every input shape becomes *candidates* (one assistant reply with its history), derived
preference pairs, or rejects (an unreadable record: file, line, reason, raw text cut short).

What counts as a record (the unit of `read == kept + rejected + sum(filtered)`):
- chat logs (JSONL/CSV/Parquet, canonical or the flat RAG-log shape): one line/row;
- oasst1 flat messages: one assistant message (its thread, rebuilt via `parent_id`, is its history); prompter
  messages are history, not records; an unparsable line is one rejected record;
- oasst2 trees: one assistant node (with the path from the root); an unparsable tree line is one rejected record;
- hh-rlhf: one `chosen`/`rejected` pair (it becomes a preference, never an SFT example).

oasst ratings (`oasst_rating`, a documented choice because the sources disagree on what "good" means):
- `quality` (default) / `helpfulness`: the crowd label mean v in [0, 1] mapped to 1 + round(4 v);
- `rank`: sibling rank r among n ranked replies mapped to 5 - round(4 r / (n - 1)) (a lone reply has none);
- `quality_then_rank`: the label when present, else the rank.
A reply without the chosen signal is filtered as `no_rating`.

Line formats are parsed by `parse_lines` on raw bytes so a process pool can do it; oasst1 must see the whole
file to rebuild threads, so `read_oasst1` runs in the calling process and holds one small dict per message
(oasst exports are MBs, not GBs).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from flywheel.foundation.errors import InputError

try:  # orjson is ~2x faster than json.loads; both raise ValueError subclasses on bad input.
    import orjson as _orjson

    def _loads(b: bytes | str) -> Any:
        return _orjson.loads(b)
except ImportError:  # pragma: no cover
    def _loads(b: bytes | str) -> Any:
        return json.loads(b)

FORMATS = ("chatlog", "oasst1", "oasst2", "hh")
RAW_CUT = 2000  # rejects keep this many characters of the raw line: enough to debug, not a 10 MB copy
ROLES = {"system", "user", "assistant"}
OASST_RATINGS = ("quality", "helpfulness", "rank", "quality_then_rank")
LINE_SUFFIXES = (".jsonl", ".json")  # line-delimited JSON: what an append-only log is
DATA_SUFFIXES = LINE_SUFFIXES + (".csv", ".parquet")


class RecordError(ValueError):
    """A record that cannot be read; the message is the reject reason (`rating: 'five' is not an integer`)."""


# ----------------------------------------------------------------------------------------------- inputs
def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files to read: a directory stands for its data files (sorted). A missing input is an InputError; an empty
    file is kept (a rotated, empty log among others is normal: the miner counts it, 0 records, and warns), but
    inputs that are *all* empty are an InputError: there is nothing to mine."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(f"{p}: input does not exist")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and is_data_file(f))
            if not files:
                raise InputError(f"{p}: directory holds no .jsonl/.csv/.parquet files")
            out.extend(files)
        else:
            out.append(p)
    empty = [f for f in out if is_empty(f)]
    if empty and len(empty) == len(out):
        names = ", ".join(map(str, empty[:3])) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise InputError(f"{names}: input file{'s are' if len(empty) > 1 else ' is'} empty (nothing to mine)")
    return out


def is_data_file(path: Path) -> bool:
    """What a directory of inputs contributes: the suffixes the readers parse (`DATA_SUFFIXES`, any case); hidden
    files (editor swap files, a writer's `.tmp`) are not logs. The one definition `flywheel mine` and the loop
    (`flywheel run`) share, so the loop never slices a file that mining then refuses."""
    return path.suffix.lower() in DATA_SUFFIXES and not path.name.startswith(".")


def is_empty(path: Path) -> bool:
    return path.stat().st_size == 0


def display_name(path: Path) -> str:
    """`parent/name`: names the file in rejects and the manifest without an absolute (machine) path."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def detect_format(path: Path) -> str:
    """Guess the format from the suffix and the first record's keys; an unknown shape is an InputError."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet"):
        return "chatlog"
    if suffix not in (".jsonl", ".json"):
        raise InputError(f"{path}: unknown format (suffix {suffix or 'none'!r}); pass format=chatlog|oasst1|"
                         "oasst2|hh or use .jsonl/.csv/.parquet")
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = _loads(line)
            except ValueError:
                if i > 20:
                    break
                continue  # a bad first line is a reject, not a reason to give up on the file
            if not isinstance(obj, dict):
                continue
            if "chosen" in obj and "rejected" in obj:
                return "hh"
            if isinstance(obj.get("prompt"), dict) and "message_tree_id" in obj:
                return "oasst2"
            if "message_id" in obj and "parent_id" in obj:
                return "oasst1"
            if "messages" in obj or "user_query" in obj or "conversation_id" in obj:
                return "chatlog"
            raise InputError(f"{path}:{i}: unknown format (keys {sorted(obj)[:8]}); pass format=...")
    raise InputError(f"{path}: unknown format (no JSON object in the first lines)")


def iter_raw_lines(path: Path, max_line_bytes: int, start: int = 0, first_line: int = 0,
                   limit: int | None = None) -> Iterator[tuple[int, bytes | None, bytes]]:
    """(line_no, line, head) for each non-blank line; `line` is None when it exceeds `max_line_bytes`
    (then `head` is its first bytes and the rest is skipped without being held in memory).
    `start`/`first_line`/`limit`: one block of the file (`line_blocks`): `limit` lines from byte `start`, the
    first of which is line `first_line + 1`."""
    with open(path, "rb") as f:
        f.seek(start)
        n = first_line
        while True:
            if limit is not None and n - first_line >= limit:
                return
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            n += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                head = line[:RAW_CUT]
                while line and not line.endswith(b"\n"):  # drain the rest of the giant line
                    line = f.readline(1 << 20)
                yield n, None, head
                continue
            if line.strip():
                yield n, line, line


def line_blocks(path: Path, block_bytes: int) -> list[tuple[int, int, int]]:
    """(start byte, lines before it, lines in it) of blocks of about `block_bytes`, cut at line ends, counting
    lines as `iter_raw_lines` does (a giant line is one line). One sequential read; nothing is held."""
    blocks, start, first, n = [], 0, 0, 0
    with open(path, "rb") as f:
        while True:
            line = f.readline(1 << 20)
            if not line:
                break
            while not line.endswith(b"\n"):
                line = f.readline(1 << 20)
                if not line:
                    break
            n += 1
            if f.tell() - start >= block_bytes:
                blocks.append((start, first, n - first))
                start, first = f.tell(), n
    if n > first:
        blocks.append((start, first, n - first))
    return blocks


# ----------------------------------------------------------------------------------------------- events
# Readers yield plain tuples (cheap to pickle across processes):
#   ("cand", line, candidate_dict)   a record to curate
#   ("reject", line, reason, raw)    an unreadable record
#   ("filtered", line, reason)       a readable record dropped by the reader itself (e.g. identical hh pair)
#   ("pair", line, preference_dict)  an hh record kept as a preference
#   ("pref", line, preference_dict)  a derived preference (oasst sibling ranks): not a record
def reject(line: int, reason: str, raw: bytes | str) -> tuple:
    if isinstance(raw, bytes):
        raw = raw[:RAW_CUT * 4].decode("utf-8", errors="replace")
    return ("reject", line, reason, raw.rstrip("\n")[:RAW_CUT])


def _decode(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8 at byte {e.start}") from None
    try:
        return _loads(text)
    except ValueError as e:
        raise RecordError(f"invalid JSON ({str(e).splitlines()[0][:80]})") from None


def parse_lines(fmt: str, items: list[tuple[int, bytes | None, bytes]], oasst_rating: str = "quality",
                max_line_bytes: int = 0, max_rank_pairs: int = 3, ratings: dict | None = None) -> list[tuple]:
    """Raw lines of one line-oriented format -> events. Pure; runs in worker processes. `ratings`: later rating
    lines of the file by conversation id (`rating_lines`); a rating line itself is not a record."""
    out: list[tuple] = []
    for line_no, raw, head in items:
        if raw is None:
            out.append(reject(line_no, f"line longer than {max_line_bytes} bytes", head))
            continue
        try:
            obj = _decode(raw)
            if not isinstance(obj, dict):
                raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
            if fmt == "chatlog":
                if "rating_for" in obj:
                    continue
                cand = chatlog_candidate(obj, line_no)
                if ratings and cand["id"] in ratings:
                    cand["rating"] = _rating(ratings[cand["id"]])
                out.append(("cand", line_no, cand))
            elif fmt == "oasst2":
                out.extend(oasst2_events(obj, line_no, oasst_rating, max_rank_pairs))
            elif fmt == "hh":
                out.append(hh_event(obj, line_no))
            else:
                raise ValueError(f"parse_lines: unknown format {fmt!r}")
        except RecordError as e:
            out.append(reject(line_no, str(e), raw))
    return out


# ----------------------------------------------------------------------------------------------- chat logs
def _stable_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def _rating(value: Any, field: str = "rating") -> int:
    if value is None:
        raise RecordError(f"missing field '{field}'")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RecordError(f"{field}: {value!r:.40} is not an integer 1-5")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RecordError(f"{field}: {value!r:.40} is not an integer 1-5") from None
    if value != int(value):
        raise RecordError(f"{field}: {value!r} is not an integer 1-5")
    if not 1 <= int(value) <= 5:
        raise RecordError(f"{field}: {int(value)} is outside 1-5")
    return int(value)


def _messages(value: Any) -> list[dict]:
    if isinstance(value, str):  # CSV/Parquet cells carry the list as JSON text
        try:
            value = json.loads(value)
        except ValueError:
            raise RecordError("messages: not a JSON list") from None
    if not isinstance(value, list) or not value:
        raise RecordError("messages: expected a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(f"messages[{i}]: expected an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RecordError(f"messages[{i}].role: {role!r:.40} is not one of system/user/assistant")
        if not isinstance(content, str):
            raise RecordError(f"messages[{i}].content: expected a string")
        out.append({"role": role, "content": content})
    return out


def _opt_str(obj: dict, key: str) -> str | None:
    v = obj.get(key)
    if v is None or v == "":
        return None
    if isinstance(v, (list, tuple)):  # retrieved documents as a list: join them
        return "\n\n".join(str(x) for x in v if x is not None) or None
    if hasattr(v, "tolist"):  # numpy arrays from Parquet
        return _opt_str({key: v.tolist()}, key)
    return str(v)


def chatlog_candidate(obj: dict, line_no: int) -> dict:
    """One canonical (or seed flat-shape) chat-log record -> candidate. Raises RecordError naming the field."""
    if "messages" in obj:
        messages = _messages(obj["messages"])
        # `"rating": null` is an interaction not rated (yet): filtered as no_rating; a missing key is a defect
        rating = None if "rating" in obj and obj["rating"] is None else _rating(obj.get("rating"))
        context = _opt_str(obj, "retrieved_context")
        cid = obj.get("conversation_id")
    elif "user_query" in obj or "llm_response" in obj:  # the flat RAG-log shape
        q, a = obj.get("user_query"), obj.get("llm_response")
        if not isinstance(q, str) or not q:
            raise RecordError("user_query: missing or not a string")
        if not isinstance(a, str):
            raise RecordError("llm_response: missing or not a string")
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rating = _rating(obj.get("user_rating"), "user_rating")
        context = _opt_str(obj, "retrieved_documents")
        cid = obj.get("conversation_id") or obj.get("id")
    else:
        raise RecordError("missing field 'messages' (or the flat 'user_query'/'llm_response')")
    if cid is not None and not isinstance(cid, (str, int)):
        raise RecordError("conversation_id: expected a string")
    if cid is None or cid == "":
        cid = _stable_id(*(m["content"] for m in messages))
    system = [m["content"] for m in messages if m["role"] == "system"]
    if system and context is None:
        context = "\n\n".join(system)
    turns = [m for m in messages if m["role"] != "system"]
    return {
        "id": str(cid), "group": str(cid), "messages": turns, "context": context, "rating": rating,
        "source": "chatlog", "prompt_variant": _opt_str(obj, "prompt_variant"), "model": _opt_str(obj, "model"),
        "lang": _opt_str(obj, "lang"), "flags": [],
    }


# Ratings that arrive after the interaction (`flywheel.pipelines.applog.log_rating` without a tracking server):
# a line {"rating_for": <conversation_id>, "rating": r} later in the same file; the last one wins.
RATING_LINE = b'{"rating_for"'
_CID_RE = re.compile(rb'"conversation_id": ?"((?:[^"\\]|\\.)*)"')


def rating_lines(path: Path) -> dict[str, Any]:
    """{conversation_id: rating} of the file's rating lines; {} (one C-speed scan) when it has none."""
    if not _contains(path, RATING_LINE):
        return {}
    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(RATING_LINE):
                try:
                    obj = _loads(line)
                    out[str(obj["rating_for"])] = obj.get("rating")
                except (ValueError, KeyError, TypeError):
                    continue  # the line itself is rejected when the main pass reads it
    return out


def _contains(path: Path, needle: bytes, chunk: int = 1 << 20) -> bool:
    """Whether the file holds `needle`, read in 1 MiB chunks. Not mmap: touching every page of a mapped file counts
    the whole file in the process's RSS (856 MiB at 1M records), which hides the miner's real, flat footprint."""
    keep = len(needle) - 1
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if needle in tail + block[:keep] or needle in block:
                return True
            tail = block[-keep:]
    return False


def batch_ratings(ratings: dict[str, Any], items: list[tuple[int, bytes | None, bytes]]) -> dict[str, Any]:
    """The ratings a batch of raw lines needs (found by their conversation_id), so a worker gets only those."""
    if not ratings:
        return {}
    out = {}
    for _, raw, _ in items:
        for m in _CID_RE.finditer(raw or b""):
            cid = m.group(1).decode("utf-8", "replace")
            if cid in ratings:
                out[cid] = ratings[cid]
    return out


def iter_csv_rows(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line_no, row, raw) per CSV row; line_no is the physical line where the row starts."""
    with open(path, encoding="utf-8", errors="strict", newline="") as f:
        reader = csv.DictReader(f)
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                yield start, None, f"unreadable CSV row ({e})"
                return  # the csv module cannot resync after a broken row; the rest is one reject
            if None in row:
                yield start, None, "more fields than the header"
            else:
                yield start, row, ",".join(v or "" for v in row.values())
            start = reader.line_num + 1


def iter_parquet_rows(path: Path, batch_size: int = 4096) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a non-parquet file)
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def parse_rows(items: list[tuple[int, dict | None, str]]) -> list[tuple]:
    out = []
    for line_no, row, raw in items:
        if row is None:
            out.append(reject(line_no, raw, raw))
            continue
        try:
            out.append(("cand", line_no, chatlog_candidate(row, line_no)))
        except RecordError as e:
            out.append(reject(line_no, str(e), json.dumps(row, ensure_ascii=False, default=str)))
    return out


# ----------------------------------------------------------------------------------------------- oasst
def label_values(labels: Any) -> dict[str, float]:
    """oasst1 flat `{name: [...], value: [...]}` and oasst2 `{name: {value, count}}` -> {name: value}."""
    if not isinstance(labels, dict):
        return {}
    if isinstance(labels.get("name"), list):
        return {n: float(v) for n, v in zip(labels["name"], labels.get("value") or []) if v is not None}
    out = {}
    for k, v in labels.items():
        if isinstance(v, dict) and v.get("value") is not None:
            out[k] = float(v["value"])
        elif isinstance(v, (int, float)) and not isinstance(v, bool):  # already {name: value}
            out[k] = float(v)
    return out


def oasst_rating(node: dict, labels: dict[str, float], n_ranked: int, mode: str) -> int | None:
    def from_label(name: str) -> int | None:
        v = labels.get(name)
        return None if v is None else 1 + int(round(4 * min(1.0, max(0.0, v))))

    def from_rank() -> int | None:
        r = node.get("rank")
        if not isinstance(r, int) or n_ranked < 2:
            return None
        return 5 - int(round(4 * min(r, n_ranked - 1) / (n_ranked - 1)))

    if mode in ("quality", "helpfulness"):
        return from_label(mode)
    if mode == "rank":
        return from_rank()
    q = from_label("quality")
    return q if q is not None else from_rank()


def _oasst_flags(node: dict, labels: dict[str, float]) -> list[str]:
    flags = []
    if node.get("deleted"):
        flags.append("deleted")
    if node.get("review_result") is False:
        flags.append("review_failed")
    if labels.get("spam", 0.0) >= 0.5:
        flags.append("spam")
    return flags


def _role(node: dict) -> str:
    return "assistant" if node.get("role") == "assistant" else "user"


def oasst_thread_events(path_nodes: list[dict], siblings: list[dict], source: str, line_no: int,
                        mode: str, group: str | None = None) -> tuple:
    """The candidate for the last node of `path_nodes` (root prompt ... assistant reply)."""
    node = path_nodes[-1]
    labels = label_values(node.get("labels"))
    n_ranked = sum(isinstance(s.get("rank"), int) for s in siblings)
    flags: list[str] = []
    for anc in path_nodes:  # a deleted or review-failed turn anywhere in the history poisons the thread
        anc_labels = labels if anc is node else label_values(anc.get("labels"))
        for f in _oasst_flags(anc, anc_labels):
            if f not in flags:
                flags.append(f)
    text_ok = all(isinstance(n.get("text"), str) for n in path_nodes)
    if not text_ok:
        raise RecordError("text: missing or not a string")
    cand = {
        "id": str(node.get("message_id")), "group": group or str(node.get("message_tree_id") or path_nodes[0].get("message_id")),
        "messages": [{"role": _role(n), "content": n["text"]} for n in path_nodes], "context": None,
        "rating": oasst_rating(node, labels, n_ranked, mode), "source": source, "prompt_variant": None,
        "model": node.get("model_name"), "lang": node.get("lang") or path_nodes[0].get("lang"), "flags": flags,
    }
    return ("cand", line_no, cand)


def rank_preferences(parent_path: list[dict], children: list[dict], source: str, line_no: int,
                     max_pairs: int = 3) -> list[tuple]:
    """oasst sibling ranks -> (best vs each worse) pairs; deleted/spam/review-failed replies never take part."""
    ok = [c for c in children if c.get("role") == "assistant" and isinstance(c.get("rank"), int)
          and isinstance(c.get("text"), str) and not _oasst_flags(c, label_values(c.get("labels")))]
    if len(ok) < 2 or any(_oasst_flags(n, label_values(n.get("labels"))) for n in parent_path):
        return []
    ok.sort(key=lambda c: c["rank"])
    prompt = [{"role": _role(n), "content": n["text"]} for n in parent_path]
    out = []
    for worse in ok[1:1 + max_pairs]:
        if worse["rank"] == ok[0]["rank"] or worse["text"] == ok[0]["text"]:
            continue
        out.append(("pref", line_no, {
            "id": _stable_id(str(ok[0].get("message_id")), str(worse.get("message_id"))), "prompt": prompt,
            "chosen": [{"role": "assistant", "content": ok[0]["text"]}],
            "rejected": [{"role": "assistant", "content": worse["text"]}], "source": f"{source}:rank"}))
    return out


def oasst2_events(tree: dict, line_no: int, mode: str, max_pairs: int = 3) -> list[tuple]:
    root = tree.get("prompt")
    if not isinstance(root, dict):
        raise RecordError("prompt: missing or not an object (not an oasst2 tree)")
    group = str(tree.get("message_tree_id") or root.get("message_id"))
    out: list[tuple] = []
    stack = [(root, [root], [root])]  # (node, path from the root, the node's siblings incl. itself)
    while stack:  # iterative DFS: deep trees must not hit the recursion limit
        node, path, sibs = stack.pop()
        children = [c for c in node.get("replies") or [] if isinstance(c, dict)]
        if node is not root and node.get("role") == "assistant":
            out.append(oasst_thread_events(path, sibs, "oasst2", line_no, mode, group))
        out.extend(rank_preferences(path, children, "oasst2", line_no, max_pairs))
        for c in reversed(children):  # reversed push => document order out
            stack.append((c, path + [c], children))
    return out


def read_oasst1(path: Path, mode: str, max_line_bytes: int, max_pairs: int = 3) -> Iterator[tuple]:
    """Flat oasst1 messages -> events. Holds one dict per message (no labels/detoxify kept) to rebuild threads."""
    nodes: dict[str, dict] = {}
    order: list[str] = []
    for line_no, raw, head in iter_raw_lines(path, max_line_bytes):
        if raw is None:
            yield reject(line_no, f"line longer than {max_line_bytes} bytes", head)
            continue
        try:
            m = _decode(raw)
            if not isinstance(m, dict):
                raise RecordError(f"expected a JSON object, got {type(m).__name__}")
            mid = m.get("message_id")
            if not isinstance(mid, str) or not mid:
                raise RecordError("missing field 'message_id'")
            if not isinstance(m.get("text"), str):
                raise RecordError("text: missing or not a string")
            if m.get("role") not in ("prompter", "assistant"):
                raise RecordError(f"role: {m.get('role')!r:.40} is not prompter/assistant")
        except RecordError as e:
            yield reject(line_no, str(e), raw)
            continue
        keep = {k: m.get(k) for k in ("message_id", "parent_id", "message_tree_id", "text", "role", "lang",
                                       "deleted", "review_result", "rank", "model_name")}
        keep["labels"] = label_values(m.get("labels"))  # {name: value}: all we need of the label table
        keep["_line"] = line_no
        keep["_kids"] = []
        nodes[mid] = keep
        order.append(mid)
    for mid in order:
        n = nodes[mid]
        parent = nodes.get(n["parent_id"]) if n["parent_id"] else None
        if parent is not None:
            parent["_kids"].append(n)
    for mid in order:
        n = nodes[mid]
        if n["role"] != "assistant":
            if n["_kids"]:
                path = _path(nodes, n)
                if path is not None:
                    yield from rank_preferences(path, n["_kids"], "oasst1", n["_line"], max_pairs)
            continue
        path = _path(nodes, n)
        if path is None:
            yield ("filtered", n["_line"], "orphan")  # an ancestor is missing from the export
            continue
        parent = nodes.get(n["parent_id"])
        siblings = parent["_kids"] if parent else [n]
        try:
            yield oasst_thread_events(path, siblings, "oasst1", n["_line"], mode)
        except RecordError as e:
            yield reject(n["_line"], str(e), n["text"])


def _path(nodes: dict[str, dict], n: dict) -> list[dict] | None:
    path = [n]
    seen = {n["message_id"]}
    while path[-1]["parent_id"]:
        p = nodes.get(path[-1]["parent_id"])
        if p is None or p["message_id"] in seen:
            return None
        seen.add(p["message_id"])
        path.append(p)
    path.reverse()
    return path


# ----------------------------------------------------------------------------------------------- hh-rlhf
_TURN_RE = re.compile(r"\n\n(Human|Assistant):")


def parse_transcript(text: str) -> list[dict]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` -> [{role, content}]; RecordError if it is not one."""
    parts = _TURN_RE.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RecordError("not a Human/Assistant transcript")
    return [{"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1].strip()}
            for i in range(1, len(parts) - 1, 2)]


def hh_event(obj: dict, line_no: int) -> tuple:
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(v, str):
            raise RecordError(f"{name}: missing or not a string")
    try:
        c, r = parse_transcript(chosen), parse_transcript(rejected)
    except RecordError as e:
        raise RecordError(f"chosen/rejected: {e}") from None
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise RecordError("chosen/rejected: transcript does not end with an Assistant turn")
    if c[-1]["content"] == r[-1]["content"]:
        return ("filtered", line_no, "identical_pair")
    if not c[-1]["content"] or not r[-1]["content"]:
        return ("filtered", line_no, "empty_reply")
    prompt = c[:-1]  # chosen and rejected share the prefix in hh-rlhf; a few differ: trust `chosen`
    return ("pair", line_no, {"id": _stable_id(chosen, rejected), "prompt": prompt, "chosen": [c[-1]],
                              "rejected": [r[-1]], "source": "hh-rlhf"})


def csv_sniff_ok(path: Path) -> None:
    """Whole-file check for CSV: a header must exist."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        header = next(csv.reader(io.StringIO(f.readline())), None)
    if not header:
        raise InputError(f"{path}:1: CSV has no header row")
