"""Paired comparisons and p-value adjustment equal scipy/statsmodels on reference cases."""

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from flywheel.evals.ab.multiple import adjust_pvalues
from flywheel.evals.ab.paired import compare_paired
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
    assert r["p_value"] == pytest.approx(stats.wilcoxon(t, c).pvalue, abs=1e-12)


def test_nan_pairs_dropped_and_counted():
    c = [1.0, 2.0, float("nan"), 4.0, 5.0, 3.0]
    t = [2.0, 2.5, 3.0, float("nan"), 5.5, 3.5]
    r = compare_paired(c, t, metric="m", variant="b", control_name="a", test="t")
    assert r["n"] == 4 and r["n_dropped"] == 2


def test_zero_variance_is_explicit():
    r = compare_paired([1, 2, 3], [2, 3, 4], metric="m", variant="b", control_name="a", test="t")
    assert r["warning"] and r["p_value"] == 0.0 and r["ci_low"] == r["ci_high"] == 1.0
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
