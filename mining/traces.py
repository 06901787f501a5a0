"""MLflow traces as chat-log records: one trace (as `mlflow.entities.Trace.to_dict()`, plain data) -> a candidate.

The shell reads the traces (`flywheel.pipelines.traces`); this module only maps their dicts, so it runs in the
mining worker pool like any other reader and never imports mlflow.

A trace maps to one record:
- messages: the root span's inputs (`messages_field`, the OpenAI-style list autologging records; without one,
  `question_field` for a custom `@mlflow.trace` function taking a question), then the answer from the root span's
  outputs (`answer_field`, else the first that fits: a string, `choices[0].message.content`, `content`,
  `message.content`, the last assistant message of a list);
- context: the documents' `page_content` of every RETRIEVER span, in start order;
- rating: the feedback assessment named `rating_name` (numbers 1-5 as they are; booleans as `true_rating` /
  `false_rating`); with `rating_rule` human_first the latest HUMAN feedback wins and judges/code only count when
  no human rated, latest takes the latest of any source, human_only ignores every other source;
- prompt variant, model and language from the trace's tags (else its metadata).
A trace that cannot be mapped is a reject naming the trace id and the reason; an unrated one is filtered as
`no_rating` (most traces are never rated, which is not a defect).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Iterable

from flywheel.mining.readers import RecordError, _messages, _rating, reject

SOURCE = "mlflow-traces"
RETRIEVER = "RETRIEVER"
SESSION_KEY = "mlflow.trace.session"  # MLflow's standard metadata key for a conversation/session id

try:
    import orjson as _orjson

    def _canon(obj: Any) -> bytes:
        return _orjson.dumps(obj, option=_orjson.OPT_SORT_KEYS, default=str)
except ImportError:  # pragma: no cover
    def _canon(obj: Any) -> bytes:
        return json.dumps(obj, sort_keys=True, default=str).encode()


def source_name(experiment: str) -> str:
    """The input's name in the manifest, rejects and lineage: `mlflow-traces:<experiment>`."""
    return f"{SOURCE}:{experiment}"


def digest(h: "hashlib._Hash", items: Iterable[tuple[int, dict]]) -> None:
    """Fold a batch of (ordinal, trace dict) into the input's sha256, so the dataset version changes with them."""
    for _, t in items:
        h.update(_canon(t))


# ------------------------------------------------------------------------------------------------ trace parts
def _attr(span: dict, key: str) -> Any:
    """A span attribute: MLflow stores each one JSON-encoded."""
    v = (span.get("attributes") or {}).get(key)
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _get(obj: Any, path: str) -> Any:
    """Dotted path into dicts and lists (`choices.0.message.content`); None when any step is missing."""
    for part in path.split(".") if path else []:
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def _text(content: Any) -> Any:
    """OpenAI content parts ([{type: text, text}]) as one string; anything else unchanged."""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(str(p.get("text", "")) for p in content if p.get("type", "text") == "text")
    return content


def _answer(outputs: Any, field: str | None) -> str:
    if field:
        a = _get(outputs, field)
    elif isinstance(outputs, str):
        a = outputs
    else:
        a = next((x for x in (_get(outputs, "choices.0.message.content"), _get(outputs, "content"),
                              _get(outputs, "message.content")) if x is not None), None)
        if a is None and isinstance(outputs, list):  # a list of messages: the last assistant one
            a = next((m.get("content") for m in reversed(outputs)
                      if isinstance(m, dict) and m.get("role") == "assistant"), None)
    a = _text(a)
    if not isinstance(a, str):
        where = f"nothing at {field!r}" if field else "no string, choices.0.message.content, content or message"
        raise RecordError(f"no answer in the root span's outputs ({where})")
    return a


def _conversation(inputs: Any, spec: dict) -> list[dict]:
    msgs = _get(inputs, spec["messages_field"])
    if not isinstance(msgs, list) and spec["question_field"]:  # a custom function's traces beside autologged ones
        q = _get(inputs, spec["question_field"])
        if not isinstance(q, str) or not q:
            raise RecordError(f"no messages and no question: root span inputs have neither a list at "
                              f"{spec['messages_field']!r} nor a string at {spec['question_field']!r}")
        return [{"role": "user", "content": q}]
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(f"no messages: root span inputs have no list at {spec['messages_field']!r} "
                          "(set traces.messages_field or traces.question_field)")
    return [{**m, "content": _text(m.get("content"))} if isinstance(m, dict) else m for m in msgs]


