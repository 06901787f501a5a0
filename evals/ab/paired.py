"""Paired comparisons: the same items (prompts, contexts, users) scored under control and treatment.

Pairing removes the item-to-item variance (some prompts are just hard), so a paired test is far more sensitive
than comparing two independent samples of the same size. The estimate is always the mean of the per-item
differences (treatment - control). `test="auto"` picks the test and says why in `test_reason`:
- 0/1 outcomes on both sides (pass rates, exact match): McNemar's test on the discordant pairs, exact (binomial)
  when there are fewer than 25 of them, with the Agresti-Min interval for the difference in proportions;
- ordinal scores (few distinct levels, e.g. 1-5 ratings) or clearly non-normal differences: the Wilcoxon
  signed-rank test, with a t-interval for the mean difference;
- otherwise the paired t-test and its t-interval.

One Wilcoxon convention everywhere in Flywheel (`signed_rank_p`, also used by the embeddings comparisons): zero
differences stay in the ranking, split between the signs (`zsplit`), instead of being silently dropped, and small
samples get scipy's exact null distribution: eight identical non-zero differences give p = 2/2^8, never 0.
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


MCNEMAR_EXACT_BELOW = 25  # discordant pairs; below this the chi-square approximation is poor


def signed_rank_p(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences `d` (zsplit; exact for small n)."""
    from scipy import stats

    d = np.asarray(d, dtype=float)
    if d.size == 0 or np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d, zero_method="zsplit").pvalue)


def mcnemar(control: np.ndarray, treatment: np.ndarray, alpha: float = 0.05) -> dict:
    """McNemar's test for paired 0/1 outcomes, with the Agresti-Min interval for p_treatment - p_control.

    Only discordant pairs carry evidence: `gained` (control 0, treatment 1) and `lost` (control 1, treatment 0).
    """
    from scipy import stats
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    c = np.asarray(control, dtype=float) > 0.5
    t = np.asarray(treatment, dtype=float) > 0.5
    n = int(c.size)
    gained, lost = int((~c & t).sum()), int((c & ~t).sum())
    both, neither = int((c & t).sum()), int((~c & ~t).sum())
    discordant = gained + lost
    exact = discordant < MCNEMAR_EXACT_BELOW
    if discordant == 0:
        p = 1.0
    else:
        p = float(sm_mcnemar([[both, lost], [gained, neither]], exact=exact, correction=True).pvalue)
    # Agresti & Min (2005): add 1/2 to each of the four cells, then the Wald interval; good coverage at small n.
    g, l_, m = gained + 0.5, lost + 0.5, n + 2.0
    est_adj = (g - l_) / m
    se = math.sqrt(max((g + l_) - (g - l_) ** 2 / m, 0.0)) / m
    z = float(stats.norm.ppf(1 - alpha / 2))
    return {"p_value": min(max(p, 0.0), 1.0), "ci_low": max(-1.0, est_adj - z * se),
            "ci_high": min(1.0, est_adj + z * se), "gained": gained, "lost": lost, "exact": exact}


def _binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0) | (x == 1)))


def choose_test(control: np.ndarray, treatment: np.ndarray) -> tuple[str, str]:
    """('mcnemar' | 't' | 'wilcoxon', reason) for paired data."""
    from scipy import stats

    if _binary(control) and _binary(treatment):
        return "mcnemar", "paired 0/1 outcomes"
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
    elif test == "mcnemar":
        if not (_binary(c) and _binary(t)):
            raise InputError(f"{metric}: McNemar's test needs 0/1 outcomes on both sides")
        kind, reason = "mcnemar", "requested"
    else:
        raise InputError(f"unknown paired test {test!r}; use auto, t, wilcoxon or mcnemar")

    d = t - c
    n = d.size
    mean_d = float(d.mean())
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    tcrit = float(stats.t.ppf(1 - alpha / 2, n - 1))
    warning = None
    extra: dict = {}
    if kind == "mcnemar":
        mc = mcnemar(c, t, alpha)
        p, ci_low, ci_high = mc["p_value"], mc["ci_low"], mc["ci_high"]
        extra = {"gained": mc["gained"], "lost": mc["lost"], "exact": mc["exact"]}
    elif sd == 0.0:
        # Identical differences: the t statistic does not exist and the t-interval has zero width. The signed-rank
        # test still has an exact answer (2/2^n for n equal non-zero differences), so use it and say so.
        warning = f"all paired differences are identical ({mean_d:g}); p-value from the exact signed-rank test"
        p = signed_rank_p(d)
        ci_low = ci_high = mean_d
    else:
        ci_low, ci_high = mean_d - tcrit * se, mean_d + tcrit * se
        p = float(stats.ttest_rel(t, c).pvalue) if kind == "t" else signed_rank_p(d)
    name = {"t": "paired_t", "wilcoxon": "wilcoxon_signed_rank", "mcnemar": "mcnemar"}[kind]
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
        **extra,
    }
