import json
from collections import Counter

from flywheel.mining import curate

S = {"min_rating": 4, "min_chars": 2, "max_chars": 200, "languages": ["en"], "redact": True, "gap_prefs": True,
     "near_dedupe": True, "num_perm": 64, "shingle": 3, "system_template": "ctx: {context}"}


def cand(**kw):
    c = {"id": "c", "group": "c", "messages": [{"role": "user", "content": "mail me at a@b.org"},
                                                 {"role": "assistant", "content": "Sure thing, done."}],
         "context": None, "rating": 5, "source": "chatlog", "lang": None, "flags": []}
    c.update(kw)
    return c


def test_each_filter_names_its_reason():
    cases = {
        "deleted": cand(flags=["review_failed", "deleted"]),  # fixed order: deleted before review_failed
        "no_rating": cand(rating=None),
        "no_assistant_reply": cand(messages=[{"role": "user", "content": "hello?"}]),
        "too_short": cand(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "k"}]),
        "too_long": cand(context="x" * 500),
        "language": cand(lang="de"),
        "low_rating": cand(rating=3),
    }
    events = [("cand", i, c) for i, c in enumerate(cases.values())] + [("cand", 99, cand(lang="en-US"))]
    out, counts = curate.curate_events(events, S)
    got = [e[2] for e in out[:-1]]
    assert got == list(cases)
    last = out[-1]
    rec = json.loads(last[2])  # the output record, serialised by the worker (no `cluster` yet)
    assert last[0] == "cand" and rec["messages"][0]["content"] == "mail me at <EMAIL>"
    assert set(rec) == {"id", "messages", "rating", "source", "prompt_variant", "context"}
    assert len(last[3]) == 12 and last[4] is not None and last[6:] == (5, "c", "c")  # key, signature, meta
    assert json.loads(last[5][1].split("\t", 3)[3])[1] == 5  # rating-gap item
    assert out[-2][3] is not None  # low-rated answers still feed rating-gap preferences
    assert counts == Counter({"email": 2})


def test_pure_filter_functions():
    assert curate.language_reason(cand(lang=None), ["en"]) is None  # undeclared language passes (no detector)
    assert curate.length_reason(cand(), 2, 10_000) is None
    assert curate.normalise("  Hello\n  WORLD ") == "hello world"
    assert curate.prompt_key(cand()) == curate.prompt_key(cand(messages=[
        {"role": "user", "content": "MAIL me at a@b.org "}, {"role": "assistant", "content": "other"}]))
