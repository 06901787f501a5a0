"""Paired comparisons and p-value adjustment equal scipy/statsmodels on reference cases."""

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from flywheel.evals.ab.multiple import adjust_pvalues
from flywheel.evals.ab.paired import compare_paired, signed_rank_p
from flywheel.foundation.errors import InputError


def test_paired_t_matches_scipy():
    rng = np.random.default_rng(1)
    c = rng.normal(0.5, 0.2, 40)
    t = c + rng.normal(0.05, 0.1, 40)
    r = compare_paired(c, t, metric="m", variant="b", control_name="a", test="t")
    ref = stats.ttest_rel(t, c)
    assert r["test"] == "paired_t"
    assert r["p_value"] == pytest.approx(ref.pvalue, abs=1e-12)
    ci = ref.confidence_interval(0.95)
    assert r["ci_low"] == pytest.approx(ci.low, abs=1e-9)
    assert r["ci_high"] == pytest.approx(ci.high, abs=1e-9)
    assert r["estimate"] == pytest.approx(np.mean(t - c), abs=1e-12)
    assert r["n"] == 40


def test_auto_picks_wilcoxon_for_ordinal_and_matches_scipy():
    rng = np.random.default_rng(2)
    c = rng.integers(1, 6, 60).astype(float)
    t = np.clip(c + rng.integers(-1, 3, 60), 1, 5).astype(float)
    r = compare_paired(list(c), list(t), metric="rating", variant="v2", control_name="v1")
    assert r["test"] == "wilcoxon_signed_rank" and "ordinal" in r["test_reason"]
    # One convention: zero differences stay in the ranking (zsplit), never silently dropped.
    assert (t == c).sum() > 5
    assert r["p_value"] == pytest.approx(stats.wilcoxon(t - c, zero_method="zsplit").pvalue, abs=1e-12)
    assert r["p_value"] != pytest.approx(stats.wilcoxon(t, c).pvalue, abs=1e-6)  # scipy's default drops zeros


def test_embeddings_comparisons_use_the_same_signed_rank_convention():
    from flywheel.evals.embeddings.compare import paired_test

    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, 40) / 4.0
    b = np.clip(a + rng.integers(-1, 2, 40) / 4.0, 0, 1)
    assert paired_test(b, a, "wilcoxon") == pytest.approx(signed_rank_p(b - a), abs=1e-15)


def test_small_identical_differences_give_the_exact_p_not_zero():
    # 8 identical non-zero differences: the exact signed-rank p is 2 / 2**8 = 0.0078, never 0.
    r = compare_paired([1, 2, 3, 4, 5, 6, 7, 8.5], [2, 3, 4, 5, 6, 7, 8, 9.5], metric="m", variant="b",
                       control_name="a", test="wilcoxon")
    assert r["p_value"] == pytest.approx(2 / 2 ** 8)
    r = compare_paired([1, 2, 3, 4, 5, 6, 7, 8.5], [2, 3, 4, 5, 6, 7, 8, 9.5], metric="m", variant="b",
                       control_name="a", test="t")
    assert r["p_value"] == pytest.approx(2 / 2 ** 8) and "exact signed-rank" in r["warning"]


def test_binary_outcomes_use_mcnemar_exact_with_a_matching_interval():
    from statsmodels.stats.contingency_tables import mcnemar

    # 30 cases: 4 gained (0 -> 1), 1 lost (1 -> 0), the rest concordant.
    c = [0] * 4 + [1] + [1] * 15 + [0] * 10
    t = [1] * 4 + [0] + [1] * 15 + [0] * 10
    r = compare_paired(c, t, metric="exact_match", variant="b", control_name="a")
    assert r["test"] == "mcnemar" and r["exact"] and (r["gained"], r["lost"]) == (4, 1)
    assert r["p_value"] == pytest.approx(mcnemar([[15, 1], [4, 10]], exact=True).pvalue)
    assert r["p_value"] == pytest.approx(0.375)  # binomial(5, 1/2): P(X <= 1) * 2
    assert r["estimate"] == pytest.approx(3 / 30)
    assert r["ci_low"] < r["estimate"] < r["ci_high"] and -1 <= r["ci_low"] and r["ci_high"] <= 1
    # no discordant pair: no evidence either way
    r = compare_paired([0, 1, 1, 0], [0, 1, 1, 0], metric="exact_match", variant="b", control_name="a")
    assert r["test"] == "mcnemar" and r["p_value"] == 1.0


def test_nan_pairs_dropped_and_counted():
    c = [1.0, 2.0, float("nan"), 4.0, 5.0, 3.0]
    t = [2.0, 2.5, 3.0, float("nan"), 5.5, 3.5]
    r = compare_paired(c, t, metric="m", variant="b", control_name="a", test="t")
    assert r["n"] == 4 and r["n_dropped"] == 2


def test_zero_variance_is_explicit():
    r = compare_paired([1, 2, 3], [2, 3, 4], metric="m", variant="b", control_name="a", test="t")
    assert r["warning"] and r["p_value"] == pytest.approx(0.25) and r["ci_low"] == r["ci_high"] == 1.0
    r = compare_paired([1, 2, 3], [1, 2, 3], metric="m", variant="b", control_name="a")
    assert r["p_value"] == 1.0


def test_bad_input():
    with pytest.raises(InputError, match="equal-length"):
        compare_paired([1, 2], [1, 2, 3], metric="m", variant="b", control_name="a")
    with pytest.raises(InputError, match="at least 2"):
        compare_paired([1], [2], metric="m", variant="b", control_name="a")


@pytest.mark.parametrize("method,sm", [("holm", "holm"), ("bh", "fdr_bh"), ("bonferroni", "bonferroni")])
def test_adjust_matches_statsmodels(method, sm):
    p = [0.01, 0.04, 0.03, 0.2, 0.001]
    assert adjust_pvalues(p, method) == pytest.approx(list(multipletests(p, method=sm)[1]), abs=1e-15)


def test_adjust_keeps_nan_out_of_family():
    out = adjust_pvalues([0.01, float("nan"), 0.04], "holm")
    assert math.isnan(out[1])
    assert out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.04)
    with pytest.raises(InputError):
        adjust_pvalues([0.1], "nope")
