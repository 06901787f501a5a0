from flywheel.mining.card import render_card


def test_card_lists_sources_filters_and_examples():
    manifest = {
        "version": "abc123", "config": {"eval_fraction": 0.1, "min_rating": 4, "oasst_rating": "quality",
                                        "dedupe": {"near": True, "threshold": 0.8}, "redact_pii": True},
        "inputs": [{"path": "d/logs.jsonl", "format": "chatlog", "sha256": "f" * 64, "read": 10, "kept": 5,
                    "rejected": 1, "filtered": {"low_rating": 4}}],
        "counts": {"read": 10, "kept": 5, "rejected": 1, "filtered": {"low_rating": 4}, "preferences": 2,
                   "pii": {"email": 1}},
        "splits": {"train": 4, "eval": 1},
    }
    ex = {"id": "1", "messages": [{"role": "user", "content": "mail <EMAIL>"}], "rating": 5}
    card = render_card(manifest, [ex])
    assert "# Flywheel dataset `abc123`" in card and "`d/logs.jsonl`" in card
    assert "| `low_rating` | 4 |" in card and "<EMAIL>" in card and "email 1" in card
    assert "read 10 = kept 5 + rejected 1 + filtered 4" in card
