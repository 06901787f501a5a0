"""A mined dataset never holds one id twice: per-turn logs keep their longest version, ids reused by two log files
are told apart by the file."""

import json

from flywheel.foundation.io import read_jsonl
from flywheel.pipelines.mine import MineConfig, mine_to_dir

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def _reply(n: int) -> str:
    # distinct enough that near-dedupe never merges two of them
    return " ".join(WORDS[(n * 7 + k * (n + 3)) % len(WORDS)] + str(n * 100 + k) for k in range(12))


def _turns(k: int, base: int) -> list[dict]:
    msgs = []
    for t in range(k):
        msgs += [{"role": "user", "content": f"question {base}-{t}"},
                 {"role": "assistant", "content": _reply(base * 10 + t)}]
    return msgs


def _write(path, rows):
    path.write_text("".join(json.dumps({"conversation_id": cid, "messages": m, "rating": 5}) + "\n"
                            for cid, m in rows), encoding="utf-8")


def _records(out):
    return read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")


def cfg():
    return MineConfig(progress=False, workers=1, eval_fraction=0.5)


def test_a_conversation_logged_once_per_turn_keeps_its_longest_version(tmp_path):
    _write(tmp_path / "chat.jsonl", [("c1", _turns(1, 1)), ("c2", _turns(1, 2)), ("c1", _turns(2, 1)),
                                     ("c1", _turns(3, 1))])
    m = mine_to_dir([tmp_path / "chat.jsonl"], tmp_path / "ds", cfg())
    recs = _records(tmp_path / "ds")
    assert sorted(r["id"] for r in recs) == ["c1", "c2"]
    assert len(next(r for r in recs if r["id"] == "c1")["messages"]) == 6
    c = m["counts"]
    assert c["filtered"] == {"superseded": 2} and c["kept"] == 2
    assert c["read"] == c["kept"] + c["rejected"] + sum(c["filtered"].values())


def test_a_conversation_continued_in_the_next_rotated_log_is_one_record(tmp_path):
    _write(tmp_path / "a.jsonl", [("c1", _turns(1, 1))])
    _write(tmp_path / "b.jsonl", [("c1", _turns(2, 1))])
    m = mine_to_dir([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "ds", cfg())
    recs = _records(tmp_path / "ds")
    assert [r["id"] for r in recs] == ["c1"] and len(recs[0]["messages"]) == 4
    assert m["counts"]["filtered"] == {"superseded": 1}


def test_ids_reused_by_two_files_are_told_apart_by_the_file(tmp_path):
    _write(tmp_path / "a.jsonl", [("c1", _turns(1, 1)), ("c2", _turns(1, 2))])
    _write(tmp_path / "b.jsonl", [("c1", _turns(1, 3))])
    m = mine_to_dir([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "ds", cfg())
    recs = _records(tmp_path / "ds")
    got = sorted(r["id"] for r in recs)
    sha = {i["path"].split("/")[-1]: i["sha256"][:8] for i in m["inputs"]}
    assert got == sorted([f"{sha['a.jsonl']}:c1", f"{sha['b.jsonl']}:c1", "c2"])
    assert len({r["cluster"] for r in recs}) == len(recs) == m["counts"]["kept"] == 3
    assert m["counts"]["filtered"] == {}
