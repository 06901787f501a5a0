"""Preference pairs: loading (file:line errors), the prompt-hash holdout, tokenization and the pair audit."""

from __future__ import annotations

import json

import pytest

from flywheel.foundation.errors import InputError
from flywheel.training.dpo import (check_pair_audit, holdout_by_prompt, load_preference_dataset, pair_audit,
                                   tokenize_pairs)
from tests.training.conftest import pair, write_preferences


def test_holdout_is_deterministic_and_keeps_prompts_together():
    pairs = [pair(i, f"C{i % 40}", "X") for i in range(400)]
    train, evals = holdout_by_prompt(pairs, 0.1)
    assert (train, evals) == holdout_by_prompt(list(pairs), 0.1)
    assert 10 <= len(evals) <= 80
    key = lambda p: json.dumps(p["prompt"])  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in evals}


def test_loader_reads_pairs_and_holds_out(tmp_path):
    ds = load_preference_dataset(write_preferences(tmp_path / "d", n=30))
    assert len(ds.train) + len(ds.eval) == 30 and ds.eval_source.startswith("held out")


def test_a_separate_eval_split_is_used_when_present(tmp_path, monkeypatch):
    from flywheel.mining import dataset

    root = write_preferences(tmp_path / "d", n=6)
    (root / "preferences_eval.jsonl").write_text(json.dumps(pair(99, "Peru", "Lima")) + "\n", encoding="utf-8")
    if "preferences_eval" not in dataset.SPLITS:  # the split name mining will add
        monkeypatch.setattr(dataset, "SPLITS", dataset.SPLITS + ("preferences_eval",))
    ds = load_preference_dataset(root)
    assert len(ds.train) == 6 and [p["id"] for p in ds.eval] == ["p99"]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}]}',
     "preferences.jsonl:2: rejected: missing"),
    ('{"prompt": "q", "chosen": [], "rejected": []}', "preferences.jsonl:2: prompt: must be a non-empty list"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}', r"preferences.jsonl:2: chosen\[-1\].role"),
    ("not json", "preferences.jsonl:2: invalid JSON"),
])
def test_bad_pairs_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "preferences.jsonl"
    p.write_text(json.dumps(pair(0, "Peru", "Lima")) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=message):
        load_preference_dataset(p)


def test_a_dataset_without_preferences_is_refused(tmp_path):
    from tests.training.conftest import write_dataset

    with pytest.raises(InputError, match="no preferences.jsonl .* method=dpo trains on preference pairs"):
        load_preference_dataset(write_dataset(tmp_path / "sft"))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from flywheel.training.models import resolve_base_model

    return AutoTokenizer.from_pretrained(str(resolve_base_model("smollm2-135m-instruct").path))


def test_tokenized_pairs_split_where_trl_does(tokenizer):
    p = pair(0, "Peru", "Lima")
    rows, facts = tokenize_pairs([p], tokenizer, 256, 256)
    full = tokenizer.apply_chat_template(p["prompt"] + p["chosen"], tokenize=True, return_dict=True)["input_ids"]
    assert rows[0]["prompt_ids"] + rows[0]["chosen_ids"] == list(full)
    assert tokenizer.decode(rows[0]["chosen_ids"]).startswith("The capital of Peru is Lima.")
    assert facts[0]["prompt_tokens"] == len(rows[0]["prompt_ids"]) and not facts[0]["same_text"]
    report = pair_audit(facts, 256, 256)
    assert report["ok"] and report["lengths"]["chosen"]["max"] == facts[0]["chosen_tokens"]


@pytest.mark.parametrize("make, budgets, problem", [
    (lambda p: {**p, "rejected": p["chosen"]}, (256, 256), "chosen equals rejected"),
    (lambda p: p, (256, 4), "chosen equals rejected"),       # rejected replaced below: same first 4 tokens
    (lambda p: p, (3, 256), "prompt truncated to nothing"),
    (lambda p: {**p, "chosen": [{"role": "assistant", "content": " "}]}, (256, 256), "chosen answer empty"),
])
def test_audit_refuses_when_most_pairs_are_useless(tokenizer, make, budgets, problem):
    pairs = [make(pair(i, "Peru", "Lima")) for i in range(3)]
    if budgets == (256, 4):  # answers that differ only after the kept tokens
        pairs = [{**p, "rejected": [{"role": "assistant", "content": "The capital of Peru is Cusco."}]}
                 for p in pairs]
    _, facts = tokenize_pairs(pairs, tokenizer, *budgets)
    report = pair_audit(facts, *budgets)
    assert not report["ok"] and problem in report["problems"][0]
    with pytest.raises(InputError, match="pair audit: 3/3 pairs"):
        check_pair_audit(report)
