"""Deterministic salted-hash assignment: stable across processes, uniform, independent across experiments."""

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from flywheel.evals.ab.assign import assign, bucket
from flywheel.foundation.errors import InputError


def test_stable_across_processes():
    here = [assign(f"user-{i}", "exp-1", ["a", "b", "c"]) for i in range(50)]
    code = ("from flywheel.evals.ab.assign import assign; "
            "print(','.join(assign(f'user-{i}', 'exp-1', ['a','b','c']) for i in range(50)))")
    # a fresh interpreter with a different hash seed: Python's hash() would change, ours must not
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=str(__import__("pathlib").Path(__file__)
                                                                              .resolve().parents[2]))
    assert out.stdout.strip().split(",") == here
    # pinned values: first 8 bytes of sha256("exp-1:user-0") / 2^64, the same on every machine
    assert bucket("user-0", "exp-1") == 0.09226649914008385
    assert here[:8] == ["a", "b", "c", "c", "b", "a", "b", "b"]


def test_uniform_split_and_weights():
    n = 20000
    got = [assign(i, "checkout-v2", {"control": 1, "treatment": 1}) for i in range(n)]
    k = sum(g == "control" for g in got)
    assert stats.binomtest(k, n, 0.5).pvalue > 0.001
    got = [assign(i, "exp-w", {"a": 0.7, "b": 0.2, "c": 0.1}) for i in range(n)]
    counts = [got.count(v) for v in "abc"]
    assert stats.chisquare(counts, [0.7 * n, 0.2 * n, 0.1 * n]).pvalue > 0.001
    # buckets are uniform on [0, 1)
    u = np.array([bucket(i, "exp-u") for i in range(n)])
    assert stats.kstest(u, "uniform").pvalue > 0.001


def test_independent_across_experiments():
    n = 20000
    a = [assign(i, "exp-A", ["x", "y"]) for i in range(n)]
    b = [assign(i, "exp-B", ["x", "y"]) for i in range(n)]
    table = [[sum(1 for p, q in zip(a, b) if p == r and q == c) for c in "xy"] for r in "xy"]
    assert stats.chi2_contingency(table).pvalue > 0.001


def test_bad_variants():
    with pytest.raises(InputError):
        assign("u", "e", [])
    with pytest.raises(InputError):
        assign("u", "e", {"a": -1, "b": 2})
