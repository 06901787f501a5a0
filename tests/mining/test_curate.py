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
    assert curate.language_reason(cand(lang=None), ["en"]) is None  # undeclared, detection off: passes
    assert curate.length_reason(cand(), 2, 10_000) is None
    assert curate.normalise("  Hello\n  WORLD ") == "hello world"
    assert curate.prompt_key(cand()) == curate.prompt_key(cand(messages=[
        {"role": "user", "content": "MAIL me at a@b.org "}, {"role": "assistant", "content": "other"}]))


def _reply(text, **kw):
    return cand(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": text}], **kw)


def test_language_detected_when_no_lang_is_declared():
    de = "Seitan ist ein Fleischersatz aus Weizeneiweiß, der viel Protein enthält und gut gewürzt werden muss."
    en = "Seitan is a meat substitute made from wheat gluten; it is rich in protein and takes spices well."
    assert curate.language_reason(_reply(de), ["en"], 20) == "language_detected"
    assert curate.language_reason(_reply(en), ["en"], 20) is None
    assert curate.language_reason(_reply(de), ["de", "en"], 20) is None
    assert curate.language_reason(_reply("Ja, genau."), ["en"], 20) is None  # too short to judge: passes
    assert curate.language_reason(_reply(de), ["en"], None) is None  # detection off
    assert curate.language_reason(_reply(de, lang="en"), ["en"], 20) is None  # a declared lang decides
    assert curate.language_reason(_reply(en, lang="de"), ["en"], 20) == "language"
    assert curate.language_reason(_reply(de), [], 20) is None  # no language filter: the detector never runs


def test_the_language_filter_applies_to_preference_pairs():
    de = "Seitan ist ein Fleischersatz aus Weizeneiweiß, der viel Protein enthält und gut gewürzt werden muss."
    en = "Seitan is a meat substitute made from wheat gluten; it is rich in protein and takes spices well."

    def pair(text, i):
        return {"id": f"p{i}", "prompt": [{"role": "user", "content": "What is seitan?"}],
                "chosen": [{"role": "assistant", "content": text}],
                "rejected": [{"role": "assistant", "content": "no idea"}], "source": "hh"}

    s = {**S, "detect_min_chars": 20}
    events = [("pair", 1, pair(de, 1)), ("pair", 2, pair(en, 2)), ("pref", 3, pair(de, 3)), ("pref", 4, pair(en, 4))]
    out, _ = curate.curate_events(events, s)
    # the German hh pair is a record filtered under its reason; the German derived pair is simply not kept
    assert [(e[0], e[1]) for e in out] == [("filtered", 1), ("pair", 2), ("pref", 4)]
    assert out[0].reason == "language_detected"
    out, _ = curate.curate_events(events, {**s, "languages": []})  # no filter: every pair kept
    assert [e[0] for e in out] == ["pair", "pair", "pref", "pref"]
