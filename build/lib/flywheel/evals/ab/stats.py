"""Two-sample tests computed from aggregates (n, mean, variance, histograms), vectorised over numpy arrays.

Working from aggregates is what lets 10M outcome rows analyse in about the time of one pass over them: a
variant's n, sum and sum of squares give Welch's t; a histogram of an ordinal rating gives Mann-Whitney's U with
the exact tie correction; counts of successes give the two-proportion test. Every function here equals its
scipy/statsmodels counterpart on reference cases (see tests/evals/test_ab_stats.py); they are written out (not
called) because the library versions want raw rows, and because the A/A simulation calls them on arrays of
2000+ experiments at once.
Differences are always treatment - control.
"""

from __future__ import annotations

import math

import numpy as np


def _norm():
    from scipy import stats

    return stats.norm


def welch(n_c, mean_c, var_c, n_t, mean_t, var_t, alpha: float = 0.05) -> dict:
    """Welch's unequal-variance t-test for the mean difference; = scipy.stats.ttest_ind(equal_var=False).

    Inputs may be scalars or arrays (vectorised A/A simulation). var_* are sample variances (ddof=1).
    """
    from scipy import stats

    n_c, mean_c, var_c, n_t, mean_t, var_t = (np.asarray(x, dtype=float)
                                              for x in (n_c, mean_c, var_c, n_t, mean_t, var_t))
    a, b = var_t / n_t, var_c / n_c
    se = np.sqrt(a + b)
    diff = mean_t - mean_c
    with np.errstate(divide="ignore", invalid="ignore"):
        # Welch-Satterthwaite degrees of freedom
        df = (a + b) ** 2 / (a ** 2 / (n_t - 1) + b ** 2 / (n_c - 1))
        tstat = diff / se
    p = 2 * stats.t.sf(np.abs(tstat), df)
    q = stats.t.ppf(1 - alpha / 2, df)
    return _out(diff, se, tstat, p, diff - q * se, diff + q * se, df=df)


def mann_whitney_from_hist(counts_c, counts_t) -> dict:
    """Mann-Whitney U (two-sided, normal approximation with tie and continuity correction) from histograms.

    counts_c / counts_t: counts per ordered level (same levels, ascending). Equals
    scipy.stats.mannwhitneyu(treatment, control, method="asymptotic"). Also returns the probability of
    superiority P(T > C) + 0.5 P(T = C) = U_t / (n_t n_c), the effect size that goes with U.
    """
    ct = np.asarray(counts_t, dtype=float)
    cc = np.asarray(counts_c, dtype=float)
    tot = ct + cc
    n_t, n_c = ct.sum(), cc.sum()
    N = n_t + n_c
    # midrank of each level: ranks before it + (ties + 1) / 2
    before = np.concatenate([[0.0], np.cumsum(tot)[:-1]])
    midrank = before + (tot + 1) / 2
    r_t = float((ct * midrank).sum())
    u_t = r_t - n_t * (n_t + 1) / 2
    u_c = n_t * n_c - u_t
    mu = n_t * n_c / 2
    tie_term = float((tot ** 3 - tot).sum())
    var = n_t * n_c / 12 * ((N + 1) - tie_term / (N * (N - 1)))
    big = max(u_t, u_c)
    if var <= 0:
        z, p = 0.0, 1.0
    else:
        z = (big - mu - 0.5) / math.sqrt(var)
        p = float(min(1.0, 2 * _norm().sf(z)))
    return {"u": u_t, "z": z, "p_value": p, "prob_superiority": u_t / (n_t * n_c)}


def two_proportion(x_c, n_c, x_t, n_t, alpha: float = 0.05) -> dict:
    """Two-proportion z-test (pooled variance under H0, = statsmodels proportions_ztest) with a Wald CI for the
    difference (unpooled, = statsmodels confint_proportions_2indep(method="wald")). Vectorised."""
    norm = _norm()
    x_c, n_c, x_t, n_t = (np.asarray(v, dtype=float) for v in (x_c, n_c, x_t, n_t))
    p_c, p_t = x_c / n_c, x_t / n_t
    pool = (x_c + x_t) / (n_c + n_t)
    se0 = np.sqrt(pool * (1 - pool) * (1 / n_c + 1 / n_t))
    diff = p_t - p_c
    with np.errstate(divide="ignore", invalid="ignore"):
        z = diff / se0
    p = 2 * norm.sf(np.abs(z))
    p = np.where(se0 == 0, 1.0, p)
    se = np.sqrt(p_t * (1 - p_t) / n_t + p_c * (1 - p_c) / n_c)
    q = norm.ppf(1 - alpha / 2)
    return _out(diff, se, z, p, diff - q * se, diff + q * se)


