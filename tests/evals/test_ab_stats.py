"""Every A/B statistic equals scipy/statsmodels on reference cases; A/A simulations are calibrated.

The A/A simulations run the same aggregate-level functions the engine uses, vectorised over thousands of
experiments (per-experiment n / mean / variance from one pass), so they take a few seconds.
"""

import math

import numpy as np
import pytest
from scipy import integrate, stats
from statsmodels.stats.power import NormalIndPower, TTestIndPower
from statsmodels.stats.proportion import (confint_proportions_2indep, proportion_effectsize,
                                          proportions_ztest)

from flywheel.evals.ab import bayes, power, sequential
from flywheel.evals.ab import stats as abs_
from flywheel.evals.ab.cuped import cuped_adjust
from flywheel.evals.ab.engine import aggregate
from flywheel.evals.ab.srm import srm_check

TOL = 1e-9


def _moments(x):
    return len(x), float(np.mean(x)), float(np.var(x, ddof=1))


# --------------------------------------------------------------------------------------------- reference cases
@pytest.mark.parametrize("seed,nc,nt", [(0, 30, 45), (1, 500, 480), (2, 7, 9)])
def test_welch_equals_scipy(seed, nc, nt):
    rng = np.random.default_rng(seed)
    c, t = rng.normal(10, 2, nc), rng.normal(10.5, 3, nt)
    r = abs_.welch(*_moments(c), *_moments(t), alpha=0.05)
    ref = stats.ttest_ind(t, c, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert r["p_value"] == pytest.approx(ref.pvalue, abs=TOL)
    assert r["stat"] == pytest.approx(ref.statistic, abs=TOL)
    assert r["ci_low"] == pytest.approx(ci.low, abs=TOL) and r["ci_high"] == pytest.approx(ci.high, abs=TOL)
    assert r["df"] == pytest.approx(ref.df, abs=TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mann_whitney_from_histograms_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    c = rng.choice([1, 2, 3, 4, 5], 120, p=[.1, .2, .3, .25, .15])
    t = rng.choice([1, 2, 3, 4, 5], 140, p=[.05, .15, .3, .3, .2])
    levels = np.arange(1, 6)
    hc = np.array([(c == v).sum() for v in levels])
    ht = np.array([(t == v).sum() for v in levels])
    r = abs_.mann_whitney_from_hist(hc, ht)
    ref = stats.mannwhitneyu(t, c, method="asymptotic")
    assert r["p_value"] == pytest.approx(ref.pvalue, abs=TOL)
    assert r["u"] == pytest.approx(ref.statistic, abs=TOL)


def test_two_proportion_equals_statsmodels():
    x_c, n_c, x_t, n_t = 412, 1000, 455, 1010
    r = abs_.two_proportion(x_c, n_c, x_t, n_t)
    z, p = proportions_ztest([x_t, x_c], [n_t, n_c])
    lo, hi = confint_proportions_2indep(x_t, n_t, x_c, n_c, method="wald", compare="diff")
    assert r["p_value"] == pytest.approx(p, abs=TOL) and r["stat"] == pytest.approx(z, abs=TOL)
    assert r["ci_low"] == pytest.approx(lo, abs=TOL) and r["ci_high"] == pytest.approx(hi, abs=TOL)


def test_fisher_exact_used_when_small():
    assert abs_.needs_exact(1, 12, 6, 11) and not abs_.needs_exact(412, 1000, 455, 1010)
    r = abs_.fisher_exact(1, 12, 6, 11)
    assert r["p_value"] == pytest.approx(stats.fisher_exact([[6, 5], [1, 11]]).pvalue, abs=TOL)
    lo, hi = confint_proportions_2indep(6, 11, 1, 12, method="newcomb", compare="diff")
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), abs=TOL)


def test_relative_lift_delta_method():
    # The delta-method SE equals the first-order Taylor formula and covers the truth in simulation.
    r = abs_.relative_lift(1000, 4.0, 1.0, 1000, 4.2, 1.1)
    se = math.sqrt(1.1 / 1000 / 16 + 4.2 ** 2 * 1.0 / 1000 / 4.0 ** 4)
    assert r["estimate"] == pytest.approx(0.05, abs=TOL) and r["se"] == pytest.approx(se, abs=TOL)
    rng = np.random.default_rng(5)
    nexp, n = 4000, 400
    mc = rng.normal(4.0, 1.0, (nexp, n)).mean(1)
    mt = rng.normal(4.2, 1.0, (nexp, n)).mean(1)
    cover = 0
    for a, b in zip(mc[:2000], mt[:2000]):
        rl = abs_.relative_lift(n, a, 1.0, n, b, 1.0)
        cover += rl["ci_low"] <= 0.05 <= rl["ci_high"]
    assert 0.93 <= cover / 2000 <= 0.97


