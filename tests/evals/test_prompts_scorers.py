"""Each scorer on hand-made outputs: assertions, reference metrics, guardrails, consistency, judge parsing."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("text, kind", [
    ("mail me at jane.doe@example.com", "email"),
    ("card 4111 1111 1111 1111 thanks", "card"),
    ("my ip is 192.168.10.4", "ip"),
    ("call +1 415 555 2671 today", "phone"),
    ("IBAN DE89 3704 0044 0532 0130 00", "iban"),
])
def test_pii_found(text, kind):
    assert kind in scorers.find_pii(text)


@pytest.mark.parametrize("text", [
    "Python 3.11.7 was released", "It costs $12.50 per 100 g", "Eat 2-3 servings on 2024-05-01",
    "card 4111 1111 1111 1112", "Lentils have 9 g of protein per 100 g.",
])
def test_pii_not_found(text):
    assert scorers.find_pii(text) == []


def test_consistency_rate():
    assert scorers.consistency_rate(["Yes.", "yes", "No"]) == pytest.approx(2 / 3)
    assert scorers.consistency_rate(["a", "a"]) == 1.0
    assert math.isnan(scorers.consistency_rate([]))


def test_judge_score_parsing_and_directions():
    assert scorers.parse_judge_score("Score: 4\nGood answer.") == 4.0
    assert scorers.parse_judge_score("5") == 5.0
    assert scorers.parse_judge_score("no idea") is None
    msgs = scorers.judge_messages(scorers.DEFAULT_RUBRIC, "Q?", "A.", "R.")
    assert "REFERENCE" in msgs[1]["content"]
    assert scorers.direction("nll") == "lower"
    assert scorers.direction("rouge_l") == "higher"
    assert scorers.direction("assert.contains") == "higher"
    assert scorers.direction("generated_tokens") == "none"


@pytest.mark.parametrize("text, kind", [
    ("mail me at jane.doe@example.com", "email"), ("card 4111 1111 1111 1111", "card"),
    ("my ip is 192.168.10.4", "ip"), ("IBAN DE89 3704 0044 0532 0130 00", "iban"),
])
def test_fallback_pii_detector(text, kind):
    """The stdlib fallback (used when pipelines.data.pii is absent) finds the same kinds."""
    assert kind in scorers._own_pii(text)
    assert scorers._own_pii("Python 3.11.7, $12.50, 2024-05-01") == []
