"""The analysis: outcome rows -> per-variant aggregates -> comparisons -> verdicts, as one JSON-able dict.

Flow (independent design, the default):
  1. clean: rows without a variant, with a variant not in the configured list, without a unit, or whose unit
     shows up in more than one variant are excluded and counted by reason; a bad outcome value (NaN,
     non-numeric, out of range) excludes the row from that metric only, also counted.
  2. collapse to the randomisation unit: a user with 40 conversations counts once (the mean of their rows),
     because units, not rows, are independent; otherwise the tests would be overconfident.
  3. aggregate per variant with np.bincount: n, shifted sum, sum of squares, histogram for discrete metrics.
     Everything after this step costs O(variants x levels), whatever the number of rows.
  4. per variant x metric: the test that fits the metric (Welch for means, Mann-Whitney for ordinal ratings,
     two-proportion z or Fisher exact for rates, non-inferiority for guardrails), a delta-method relative lift,
     a bootstrap CI cross-check, Bayesian chance-to-beat, an always-valid sequential p / confidence sequence.
  5. Holm (or BH) across variants x metrics, guardrails as their own family; SRM; verdicts.
Paired design (`paired=True`): the unit is an item scored under every variant; per-item differences go to
paired t / Wilcoxon (flywheel.evals.ab.paired).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from flywheel.evals.ab import bayes, power, sequential, stats
from flywheel.evals.ab.config import AbConfig, MetricConfig
from flywheel.evals.ab.cuped import cuped_adjust
from flywheel.evals.ab.data import to_numeric
from flywheel.evals.ab.multiple import adjust_pvalues
from flywheel.evals.ab.paired import ORDINAL_MAX_LEVELS, compare_paired
from flywheel.evals.ab.srm import srm_check
from flywheel.evals.ab.verdict import decide
from flywheel.foundation.errors import InputError

# Internal sizes, not settings: the bootstrap's bucket count for continuous metrics and the located examples kept
# per exclusion reason.
BUCKETS = 1000
MAX_EXAMPLES = 5


class _Problems:
    """Counts of unusable rows by reason, plus a few located examples of each."""

    def __init__(self, max_examples: int):
        self.counts: Counter = Counter()
        self.warnings: list[str] = []
        self.units_in_multiple_variants = 0
        self.examples: dict[str, list[str]] = {}
        self.max = max_examples

    def add(self, reason: str, mask: np.ndarray, df=None, col: str | None = None) -> None:
        k = int(mask.sum())
        if not k:
            return
        self.counts[reason] += k
        ex = self.examples.setdefault(reason, [])
        if df is not None and "_file" in df.columns and len(ex) < self.max:
            idx = np.flatnonzero(mask)[: self.max - len(ex)]
            for i in idx:
                val = df[col].iloc[i] if col else None
                ex.append(f"{df['_file'].iloc[i]}:{df['_line'].iloc[i]}" + (f": {col}={val!r:.60}" if col else ""))

    def as_dict(self) -> dict:
        return {"by_reason": dict(self.counts), "examples": {k: v for k, v in self.examples.items() if v}}


# ----------------------------------------------------------------------------------------------- cleaning

def _variant_codes(df, s: AbConfig, probs: _Problems) -> tuple[np.ndarray, list[str]]:
    import pandas as pd

    if s.variant not in df.columns:
        raise InputError(f"variant column {s.variant!r} not found; columns: {[c for c in df.columns if c[0] != '_']}")
    col = df[s.variant]
    if isinstance(col.dtype, pd.CategoricalDtype):
        codes = col.cat.codes.to_numpy().astype(np.int64)
        names = [str(x) for x in col.cat.categories]
    else:
        codes, uniq = pd.factorize(col, use_na_sentinel=True)
        codes = codes.astype(np.int64)
        names = [str(x) for x in uniq]
    # "" or whitespace is as missing as None
    for i, n in enumerate(names):
        if not n.strip():
            codes[codes == i] = -1
    probs.add("missing_variant", codes < 0, df, s.variant)
    if s.variants:
        unknown = [i for i, n in enumerate(names) if n not in s.variants]
        if unknown:
            mask = np.isin(codes, unknown)
            probs.add("unknown_variant", mask, df, s.variant)
            codes = np.where(mask, -1, codes)
    counts = np.bincount(codes + 1, minlength=len(names) + 1)[1:]
    present = [n for i, n in enumerate(names) if counts[i] > 0]
    # Reorder codes: control first, then configured order (or order of appearance).
    control = s.control or (s.variants[0] if s.variants else ("control" if "control" in present else
                                                                 sorted(present)[0] if present else None))
    if control not in present:
        raise InputError(f"control variant {control!r} has no usable data; variants with data: {present or 'none'}"
                         + (f" (configured: {s.variants})" if s.variants else ""))
    if len(present) < 2:
        raise InputError(f"only one variant ({present[0]!r}) has data: nothing to compare against the control")
    order = [control] + [v for v in (s.variants or sorted(present)) if v in present and v != control]
    remap = np.full(len(names) + 1, -1, dtype=np.int64)
    for new, n in enumerate(order):
        remap[names.index(n)] = new
    return remap[codes], order  # codes == -1 index the trailing -1


def _unit_codes(df, s: AbConfig, vcodes: np.ndarray, probs: _Problems) -> tuple[np.ndarray | None, np.ndarray]:
    """Unit index per row (or None: each row is a unit) and the cleaned variant codes."""
    import pandas as pd

    if not s.unit:
        return None, vcodes
    if s.unit not in df.columns:
        raise InputError(f"unit column {s.unit!r} not found; columns: {[c for c in df.columns if c[0] != '_']}"
                         " (pass --unit COL, or unit=null to treat each row as a unit)")
    ucodes, uniq = pd.factorize(df[s.unit], use_na_sentinel=True)
    ucodes = ucodes.astype(np.int64)
    if len(ucodes) and not (ucodes >= 0).any():
        raise InputError(f"unit column {s.unit!r} is empty in every row (pass --unit COL for the right column, or "
                         "--unit none to treat each row as a unit)")
    miss = (ucodes < 0) & (vcodes >= 0)
    probs.add("missing_unit", miss, df, s.unit)
    vcodes = np.where(ucodes < 0, -1, vcodes)
    ok = vcodes >= 0
    n_units = len(uniq)
    if ok.any():
        V = int(vcodes.max()) + 1
        pairs = np.unique(ucodes[ok] * V + vcodes[ok])
        per_unit = np.bincount(pairs // V, minlength=n_units)
        multi = per_unit > 1
        if multi.any():
            # A unit seen in two variants was exposed to both: its outcomes belong to neither arm.
            mask = ok & multi[np.where(ucodes >= 0, ucodes, 0)]
            probs.add("unit_in_multiple_variants", mask, df, s.unit)
            probs.units_in_multiple_variants = int(multi.sum())
            probs.warnings.append(
                f"{int(multi.sum())} unit(s) appear in more than one variant ({int(mask.sum())} rows excluded): "
                "assignment is broken for them (a unit must stay in one arm); check the randomisation")
            vcodes = np.where(mask, -1, vcodes)
    return ucodes, vcodes


def _resolve_kind(m: MetricConfig, y: np.ndarray) -> str:
    if m.kind != "auto":
        return m.kind
    if m.threshold is not None:
        return "rate"
    levels = np.unique(y[: 200_000])
    if levels.size <= 2 and np.isin(levels, [0.0, 1.0]).all():
        return "rate"
    if levels.size <= ORDINAL_MAX_LEVELS and np.unique(y).size <= ORDINAL_MAX_LEVELS:
        return "ordinal"
    return "mean"


def _metric_values(df, m: MetricConfig, vcodes: np.ndarray, probs: _Problems,
                   cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values, usable mask) for one metric; rates are turned into 0/1 here."""
    column = m.source_column
    if column not in df.columns:
        raise InputError(f"metric {m.name}: column {column!r} not found; columns: "
                         f"{[c for c in df.columns if c[0] != '_']}")
    y, bad = cache[column] if cache is not None and column in cache else to_numeric(df[column])
    if cache is not None:
        cache[column] = (y, bad)
    active = vcodes >= 0
    if bad is not None:
        probs.add(f"{m.name}: missing or non-numeric", bad & active, df, column)
        ok = active & ~bad
    else:
        ok = active
    out = None
    if m.min is not None:
        out = ok & (y < m.min)
    if m.max is not None:
        out = ok & (y > m.max) if out is None else out | (ok & (y > m.max))
    if m.kind == "rate" and m.threshold is None:
        notbin = ok & (y != 0) & (y != 1)
        out = notbin if out is None else out | notbin
    if out is not None and out.any():
        probs.add(f"{m.name}: out of range" + (f" [{m.min}, {m.max}]" if m.min is not None or m.max is not None
                                                else " (rate needs 0/1)"), out, df, column)
        ok = ok & ~out
    if m.threshold is not None:
        y = (y >= m.threshold).astype(np.int8)  # rows that are not ok are masked out downstream
    return y, ok