def test_bootstrap_cis_agree_with_t_interval():
    rng = np.random.default_rng(3)
    c, t = rng.integers(1, 6, 800), rng.integers(1, 6, 800) + (rng.random(800) < 0.2)
    t = np.clip(t, 1, 5)
    levels = np.arange(1, 6)
    lo, hi = abs_.bootstrap_diff_hist(levels, [(c == v).sum() for v in levels], [(t == v).sum() for v in levels])
    w = abs_.welch(*_moments(c), *_moments(t))
    assert lo == pytest.approx(w["ci_low"], abs=0.02) and hi == pytest.approx(w["ci_high"], abs=0.02)
    x, y = rng.lognormal(0, 1, 3000), rng.lognormal(0.1, 1, 3000)
    K = 1000
    bl, bh = abs_.bootstrap_diff_buckets(np.bincount(np.arange(3000) % K, x), np.bincount(np.arange(3000) % K),
                                         np.bincount(np.arange(3000) % K, y), np.bincount(np.arange(3000) % K))
    w = abs_.welch(*_moments(x), *_moments(y))
    assert bl == pytest.approx(w["ci_low"], abs=0.03) and bh == pytest.approx(w["ci_high"], abs=0.03)


def test_srm_equals_scipy_and_flags_52_48():
    r = srm_check({"a": 10400, "b": 9600}, {"a": 0.5, "b": 0.5})
    assert r["p_value"] == pytest.approx(stats.chisquare([10400, 9600]).pvalue, abs=TOL)
    assert r["status"] == "alert"
    assert srm_check({"a": 10050, "b": 9950})["status"] == "ok"
    r = srm_check({"a": 7070, "b": 2930}, {"a": 0.7, "b": 0.3})
    assert r["status"] == "ok"
    assert srm_check({"a": 5130, "b": 4870})["status"] == "warning"  # p ~ 0.009


def test_power_equals_statsmodels_and_textbook():
    # Cohen: d = 0.5, alpha .05, power .8 -> 64 per group
    assert power.n_for_mean(0.5, 1.0) == 64
    assert power.n_for_mean(0.2, 1.1) == math.ceil(TTestIndPower().solve_power(0.2 / 1.1, alpha=0.05, power=0.8))
    h = proportion_effectsize(0.45, 0.40)
    assert power.n_for_proportion(0.40, 0.05) == math.ceil(NormalIndPower().solve_power(h, alpha=0.05, power=0.8))
    mde = power.mde_for_proportion(0.40, 1500)
    assert power.n_for_proportion(0.40, mde) in (1500, 1501)
    m = power.mde_for_mean(200, 1.0)
    assert power.n_for_mean(m, 1.0) in (200, 201)
    p = power.plan(metric_type="proportion", baseline=0.4, daily_units=1000, days=7)
    assert p["solve"] == "mde" and p["n_per_arm"] == 3500 and p["assumptions"]


def test_bayes_equals_integrals():
    est, se = 0.1, 0.08
    r = bayes.chance_to_beat(est, se)
    assert r["chance_to_beat_control"] == pytest.approx(stats.norm.cdf(est / se), abs=TOL)
    loss = integrate.quad(lambda x: max(0.0, -x) * stats.norm.pdf(x, est, se), -2, 2, points=[0])[0]
    assert r["expected_loss"] == pytest.approx(loss, abs=1e-9)
    r2 = bayes.chance_to_beat(est, se, higher_is_better=False)
    assert r2["chance_to_beat_control"] == pytest.approx(1 - r["chance_to_beat_control"], abs=TOL)


def test_cuped_reduces_variance_by_rho_squared():
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1, 20000)
    y = 0.8 * x + rng.normal(0, 0.6, 20000)  # corr = 0.8
    y_adj, info = cuped_adjust(y, x)
    assert info["theta"] == pytest.approx(np.polyfit(x, y, 1)[0], abs=1e-9)
    assert info["variance_reduction"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, abs=1e-3)
    assert y_adj.mean() == pytest.approx(y.mean(), abs=1e-9)