def _context(spans: list[dict]) -> str | None:
    docs: list[str] = []
    for sp in sorted((s for s in spans if _attr(s, "mlflow.spanType") == RETRIEVER),
                     key=lambda s: s.get("start_time_unix_nano") or 0):
        out = _attr(sp, "mlflow.spanOutputs")
        for d in out if isinstance(out, list) else []:
            text = d.get("page_content") if isinstance(d, dict) else d if isinstance(d, str) else None
            if text:
                docs.append(str(text))
    return "\n\n".join(docs) or None


def _when(a: dict) -> datetime:
    t = a.get("last_update_time") or a.get("create_time") or "1970-01-01T00:00:00Z"
    return datetime.fromisoformat(t.replace("Z", "+00:00")) if isinstance(t, str) else datetime.fromtimestamp(
        t / 1000)


def pick_feedback(assessments: list[dict], name: str, rule: str) -> dict | None:
    """The feedback assessment that rates the trace under `rule` (human_first | latest | human_only), or None."""
    fb = [a for a in assessments if a.get("assessment_name") == name and "feedback" in a
          and a.get("valid", True) is not False and (a["feedback"] or {}).get("value") is not None]
    human = [a for a in fb if (a.get("source") or {}).get("source_type") == "HUMAN"]
    pool = human if rule == "human_only" or (rule == "human_first" and human) else fb
    # the latest wins; equal times (one millisecond) go to the one listed last, as the store lists them in order
    return max(enumerate(pool), key=lambda ia: (_when(ia[1]), ia[0]))[1] if pool else None


def rating_of(assessments: list[dict], spec: dict) -> int | None:
    a = pick_feedback(assessments, spec["rating_name"], spec["rating_rule"])
    if a is None:
        return None
    v = a["feedback"]["value"]
    if isinstance(v, bool):
        return spec["true_rating"] if v else spec["false_rating"]
    return _rating(v, f"feedback {spec['rating_name']!r}")


def _meta(info: dict, key: str | None) -> str | None:
    if not key:
        return None
    v = (info.get("tags") or {}).get(key) or (info.get("trace_metadata") or {}).get(key)
    return str(v) if v not in (None, "") else None


# ------------------------------------------------------------------------------------------------ the mapping
def trace_candidate(trace: dict, spec: dict) -> dict:
    """One trace dict -> a chat-log candidate (the shape `readers.chatlog_candidate` returns). RecordError names
    what is missing."""
    info, spans = trace.get("info") or {}, (trace.get("data") or {}).get("spans") or []
    tid = info.get("trace_id") or info.get("request_id")
    if not tid:
        raise RecordError("trace has no trace_id")
    root = next((s for s in spans if not s.get("parent_span_id")), None)
    if root is None:
        raise RecordError("no root span (the trace holds no spans)")
    messages = _messages(_conversation(_attr(root, "mlflow.spanInputs"), spec))
    if messages[-1]["role"] == "assistant":
        raise RecordError("root span inputs end with an assistant message: nothing answers them")
    messages.append({"role": "assistant", "content": _answer(_attr(root, "mlflow.spanOutputs"),
                                                            spec["answer_field"])})
    context = _context(spans)
    system = [m["content"] for m in messages if m["role"] == "system"]
    if system and context is None:  # as for chat logs: the system message is the context
        context = "\n\n".join(system)
    return {"id": str(tid), "group": _meta(info, SESSION_KEY) or str(tid),
            "messages": [m for m in messages if m["role"] != "system"], "context": context,
            "rating": rating_of(info.get("assessments") or [], spec), "source": SOURCE,
            "prompt_variant": _meta(info, spec["variant_tag"]), "model": _meta(info, spec["model_tag"]),
            "lang": _meta(info, spec["lang_tag"]), "flags": []}


def trace_events(items: list[tuple[int, dict]], spec: dict) -> list[tuple]:
    """(ordinal, trace dict) pairs -> reader events; runs in the worker pool like `readers.parse_lines`."""
    out: list[tuple] = []
    for n, t in items:
        try:
            out.append(("cand", n, trace_candidate(t, spec)))
        except RecordError as e:
            tid = (t.get("info") or {}).get("trace_id") if isinstance(t, dict) else None
            out.append(reject(n, f"trace {tid}: {e}", str(tid)))
    return out


def trace_time_ms(trace: dict) -> int | None:
    """The trace's request time in ms since the epoch (what `timestamp_ms` filters compare)."""
    t = (trace.get("info") or {}).get("request_time")
    if isinstance(t, str):
        return int(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() * 1000)
    return int(t) if isinstance(t, (int, float)) else None