def fisher_exact(x_c: int, n_c: int, x_t: int, n_t: int, alpha: float = 0.05) -> dict:
    """Small samples: Fisher's exact test (scipy) with a Newcombe hybrid-score CI (statsmodels)."""
    from scipy import stats
    from statsmodels.stats.proportion import confint_proportions_2indep

    p = float(stats.fisher_exact([[x_t, n_t - x_t], [x_c, n_c - x_c]]).pvalue)
    lo, hi = confint_proportions_2indep(x_t, n_t, x_c, n_c, method="newcomb", compare="diff", alpha=alpha)
    diff = x_t / n_t - x_c / n_c
    se = math.sqrt(max(x_t / n_t * (1 - x_t / n_t) / n_t + x_c / n_c * (1 - x_c / n_c) / n_c, 0.0))
    return _out(diff, se, float("nan"), p, float(lo), float(hi))


def needs_exact(x_c, n_c, x_t, n_t, min_expected: float = 5.0) -> bool:
    """The usual rule: the z-approximation is poor when any expected cell count is below 5."""
    pool = (x_c + x_t) / (n_c + n_t)
    cells = [n * pool for n in (n_c, n_t)] + [n * (1 - pool) for n in (n_c, n_t)]
    return min(cells) < min_expected


def relative_lift(n_c, mean_c, var_c, n_t, mean_t, var_t, alpha: float = 0.05) -> dict:
    """Relative lift mean_t / mean_c - 1 with a delta-method CI (independent arms).

    Var(m_t / m_c) ~= Var(m_t) / m_c^2 + m_t^2 Var(m_c) / m_c^4, where Var(m) = s^2 / n. The ratio's
    sampling distribution is skewed when the control mean is poorly determined; the delta CI is the standard
    first-order answer (what GrowthBook and Statsig report), fine at A/B sample sizes.
    """
    if mean_c == 0:
        return {"estimate": None, "ci_low": None, "ci_high": None, "se": None}
    est = mean_t / mean_c - 1
    var = var_t / n_t / mean_c ** 2 + mean_t ** 2 * var_c / n_c / mean_c ** 4
    se = math.sqrt(var)
    q = float(_norm().ppf(1 - alpha / 2))
    return {"estimate": est, "ci_low": est - q * se, "ci_high": est + q * se, "se": se}


def bootstrap_diff_hist(levels, counts_c, counts_t, *, alpha: float = 0.05, n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean difference for a discrete metric, from its histograms.

    Resampling n rows with replacement from a histogram is one multinomial draw over its levels, so the
    bootstrap costs O(n_boot x levels) whatever n is.
    """
    rng = np.random.default_rng(seed)
    levels = np.asarray(levels, dtype=float)
    means = []
    for counts in (counts_c, counts_t):
        counts = np.asarray(counts, dtype=np.int64)
        n = int(counts.sum())
        draws = rng.multinomial(n, counts / n, size=n_boot)
        means.append(draws @ levels / n)
    d = means[1] - means[0]
    return float(np.quantile(d, alpha / 2)), float(np.quantile(d, 1 - alpha / 2))


def bootstrap_diff_buckets(sums_c, counts_c, sums_t, counts_t, *, alpha: float = 0.05, n_boot: int = 2000,
                           seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean difference from bucket aggregates (a 'bucket bootstrap').

    Each arm's rows are dealt into K buckets (one row per bucket when n is small: the plain row bootstrap);
    resampling the K non-empty buckets with replacement and taking sum/count reproduces the row bootstrap's
    spread for i.i.d. rows at a cost independent of n.
    """
    rng = np.random.default_rng(seed)
    means = []
    for sums, counts in ((sums_c, counts_c), (sums_t, counts_t)):
        sums, counts = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
        keep = counts > 0
        sums, counts = sums[keep], counts[keep]
        k = sums.size
        idx = rng.integers(0, k, size=(n_boot, k))  # k buckets drawn with replacement, n_boot times
        means.append(sums[idx].sum(axis=1) / counts[idx].sum(axis=1))
    d = means[1] - means[0]
    return float(np.quantile(d, alpha / 2)), float(np.quantile(d, 1 - alpha / 2))


def _out(diff, se, stat, p, lo, hi, df=None) -> dict:
    def f(x):
        x = np.asarray(x, dtype=float)
        return float(x) if x.ndim == 0 else x

    out = {"estimate": f(diff), "se": f(se), "stat": f(stat), "p_value": f(p), "ci_low": f(lo), "ci_high": f(hi)}
    if df is not None:
        out["df"] = f(df)
    return out
