"""Dense retrieval and its metrics, per query, so models can be compared on the same queries.

Ranking: cosine similarity (vectors L2-normalised, then a dot product), exhaustive (the corpora here are small;
an ANN index would only add recall loss to the comparison). Ties are broken by ascending document id, the
same rule as sentence-transformers' InformationRetrievalEvaluator, so both score the same ranking.

Metrics (k cut-offs as named):
- nDCG@k with linear gain (the qrels grade, as trec_eval and BEIR), ideal DCG from all judged relevant docs;
- MRR@k: 1 / rank of the first relevant doc in the top k, else 0;
- MAP@k: sum of precision at each relevant hit in the top k, / min(k, #relevant) (sentence-transformers' rule;
  equal to trec_eval's map_cut when #relevant <= k, which holds on medline and cranfield);
- Recall@k: relevant docs in the top k / #relevant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METRICS = ("ndcg@10", "mrr@10", "map@100", "recall@1", "recall@5", "recall@10", "recall@100")


@dataclass
class Ranking:
    query_ids: list[str]
    doc_ids: list[str]  # per query, top-k doc ids in rank order
    top_ids: list[list[str]]
    top_scores: list[list[float]]


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def rank(query_emb: np.ndarray, doc_emb: np.ndarray, query_ids: list[str], doc_ids: list[str],
         k: int = 100, chunk: int = 256) -> Ranking:
    """Top-k documents per query by cosine; ties by ascending doc id (deterministic, evaluator-compatible)."""
    q = normalize(query_emb)
    d = normalize(doc_emb)
    k = min(k, len(doc_ids))
    # Rank position of each doc id in lexical order: the tie-breaker key.
    lex = np.empty(len(doc_ids), dtype=np.int64)
    lex[np.argsort(np.asarray(doc_ids, dtype=object), kind="stable")] = np.arange(len(doc_ids))
    top_ids, top_scores = [], []
    for start in range(0, len(q), chunk):
        sims = q[start:start + chunk] @ d.T
        for row in sims:
            # lexsort sorts by the last key first: score descending, then doc id ascending.
            order = np.lexsort((lex, -row))[:k]
            top_ids.append([doc_ids[j] for j in order])
            top_scores.append([float(row[j]) for j in order])
    return Ranking(list(query_ids), list(doc_ids), top_ids, top_scores)


def _dcg(gains: list[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def per_query_metrics(ranking: Ranking, qrels: dict[str, dict[str, int]]) -> dict[str, np.ndarray]:
    """{metric: array over queries (ranking.query_ids order)}; docs with grade <= 0 count as not relevant."""
    out = {m: np.zeros(len(ranking.query_ids)) for m in METRICS}
    for qi, (qid, hits) in enumerate(zip(ranking.query_ids, ranking.top_ids)):
        rel = {d: g for d, g in qrels.get(qid, {}).items() if g > 0}
        if not rel:
            raise ValueError(f"query {qid!r} has no relevant document: it cannot be scored")
        n_rel = len(rel)
        gains = [rel.get(d, 0) for d in hits]
        ideal = sorted(rel.values(), reverse=True)
        out["ndcg@10"][qi] = _dcg(gains[:10]) / _dcg(ideal[:10])
        first = next((i for i, g in enumerate(gains[:10]) if g > 0), None)
        out["mrr@10"][qi] = 0.0 if first is None else 1.0 / (first + 1)
        found, ap = 0, 0.0
        for i, g in enumerate(gains[:100]):
            if g > 0:
                found += 1
                ap += found / (i + 1)
        out["map@100"][qi] = ap / min(100, n_rel)
        for k in (1, 5, 10, 100):
            out[f"recall@{k}"][qi] = sum(1 for g in gains[:k] if g > 0) / n_rel
    return out


def mean_metrics(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    return {m: float(np.mean(v)) for m, v in per_query.items()}
