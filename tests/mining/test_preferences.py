import json

from flywheel.mining.preferences import GapMiner, best_vs_worst


def _item(key, rating, rid, answer, context=None):
    return (key, rating, rid, "chatlog", [{"role": "user", "content": "q?"}], context, answer)


def test_best_vs_worst_needs_a_gap_and_different_answers():
    items = [_item("k", 5, "a", "great"), _item("k", 2, "b", "bad"), _item("k", 4, "c", "ok")]
    p = best_vs_worst(items, min_gap=2)
    assert p["chosen"][0]["content"] == "great" and p["rejected"][0]["content"] == "bad"
    assert p["source"] == "chatlog:rating_gap" and p["prompt"] == [{"role": "user", "content": "q?"}]
    assert best_vs_worst(items, min_gap=4) is None
    assert best_vs_worst([_item("k", 5, "a", "same"), _item("k", 1, "b", "same ")], 2) is None
    # context becomes the system message of the prompt; order of items does not matter
    ctx = [_item("k", 1, "b", "bad", "ctx"), _item("k", 5, "a", "great", "ctx")]
    p2 = best_vs_worst(ctx, 2)
    assert p2["prompt"][0] == {"role": "system", "content": "ctx"} and p2 == best_vs_worst(ctx[::-1], 2)


def test_gap_miner_groups_across_buckets(tmp_path):
    g = GapMiner(tmp_path, min_gap=2, buckets=4)
    keys = [f"{i:024x}" for i in range(0, 40, 3)]
    def line(item):
        return f"{item[0]}\t{item[1]}\t{json.dumps(item[2])}\t{json.dumps(item)}"

    for k in keys:
        g.add(k, line(_item(k, 4, "c" + k, "middling " + k)))
        g.add(k, line(_item(k, 5, "a" + k, "good " + k)))
        g.add(k, line(_item(k, 1, "b" + k, "bad " + k)))
    g.add("f" * 24, line(_item("f" * 24, 5, "lonely", "only one answer")))
    prefs = list(g.mine())
    assert len(prefs) == len(keys)
    assert all(p["chosen"][0]["content"].startswith("good") for p in prefs)
    assert all(p["rejected"][0]["content"].startswith("bad") for p in prefs)
