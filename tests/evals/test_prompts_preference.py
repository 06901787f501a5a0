"""The preference metric: pair cases, the per-pair 0/1 score, paired comparison by McNemar, and the real model."""

from __future__ import annotations

import json
import math
import random

import pytest

from flywheel.evals.prompts import harness
from flywheel.evals.prompts.cases import load_cases
from flywheel.evals.prompts.nll import preference_win
from flywheel.evals.prompts.templates import template_from_dict
from flywheel.foundation.errors import InputError

PLAIN = template_from_dict({"name": "plain", "version": "1", "system": "", "user": "{{ question }}"})

FLUENT = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
    ("Which animal is known as man's best friend?", "The dog is known as man's best friend."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do plants need to grow?", "Plants need sunlight, water and soil to grow."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
]


def _shuffled(text: str, seed: int) -> str:
    words = text.rstrip(".").split()
    rng = random.Random(seed)
    while True:
        out = words[:]
        rng.shuffle(out)
        if out != words:
            return " ".join(out) + "."


def pair(i: int, q: str, chosen: str, rejected: str) -> dict:
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "source": "test"}


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def fluent_vs_shuffled():
    return [pair(i, q, a, _shuffled(a, i)) for i, (q, a) in enumerate(FLUENT)]


# -- cases ----------------------------------------------------------------------------------------------------

def test_pairs_file_is_read_by_shape(tmp_path):
    recs = fluent_vs_shuffled()
    recs[0]["prompt"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    cs = load_cases(write_jsonl(tmp_path / "pairs.jsonl", recs))
    assert cs.kind == "preferences" and len(cs.cases) == len(FLUENT)
    c = cs.cases[0]
    assert c.is_pair and c.question == "Capital of France?" and c.context == "Be brief."
    assert c.history == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert c.reference == c.chosen == FLUENT[0][1] and c.rejected != c.chosen


def test_mined_dir_gives_its_preference_eval_split_when_asked(tmp_path):
    d = tmp_path / "mined"
    d.mkdir()
    write_jsonl(d / "eval.jsonl", [{"id": "e1", "messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "a"}]}])
    write_jsonl(d / "preferences_eval.jsonl", fluent_vs_shuffled()[:3])
    (d / "manifest.json").write_text(json.dumps({"version": "v1"}), encoding="utf-8")
    assert [c.id for c in load_cases(d).cases] == ["e1"]
    prefs = load_cases(d, preferences=True)
    assert [c.id for c in prefs.cases] == ["p0", "p1", "p2"] and prefs.dataset_version == "v1"
    (d / "preferences_eval.jsonl").unlink()
    with pytest.raises(InputError, match="no preferences_eval.jsonl"):
        load_cases(d, preferences=True)


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r.update(rejected=[{"role": "user", "content": "x"}]), r"pairs.jsonl:2: rejected: expected one assistant"),
    (lambda r: r.update(chosen="text"), r"pairs.jsonl:2: chosen: expected a list"),
    (lambda r: r.update(prompt=[]), r"pairs.jsonl:2: prompt: expected a non-empty list"),
])
def test_bad_pairs_name_file_line_and_field(tmp_path, mutate, needle):
    recs = fluent_vs_shuffled()[:2]
    mutate(recs[1])
    with pytest.raises(InputError, match=needle):
        load_cases(write_jsonl(tmp_path / "pairs.jsonl", recs))


def test_preference_accuracy_needs_pairs(tmp_path):
    cs = load_cases(write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "reference": "a"}]))
    with pytest.raises(InputError, match="preference_accuracy needs preference pairs"):
        harness.validate_static(cs.cases, [PLAIN], ["base"], [], ["preference_accuracy"])


# -- the score and its comparison -----------------------------------------------------------------------------

def test_preference_win_is_lower_mean_nll_for_chosen():
    assert preference_win(1.2, 2.0) == 1.0
    assert preference_win(2.0, 1.2) == 0.0
    assert preference_win(1.5, 1.5) == 0.0  # a tie is not a win
    assert preference_win(None, 1.0) is None and preference_win(float("nan"), 1.0) is None


def _rows(target, wins):
    return [{"case_id": f"p{i}", "variant": "plain", "target": target, "failed": False,
             "metrics": {"preference_accuracy": float(w)}} for i, w in enumerate(wins)]


def test_two_targets_compare_paired_with_mcnemar():
    base = [1, 0, 0, 1, 0, 0, 1, 0] * 5
    tuned = [1, 1, 1, 1, 0, 1, 1, 1] * 5  # gains on 20 pairs, loses none
    comps, notes = harness.compare(_rows("base", base) + _rows("dpo", tuned),
                                   [(("plain", "base"), ("plain", "dpo"))])
    (c,) = [c for c in comps if c["metric"] == "preference_accuracy"]
    assert c["test"].startswith("mcnemar") and c["direction"] == "higher" and c["n"] == 40
    assert c["estimate"] == pytest.approx(0.5) and c["ci_low"] > 0 and c["p_value"] < 0.001
    assert c["outcome"] == "better" and notes == []
    cell = {x["target"]: x for x in harness.cells(_rows("base", base) + _rows("dpo", tuned))}
    assert cell["dpo"]["mean"] == pytest.approx(0.875) and cell["dpo"]["ci_high"] < 1  # Wilson: a 0/1 metric


# -- the real model -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_prefers_fluent_answers_to_shuffled_words(tmp_path):
    from flywheel.evals.prompts.generate import GenParams, HFTarget
    from flywheel.foundation.cache import JsonCache
    from flywheel.training.models import resolve_base_model

    base = resolve_base_model("smollm2-135m-instruct")
    cases = load_cases(write_jsonl(tmp_path / "pairs.jsonl", fluent_vs_shuffled())).cases
    target = HFTarget("base", base.name, base.path, base.sha256)
    cache = JsonCache(tmp_path / "cache")
    run = lambda: harness.run_matrix(cases, [PLAIN], [target], params=GenParams(max_new_tokens=1), cache=cache,  # noqa: E731
                                     metrics=["preference_accuracy", "nll"])
    rows = run()["rows"]
    acc = [r["metrics"]["preference_accuracy"] for r in rows]
    assert set(acc) <= {0.0, 1.0} and sum(acc) / len(acc) >= 0.8
    assert all(math.isfinite(r["metrics"]["nll"]) for r in rows)
    # chosen answers are the references: their NLL is computed once and shared with the preference pass
    assert cache.misses == len(cases) * 2 + len(cases)  # chosen + rejected NLL, one generation per case
    hits = cache.hits
    again = run()["rows"]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in rows]
    assert cache.hits - hits == len(cases) * 4 and cache.misses == len(cases) * 3  # all cached
