"""CUPED (Deng et al. 2013): subtract the part of the outcome a pre-period covariate predicts.

Y_adj = Y - theta (X - mean(X)),  theta = cov(X, Y) / var(X) pooled over all units. Because X is measured
before assignment it is independent of the variant, so the mean difference of Y_adj estimates the same effect
as Y's, with variance shrunk by the factor (1 - corr(X, Y)^2). Units without a covariate keep X = mean(X)
(no adjustment), which keeps them in the analysis instead of dropping them.
"""

from __future__ import annotations

import numpy as np


def cuped_adjust(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, dict]:
    y = np.asarray(y, dtype=float)
    x = np.asarray(x, dtype=float)
    have = np.isfinite(x)
    if have.sum() < 3 or np.var(x[have]) == 0:
        return y, {"theta": 0.0, "variance_reduction": 0.0, "units_with_covariate": int(have.sum()),
                   "note": "covariate missing or constant: no adjustment"}
    xm = float(x[have].mean())
    xf = np.where(have, x, xm)
    c = np.cov(xf[have], y[have])
    theta = float(c[0, 1] / c[0, 0])
    y_adj = y - theta * (xf - xm)
    vr = 1.0 - float(np.var(y_adj, ddof=1) / np.var(y, ddof=1)) if np.var(y) > 0 else 0.0
    return y_adj, {"theta": theta, "variance_reduction": vr, "units_with_covariate": int(have.sum())}
