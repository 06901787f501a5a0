"""Scorers: deterministic assertions, reference-based metrics, guardrails, consistency, LLM-as-judge.

All plain functions over strings. Each metric has a direction (`METRICS`) that results.json carries, so a reader
(the gate, the dashboard) never has to guess whether up is good: `nll` and the guardrails are lower-is-better.

Assertions (promptfoo-style, `{type, value?, name?}`): contains, icontains, not-contains, regex, is-json,
json-schema, max-length, refusal, not-refusal, equals (against `value`, else the case's reference).
`validate_assertion` runs before any generation: a bad regex, an invalid JSON schema or an `equals` on a case with
no reference fails the run at once, naming the case's file and line.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from typing import Any, Callable, Sequence

from flywheel.foundation.errors import InputError

# name -> (direction, what it is). Directions: "higher" / "lower" is better; "none" = descriptive only.
METRICS: dict[str, tuple[str, str]] = {
    "pass_rate": ("higher", "share of cases whose assertions all passed (a failed generation counts as a fail)"),
    "error_rate": ("lower", "share of cases whose generation or scoring failed"),
    "exact_match": ("higher", "normalised output == normalised reference"),
    "rouge_l": ("higher", "ROUGE-L F1 against the reference (rouge-score, stemmed)"),
    "embedding_similarity": ("higher", "cosine similarity of output and reference embeddings"),
    "nll": ("lower", "mean token negative log-likelihood of the reference answer under the target "
                     "(teacher-forced; nats/token)"),
    "pii": ("lower", "share of outputs containing PII (email, phone, card, IP, IBAN)"),
    "latency_ms": ("lower", "generation wall time per case (batch time / batch size), ms"),
    "generated_tokens": ("none", "tokens generated per case"),
    "consistency": ("higher", "share of repeats equal to the most common output (normalised), per case"),
    "judge_score": ("higher", "LLM-as-judge rubric score 1-5"),
}
BINARY_METRICS = {"pass_rate", "error_rate", "exact_match", "pii"}


def direction(metric: str) -> str:
    if metric.startswith("assert."):
        return "higher"
    return METRICS.get(metric, ("none", ""))[0]


# -- assertions -----------------------------------------------------------------------------------------------

REFUSAL_RE = re.compile(
    r"\b(i\s*(?:'m| am)\s+(?:sorry|afraid|unable|not able)|i\s*(?:can(?:'|no)t|cannot|won't|will not)\s+"
    r"(?:help|assist|provide|answer|do that|comply)|as an ai\b|i'm not (?:allowed|permitted)|"
    r"i (?:must|have to) (?:decline|refuse)|i do not have (?:access|the ability))",
    re.IGNORECASE,
)

ASSERTION_TYPES = {"contains", "icontains", "not-contains", "regex", "is-json", "json-schema", "max-length",
                   "refusal", "not-refusal", "equals"}
_NEEDS_VALUE = {"contains", "icontains", "not-contains", "regex", "json-schema", "max-length"}


def is_refusal(text: str) -> bool:
    return bool(REFUSAL_RE.search(text or ""))


def assertion_name(a: dict) -> str:
    return str(a.get("name") or a["type"])


def validate_assertion(a: Any, where: str, reference: str | None) -> None:
    """Raise InputError if the assertion cannot be evaluated on this case (checked before generation)."""
    if not isinstance(a, dict) or "type" not in a:
        raise InputError(f"{where}: assert: each assertion needs a `type` ({', '.join(sorted(ASSERTION_TYPES))})")
    t = a["type"]
    if t not in ASSERTION_TYPES:
        raise InputError(f"{where}: assert.type: unknown {t!r} (known: {', '.join(sorted(ASSERTION_TYPES))})")
    unknown = sorted(set(a) - {"type", "value", "name"})
    if unknown:
        raise InputError(f"{where}: assert({t}).{unknown[0]}: unknown key")
    v = a.get("value")
    if t in _NEEDS_VALUE and v is None:
        raise InputError(f"{where}: assert({t}).value: required")
    if t in ("contains", "icontains", "not-contains"):
        if not (isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))):
            raise InputError(f"{where}: assert({t}).value: expected text or a list of texts")
    elif t == "regex":
        try:
            re.compile(str(v))
        except re.error as e:
            raise InputError(f"{where}: assert(regex).value: invalid pattern {v!r} ({e})") from None
    elif t == "json-schema":
        import jsonschema

        try:
            jsonschema.validators.validator_for(v).check_schema(v)
        except jsonschema.SchemaError as e:
            raise InputError(f"{where}: assert(json-schema).value: invalid schema ({e.message})") from None
    elif t == "max-length":
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InputError(f"{where}: assert(max-length).value: expected a non-negative integer, got {v!r}")
    elif t == "equals" and v is None and reference is None:
        raise InputError(f"{where}: assert(equals): needs `value` or a case reference, the case has neither")


def _parse_json(text: str) -> tuple[bool, Any]:
    s = text.strip()
    # Small models wrap JSON in a fenced block; accept the block's body, nothing looser.
    m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", s, re.DOTALL)
    if m:
        s = m.group(1)
    try:
        return True, json.loads(s)
    except (json.JSONDecodeError, ValueError):
        return False, None


def check_assertion(a: dict, output: str, reference: str | None = None) -> tuple[bool, str | None]:
    """(passed, reason when failed). `a` must have passed `validate_assertion`."""
    t, v = a["type"], a.get("value")
    out = output or ""
    if t in ("contains", "icontains", "not-contains"):
        needles = [v] if isinstance(v, str) else list(v)
        hay = out.lower() if t == "icontains" else out
        if t == "not-contains":
            found = [n for n in needles if n in out]
            return (not found, f"contains {found[0]!r}" if found else None)
        missing = [n for n in needles if (n.lower() if t == "icontains" else n) not in hay]
        return (not missing, f"missing {missing[0]!r}" if missing else None)
    if t == "regex":
        ok = re.search(str(v), out) is not None
        return ok, None if ok else f"no match for /{v}/"
    if t == "is-json":
        ok, _ = _parse_json(out)
        return ok, None if ok else "not valid JSON"
    if t == "json-schema":
        import jsonschema

        ok, obj = _parse_json(out)
        if not ok:
            return False, "not valid JSON"
        err = next(iter(jsonschema.validators.validator_for(v)(v).iter_errors(obj)), None)
        return err is None, None if err is None else f"schema: {err.message[:200]}"
    if t == "max-length":
        ok = len(out) <= v
        return ok, None if ok else f"length {len(out)} > {v}"
    if t == "refusal":
        ok = is_refusal(out)
        return ok, None if ok else "not a refusal"
    if t == "not-refusal":
        ok = not is_refusal(out)
        return ok, None if ok else "refused"
    if t == "equals":
        target = v if v is not None else reference
        ok = normalize(out) == normalize(str(target))
        return ok, None if ok else "not equal"
    raise InputError(f"unknown assertion type {t!r}")


# -- reference-based ------------------------------------------------------------------------------------------

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD-style: lower case, no punctuation or articles, single spaces."""
    s = (text or "").lower().translate(_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(output: str, reference: str) -> float:
    return float(normalize(output) == normalize(reference))


_ROUGE = None


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1 (rouge-score, Porter stemming)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_ROUGE.score(reference or "", output or "")["rougeL"].fmeasure)


