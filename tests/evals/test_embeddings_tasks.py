"""Task loaders: BEIR / STS / mined-dataset parsing and the bad-input messages (file, line, counts)."""

from __future__ import annotations

import json

import pytest

from flywheel.evals.embeddings.tasks import load_beir, load_domain, load_sts, resolve_task
from flywheel.foundation.errors import InputError


def _beir(root, corpus, queries, qrels, header=True):
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


DOCS = [{"_id": f"d{i}", "title": "", "text": f"document number {i}"} for i in range(10)]
QUERIES = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}, {"_id": "q3", "text": "no judgement"}]
QRELS = [("q1", "d1", 2), ("q1", "d2", 1), ("q1", "d3", 0), ("q2", "d4", 1)]


def test_beir_graded_and_unjudged_queries_counted(tmp_path):
    t = load_beir(_beir(tmp_path / "b", DOCS, QUERIES, QRELS))
    assert list(t.queries) == ["q1", "q2"]
    assert t.qrels["q1"] == {"d1": 2, "d2": 1}  # grade 0 = judged not relevant, dropped from qrels
    assert t.info["queries_without_relevant"] == 1 and t.info["graded"] is True
    assert len(t.corpus) == 10


def test_beir_unknown_ids_reported_with_counts(tmp_path):
    root = _beir(tmp_path / "b", DOCS, QUERIES, QRELS + [("q1", "d99", 1), ("q2", "d98", 1), ("qX", "d1", 1)])
    with pytest.raises(InputError) as e:
        load_beir(root)
    msg = str(e.value)
    assert "test.tsv" in msg and "2 judgement(s) name unknown documents (first: 'd99' at line 6)" in msg
    assert "1 judgement(s) name unknown queries (first: 'qX'" in msg


def test_beir_duplicate_ids_and_empty_corpus(tmp_path):
    with pytest.raises(InputError, match=r"corpus.jsonl: 2 duplicate _id\(s\) \(first: 'd1' at line 11"):
        load_beir(_beir(tmp_path / "a", DOCS + [DOCS[1], DOCS[2]], QUERIES, QRELS))
    with pytest.raises(InputError, match="empty corpus"):
        load_beir(_beir(tmp_path / "b", [], QUERIES, QRELS))
    root = _beir(tmp_path / "c", DOCS, QUERIES, QRELS)
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n{oops\n')
    with pytest.raises(InputError, match=r"queries.jsonl:2: invalid JSON"):
        load_beir(root)
    (root / "qrels" / "test.tsv").write_text("q1\td1\tgood\n")
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    with pytest.raises(InputError, match=r"test.tsv:1: score: 'good' is not a number"):
        load_beir(root)


def test_max_docs_keeps_every_relevant_document(tmp_path):
    t = load_beir(_beir(tmp_path / "b", DOCS, QUERIES, QRELS), max_docs=4, seed=1)
    assert len(t.corpus) == 4 and {"d1", "d2", "d4"} <= set(t.corpus)
    t = load_beir(_beir(tmp_path / "c", DOCS, QUERIES, QRELS), max_queries=1, max_docs=2)
    assert len(t.queries) == 1 and all(d in t.corpus for q in t.qrels for d in t.qrels[q])


def test_sts_ragged_rows_and_bad_score(tmp_path):
    f = tmp_path / "sts-dev.csv"
    f.write_text('main\tMSRvid\t2012\t1\t5.000\tA "quoted plane.\tA plane.\n'
                 "main\tx\t2012\t2\t1.5\tOne.\tTwo.\textra\tfields\n")
    t = load_sts(tmp_path, "dev")
    assert t.s1 == ['A "quoted plane.', "One."] and t.scores == [5.0, 1.5]
    f.write_text("main\tx\t2012\t2\tfive\tOne.\tTwo.\n")
    with pytest.raises(InputError, match=r"sts-dev.csv:1: score: 'five'"):
        load_sts(tmp_path, "dev")


def _mined(root, records):
    root.mkdir(parents=True)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "manifest.json").write_text(json.dumps({"version": "abc123"}))
    return root


def _rec(i, ctx, q, in_system=False):
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": "a"}]
    if ctx and in_system:
        msgs.insert(0, {"role": "system", "content": ctx})
    return {"id": str(i), "messages": msgs, "rating": 5, "source": "t", "prompt_variant": "v1",
            "context": None if in_system else ctx, "cluster": "c"}


def test_domain_task_from_mined_dataset(tmp_path):
    root = _mined(tmp_path / "ds", [_rec(1, "Paris is the capital of France.", "capital of France?"),
                                    _rec(2, "Paris is the capital of France.", "where is the French government?"),
                                    _rec(3, "Water boils at 100 C.", "boiling point?", in_system=True),
                                    _rec(4, None, "no context here")])
    t = load_domain(root)
    assert len(t.queries) == 3 and len(t.corpus) == 2  # identical contexts are one document
    assert t.qrels["train:1"] == t.qrels["train:2"]
    assert t.info["records_without_context"] == 1 and t.info["dataset_version"] == "abc123"
    assert resolve_task(str(root), tmp_path).kind == "retrieval"
    with pytest.raises(InputError, match="no record has both a context and a user question"):
        load_domain(_mined(tmp_path / "empty", [_rec(1, None, "q")]))


def test_resolve_unknown_task(tmp_path):
    with pytest.raises(InputError, match="not a known task"):
        resolve_task("nope", tmp_path)


def test_real_shared_data_shapes(shared_data):
    med = load_beir(shared_data("medline-beir"))
    assert len(med.queries) == 20 and len(med.corpus) == 1033 and not med.info["graded"]
    cran = load_beir(shared_data("cranfield-beir"))
    assert cran.info["graded"] and len(cran.corpus) == 1400
    sts = load_sts(shared_data("stsbenchmark"), "train")
    assert len(sts.scores) == 5749


def test_labelled_pairs_jsonl(tmp_path):
    from flywheel.evals.embeddings.tasks import load_pairs

    f = tmp_path / "dups.jsonl"
    f.write_text('{"text1": "how do I reset my password", "text2": "password reset help", "label": 1}\n'
                 '{"s1": "refund policy", "s2": "shipping times", "label": 0}\n')
    t = resolve_task(str(f), tmp_path)
    assert t.kind == "sts" and t.labels == [True, False] and t.name == "dups"
    f.write_text('{"text1": "a", "text2": "b", "label": 1}\n{"text1": "a", "text2": "c", "score": 2.0}\n')
    with pytest.raises(InputError, match="1 of 2 pairs have no 'label'"):
        load_pairs(f)
    f.write_text('{"text1": "a", "text2": "b", "label": "yes"}\n')
    with pytest.raises(InputError, match=r"dups.jsonl:1: label: 'yes' is not 0/1"):
        load_pairs(f)
