"""`flywheel mine` on slices of the real data in ../shared/data (skipped with a reason when it is absent):
oasst1 flat messages, oasst2 trees, hh-rlhf pairs, and PII planted into real oasst text."""

import json
import random

import pytest

from flywheel.mining.demo_logs import _pii
from flywheel.foundation.io import read_jsonl
from flywheel.pipelines.mine import MineConfig, mine_to_dir
from tests.conftest import shared_path


def _head(src, dst, n):
    with open(src, "rb") as f, open(dst, "wb") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)
    return dst


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    oasst1 = _head(shared_path("oasst1-en-validation", "messages.jsonl"), d / "oasst1.jsonl", 300)
    oasst2 = _head(shared_path("oasst2-vegan-filtered-trees", "trees.jsonl"), d / "oasst2.jsonl", 40)
    hh = _head(shared_path("hh-rlhf-harmless-base-test", "pairs.jsonl"), d / "hh.jsonl", 200)
    # Planted PII inside real assistant text, in the canonical chat-log shape.
    rng = random.Random(0)
    texts = [m["text"] for m in read_jsonl(oasst1) if m["role"] == "assistant"][:40]
    planted, rows = [], []
    for i, t in enumerate(texts):
        kind, value = _pii(rng, i)
        cut = rng.randrange(len(t) // 2 + 1)
        rows.append({"conversation_id": f"p{i}", "rating": 5, "messages": [
            {"role": "user", "content": "Please help, my contact: " + value},
            {"role": "assistant", "content": t[:cut] + f" {value} " + t[cut:]}]})
        planted.append(value)
    (d / "planted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = d / "ds"
    m = mine_to_dir([oasst1, oasst2, hh, d / "planted.jsonl"], out, MineConfig(progress=False, workers=1))
    return m, out, planted


def test_formats_detected_and_counts_reconcile(mined):
    m, out, _ = mined
    assert [i["format"] for i in m["inputs"]] == ["oasst1", "oasst2", "hh", "chatlog"]
    for i in m["inputs"] + [m["counts"]]:
        assert i["read"] == i["kept"] + i["rejected"] + sum(i["filtered"].values())
    o1, o2, hh, _ = m["inputs"]
    assert o1["kept"] > 30 and o1["filtered"]["low_rating"] > 0
    assert o2["kept"] > 10 and hh["kept"] > 150 and hh["rejected"] == 0
    prefs = read_jsonl(out / "preferences.jsonl")
    sources = {p["source"] for p in prefs}
    assert {"hh-rlhf", "oasst1:rank", "oasst2:rank"} <= sources
    assert all(p["chosen"] != p["rejected"] and p["prompt"] for p in prefs)


def test_no_planted_pii_leaks(mined):
    m, out, planted = mined
    text = "".join(p.read_text(encoding="utf-8") for p in out.iterdir())
    assert [v for v in planted if v in text] == []
    assert sum(m["counts"]["pii"].values()) >= 2 * len(planted)  # each value was planted twice


def test_oasst_threads_are_well_formed(mined):
    _, out, _ = mined
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
    for r in rows:
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles[-1] == "assistant" and roles[0] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # turns alternate
        assert 1 <= r["rating"] <= 5 and r["rating"] >= 4
