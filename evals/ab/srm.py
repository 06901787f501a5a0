"""Sample-ratio mismatch: are the observed units per variant what the configured allocation predicts?

An SRM means the assignment or the logging is broken (bots filtered in one arm, a crash that loses one arm's
events, a redirect): the comparison is then biased in an unknown direction and no verdict should ship.
Chi-square goodness of fit (scipy.stats.chisquare) on unit counts. Thresholds follow Statsig/GrowthBook
practice: p < 0.01 is a warning, p < 0.001 an alert that marks the experiment invalid.
"""

from __future__ import annotations

from typing import Mapping

from flywheel.foundation.errors import InputError


def srm_check(counts: Mapping[str, int], allocation: Mapping[str, float] | None = None, *,
              warn_p: float = 0.01, alert_p: float = 0.001) -> dict:
    """counts: units per variant; allocation: weights per variant (normalised; equal when None)."""
    from scipy import stats

    names = list(counts)
    if allocation:
        missing = [v for v in names if v not in allocation]
        if missing:
            raise InputError(f"SRM: variants {missing} have data but no configured allocation "
                             f"(allocation has {sorted(allocation)})")
        w = [float(allocation[v]) for v in names]
    else:
        w = [1.0] * len(names)
    if any(x <= 0 for x in w):
        raise InputError(f"SRM: allocation weights must be > 0, got {dict(zip(names, w))}")
    total = sum(counts.values())
    ws = sum(w)
    expected = [total * x / ws for x in w]
    observed = [int(counts[v]) for v in names]
    if len(names) < 2 or total == 0:
        return {"p_value": None, "status": "not_checked", "observed": dict(zip(names, observed)),
                "expected": dict(zip(names, expected)), "chi2": None}
    res = stats.chisquare(observed, expected)
    p = float(res.pvalue)
    status = "alert" if p < alert_p else "warning" if p < warn_p else "ok"
    return {
        "p_value": p,
        "status": status,
        "chi2": float(res.statistic),
        "observed": dict(zip(names, observed)),
        "expected": {k: round(v, 3) for k, v in zip(names, expected)},
        "allocation": {k: x / ws for k, x in zip(names, w)},
        "thresholds": {"warning": warn_p, "alert": alert_p},
    }
