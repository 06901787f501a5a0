"""Scorers: deterministic assertions, reference-based metrics, guardrails, consistency, LLM-as-judge.

All plain functions over strings. Every metric is registered once (`METRICS`, `@metric`) with its direction, which
results.json carries, so a reader (the gate, the dashboard) never has to guess whether up is good: `nll` and the
guardrails are lower-is-better.

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
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from flywheel.foundation.errors import InputError

# -- the metric registry ---------------------------------------------------------------------------------------
#
# One entry per metric, like lm-evaluation-harness's metric registry: its name, which way is better, whether it is
# a 0/1 outcome (which picks Wilson intervals for cells and McNemar's test for paired comparisons), how it
# aggregates, and, for a metric scored on each generated output, the function that scores it. Adding a metric is
# one `@metric(...)` function below; the harness, results.json, the gate and the dashboard read it from here.


@dataclass(frozen=True)
class Scored:
    """What a per-output scorer sees: one generation of one case."""

    text: str
    reference: str | None
    question: str
    latency_ms: float | None
    tokens: int | None
    judge: Callable[[str, str, str | None], float | None] | None = None
    batch_latency_ms: float | None = None


@dataclass(frozen=True)
class MetricSpec:
    name: str
    direction: Literal["higher", "lower", "none"]  # "none": descriptive only, never compared
    binary: bool                                   # one 0/1 outcome per case
    description: str
    # Scores one generated output; None for metrics the harness computes itself (teacher-forced NLL, one batched
    # embedding pass, assertions, repeats, failures). It may raise `NoScore` (e.g. an unparseable judge reply):
    # the output then has no value for this metric, and the miss is counted by kind.
    score: Callable[[Scored], float | None] | None = None
    needs_reference: bool = False
    # A failed generation: "missing" (every metric but error_rate) leaves the metric without a value for that
    # output, never a zero that looks like a score; the row counts in its cell's `n_failed`. "count": the metric
    # measures the failure itself (error_rate = 1).
    on_failure: Literal["missing", "count"] = "missing"
    default: bool = False            # part of the default metric list of `flywheel eval`
    aggregate: Literal["mean"] = "mean"  # over repeats of a case, then over cases
    judged: bool = False             # an LLM judge gives the value (recorded as an LLM_JUDGE assessment on traces)


METRICS: dict[str, MetricSpec] = {}


def metric(name: str, *, direction: Literal["higher", "lower", "none"], description: str, binary: bool = False,
           needs_reference: bool = False, on_failure: Literal["missing", "count"] = "missing",
           default: bool = False, judged: bool = False):
    """Register `fn(Scored) -> float | None` as metric `name` (or declare a harness-computed one with fn=None)."""
    def register(fn: Callable[[Scored], float | None] | None):
        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        METRICS[name] = MetricSpec(name, direction, binary, description, fn, needs_reference, on_failure, default,
                                   judged=judged)
        return fn
    return register


class NoScore(Exception):
    """A scorer could not score this output: `kind` says why ("unparseable", "failed"), and is counted per cell."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def score_output(names: Sequence[str], out: Scored, failed: bool,
                 misses: Counter | None = None) -> dict[str, float | None]:
    """The registered per-output metrics among `names` for one generation. A failed generation gets None for
    every metric (its `on_failure` is "missing"); a scorer's `NoScore` gives None and counts in `misses` under
    "<metric>.<kind>"."""
    vals: dict[str, float | None] = {}
    for name in names:
        spec = METRICS.get(name)
        if spec is None or spec.score is None or (spec.needs_reference and out.reference is None):
            continue
        if failed:
            vals[name] = None
            continue
        try:
            v = spec.score(out)
            if v is not None:  # None: does not apply to this output (e.g. per-request latency of a local batch)
                vals[name] = v
        except NoScore as e:
            vals[name] = None
            if misses is not None:
                misses[f"{name}.{e.kind}"] += 1
    return vals


