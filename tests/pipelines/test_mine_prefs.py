"""Preference pairs are split train/eval like the SFT records (same hash, salt and fraction), by their prompt:
no prompt on both sides, and the counts reconcile."""

from flywheel.foundation.io import read_jsonl
from flywheel.mining.curate import normalise
from flywheel.mining.dataset import open_dataset
from flywheel.pipelines.mine import MineConfig, mine_to_dir
from tests.conftest import shared_path


def _prompt(p):
    return tuple((m["role"], normalise(m["content"])) for m in p["prompt"])


def test_no_prompt_on_both_sides_and_counts_reconcile(tmp_path):
    src = shared_path("oasst1-en-validation", "messages.jsonl")
    m = mine_to_dir([src], tmp_path / "ds", MineConfig(progress=False, workers=1, eval_fraction=0.3))
    ds = open_dataset(tmp_path / "ds", need=("preferences", "preferences_eval"))
    train, ev = read_jsonl(ds.files["preferences"]), read_jsonl(ds.files["preferences_eval"])
    assert len(train) == m["splits"]["preferences"] > 0 and len(ev) == m["splits"]["preferences_eval"] > 0
    assert len(train) + len(ev) == m["counts"]["preferences"]
    assert len({p["id"] for p in train + ev}) == len(train) + len(ev)
    # several pairs share a prompt (oasst sibling ranks): all of them sit on one side
    prompts = [_prompt(p) for p in train + ev]
    assert len(set(prompts)) < len(prompts)
    assert not {_prompt(p) for p in train} & {_prompt(p) for p in ev}
    assert set(m["files"]) >= {"preferences.jsonl", "preferences_eval.jsonl"}
