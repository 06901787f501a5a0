"""Prompt templates and cases: parsing, rendering, and the checks that run before any generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.evals.prompts.cases import Case, load_cases
from flywheel.evals.prompts.templates import check_fields, load_template, template_from_dict
from flywheel.foundation.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_variants_load_and_render():
    concise = load_template("concise", ROOT / "configs" / "prompts")
    grounded = load_template(ROOT / "configs" / "prompts" / "grounded.yaml")
    assert concise.fields == ["question"]
    assert set(grounded.fields) == {"context", "question"}
    case = Case(id="c1", question="How much protein in tofu?", context="Tofu: 8 g protein per 100 g.")
    msgs = grounded.render(case.fields())
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "Tofu: 8 g protein" in msgs[0]["content"] and msgs[1]["content"] == "How much protein in tofu?"
    # no context: the template's default fills it, and says so to the model
    bare = grounded.render(Case(id="c2", question="Q?").fields())
    assert "no context was retrieved" in bare[0]["content"]
    assert concise.sha256 != grounded.sha256


def test_render_keeps_braces_and_substitutes_only_variables():
    t = template_from_dict({"name": "j", "version": 1, "user": 'Answer as {"a": 1}: {{question}}'})
    assert t.render({"question": "why?"})[0]["content"] == 'Answer as {"a": 1}: why?'


def test_template_naming_a_missing_field_fails_naming_file_and_field(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("name: typo\nversion: 1\nsystem: 'Context: {{ contxt }}'\nuser: '{{ question }}'\n")
    t = load_template(p)
    cases = [Case(id="c1", question="Q?", context="C", source="cases.jsonl:1")]
    with pytest.raises(InputError) as e:
        check_fields([t], cases)
    msg = str(e.value)
    assert str(p) in msg and "'contxt'" in msg and "cases.jsonl:1" in msg


@pytest.mark.parametrize("data, match", [
    ({"name": "x", "version": 1}, "user: required"),
    ({"name": "x", "user": "{{q}}"}, "version: required"),
    ({"name": "x", "version": 1, "user": "{{ question }"}, "malformed variable"),
    ({"name": "x", "version": 1, "user": "q", "sytem": "s"}, "unknown key 'sytem'"),
    ({"name": "bad name", "version": 1, "user": "q"}, "name:"),
])
def test_bad_template_files(data, match):
    with pytest.raises(InputError, match=match):
        template_from_dict(data, source="configs/prompts/x.yaml")


def test_unknown_variant_lists_known_ones():
    with pytest.raises(InputError, match="known: .*concise"):
        load_template("nope", ROOT / "configs" / "prompts")


def test_cases_from_mined_dataset_dir(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    rec = {"id": "a1", "messages": [{"role": "system", "content": "Lentils: 9 g protein."},
                                    {"role": "user", "content": "Protein in lentils?"},
                                    {"role": "assistant", "content": "About 9 g per 100 g."}],
           "rating": 5, "source": "demo", "prompt_variant": "v1", "context": "Lentils: 9 g protein.",
           "cluster": "k"}
    (d / "eval.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "id": "a2", "context": None}) + "\n")
    (d / "manifest.json").write_text(json.dumps({"version": "abc123"}))
    cs = load_cases(d)
    assert cs.kind == "dataset" and cs.dataset_version == "abc123"
    c = cs.cases[0]
    assert (c.id, c.question, c.reference, c.context) == ("a1", "Protein in lentils?", "About 9 g per 100 g.",
                                                          "Lentils: 9 g protein.")
    assert cs.cases[1].context is None and cs.cases[1].fields()["context"] is None
    assert c.vars["rating"] == 5


def test_cases_file_jsonl_and_yaml(tmp_path):
    j = tmp_path / "cases.jsonl"
    j.write_text('{"id": "q1", "question": "Hi?", "reference": "Hello.", "assert": [{"type": "is-json"}]}\n'
                 '\n{"question": "Second?", "vars": {"tone": "dry"}}\n')
    cs = load_cases(j)
    assert [c.id for c in cs.cases] == ["q1", "cases.jsonl:3"]
    assert cs.cases[0].assertions == [{"type": "is-json"}]
    assert cs.cases[1].fields()["tone"] == "dry"
    y = tmp_path / "cases.yaml"
    y.write_text("cases:\n  - {id: a, question: 'A?'}\n  - {id: b, question: 'B?', reference: 'b'}\n")
    assert [c.id for c in load_cases(y, limit=1).cases] == ["a"]


@pytest.mark.parametrize("line, match", [
    ('{"question": 3}', r"cases\.jsonl:1: question: expected text"),
    ('{"reference": "x"}', r"cases\.jsonl:1: question: required"),
    ('{"question": "q", "asert": []}', r"cases\.jsonl:1: asert: unknown case field"),
    ('{"question": "q", "assert": "contains"}', r"cases\.jsonl:1: assert: expected a list"),
    ('{not json', r"cases\.jsonl:1: invalid JSON"),
    ('{"messages": [{"role": "user"}]}', r"cases\.jsonl:1: messages\[0\]"),
])
def test_bad_cases_name_file_line_and_field(tmp_path, line, match):
    p = tmp_path / "cases.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(InputError, match=match):
        load_cases(p)


def test_duplicate_case_ids_rejected(tmp_path):
    p = tmp_path / "cases.jsonl"
    p.write_text('{"id": "x", "question": "a"}\n{"id": "x", "question": "b"}\n')
    with pytest.raises(InputError, match=r"cases\.jsonl:2: id: duplicate case id 'x' \(first at .*:1\)"):
        load_cases(p)


def test_oasst_message_table_becomes_cases(shared_data):
    path = shared_data("oasst1-en-validation", "messages.jsonl")
    cs = load_cases(path, limit=5)
    assert cs.kind == "oasst" and len(cs.cases) == 5
    assert all(c.question.strip() for c in cs.cases)
    assert sum(c.reference is not None for c in cs.cases) >= 4  # most prompts have a ranked reply
