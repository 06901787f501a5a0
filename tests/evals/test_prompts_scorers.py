"""Each scorer on hand-made outputs: assertions, reference metrics, guardrails, consistency, judge parsing."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.evals.prompts import scorers
from flywheel.foundation.errors import InputError


@pytest.mark.parametrize("assertion, output, ok", [
    ({"type": "contains", "value": "iron"}, "Lentils are rich in iron.", True),
    ({"type": "contains", "value": "Iron"}, "Lentils are rich in iron.", False),
    ({"type": "icontains", "value": "IRON"}, "Lentils are rich in iron.", True),
    ({"type": "contains", "value": ["iron", "folate"]}, "iron and folate", True),
    ({"type": "contains", "value": ["iron", "zinc"]}, "iron and folate", False),
    ({"type": "not-contains", "value": "meat"}, "Lentils are a plant protein.", True),
    ({"type": "not-contains", "value": ["meat", "plant"]}, "Lentils are a plant protein.", False),
    ({"type": "regex", "value": r"\b\d+ ?g\b"}, "About 9 g per 100 g.", True),
    ({"type": "regex", "value": r"^\d+$"}, "nine", False),
    ({"type": "is-json"}, '{"protein_g": 21}', True),
    ({"type": "is-json"}, '```json\n{"protein_g": 21}\n```', True),
    ({"type": "is-json"}, "protein: 21", False),
    ({"type": "max-length", "value": 5}, "short", True),
    ({"type": "max-length", "value": 4}, "short", False),
    ({"type": "refusal"}, "I'm sorry, but I can't help with that.", True),
    ({"type": "refusal"}, "Lentils have 9 g of protein.", False),
    ({"type": "not-refusal"}, "As an AI language model I cannot answer.", False),
    ({"type": "equals", "value": "The answer: 42"}, "the answer 42", True),
])
def test_assertions(assertion, output, ok):
    scorers.validate_assertion(assertion, "case.jsonl:1", reference=None)
    passed, reason = scorers.check_assertion(assertion, output)
    assert passed is ok
    assert (reason is None) is ok


def test_json_schema_assertion():
    schema = {"type": "object", "required": ["protein_g"], "properties": {"protein_g": {"type": "number"}}}
    a = {"type": "json-schema", "value": schema}
    scorers.validate_assertion(a, "c:1", None)
    assert scorers.check_assertion(a, '{"protein_g": 21}') == (True, None)
    ok, why = scorers.check_assertion(a, '{"protein_g": "lots"}')
    assert not ok and "schema" in why
    assert scorers.check_assertion(a, "not json")[0] is False


def test_equals_uses_reference_when_no_value():
    a = {"type": "equals"}
    scorers.validate_assertion(a, "c:1", reference="Yes.")
    assert scorers.check_assertion(a, "yes", reference="Yes.")[0]
    with pytest.raises(InputError, match=r"c\.jsonl:3: assert\(equals\)"):
        scorers.validate_assertion(a, "c.jsonl:3", reference=None)


@pytest.mark.parametrize("assertion, match", [
    ({"value": "x"}, "needs a `type`"),
    ({"type": "contain", "value": "x"}, "unknown 'contain'"),
    ({"type": "contains"}, r"assert\(contains\)\.value: required"),
    ({"type": "regex", "value": "(unclosed"}, "invalid pattern"),
    ({"type": "json-schema", "value": {"type": "nonsense"}}, "invalid schema"),
    ({"type": "max-length", "value": "10"}, "non-negative integer"),
    ({"type": "contains", "value": "x", "vale": 1}, r"assert\(contains\)\.vale: unknown key"),
])
def test_bad_assertions_fail_naming_the_case(assertion, match):
    with pytest.raises(InputError, match=match) as e:
        scorers.validate_assertion(assertion, "cases.jsonl:7", reference=None)
    assert "cases.jsonl:7" in str(e.value)


def test_exact_match_and_rouge_l():
    assert scorers.exact_match("The answer is 42!", "answer is 42") == 1.0
    assert scorers.exact_match("41", "42") == 0.0
    assert scorers.rouge_l("lentils have protein", "lentils have protein") == pytest.approx(1.0)
    partial = scorers.rouge_l("lentils contain a lot of protein", "lentils have protein")
    assert 0.0 < partial < 1.0
    assert scorers.rouge_l("", "lentils") == 0.0


class _BagOfLetters:
    """A deterministic stand-in encoder (letter counts): enough to check the cosine plumbing."""

    def encode(self, texts, **kw):
        v = np.array([[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts], dtype=float)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)
        return v


def test_embedding_similarity_is_cosine():
    sims = scorers.embedding_similarity(_BagOfLetters(), ["abc", "abc"], ["abc", "xyz"])
    assert sims[0] == pytest.approx(1.0)
    assert sims[1] == pytest.approx(0.0)
    assert scorers.embedding_similarity(_BagOfLetters(), [], []) == []


def test_a_new_metric_is_one_registered_function():
    """Registering a scorer is the whole change: default list, direction, 0/1 type and scoring follow from it."""
    name = "mentions_iron_test_only"
    try:
        @scorers.metric(name, direction="higher", binary=True, description="output mentions iron")
        def _iron(o):
            return float("iron" in o.text.lower())

        assert scorers.direction(name) == "higher" and scorers.is_binary(name)
        out = scorers.Scored(text="Lentils: iron!", reference=None, question="q", latency_ms=1.0, tokens=3)
        assert scorers.score_output([name, "pii"], out, failed=False) == {name: 1.0, "pii": 0.0}
        # a failed generation has no value in any metric: never a 0.0 that looks like the worst answer
        ref = scorers.Scored(text="", reference="x", question="q", latency_ms=5.0, tokens=None)
        assert scorers.score_output([name, "exact_match", "rouge_l", "latency_ms"], ref, failed=True) == {
            name: None, "exact_match": None, "rouge_l": None, "latency_ms": None}
        assert all(s.on_failure == "missing" for m, s in scorers.METRICS.items() if m != "error_rate")
        # a scorer that cannot score (an unparseable judge reply) gives None and is counted by kind
        from collections import Counter

        def judge(q, a, r):
            raise scorers.NoScore("unparseable", "no Score: line")
        misses: Counter = Counter()
        out2 = scorers.Scored(text="a", reference=None, question="q", latency_ms=None, tokens=None, judge=judge)
        assert scorers.score_output(["judge_score", "latency_ms"], out2, failed=False, misses=misses) == {
            "judge_score": None}
        assert misses == {"judge_score.unparseable": 1}
        with pytest.raises(ValueError, match="twice"):
            scorers.metric(name, direction="higher", description="dup")(None)
    finally:
        scorers.METRICS.pop(name, None)


def test_registry_declares_every_metric_once_with_a_direction():
    assert scorers.default_metrics() == ["exact_match", "rouge_l", "embedding_similarity", "nll", "pii",
                                         "latency_ms", "batch_latency_ms", "generated_tokens"]
    for name, spec in scorers.METRICS.items():
        assert spec.direction in ("higher", "lower", "none") and spec.description, name
    assert {m for m, s in scorers.METRICS.items() if s.binary} == {"pass_rate", "error_rate", "exact_match", "pii",
                                                                         "preference_accuracy"}
    # per-request and per-batch latency are different quantities: two names, the batch one never compared
    assert scorers.direction("latency_ms") == "lower" and scorers.direction("batch_latency_ms") == "none"


@pytest.mark.parametrize("text, kind", [
    ("mail me at jane.doe@example.com", "email"), ("card 4111 1111 1111 1111", "card"),
    ("my ip is 10.20.30.4", "ip"), ("IBAN DE89 3704 0044 0532 0130 00", "iban"),
])
def test_eval_pii_is_what_mining_redacts(text, kind):
    """One PII detector: eval counts exactly the kinds the mine stage's redactor would replace."""
    from collections import Counter

    from flywheel.mining.pii import redact

    counts: Counter = Counter()
    redact(text, counts)
    assert kind in scorers.find_pii(text) and scorers.find_pii(text) == sorted(k for k, v in counts.items() if v)
    assert scorers.find_pii("Python 3.11.7, $12.50, 2024-05-01") == []
