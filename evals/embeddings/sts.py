"""Semantic textual similarity: cosine of each pair vs the gold score, Spearman and Pearson (scipy.stats).

The same definition as sentence-transformers' EmbeddingSimilarityEvaluator (cosine), checked in the tests.
"""

from __future__ import annotations

import numpy as np

from flywheel.evals.embeddings.retrieval import normalize


def pair_cosines(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    return np.sum(normalize(emb1) * normalize(emb2), axis=1)


def sts_metrics(cosines: np.ndarray, gold: np.ndarray | list[float]) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    gold = np.asarray(gold, dtype=float)
    return {"spearman": float(spearmanr(cosines, gold).statistic), "pearson": float(pearsonr(cosines, gold).statistic)}