def embedding_similarity(model: Any, outputs: Sequence[str], references: Sequence[str],
                         batch_size: int = 32) -> list[float]:
    """Cosine similarity of each output to its reference with a SentenceTransformer `model`."""
    import numpy as np

    if not outputs:
        return []
    emb = model.encode(list(outputs) + list(references), batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    a, b = emb[: len(outputs)], emb[len(outputs):]
    return [float(x) for x in np.sum(a * b, axis=1)]


# -- guardrails -----------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"\b(?:\d[ -]?){13,19}\b")
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_PHONE = re.compile(r"(?<![\w.])\+?\(?\d{1,4}\)?[\s.-]?\(?\d{2,4}\)?[\s.-]\d{3,4}[\s.-]?\d{3,4}(?![\w.])")


def _luhn(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def _iban_ok(s: str) -> bool:
    s = s.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    n = "".join(str(int(c, 36)) for c in s[4:] + s[:4])
    return int(n) % 97 == 1


def _own_pii(text: str) -> list[str]:
    import ipaddress

    kinds = []
    if _EMAIL.search(text):
        kinds.append("email")
    for m in _CARD.finditer(text):
        d = re.sub(r"\D", "", m.group())
        if 13 <= len(d) <= 19 and _luhn(d):
            kinds.append("card")
            break
    for m in _IPV4.finditer(text):
        try:
            ip = ipaddress.ip_address(m.group())
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_unspecified):
            kinds.append("ip")
            break
    if any(_iban_ok(m.group()) for m in _IBAN.finditer(text)):
        kinds.append("iban")
    if _PHONE.search(text):
        try:
            import phonenumbers

            if any(True for _ in phonenumbers.PhoneNumberMatcher(text, "US")):
                kinds.append("phone")
        except ImportError:  # pragma: no cover - phonenumbers is a dependency
            kinds.append("phone")
    return kinds


def find_pii(text: str) -> list[str]:
    """Kinds of PII found in `text` (empty list: none), e.g. ["email", "phone"].

    The mine stage's redactor (`flywheel.mining.pii.redact`) is the project's reference detector (checksum- and
    parser-confirmed candidates); we count what it would redact, so mining and eval agree on what PII is. The
    small detector above is the fallback when that module is absent.
    """
    redact = _mine_redact()
    if redact is not None and text:
        counts: Counter = Counter()
        redact(text, counts)
        return sorted(k for k, v in counts.items() if v)
    return _own_pii(text or "")


_REDACT: Any = False


def _mine_redact() -> Callable[..., str] | None:
    global _REDACT
    if _REDACT is False:
        try:
            from flywheel.mining.pii import redact

            _REDACT = redact
        except ImportError:
            _REDACT = None
    return _REDACT


# -- repeats --------------------------------------------------------------------------------------------------

def consistency_rate(outputs: Sequence[str]) -> float:
    """Share of repeats equal (after normalisation) to the most common one: 1.0 = always the same answer."""
    if not outputs:
        return float("nan")
    counts = Counter(normalize(o) for o in outputs)
    return counts.most_common(1)[0][1] / len(outputs)


# -- LLM-as-judge ---------------------------------------------------------------------------------------------

DEFAULT_RUBRIC = ("Score the ANSWER to the QUESTION from 1 (useless, wrong or unsafe) to 5 (correct, helpful, "
                  "concise). Use the REFERENCE, when given, as a guide to what a good answer contains.")
_SCORE_RE = re.compile(r"(?:score|rating)\s*[:=]?\s*([1-5])\b|^\s*([1-5])\s*$", re.IGNORECASE | re.MULTILINE)


def judge_messages(rubric: str, question: str, answer: str, reference: str | None) -> list[dict]:
    ref = f"\nREFERENCE:\n{reference}\n" if reference else ""
    return [
        {"role": "system", "content": f"You are a strict evaluator. {rubric} Reply with one line "
                                      f"`Score: N` followed by one sentence of reasons."},
        {"role": "user", "content": f"QUESTION:\n{question}\n{ref}\nANSWER:\n{answer}"},
    ]


def parse_judge_score(text: str) -> float | None:
    m = _SCORE_RE.search(text or "")
    if not m:
        return None
    return float(m.group(1) or m.group(2))
