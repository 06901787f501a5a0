"""Paired comparisons: the same items (prompts, contexts, users) scored under control and treatment.

Pairing removes the item-to-item variance (some prompts are just hard), so a paired test is far more sensitive
than comparing two independent samples of the same size. The estimate is always the mean of the per-item
differences (treatment - control) with its t-interval; the p-value comes from the paired t-test, or from the
Wilcoxon signed-rank test when the scores are ordinal (few distinct levels, e.g. 1-5 ratings or means of a
few annotators) or the differences are clearly not normal. `test="auto"` picks and says why in `test_reason`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from flywheel.foundation.errors import InputError

ORDINAL_MAX_LEVELS = 15  # <= this many distinct score values -> treat the scale as ordinal


def _as_pairs(control: Sequence[float], treatment: Sequence[float], metric: str, variant: str,
              control_name: str) -> tuple[np.ndarray, np.ndarray, int]:
    c = np.asarray(control, dtype=float)
    t = np.asarray(treatment, dtype=float)
    if c.shape != t.shape or c.ndim != 1:
        raise InputError(f"{metric}: paired comparison {variant} vs {control_name} needs two equal-length 1-d "
                         f"sequences aligned by item, got shapes {c.shape} and {t.shape}")
    ok = np.isfinite(c) & np.isfinite(t)
    dropped = int((~ok).sum())
    c, t = c[ok], t[ok]
    if c.size < 2:
        raise InputError(f"{metric}: {variant} vs {control_name}: need at least 2 complete pairs, got {c.size}"
                         f" ({dropped} pairs with a missing/NaN score)")
    return c, t, dropped


def choose_test(control: np.ndarray, treatment: np.ndarray) -> tuple[str, str]:
    """('t' | 'wilcoxon', reason) for paired data."""
    from scipy import stats

    levels = np.unique(np.concatenate([control, treatment])).size
    if levels <= ORDINAL_MAX_LEVELS:
        return "wilcoxon", f"ordinal scale ({levels} distinct score levels)"
    d = treatment - control
    if d.size >= 8 and np.ptp(d) > 0:
        p = stats.shapiro(d).pvalue
        if p < 0.05:
            return "wilcoxon", f"differences not normal (Shapiro-Wilk p={p:.3g})"
        return "t", f"continuous scores, differences compatible with normal (Shapiro-Wilk p={p:.3g})"
    return "t", "continuous scores, too few pairs to check normality"


def hodges_lehmann(d: np.ndarray, max_n: int = 3000) -> float:
    """Median of the Walsh averages: the location estimate that goes with the signed-rank test."""
    if d.size > max_n:
        return float(np.median(d))
    i, j = np.triu_indices(d.size)
    return float(np.median((d[i] + d[j]) / 2.0))


def compare_paired(control: Sequence[float], treatment: Sequence[float], *, metric: str, variant: str,
                   control_name: str, alpha: float = 0.05, test: str = "auto") -> dict:
    """Compare two aligned score vectors (item i of `control` is item i of `treatment`).

    Returns {variant, control, metric, test, test_reason, estimate (mean diff treatment - control), ci_low,
    ci_high (t-interval at 1 - alpha), p_value (two-sided), n (pairs used), n_dropped (pairs with a NaN),
    control_mean, treatment_mean, relative_lift, sd_diff, effect_size_dz, hodges_lehmann, wins, losses, ties,
    warning}. Pairs with a NaN on either side are dropped and counted, never silently.
    """
    from scipy import stats

    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha!r}")
    c, t, dropped = _as_pairs(control, treatment, metric, variant, control_name)
    if test == "auto":
        kind, reason = choose_test(c, t)
    elif test in ("t", "paired_t", "ttest"):
        kind, reason = "t", "requested"
    elif test in ("wilcoxon", "signed_rank"):
        kind, reason = "wilcoxon", "requested"
    else:
        raise InputError(f"unknown paired test {test!r}; use auto, t or wilcoxon")

    d = t - c
    n = d.size
    mean_d = float(d.mean())
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    tcrit = float(stats.t.ppf(1 - alpha / 2, n - 1))
    warning = None
    if sd == 0.0:
        # Zero variance of the differences: no test statistic exists. Say so instead of returning NaN.
        warning = ("all paired differences are identical "
                   f"({mean_d:g}); the test is degenerate")
        p = 1.0 if mean_d == 0.0 else 0.0
        ci_low = ci_high = mean_d
    else:
        ci_low, ci_high = mean_d - tcrit * se, mean_d + tcrit * se
        if kind == "t":
            p = float(stats.ttest_rel(t, c).pvalue)
        else:
            if np.all(d == 0):
                p = 1.0
            else:
                p = float(stats.wilcoxon(t, c).pvalue)
    name = "paired_t" if kind == "t" else "wilcoxon_signed_rank"
    c_mean = float(c.mean())
    return {
        "variant": variant,
        "control": control_name,
        "metric": metric,
        "test": name,
        "test_reason": reason,
        "estimate": mean_d,
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "p_value": float(p),
        "n": int(n),
        "n_dropped": dropped,
        "control_mean": c_mean,
        "treatment_mean": float(t.mean()),
        "relative_lift": (mean_d / c_mean) if c_mean != 0 else None,
        "sd_diff": sd,
        "effect_size_dz": (mean_d / sd) if sd > 0 else None,
        "hodges_lehmann": hodges_lehmann(d),
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "ties": int((d == 0).sum()),
        "alpha": alpha,
        "warning": warning,
    }
