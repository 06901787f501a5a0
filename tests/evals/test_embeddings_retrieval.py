"""Retrieval / STS / calibration / comparison metrics checked against independent references on real data:
sentence-transformers' InformationRetrievalEvaluator and pytrec_eval (trec_eval) scoring the SAME rankings, and
EmbeddingSimilarityEvaluator for STS. The static model keeps this fast (~10k texts/s)."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.evals.embeddings import calibration, compare, retrieval, sts
from flywheel.evals.embeddings.tasks import load_beir, load_sts


@pytest.fixture(scope="module")
def static_model():
    from flywheel.evals.embeddings.models import load_embedding_model

    return load_embedding_model("static-64")


def _ranked(task, model):
    doc_ids, q_ids = list(task.corpus), list(task.queries)
    d = model.encode([task.corpus[i] for i in doc_ids])
    q = model.encode([task.queries[i] for i in q_ids])
    return retrieval.rank(q, d, q_ids, doc_ids, k=100)


def test_handmade_ranking_metrics():
    r = retrieval.Ranking(["q"], ["a", "b", "c", "d"], [["a", "b", "c", "d"]], [[4, 3, 2, 1]])
    m = retrieval.per_query_metrics(r, {"q": {"b": 2, "d": 1, "x": 0}})
    assert m["mrr@10"][0] == 0.5
    assert m["recall@1"][0] == 0 and m["recall@5"][0] == 1
    ideal = 2 + 1 / np.log2(3)
    assert m["ndcg@10"][0] == pytest.approx((2 / np.log2(3) + 1 / np.log2(5)) / ideal)
    assert m["map@100"][0] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_ties_broken_by_doc_id_like_the_evaluator():
    q = np.array([[1.0, 0.0]])
    d = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    r = retrieval.rank(q, d, ["q"], ["z", "a", "m"], k=3)
    assert r.top_ids[0] == ["a", "z", "m"]


@pytest.mark.slow
def test_medline_matches_sentence_transformers_evaluator(shared_data, static_model):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    task = load_beir(shared_data("medline-beir"))
    ranking = _ranked(task, static_model)
    ours = retrieval.mean_metrics(retrieval.per_query_metrics(ranking, task.qrels))
    ev = InformationRetrievalEvaluator(task.queries, task.corpus, {q: set(d) for q, d in task.qrels.items()},
                                       precision_recall_at_k=[1, 5, 10, 100], map_at_k=[100], write_csv=False)
    results = [[{"corpus_id": d, "score": s} for d, s in zip(ids, sc)]
               for ids, sc in zip(ranking.top_ids, ranking.top_scores)]
    ref = ev.compute_metrics(results)
    assert ev.queries_ids == ranking.query_ids
    assert ours["ndcg@10"] == pytest.approx(ref["ndcg@k"][10], abs=1e-9)
    assert ours["mrr@10"] == pytest.approx(ref["mrr@k"][10], abs=1e-9)
    assert ours["map@100"] == pytest.approx(ref["map@k"][100], abs=1e-9)
    for k in (1, 5, 10, 100):
        assert ours[f"recall@{k}"] == pytest.approx(ref["recall@k"][k], abs=1e-9)
    assert 0.1 < ours["ndcg@10"] < 1


@pytest.mark.slow
def test_cranfield_graded_matches_trec_eval(shared_data, static_model):
    pytrec_eval = pytest.importorskip("pytrec_eval", reason="pytrec-eval-terrier is in the dev extra")
    task = load_beir(shared_data("cranfield-beir"))
    assert task.info["graded"]
    ranking = _ranked(task, static_model)
    per_q = retrieval.per_query_metrics(ranking, task.qrels)
    # trec_eval breaks score ties its own way: hand it strictly decreasing scores = exactly our order.
    run = {q: {d: float(100 - i) for i, d in enumerate(ids)} for q, ids in zip(ranking.query_ids, ranking.top_ids)}
    ev = pytrec_eval.RelevanceEvaluator(task.qrels, {"ndcg_cut_10", "recall_1", "recall_5", "recall_10",
                                                     "recall_100", "map_cut_100"})
    ref = ev.evaluate(run)
    for i, q in enumerate(ranking.query_ids):
        assert per_q["ndcg@10"][i] == pytest.approx(ref[q]["ndcg_cut_10"], abs=1e-6)
        for k in (1, 5, 10, 100):
            assert per_q[f"recall@{k}"][i] == pytest.approx(ref[q][f"recall_{k}"], abs=1e-6)
        # MAP agrees where #relevant <= 100 (all cranfield queries): trec divides by #relevant, we by min(k, #rel)
        assert per_q["map@100"][i] == pytest.approx(ref[q]["map_cut_100"], abs=1e-6)


@pytest.mark.slow
def test_sts_matches_similarity_evaluator(shared_data, static_model):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    task = load_sts(shared_data("stsbenchmark"), "dev", max_pairs=300)
    cos = sts.pair_cosines(static_model.encode(task.s1), static_model.encode(task.s2))
    ours = sts.sts_metrics(cos, task.scores)
    ref = EmbeddingSimilarityEvaluator(task.s1, task.s2, task.scores, main_similarity="cosine",
                                       write_csv=False)(static_model)
    assert ours["spearman"] == pytest.approx(ref["spearman_cosine"], abs=1e-6)
    assert ours["pearson"] == pytest.approx(ref["pearson_cosine"], abs=1e-6)


def test_calibration_threshold_for_target_precision():
    cos = np.array([0.99, 0.97, 0.96, 0.9, 0.8, 0.7, 0.6])
    y = np.array([1, 1, 0, 1, 0, 1, 0], bool)
    curve = calibration.pr_curve(cos, y)
    assert curve["precision"][0] == 1.0 and curve["recall"][-1] == 1.0
    cal = calibration.calibrate(cos, y, target_precision=0.75, fixed_threshold=0.95)
    # cut at 0.9: 3 of 4 predicted are duplicates (0.75), recall 3/4; lower cuts fall below 0.75
    assert cal["threshold_at_target"] == 0.9 and cal["recall_at_target"] == 0.75
    assert cal["precision_at_fixed"] == pytest.approx(2 / 3) and cal["recall_at_fixed"] == 0.5
    # ties: all-equal cosines give one cut
    assert len(calibration.pr_curve(np.ones(4), y[:4])["threshold"]) == 1


def test_paired_comparison_holm_and_too_few():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 20)
    vecs = {"good": base + 0.2, "same": base + rng.normal(0, 0.01, 20), "base": base}
    rows = compare.compare_models(vecs, task="t", metric="ndcg@10", n_boot=500, min_queries=30)
    by = {(r["model_a"], r["model_b"]): r for r in rows}
    assert by[("good", "base")]["significant"] and by[("good", "base")]["ci_low"] > 0.15
    assert by[("same", "base")]["verdict"].startswith("too few queries to tell (n=20")
    from statsmodels.stats.multitest import multipletests

    raw = [r["p_value"] for r in rows]
    assert [r["p_adjusted"] for r in rows] == pytest.approx(list(multipletests(raw, method="holm")[1]))
    assert compare.vs_best(rows, "good", "base").startswith("worse*")
    perm = compare.paired_test(vecs["good"], vecs["base"], "permutation", n_resamples=999)
    assert perm < 0.01


def test_correlation_comparison():
    rng = np.random.default_rng(1)
    gold = rng.uniform(0, 5, 300)
    rows = compare.compare_correlations({"a": gold + rng.normal(0, 0.5, 300), "b": gold + rng.normal(0, 3, 300)},
                                        gold, task="sts", n_boot=300)
    assert rows[0]["significant"] and rows[0]["estimate"] > 0 and rows[0]["ci_low"] > 0
