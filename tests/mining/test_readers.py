"""Readers: every shape becomes candidates/preferences/rejects; bad records are rejected with reason and line."""

import json

import pytest

from flywheel.mining import readers
from flywheel.foundation.errors import InputError


def _lines(rows):
    return [(i, (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n",
             r if isinstance(r, bytes) else b"") for i, r in enumerate(rows, 1)]


GOOD = {"conversation_id": "c1", "messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello!"}],
        "rating": 5, "retrieved_context": ["doc a", "doc b"], "prompt_variant": "v2"}


def test_chatlog_good_and_bad_lines():
    bad = [
        b'{"conversation_id": "x", "messages": [', b'{"messages": "caf\xe9"}', b"[1, 2]",
        dict(GOOD, rating="five"), dict(GOOD, rating=11), dict(GOOD, rating=4.5),
        {k: v for k, v in GOOD.items() if k != "messages"}, {k: v for k, v in GOOD.items() if k != "rating"},
        dict(GOOD, messages=[{"role": "robot", "content": "x"}]), dict(GOOD, messages=[]),
    ]
    ev = readers.parse_lines("chatlog", _lines([GOOD] + bad))
    assert ev[0][0] == "cand"
    c = ev[0][2]
    assert c["id"] == "c1" and c["rating"] == 5 and c["context"] == "doc a\n\ndoc b" and c["prompt_variant"] == "v2"
    reasons = [e[2] for e in ev[1:]]
    assert all(e[0] == "reject" for e in ev[1:])
    assert [e[1] for e in ev[1:]] == list(range(2, 12))  # line numbers
    assert reasons[0].startswith("invalid JSON") and reasons[1].startswith("invalid UTF-8")
    assert "expected a JSON object" in reasons[2]
    assert "'five' is not an integer" in reasons[3] and "11 is outside 1-5" in reasons[4]
    assert "4.5" in reasons[5] and "messages" in reasons[6] and "missing field 'rating'" in reasons[7]
    assert "messages[0].role" in reasons[8] and "non-empty list" in reasons[9]


def test_seed_flat_shape_and_giant_line(tmp_path):
    flat = {"user_query": "Is tofu healthy?", "retrieved_documents": ["tofu has calcium"],
            "llm_response": "Yes, it is.", "user_rating": "4"}
    c = readers.parse_lines("chatlog", _lines([flat]))[0][2]
    assert c["messages"][0] == {"role": "user", "content": "Is tofu healthy?"} and c["rating"] == 4
    assert c["context"] == "tofu has calcium" and len(c["id"]) == 16
    p = tmp_path / "big.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"x": "' + b"a" * 3_000_000 + b'"}\n' +
                  json.dumps(GOOD).encode() + b"\n")
    items = list(readers.iter_raw_lines(p, max_line_bytes=1_000_000))
    assert [i[0] for i in items] == [1, 2, 3] and items[1][1] is None and len(items[1][2]) <= 2000
    ev = readers.parse_lines("chatlog", items, max_line_bytes=1_000_000)
    assert [e[0] for e in ev] == ["cand", "reject", "cand"] and "longer than" in ev[1][2]


def test_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "logs.csv"
    p.write_text('conversation_id,messages,rating\n'
                 f'a,"{json.dumps(GOOD["messages"]).replace(chr(34), chr(34) * 2)}",4\n'
                 'b,not json,4\n', encoding="utf-8")
    rows = list(readers.iter_csv_rows(p))
    ev = readers.parse_rows(rows)
    assert ev[0][0] == "cand" and ev[0][2]["id"] == "a" and ev[1][0] == "reject" and ev[1][1] == 3
    q = tmp_path / "logs.parquet"
    pq.write_table(pa.Table.from_pylist([{"user_query": "q", "llm_response": "a", "user_rating": 5}]), q)
    ev = readers.parse_rows([(n, r, "") for n, r in readers.iter_parquet_rows(q)])
    assert ev[0][0] == "cand" and ev[0][2]["rating"] == 5


def _node(mid, parent, role, text, rank=None, quality=0.75, **kw):
    labels = {"name": ["spam", "quality", "helpfulness"], "value": [0.0, quality, 0.5], "count": [3, 3, 3]}
    return {"message_id": mid, "parent_id": parent, "message_tree_id": "t1", "text": text, "role": role,
            "lang": "en", "deleted": False, "review_result": True, "rank": rank, "labels": labels, **kw}


