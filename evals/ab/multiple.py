"""Multiple-comparison corrections across variants x metrics, delegated to statsmodels.

`holm` (the default) controls the family-wise error rate under any dependence between the tests, which is what a
ship decision over several variants and metrics needs; `bh` (Benjamini-Hochberg) controls the false discovery
rate instead and is the better choice for exploratory eval grids with many cells.
"""

from __future__ import annotations

import gc
import math
from typing import Literal

from flywheel.foundation.errors import InputError

# Friendly names -> statsmodels' names.
METHODS = {
    "holm": "holm",
    "bonferroni": "bonferroni",
    "bh": "fdr_bh",
    "fdr_bh": "fdr_bh",
    "benjamini-hochberg": "fdr_bh",
    "by": "fdr_by",
    "fdr_by": "fdr_by",
    "hommel": "hommel",
    "none": "none",
}
# The names a config may give (the spellings a user is told about; adjust_pvalues also takes the aliases above).
CorrectionMethod = Literal["holm", "bonferroni", "bh", "fdr_bh", "by", "fdr_by", "hommel", "none"]


def adjust_pvalues(pvalues: list[float], method: str = "holm") -> list[float]:
    """Adjusted p-values in the input order. NaN/None entries stay NaN and do not count towards the family."""
    from statsmodels.stats.multitest import multipletests

    key = METHODS.get(str(method).lower())
    if key is None:
        raise InputError(f"unknown p-value adjustment {method!r}; choose one of {sorted(METHODS)}")
    vals = [float("nan") if p is None else float(p) for p in pvalues]
    idx = [i for i, p in enumerate(vals) if math.isfinite(p)]
    for i in idx:
        if not 0.0 <= vals[i] <= 1.0:
            raise InputError(f"p-value #{i} is {vals[i]!r}, outside [0, 1]")
    out = [float("nan")] * len(vals)
    if not idx:
        return out
    if key == "none":
        for i in idx:
            out[i] = vals[i]
        return out
    # statsmodels' Holm branch calls gc.collect(), which costs ~0.25 s in a process holding pandas/scipy;
    # freezing the existing objects first makes that collection scan only what is new (a few ms).
    gc.freeze()
    try:
        _, adj, _, _ = multipletests([vals[i] for i in idx], method=key)
    finally:
        gc.unfreeze()
    for i, a in zip(idx, adj):
        out[i] = float(min(1.0, a))
    return out
