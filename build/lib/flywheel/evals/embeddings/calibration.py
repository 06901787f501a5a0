"""Threshold calibration for duplicate detection / a semantic cache ("answer from cache when cosine >= t").

The seed used a fixed 0.95 cosine rule. Thresholds are model-specific (a static 64-d model and MiniLM put the same
pair at very different cosines), so we measure: on labelled pairs, precision / recall / F1 of `cosine >= t` for
every distinct threshold, and the lowest threshold whose precision reaches the target (lowest = most recall).

Labels: STS-B pairs with gold score >= 4.0 ("mostly equivalent, unimportant details differ") are duplicates;
the cut-off is a config value (`duplicate_min_score`).
"""

from __future__ import annotations

import numpy as np


def pr_curve(cosines: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 of `cos >= t` for each distinct cosine t (descending)."""
    cos = np.asarray(cosines, dtype=float)
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(-cos, kind="stable")
    cos_s, y_s = cos[order], y[order]
    tp = np.cumsum(y_s)
    fp = np.cumsum(~y_s)
    # Only the last index of each run of equal cosines is a valid cut (>= t takes all ties).
    last = np.r_[cos_s[1:] != cos_s[:-1], True]
    tp, fp, thr = tp[last], fp[last], cos_s[last]
    pos = max(int(y.sum()), 1)
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / pos
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return {"threshold": thr, "precision": precision, "recall": recall, "f1": f1}


def at_threshold(cosines: np.ndarray, labels: np.ndarray, t: float) -> dict[str, float]:
    cos = np.asarray(cosines, dtype=float)
    y = np.asarray(labels, dtype=bool)
    pred = cos >= t
    tp = int((pred & y).sum())
    p = tp / pred.sum() if pred.sum() else float("nan")
    r = tp / y.sum() if y.sum() else float("nan")
    f1 = 2 * p * r / (p + r) if pred.sum() and y.sum() and (p + r) > 0 else 0.0
    return {"precision": float(p), "recall": float(r), "f1": float(f1)}


def calibrate(cosines: np.ndarray, labels: np.ndarray, target_precision: float = 0.9,
              fixed_threshold: float = 0.95) -> dict[str, float]:
    """Summary: threshold reaching the target precision (and its recall), best-F1 threshold, the fixed rule."""
    curve = pr_curve(cosines, labels)
    ok = np.nonzero(curve["precision"] >= target_precision)[0]
    out: dict[str, float] = {"positives": int(np.asarray(labels, dtype=bool).sum()), "pairs": len(labels)}
    if len(ok):
        # Among cuts meeting the target, the one with the most recall (lowest threshold).
        i = ok[np.argmax(curve["recall"][ok])]
        out.update(threshold_at_target=float(curve["threshold"][i]), recall_at_target=float(curve["recall"][i]),
                   precision_at_target=float(curve["precision"][i]))
    else:
        out.update(threshold_at_target=float("nan"), recall_at_target=0.0, precision_at_target=float("nan"))
    b = int(np.argmax(curve["f1"]))
    out.update(best_f1=float(curve["f1"][b]), best_f1_threshold=float(curve["threshold"][b]))
    fx = at_threshold(cosines, labels, fixed_threshold)
    out.update(precision_at_fixed=fx["precision"], recall_at_fixed=fx["recall"], f1_at_fixed=fx["f1"])
    return out