def test_oasst1_threads_ratings_and_rank_preferences(tmp_path):
    msgs = [_node("p", None, "prompter", "Q?"), _node("a1", "p", "assistant", "best", rank=0, quality=1.0),
            _node("a2", "p", "assistant", "worse", rank=1, quality=0.25),
            _node("a3", "p", "assistant", "gone", rank=2, deleted=True),
            _node("p2", "a1", "prompter", "follow-up?"), _node("a4", "p2", "assistant", "answer 2", quality=None),
            _node("x", "missing", "assistant", "orphan")]
    msgs[5]["labels"] = {"name": ["spam"], "value": [0.9], "count": [3]}
    p = tmp_path / "messages.jsonl"
    p.write_text("\n".join(json.dumps(m) for m in msgs) + "\n{broken\n", encoding="utf-8")
    assert readers.detect_format(p) == "oasst1"
    ev = list(readers.read_oasst1(p, "quality", 10**6))
    cands = {e[2]["id"]: e[2] for e in ev if e[0] == "cand"}
    assert cands["a1"]["rating"] == 5 and cands["a2"]["rating"] == 2 and cands["a1"]["group"] == "t1"
    assert cands["a3"]["flags"] == ["deleted"] and "spam" in cands["a4"]["flags"]
    assert [m["role"] for m in cands["a4"]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert ("filtered", 7, "orphan") in ev and any(e[0] == "reject" and e[1] == 8 for e in ev)
    prefs = [e[2] for e in ev if e[0] == "pref"]
    assert len(prefs) == 1 and prefs[0]["chosen"][0]["content"] == "best"  # the deleted sibling takes no part
    by_rank = {e[2]["id"]: e[2]["rating"] for e in readers.read_oasst1(p, "rank", 10**6) if e[0] == "cand"}
    assert by_rank["a1"] == 5 and by_rank["a2"] == 3  # ranks 0..2 among 3 ranked siblings -> 5, 3, 1


def test_oasst2_tree_and_hh(tmp_path):
    lab = {"quality": {"value": 0.5, "count": 3}, "spam": {"value": 0.0, "count": 3}}
    tree = {"message_tree_id": "t9", "prompt": {
        "message_id": "p", "text": "Q?", "role": "prompter", "lang": "es", "labels": lab, "replies": [
            {"message_id": "a", "text": "A", "role": "assistant", "rank": 0, "labels": lab, "replies": []},
            {"message_id": "b", "text": "B", "role": "assistant", "rank": 1, "labels": lab, "replies": []}]}}
    ev = readers.oasst2_events(tree, 1, "quality")
    cands = [e[2] for e in ev if e[0] == "cand"]
    assert [c["id"] for c in cands] == ["a", "b"] and cands[0]["rating"] == 3 and cands[0]["lang"] == "es"
    assert cands[0]["group"] == "t9" and sum(e[0] == "pref" for e in ev) == 1
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: bye!",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: go away"}
    kind, line, pref = readers.hh_event(hh, 4)
    assert kind == "pair" and [m["role"] for m in pref["prompt"]] == ["user", "assistant", "user"]
    assert pref["chosen"] == [{"role": "assistant", "content": "bye!"}]
    assert readers.hh_event(dict(hh, rejected=hh["chosen"]), 5) == ("filtered", 5, "identical_pair")
    ev = readers.parse_lines("hh", _lines([{"chosen": "no transcript", "rejected": "x"}]))
    assert ev[0][0] == "reject" and "transcript" in ev[0][2]


def test_whole_file_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        readers.expand_inputs([tmp_path / "nope.jsonl"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="empty"):
        readers.expand_inputs([tmp_path / "empty.jsonl"])
    # a rotated, empty log next to a real one is read (counted as 0 records by the miner), not an error
    (tmp_path / "full.jsonl").write_text('{"x": 1}\n')
    assert readers.expand_inputs([tmp_path / "empty.jsonl", tmp_path / "full.jsonl"]) == [
        tmp_path / "empty.jsonl", tmp_path / "full.jsonl"]
    (tmp_path / "empty2.jsonl").write_text("")
    with pytest.raises(InputError, match="empty.jsonl, .*empty2.jsonl: input files are empty"):
        readers.expand_inputs([tmp_path / "empty.jsonl", tmp_path / "empty2.jsonl"])
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="unknown format"):
        readers.detect_format(tmp_path / "x.txt")
    (tmp_path / "odd.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(InputError, match=r"odd.jsonl:1: unknown format"):
        readers.detect_format(tmp_path / "odd.jsonl")
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(InputError, match="no .jsonl"):
        readers.expand_inputs([d])


def test_rating_line_scan_finds_the_marker_across_read_chunks(tmp_path):
    """The rating-line probe reads in chunks (not mmap, which counts the whole file in RSS): a marker cut by a chunk
    boundary is still found, and a file without one is not."""
    from flywheel.mining.readers import RATING_LINE, _contains

    path = tmp_path / "log.jsonl"
    for offset in (0, 5, 60, 64 - len(RATING_LINE) + 1, 64, 190):
        data = bytearray(b"x" * 256)
        data[offset:offset + len(RATING_LINE)] = RATING_LINE
        path.write_bytes(bytes(data))
        assert _contains(path, RATING_LINE, chunk=64), offset
    path.write_bytes(b"x" * 256)
    assert not _contains(path, RATING_LINE, chunk=64)
    path.write_bytes(b"")
    assert not _contains(path, RATING_LINE, chunk=64)
