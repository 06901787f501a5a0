"""Are two models really different on this task? Paired statistics on per-query (per-pair) metric vectors.

For each pair of models on a task: the paired bootstrap CI of the mean difference, a paired test (Wilcoxon
signed-rank by default, or a sign-flip permutation test; scipy.stats), Holm's correction across all pairs of the
task (statsmodels), and the smallest difference the task could detect at 80% power (statsmodels TTestPower on
the observed spread of differences). A non-significant difference on a task with fewer than `min_queries`
queries is reported as "too few queries to tell", not as "no difference": medline has 20 queries.

STS has no per-query metric (Spearman is a property of the whole set), so its comparison bootstraps pairs of
sentences and compares the two Spearman correlations on each resample; the p-value is the two-sided bootstrap
proportion.
"""

from __future__ import annotations

import itertools
import math
import numpy as np


def paired_bootstrap_ci(diff: np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05):
    diff = np.asarray(diff, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def mean_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Bootstrap CI of one model's mean metric over queries (how much the task's query sample moves it)."""
    return paired_bootstrap_ci(np.asarray(values, float), n_boot, seed, alpha)


def correlation_ci(sims: np.ndarray, gold: np.ndarray, metric: str = "spearman", n_boot: int = 1000, seed: int = 0,
                   alpha: float = 0.05) -> tuple[float, float]:
    """Bootstrap (over pairs) CI of one model's Spearman/Pearson correlation with the gold scores."""
    gold = np.asarray(gold, float)
    idx = np.random.default_rng(seed).integers(0, len(gold), size=(n_boot, len(gold)))
    boots = _rowwise_corr(np.asarray(sims, float)[idx], gold[idx], metric)
    return float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))


def _rowwise_corr(x: np.ndarray, y: np.ndarray, metric: str) -> np.ndarray:
    """Pearson correlation of each row of x with the same row of y (vectorised over resamples)."""
    from scipy.stats import rankdata

    if metric == "spearman":  # Spearman = Pearson on (average) ranks, ranked within each resample
        x, y = rankdata(x, axis=-1), rankdata(y, axis=-1)
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    return (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))


def paired_test(a: np.ndarray, b: np.ndarray, test: str = "wilcoxon", seed: int = 0, n_resamples: int = 9999) -> float:
    from scipy import stats

    diff = np.asarray(a, float) - np.asarray(b, float)
    if np.allclose(diff, 0):
        return 1.0
    if test == "wilcoxon":
        # The project's one signed-rank convention: tied (zero-difference) queries stay in the ranking (zsplit);
        # with nDCG many queries tie, and dropping them would overstate the evidence.
        from flywheel.evals.ab.paired import signed_rank_p

        return signed_rank_p(diff)
    if test == "permutation":
        res = stats.permutation_test((diff,), np.mean, permutation_type="samples", n_resamples=n_resamples,
                                     alternative="two-sided", random_state=seed)
        return float(res.pvalue)
    raise ValueError(f"unknown paired test {test!r} (wilcoxon | permutation)")


def detectable_difference(diff: np.ndarray, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest mean difference a paired t-test on n queries would detect with this power (same spread)."""
    from statsmodels.stats.power import TTestPower

    n = len(diff)
    sd = float(np.std(diff, ddof=1)) if n > 1 else float("nan")
    if n < 3 or not math.isfinite(sd) or sd == 0:
        return float("nan")
    d = TTestPower().solve_power(nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(d * sd)


def compare_models(per_query: dict[str, np.ndarray], *, task: str, metric: str, test: str = "wilcoxon",
                   n_boot: int = 2000, alpha: float = 0.05, min_queries: int = 30, seed: int = 0) -> list[dict]:
    """All pairs of models on one task/metric (same queries, same order). Rows sorted by Holm-adjusted p."""
    rows = []
    models = list(per_query)
    for a, b in itertools.combinations(models, 2):
        x, y = np.asarray(per_query[a], float), np.asarray(per_query[b], float)
        if len(x) != len(y):
            raise ValueError(f"{task}: {a} and {b} were scored on different queries ({len(x)} vs {len(y)})")
        diff = x - y
        lo, hi = paired_bootstrap_ci(diff, n_boot, seed, alpha)
        rows.append({"task": task, "metric": metric, "model_a": a, "model_b": b, "n": len(diff),
                     "mean_a": float(x.mean()), "mean_b": float(y.mean()), "estimate": float(diff.mean()),
                     "ci_low": lo, "ci_high": hi, "test": test, "p_value": paired_test(x, y, test, seed),
                     "detectable_diff": detectable_difference(diff, alpha)})
    return _finish(rows, alpha, min_queries)


def compare_correlations(sims: dict[str, np.ndarray], gold: np.ndarray, *, task: str, metric: str = "spearman",
                         n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> list[dict]:
    """Pairs of models on an STS task: bootstrap over sentence pairs of the difference in correlation."""
    gold = np.asarray(gold, float)
    n = len(gold)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    full = {m: float(_rowwise_corr(np.asarray(v, float)[None], gold[None], metric)[0]) for m, v in sims.items()}
    gold_b = gold[idx]
    boots = {m: _rowwise_corr(np.asarray(v, float)[idx], gold_b, metric) for m, v in sims.items()}
    rows = []
    for a, b in itertools.combinations(list(sims), 2):
        d = boots[a] - boots[b]
        p = 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0)))
        rows.append({"task": task, "metric": metric, "model_a": a, "model_b": b, "n": n, "mean_a": float(full[a]),
                     "mean_b": float(full[b]), "estimate": float(full[a] - full[b]),
                     "ci_low": float(np.quantile(d, alpha / 2)), "ci_high": float(np.quantile(d, 1 - alpha / 2)),
                     "test": "paired bootstrap", "p_value": min(1.0, max(p, 1.0 / n_boot)),
                     "detectable_diff": float("nan")})
    return _finish(rows, alpha, min_queries=0)


def _finish(rows: list[dict], alpha: float, min_queries: int) -> list[dict]:
    from flywheel.evals.ab.multiple import adjust_pvalues

    adj = adjust_pvalues([r["p_value"] for r in rows], "holm")
    for r, p in zip(rows, adj):
        r["p_adjusted"] = p
        r["significant"] = bool(p < alpha)
        r["note"] = ""
        if r["significant"]:
            better = r["model_a"] if r["estimate"] > 0 else r["model_b"]
            r["verdict"] = f"{better} better"
        elif r["n"] < min_queries:
            r["verdict"] = f"too few queries to tell (n={r['n']} < {min_queries})"
            r["note"] = (f"{r['task']}: only {r['n']} queries; differences below ~{r['detectable_diff']:.3f} "
                         f"{r['metric']} are not detectable at 80% power")
        else:
            r["verdict"] = "no significant difference"
    return sorted(rows, key=lambda r: r["p_adjusted"])


def vs_best(rows: list[dict], best: str, model: str) -> str:
    """Leaderboard mark for `model` against the task's best model."""
    if model == best:
        return "best"
    for r in rows:
        if {r["model_a"], r["model_b"]} == {best, model}:
            if r["significant"]:
                return f"worse* (p_adj={r['p_adjusted']:.3g})"
            if r["verdict"].startswith("too few"):
                return f"too few queries to tell (n={r['n']})"
            return f"n.s. (p_adj={r['p_adjusted']:.3g})"
    return ""