def _collapse(y, ok, vcodes, ucodes):
    """Per-unit means. Returns (unit values, unit variant codes, max rows per unit)."""
    if ucodes is None:
        return (y, vcodes, 1) if ok.all() else (y[ok], vcodes[ok], 1)
    u = ucodes[ok]
    n_units = int(ucodes.max()) + 1
    cnt = np.bincount(u, minlength=n_units)
    if cnt.max() <= 1:
        return y[ok], vcodes[ok], 1
    sums = np.bincount(u, weights=y[ok], minlength=n_units)
    uvar = np.full(n_units, -1, dtype=np.int64)
    uvar[u] = vcodes[ok]
    have = cnt > 0
    return sums[have] / cnt[have], uvar[have], int(cnt.max())


# ----------------------------------------------------------------------------------------------- aggregates

@dataclass
class Agg:
    n: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    levels: np.ndarray | None = None
    hist: np.ndarray | None = None          # [variant, level]
    bucket_sums: np.ndarray | None = None   # [variant, bucket]
    bucket_counts: np.ndarray | None = None


def aggregate(y: np.ndarray, codes: np.ndarray, n_variants: int, *, discrete: bool, buckets: int = 1000) -> Agg:
    """Per-variant n, mean, variance (+ histogram or bootstrap buckets) in one to three bincount passes.

    Discrete metrics: one histogram pass; n, mean and variance then come from the histogram (exact counts,
    variance centred per level, so no cancellation). Continuous metrics: bucket sums/counts give n and the
    sum; one more pass gives the sum of squares of the shifted values.
    """
    V = n_variants
    if discrete and y.size:
        lo, hi = float(y.min()), float(y.max())
        is_int = np.issubdtype(y.dtype, np.integer)
        if hi - lo <= 10_000 and (is_int or np.array_equal(y, np.floor(y))):
            idx = y.astype(np.intp)
            if lo:
                idx -= int(lo)
            L = int(hi - lo) + 1
            hist = np.bincount(codes * L + idx, minlength=V * L).reshape(V, L)
            keep = hist.sum(axis=0) > 0
            levels, hist = (np.arange(L) + lo)[keep].astype(float), hist[:, keep]
        else:
            levels, inv = np.unique(y, return_inverse=True)
            L = levels.size
            hist = np.bincount(codes * L + inv.ravel(), minlength=V * L).reshape(V, L)
        n = hist.sum(axis=1).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = hist @ levels / n
            var = (hist * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / (n - 1)
        return Agg(n=n, mean=mean, var=var, levels=levels, hist=hist)
    # Rows are dealt into K buckets by row index (K = rows when there are at most `buckets` rows: then each
    # row is its own bucket and this is the plain row bootstrap). Empty buckets are dropped at resampling.
    K = int(max(1, min(buckets, codes.size)))
    shift = float(y[0]) if y.size else 0.0  # shifting keeps sum-of-squares variance exact to ~1e-12
    ys = y - shift
    b = codes * K + np.arange(codes.size) % K if K > 1 else codes
    bsum = np.bincount(b, weights=ys, minlength=V * K).reshape(V, K)
    bcnt = np.bincount(b, minlength=V * K).reshape(V, K).astype(float)
    n, s1 = bcnt.sum(axis=1), bsum.sum(axis=1)
    ys *= ys
    s2 = np.bincount(codes, weights=ys, minlength=V)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_s = s1 / n
        var = np.maximum((s2 - n * mean_s ** 2) / (n - 1), 0.0)
    return Agg(n=n, mean=mean_s + shift, var=var, bucket_sums=bsum, bucket_counts=bcnt)


# ----------------------------------------------------------------------------------------------- comparisons

def _compare_independent(m: MetricConfig, kind: str, agg: Agg, c: int, t: int, names: list[str], s: AbConfig,
                         cuped_info: dict | None, max_rows_per_unit: int) -> dict:
    nc, nt = agg.n[c], agg.n[t]
    if nc < 2 or nt < 2:
        raise InputError(f"metric {m.name}: {names[t]} vs {names[c]}: need >= 2 units per arm with usable values, "
                         f"got {int(nt)} and {int(nc)}")
    w = stats.welch(nc, agg.mean[c], agg.var[c], nt, agg.mean[t], agg.var[t], s.alpha)
    res = {"variant": names[t], "control": names[c], "metric": m.name, "kind": kind,
           "role": "guardrail" if m.guardrail else "primary/secondary",
           "higher_is_better": m.higher_is_better,
           "n": int(nc + nt), "n_control": int(nc), "n_treatment": int(nt),
           "mean_control": float(agg.mean[c]), "mean_treatment": float(agg.mean[t]),
           "sd_control": math.sqrt(agg.var[c]), "sd_treatment": math.sqrt(agg.var[t])}
    warnings = []
    if agg.var[c] == 0 and agg.var[t] == 0:
        # no sampling noise: the observed difference is the difference (p = 1 if none, else 0), no test needed
        warnings.append(f"zero variance in both arms ({m.name} is constant: {agg.mean[c]:g} vs {agg.mean[t]:g}); "
                        + ("no difference" if agg.mean[c] == agg.mean[t] else "the difference is exact"))
    binary = kind == "rate" and max_rows_per_unit == 1 and cuped_info is None
    if binary:
        xc, xt = round(agg.mean[c] * nc), round(agg.mean[t] * nt)
        if stats.needs_exact(xc, nc, xt, nt):
            r = stats.fisher_exact(int(xc), int(nc), int(xt), int(nt), s.alpha)
            test = "fisher_exact"
        else:
            r = stats.two_proportion(xc, nc, xt, nt, s.alpha)
            test = "two_proportion_z"
        est, se, lo, hi, p = r["estimate"], r["se"], r["ci_low"], r["ci_high"], r["p_value"]
        df_ = math.inf
    else:
        est, se, lo, hi, p, df_ = w["estimate"], w["se"], w["ci_low"], w["ci_high"], w["p_value"], w["df"]
        test = "welch_t" if kind != "rate" else "welch_t (per-unit rate)"
        if kind == "ordinal" and cuped_info is None and agg.hist is not None:
            mw = stats.mann_whitney_from_hist(agg.hist[c], agg.hist[t])
            test, p = "mann_whitney", mw["p_value"]
            res["prob_superiority"] = mw["prob_superiority"]
            res["welch_p_value"] = w["p_value"]
    if not math.isfinite(se) or se == 0:
        p = 1.0 if est == 0 else 0.0
        lo = hi = est
    res.update({"test": test, "estimate": est, "se": se, "ci_low": lo, "ci_high": hi, "p_value": float(p)})
    if cuped_info is not None:
        res["cuped"] = cuped_info
    lift = stats.relative_lift(nc, agg.mean[c], agg.var[c], nt, agg.mean[t], agg.var[t], s.alpha)
    res["relative_lift"] = {k: lift[k] for k in ("estimate", "ci_low", "ci_high")}
    # bootstrap cross-check of the difference CI
    if agg.hist is not None:
        bl, bh = stats.bootstrap_diff_hist(agg.levels, agg.hist[c], agg.hist[t], alpha=s.alpha,
                                           n_boot=s.n_boot, seed=s.seed)
    else:
        bl, bh = stats.bootstrap_diff_buckets(agg.bucket_sums[c], agg.bucket_counts[c], agg.bucket_sums[t],
                                              agg.bucket_counts[t], alpha=s.alpha, n_boot=s.n_boot, seed=s.seed)
    res["bootstrap_ci"] = [bl, bh]
    res["bayesian"] = bayes.chance_to_beat(est, se, higher_is_better=m.higher_is_better)
    if s.sequential.enabled:
        sq = sequential.msprt(est, se, (nc + nt) / 2, alpha=s.alpha, tuning_n=s.sequential.tuning_n)
        res["sequential"] = {"method": "mSPRT normal mixture (always valid)", "p_value": sq["p_value"],
                             "ci_low": sq["ci_low"], "ci_high": sq["ci_high"]}
    if m.guardrail:
        _noninferiority(res, m, se, df_, s.alpha)
    if warnings:
        res["warning"] = "; ".join(warnings)
    return res


def _noninferiority(res: dict, m: MetricConfig, se: float, df_: float, alpha: float) -> None:
    """H0: harm >= margin vs H1: harm < margin, harm = the difference in the bad direction."""
    from scipy import stats as sst

    harm = -res["estimate"] if m.higher_is_better else res["estimate"]
    margin_abs = m.margin * abs(res["mean_control"]) if m.margin_relative else m.margin
    if se > 0 and math.isfinite(se):
        stat = (margin_abs - harm) / se
        p_ni = float(sst.t.sf(stat, df_) if math.isfinite(df_) else sst.norm.sf(stat))
    else:
        p_ni = 0.0 if harm < margin_abs else 1.0
    res["p_value_difference"] = res["p_value"]
    res["test_difference"] = res["test"]
    res["test"] = "noninferiority_" + ("t" if math.isfinite(df_) else "z")
    res["p_value"] = p_ni
    res["margin_abs"] = margin_abs
    res["harm"] = harm
    res["role"] = "guardrail"


def _guardrail_status(res: dict, alpha: float) -> str:
    if res["p_adjusted"] < alpha:
        return "pass"
    harm_low = -res["ci_high"] if res["higher_is_better"] else res["ci_low"]
    # clearly worse: even the optimistic end of the CI is beyond the margin
    return "fail" if harm_low > res["margin_abs"] else "inconclusive"


# ----------------------------------------------------------------------------------------------- entry point

def analyze(df, s: AbConfig, *, problems: dict | None = None) -> dict:
    """The report dict (see module doc) for the metrics and settings of `s`. `df`: a pandas DataFrame with the
    variant, unit and metric columns (`_file`/`_line` columns, when present, locate bad rows). `problems`: rows
    the loader could not read."""
    metrics = s.metrics
    if not metrics:
        raise InputError("no metrics to analyse (give --metric COL or metrics in the config)")
    if not 0 < s.alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {s.alpha}")
    names_m = [m.name for m in metrics]
    if len(set(names_m)) != len(names_m):
        raise InputError(f"duplicate metric names: {names_m}")
    probs = _Problems(MAX_EXAMPLES)
    if problems and problems.get("invalid_json"):
        probs.counts["invalid_json"] += problems["invalid_json"]
        probs.examples["invalid_json"] = list(problems.get("examples", []))
    vcodes, names = _variant_codes(df, s, probs)
    primary = s.primary or next((m.name for m in metrics if not m.guardrail), metrics[0].name)
    if primary not in names_m:
        raise InputError(f"primary metric {primary!r} is not one of the metrics {names_m}")
    if s.paired:
        return _analyze_paired(df, metrics, s, vcodes, names, probs, primary)

    ucodes, vcodes = _unit_codes(df, s, vcodes, probs)
    V = len(names)
    # SRM on units (or rows when each row is a unit) that passed cleaning
    if ucodes is None:
        units = np.bincount(vcodes + 1, minlength=V + 1)[1:]
    else:
        ok = vcodes >= 0
        uvar = np.full(int(ucodes.max()) + 1, -1, dtype=np.int64)
        uvar[ucodes[ok]] = vcodes[ok]
        units = np.bincount(uvar[uvar >= 0], minlength=V)
    observed = {n: int(units[i]) for i, n in enumerate(names)}
    # A configured arm with no units at all is the most extreme sample-ratio mismatch: keep it in the check.
    for v in list(s.allocation or {}) + list(s.variants or []):
        if v not in observed:
            observed[v] = 0
            probs.warnings.append(f"configured variant {v!r} has no usable data")
    srm = srm_check(observed, s.allocation, warn_p=s.srm.warning_p, alert_p=s.srm.alert_p)

    comparisons, summaries, kinds = [], [], {}
    not_evaluated: list[dict] = []  # variant x metric pairs that no test could be run on, with the reason
    plan: dict[str, dict] = {}
    cache: dict = {}  # column -> parsed values: rating and success read the same column
    for m in metrics:
        y, ok = _metric_values(df, m, vcodes, probs, cache)
        yu, vu, max_rows = _collapse(y, ok, vcodes, ucodes)
        if yu.size == 0:
            raise InputError(f"metric {m.name}: no usable values (see excluded rows)")
        kind = _resolve_kind(m, yu)
        kinds[m.name] = kind
        cuped_info = None
        if m.covariate:
            if m.covariate not in df.columns:
                raise InputError(f"metric {m.name}: CUPED covariate column {m.covariate!r} not found")
            x, _ = to_numeric(df[m.covariate])  # NaN covariate = no adjustment for that unit
            x = x.astype(float)
            xu, _, _ = _collapse(x, ok, vcodes, ucodes)
            yu, cuped_info = cuped_adjust(yu, xu)
        discrete = kind in ("ordinal", "rate") and cuped_info is None
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected below and reported per arm
            agg = aggregate(yu, vu, V, discrete=discrete, buckets=BUCKETS)
        overflow = {names[i] for i in range(V) if agg.n[i] and not np.isfinite([agg.mean[i], agg.var[i]]).all()}
        for i, n in enumerate(names):
            if agg.n[i] == 0 or n in overflow:
                continue
            se = math.sqrt(agg.var[i] / agg.n[i]) if agg.n[i] > 1 else float("nan")
            q = _tq(s.alpha, agg.n[i] - 1)
            summaries.append({"variant": n, "metric": m.name, "n": int(agg.n[i]), "mean": float(agg.mean[i]),
                              "sd": math.sqrt(agg.var[i]), "ci_low": float(agg.mean[i] - q * se),
                              "ci_high": float(agg.mean[i] + q * se)})
        for t in range(1, V):
            why = (_too_few(m, {names[0]: agg.n[0], names[t]: agg.n[t]})
                   or _overflowed(m, overflow & {names[0], names[t]}))
            res = None if why else _compare_independent(m, kind, agg, 0, t, names, s, cuped_info, max_rows)
            why = why or _nonfinite(res)
            if why:
                not_evaluated.append(_not_evaluated(m, names[t], why))
            else:
                comparisons.append(res)
        if m.name == primary:
            plan = _plan_independent(m, kind, agg, names, s)

    _adjust(comparisons, s)
    verdicts = {}
    for v in names[1:]:
        mine = [c for c in comparisons if c["variant"] == v]
        verdicts[v] = decide(v, mine, srm=srm, alpha=s.alpha, primary=primary, sample_needed=plan.get(v),
                             sequential=s.decision == "sequential",
                             not_evaluated=[x for x in not_evaluated if x["variant"] == v])
    return _report("independent", df, names, probs, srm, summaries, comparisons, verdicts, s, metrics, kinds,
                   primary, units={n: int(units[i]) for i, n in enumerate(names)}, not_evaluated=not_evaluated)


def _too_few(m: MetricConfig, n_by_arm: dict[str, float]) -> str | None:
    """Why `m` cannot be tested between these arms (fewer than 2 units with usable values in one), or None."""
    short = {v: int(n) for v, n in n_by_arm.items() if n < 2}
    if not short:
        return None
    return ", ".join(f"{v} has {n} unit{'s' if n != 1 else ''} with usable {m.name} values" for v, n in short.items()
                     ) + " (a test needs at least 2 per arm)"


def _overflowed(m: MetricConfig, arms: set[str]) -> str | None:
    if not arms:
        return None
    return (f"the sum or variance of {m.name} overflows double precision in {', '.join(sorted(arms))} (values near "
            "1e308?); rescale the metric (e.g. to thousands) before comparing")


def _nonfinite(res: dict) -> str | None:
    """Why a computed comparison cannot be trusted (sums or variances overflowed to inf/NaN), or None."""
    bad = [k for k in ("mean_control", "mean_treatment", "sd_control", "sd_treatment", "estimate", "se")
           if not math.isfinite(res[k])]
    if not bad:
        return None
    return (f"non-finite {', '.join(bad)}: the values overflow double precision (magnitudes near 1e308?); "
            "rescale the metric (e.g. to thousands) before comparing")


def _not_evaluated(m: MetricConfig, variant: str, reason: str) -> dict:
    return {"variant": variant, "metric": m.name, "role": "guardrail" if m.guardrail else "primary/secondary",
            "reason": reason}


def _tq(alpha: float, df: float) -> float:
    from scipy import stats as sst

    return float(sst.t.ppf(1 - alpha / 2, df)) if df > 0 else float("nan")


def _adjust(comparisons: list[dict], s: AbConfig) -> None:
    """Holm/BH within two families: decision metrics (variants x metrics) and guardrails."""
    for fam in ("primary/secondary", "guardrail"):
        idx = [i for i, c in enumerate(comparisons) if c["role"] == fam]
        if not idx:
            continue
        adj = adjust_pvalues([comparisons[i]["p_value"] for i in idx], s.correction)
        for i, a in zip(idx, adj):
            comparisons[i]["p_adjusted"] = a
        if s.sequential.enabled:
            sq = [i for i in idx if "sequential" in comparisons[i]]
            adj = adjust_pvalues([comparisons[i]["sequential"]["p_value"] for i in sq], s.correction)
            for i, a in zip(sq, adj):
                comparisons[i]["sequential"]["p_adjusted"] = a
    for c in comparisons:
        if c["role"] == "guardrail":
            c["guardrail_status"] = _guardrail_status(c, s.alpha)


def _plan_independent(m: MetricConfig, kind: str, agg: Agg, names: list[str], s: AbConfig) -> dict:
    out = {}
    base = float(agg.mean[0])
    mde_abs = s.mde * abs(base) if s.mde_relative else s.mde
    for t in range(1, len(names)):
        have = int(min(agg.n[0], agg.n[t]))
        if have < 2 or not np.isfinite([base, agg.var[0], agg.var[t]]).all():  # not evaluated: nothing to plan with
            continue
        try:
            if kind == "rate" and 0 < base < 1:
                need = power.n_for_proportion(base, mde_abs if base + mde_abs < 1 else -mde_abs, alpha=s.alpha,
                                              power=s.power)
            else:
                sd = math.sqrt((agg.var[0] + agg.var[t]) / 2)
                need = power.n_for_mean(mde_abs, sd, alpha=s.alpha, power=s.power)
        except InputError:
            continue
        out[names[t]] = {"needed_per_arm": need, "have_per_arm": have, "mde_abs": mde_abs}
    return out


# ----------------------------------------------------------------------------------------------- paired design

def _analyze_paired(df, metrics, s: AbConfig, vcodes, names, probs: _Problems, primary: str) -> dict:
    import pandas as pd

    if not s.unit or s.unit not in df.columns:
        raise InputError(f"paired design needs the item column as --unit (got {s.unit!r}; columns: "
                         f"{[c for c in df.columns if c[0] != '_']})")
    items = df[s.unit]
    miss = items.isna().to_numpy() & (vcodes >= 0)
    probs.add("missing_unit", miss, df, s.unit)
    vcodes = np.where(miss, -1, vcodes)
    V = len(names)
    comparisons, summaries, kinds, plan = [], [], {}, {}
    not_evaluated: list[dict] = []
    counts = {}
    rng = np.random.default_rng(s.seed)
    for m in metrics:
        y, ok = _metric_values(df, m, vcodes, probs)
        frame = pd.DataFrame({"item": items[ok].to_numpy(), "v": vcodes[ok], "y": y[ok]})
        kind = _resolve_kind(m, frame["y"].to_numpy())
        kinds[m.name] = kind
        dup = frame.duplicated(["item", "v"]).sum()
        if dup:
            probs.counts[f"{m.name}: duplicate item x variant rows (averaged, not dropped)"] += int(dup)
        wide = frame.groupby(["item", "v"])["y"].mean().unstack("v")
        counts[m.name] = {names[int(k)]: int(wide[k].notna().sum()) for k in wide.columns}
        for i in range(V):
            if i not in wide.columns:
                continue
            col = wide[i].dropna().to_numpy()
            if col.size:
                se = col.std(ddof=1) / math.sqrt(col.size) if col.size > 1 else float("nan")
                q = _tq(s.alpha, col.size - 1)
                summaries.append({"variant": names[i], "metric": m.name, "n": int(col.size), "mean": float(col.mean()),
                                  "sd": float(col.std(ddof=1)) if col.size > 1 else float("nan"),
                                  "ci_low": float(col.mean() - q * se), "ci_high": float(col.mean() + q * se)})
        for t in range(1, V):
            pairs = int(wide[[0, t]].notna().all(axis=1).sum()) if {0, t} <= set(wide.columns) else 0
            if pairs < 2:
                not_evaluated.append(_not_evaluated(m, names[t], f"{pairs} item{'s' if pairs != 1 else ''} with "
                                                    f"usable {m.name} values under both {names[0]} and {names[t]}"
                                                    " (a paired test needs at least 2)"))
                continue
            both = wide[[0, t]]
            incomplete = int(both.notna().any(axis=1).sum() - both.notna().all(axis=1).sum())
            test = {"ordinal": "wilcoxon", "mean": "t", "rate": "wilcoxon"}.get(kind, "auto")
            r = compare_paired(both[0].to_numpy(), both[t].to_numpy(), metric=m.name, variant=names[t],
                               control_name=names[0], alpha=s.alpha, test=test)
            r["n_incomplete_items"] = incomplete
            r["kind"] = kind
            r["role"] = "guardrail" if m.guardrail else "primary/secondary"
            r["higher_is_better"] = m.higher_is_better
            r["n_control"] = r["n_treatment"] = r["n"]
            r["mean_control"], r["mean_treatment"] = r["control_mean"], r["treatment_mean"]
            d = (both[t] - both[0]).dropna().to_numpy()
            se = r["sd_diff"] / math.sqrt(r["n"])
            r["se"] = se
            boot = d[rng.integers(0, d.size, size=(s.n_boot, d.size))].mean(axis=1)
            r["bootstrap_ci"] = [float(np.quantile(boot, s.alpha / 2)), float(np.quantile(boot, 1 - s.alpha / 2))]
            c_mean = r["control_mean"]
            if c_mean:
                # delta method for mean(T)/mean(C) - 1 with the pair covariance
                ct = both.dropna().to_numpy()
                cov = np.cov(ct[:, 0], ct[:, 1]) / ct.shape[0]
                mt = r["treatment_mean"]
                g = np.array([-mt / c_mean ** 2, 1 / c_mean])
                lse = math.sqrt(max(float(g @ cov @ g), 0.0))
                est = mt / c_mean - 1
                zq = _zq(s.alpha)
                r["relative_lift"] = {"estimate": est, "ci_low": est - zq * lse, "ci_high": est + zq * lse}
            else:
                r["relative_lift"] = {"estimate": None, "ci_low": None, "ci_high": None}
            r["bayesian"] = bayes.chance_to_beat(r["estimate"], se, higher_is_better=m.higher_is_better)
            if s.sequential.enabled:
                sq = sequential.msprt(r["estimate"], se, r["n"], alpha=s.alpha, tuning_n=s.sequential.tuning_n)
                r["sequential"] = {"method": "mSPRT normal mixture (always valid)", "p_value": sq["p_value"],
                                   "ci_low": sq["ci_low"], "ci_high": sq["ci_high"]}
            if m.guardrail:
                _noninferiority(r, m, se, r["n"] - 1, s.alpha)
            why = _nonfinite({"mean_control": r["control_mean"], "mean_treatment": r["treatment_mean"],
                              "sd_control": 0.0, "sd_treatment": r["sd_diff"], "estimate": r["estimate"], "se": se})
            if why:
                not_evaluated.append(_not_evaluated(m, names[t], why))
                continue
            comparisons.append(r)
            if m.name == primary and r["sd_diff"] > 0:
                mde_abs = s.mde * abs(c_mean) if s.mde_relative else s.mde
                try:
                    need = power.n_for_paired(mde_abs, r["sd_diff"], alpha=s.alpha, power=s.power)
                    plan[names[t]] = {"needed_per_arm": need, "have_per_arm": r["n"], "mde_abs": mde_abs}
                except InputError:
                    pass
    # In a paired design every item should be scored under every variant: a chi-square on items per variant
    # (primary metric) flags variants whose scores went missing, the paired analogue of an SRM.
    srm = srm_check(counts[primary], None, warn_p=s.srm.warning_p, alert_p=s.srm.alert_p)
    srm["note"] = "paired design: items scored per variant vs an equal count"
    _adjust(comparisons, s)
    verdicts = {v: decide(v, [c for c in comparisons if c["variant"] == v], srm=srm, alpha=s.alpha,
                          primary=primary, sample_needed=plan.get(v), sequential=s.decision == "sequential",
                          not_evaluated=[x for x in not_evaluated if x["variant"] == v])
                for v in names[1:]}
    return _report("paired", df, names, probs, srm, summaries, comparisons, verdicts, s, metrics, kinds, primary,
                   units=counts[primary], not_evaluated=not_evaluated)


def _zq(alpha: float) -> float:
    from scipy import stats as sst

    return float(sst.norm.ppf(1 - alpha / 2))


def _report(design, df, names, probs, srm, summaries, comparisons, verdicts, s, metrics, kinds, primary, units,
            not_evaluated=()):
    for c in [*comparisons, *not_evaluated]:
        if c["role"] == "primary/secondary":
            c["role"] = "primary" if c["metric"] == primary else "secondary"
    n_read = int(len(df)) + int(probs.counts.get("invalid_json", 0))
    row_level = {k: v for k, v in probs.counts.items() if ":" not in k}
    return _clean({
        "schema": "flywheel.ab/1",
        "design": design,
        "control": names[0],
        "variants": names,
        "units": units,
        "primary_metric": primary,
        "metrics": [{**m.model_dump(), "column": m.source_column, "kind": kinds.get(m.name, m.kind)}
                    for m in metrics],
        "alpha": s.alpha,
        "correction": s.correction,
        "decision_basis": s.decision,
        "rows": {"read": n_read, "excluded": sum(row_level.values()),
                 "used": n_read - sum(row_level.values()), **probs.as_dict()},
        "units_in_multiple_variants": probs.units_in_multiple_variants,
        "srm": srm,
        "warnings": probs.warnings + [f"{c['variant']} / {c['metric']}: {c['warning']}" for c in comparisons
                                      if c.get("warning")]
                    + [f"{x['variant']} / {x['metric']} ({x['role']}) not evaluated: {x['reason']}"
                       for x in not_evaluated],
        "summaries": summaries,
        "comparisons": comparisons,
        "not_evaluated": list(not_evaluated),
        "verdicts": verdicts,
        "notes": {
            "bayesian": "bayesian.chance_to_beat_control and expected_loss are posterior quantities (flat prior, "
                        "normal approximation), not p-values",
            "sequential": "sequential.p_value/ci are always valid: safe to check after every batch",
            "p_adjusted": f"{s.correction} within families: decision metrics (variants x metrics) and guardrails",
            "estimate": "treatment - control in the metric's units; relative_lift uses the delta method",
        },
    })


def _clean(c: dict) -> dict:
    """JSON-safe: numpy scalars to float, NaN/inf to None."""
    def f(v):
        if isinstance(v, dict):
            return {k: f(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [f(x) for x in v]
        if isinstance(v, (np.floating, float)):
            v = float(v)
            return v if math.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        return v
    return f(c)