# --------------------------------------------------------------------------------------------- A/A calibration
def test_aa_welch_false_positive_rate_and_coverage():
    rng = np.random.default_rng(2026)
    nexp, n = 10_000, 200
    # skewed outcome (lognormal latency): the CLT has to do the work, as in production
    y = rng.lognormal(0, 0.6, 2 * nexp * n)
    # the engine's own aggregation: every (experiment, arm) is one "variant" of a single bincount pass
    agg = aggregate(y, np.repeat(np.arange(2 * nexp), n), 2 * nexp, discrete=False, buckets=1)
    c, t = slice(0, None, 2), slice(1, None, 2)
    r = abs_.welch(agg.n[c], agg.mean[c], agg.var[c], agg.n[t], agg.mean[t], agg.var[t], 0.05)
    fpr = float((r["p_value"] < 0.05).mean())
    cover = float(((r["ci_low"] <= 0) & (0 <= r["ci_high"])).mean())
    assert 0.04 <= fpr <= 0.06, fpr
    assert 0.94 <= cover <= 0.96, cover


def test_aa_two_proportion_calibrated():
    rng = np.random.default_rng(11)
    nexp, n = 10_000, 1000
    xc, xt = rng.binomial(n, 0.3, nexp), rng.binomial(n, 0.3, nexp)
    r = abs_.two_proportion(xc, n, xt, n)
    assert 0.04 <= float((r["p_value"] < 0.05).mean()) <= 0.06
    assert 0.94 <= float(((r["ci_low"] <= 0) & (r["ci_high"] >= 0)).mean()) <= 0.96


def test_aa_mann_whitney_calibrated():
    rng = np.random.default_rng(12)
    p = [.1, .15, .3, .3, .15]
    nexp, n = 2000, 150
    hc = rng.multinomial(n, p, nexp)
    ht = rng.multinomial(n, p, nexp)
    pv = np.array([abs_.mann_whitney_from_hist(a, b)["p_value"] for a, b in zip(hc, ht)])
    assert 0.04 <= float((pv < 0.05).mean()) <= 0.06


def test_sequential_stays_below_alpha_when_peeking_every_batch():
    rng = np.random.default_rng(99)
    nexp, batches, per = 4000, 20, 50
    c = rng.normal(0, 1, (nexp, batches, per))
    t = rng.normal(0, 1, (nexp, batches, per))
    n = per * np.arange(1, batches + 1)
    cs1, cs2 = np.cumsum(c.sum(2), 1), np.cumsum((c ** 2).sum(2), 1)
    ts1, ts2 = np.cumsum(t.sum(2), 1), np.cumsum((t ** 2).sum(2), 1)
    mc, mt = cs1 / n, ts1 / n
    vc, vt = (cs2 - n * mc ** 2) / (n - 1), (ts2 - n * mt ** 2) / (n - 1)
    est, se = mt - mc, np.sqrt(vc / n + vt / n)
    seq = sequential.msprt(est, se, n, alpha=0.05, tuning_n=500)
    always_valid = sequential.running_min_p(seq["p_value"])[:, -1]
    fpr_seq = float((always_valid < 0.05).mean())
    naive = float((2 * stats.norm.sf(np.abs(est / se)) < 0.05).any(axis=1).mean())
    assert fpr_seq <= 0.05, fpr_seq
    assert naive > 0.15  # peeking at fixed-horizon p-values inflates the error rate ~4x: why the CS exists
    # the confidence sequence holds at every look simultaneously
    miss = ((seq["ci_low"] > 0) | (seq["ci_high"] < 0)).any(axis=1).mean()
    assert miss <= 0.05


def test_sequential_detects_real_effect():
    rng = np.random.default_rng(4)
    n = 4000
    c, t = rng.normal(0, 1, n), rng.normal(0.15, 1, n)
    w = abs_.welch(*_moments(c), *_moments(t))
    s = sequential.msprt(w["estimate"], w["se"], n, tuning_n=1000)
    assert s["p_value"] < 0.05 and s["ci_low"] < w["ci_low"] and s["ci_high"] > w["ci_high"]