def direction(name: str) -> str:
    if name.startswith("assert."):
        return "higher"
    spec = METRICS.get(name)
    return spec.direction if spec else "none"


def is_binary(name: str) -> bool:
    return name.startswith("assert.") or (name in METRICS and METRICS[name].binary)


def default_metrics() -> list[str]:
    return [m for m, spec in METRICS.items() if spec.default]


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

def find_pii(text: str) -> list[str]:
    """Kinds of PII found in `text` (empty list: none), e.g. ["email", "phone"].

    The mine stage's redactor (`flywheel.mining.pii.redact`, checksum- and parser-confirmed candidates) is the one
    detector: eval counts what mining would redact, so the two agree on what PII is.
    """
    from flywheel.mining.pii import redact

    if not text:
        return []
    counts: Counter = Counter()
    redact(text, counts)
    return sorted(k for k, v in counts.items() if v)


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


# -- the registered metrics, in the order results.json lists them ---------------------------------------------
# Those with `(None)` are computed by the harness (assertions, failures, one batched embedding pass, teacher-forced
# NLL, repeats); they are declared here so that direction, type and description live in one place.

metric("pass_rate", direction="higher", binary=True,
       description="share of cases whose assertions all passed (a failed generation has no value: see n_failed)")(None)
metric("error_rate", direction="lower", binary=True, on_failure="count",
       description="share of cases whose generation failed")(None)


@metric("exact_match", direction="higher", binary=True, needs_reference=True, default=True,
        description="normalised output == normalised reference")
def _exact_match(o: Scored) -> float:
    return exact_match(o.text, o.reference or "")


@metric("rouge_l", direction="higher", needs_reference=True, default=True,
        description="ROUGE-L F1 against the reference (rouge-score, stemmed)")
def _rouge_l(o: Scored) -> float:
    return rouge_l(o.text, o.reference or "")


metric("embedding_similarity", direction="higher", needs_reference=True, default=True,
       description="cosine similarity of output and reference embeddings")(None)
metric("nll", direction="lower", needs_reference=True, default=True,
       description="mean token negative log-likelihood of the reference answer under the target "
                   "(teacher-forced; nats/token)")(None)
metric("preference_accuracy", direction="higher", binary=True,
       description="preference cases: 1 when the target gives the chosen answer a higher mean token "
                   "log-likelihood than the rejected one, else 0 (teacher-forced; 0/1 per pair)")(None)


@metric("pii", direction="lower", binary=True, default=True,
        description="share of outputs containing PII (email, phone, card, IP, IBAN)")
def _pii(o: Scored) -> float:
    return 1.0 if find_pii(o.text) else 0.0


@metric("latency_ms", direction="lower", default=True,
        description="wall time of one request to an endpoint target, ms (retries included)")
def _latency(o: Scored) -> float | None:
    return o.latency_ms


# Local generation is batched: every case of a batch gets the same share, so its spread is not a per-case latency
# and it is never compared (direction "none"), least of all with an endpoint's per-request `latency_ms`.
@metric("batch_latency_ms", direction="none", default=True,
        description="local batched generation: batch wall time / batch size, ms (descriptive, not compared)")
def _batch_latency(o: Scored) -> float | None:
    return o.batch_latency_ms


@metric("generated_tokens", direction="none", default=True, description="tokens generated per case")
def _tokens(o: Scored) -> float | None:
    return None if o.tokens is None else float(o.tokens)


metric("consistency", direction="higher",
       description="share of repeats equal to the most common output (normalised), per case")(None)


@metric("judge_score", direction="higher", judged=True,
        description="LLM-as-judge rubric score 1-5 (unparseable and failed judgements counted per cell)")
def _judge(o: Scored) -> float | None:
    """The judge returns a score or raises NoScore("unparseable" | "failed")."""
    return o.judge(o.question, o.text, o.reference) if o.judge is not None else None
