"""The embedded demo logs: deterministic, dirty on purpose, with a planted v2 rating effect."""

import json
from statistics import mean

from flywheel.mining.demo_logs import generate_demo_records, variant_for_user, write_demo_logs


def test_deterministic_file_and_planted_dirt(tmp_path):
    a = write_demo_logs(tmp_path / "a.jsonl", n=200, seed=7)
    write_demo_logs(tmp_path / "b.jsonl", n=200, seed=7)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a["duplicates"] > 0 and a["near_duplicates"] > 0 and a["malformed"] == 7 and len(a["pii"]) > 5
    assert {p["kind"] for p in a["pii"]} == {"email", "phone", "card", "ip", "iban"}
    bad = 0
    for line in (tmp_path / "a.jsonl").read_bytes().splitlines():
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and isinstance(rec.get("rating"), int) and 1 <= rec["rating"] <= 5 \
                and isinstance(rec.get("messages"), list) \
                and all(m.get("role") in ("user", "assistant") for m in rec["messages"])
        except ValueError:
            ok = False
        bad += not ok
    assert bad == a["malformed"]


def test_variants_by_user_with_a_real_effect():
    rows, _ = generate_demo_records(n=600, seed=0, dirty=False)
    assert all(r["prompt_variant"] == variant_for_user(r["user_id"]) for r in rows)
    v2 = [r["rating"] for r in rows if r["prompt_variant"] == "v2"]
    v1 = [r["rating"] for r in rows if r["prompt_variant"] == "v1"]
    assert 0.35 < len(v2) / len(rows) < 0.65
    assert mean(v2) - mean(v1) > 0.3
    r = rows[0]
    assert set(r) >= {"conversation_id", "messages", "rating", "retrieved_context", "prompt_variant", "model",
                      "user_id", "timestamp", "latency_ms", "tokens"}
