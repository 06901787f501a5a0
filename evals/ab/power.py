"""Planning: sample size per arm for a minimum detectable effect (MDE), or the MDE a given sample buys.

Means use the two-sample t-test power (statsmodels TTestIndPower) with effect size d = MDE / sd; proportions
use the normal approximation on Cohen's h (statsmodels NormalIndPower + proportion_effectsize). Both assume
equal allocation unless `ratio` (treatment/control units) says otherwise, a two-sided test at `alpha`,
independent units, and a variance (or baseline rate) known from history.
"""

from __future__ import annotations

import math

from flywheel.foundation.errors import InputError


def _check(alpha: float, power: float) -> None:
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
    if not 0 < power < 1:
        raise InputError(f"power must be in (0, 1), got {power}")


def n_for_mean(mde_abs: float, sd: float, *, alpha: float = 0.05, power: float = 0.8, ratio: float = 1.0) -> int:
    """Control-arm units needed to detect an absolute mean difference `mde_abs` (treatment arm = ratio x that)."""
    from statsmodels.stats.power import TTestIndPower

    _check(alpha, power)
    if sd <= 0 or mde_abs == 0:
        raise InputError(f"need sd > 0 and a non-zero MDE (got sd={sd}, mde={mde_abs})")
    n = TTestIndPower().solve_power(effect_size=abs(mde_abs) / sd, alpha=alpha, power=power, ratio=ratio)
    return int(math.ceil(n))


def mde_for_mean(n_per_arm: float, sd: float, *, alpha: float = 0.05, power: float = 0.8,
                 ratio: float = 1.0) -> float:
    from statsmodels.stats.power import TTestIndPower

    _check(alpha, power)
    if n_per_arm < 2:
        raise InputError(f"need at least 2 units per arm, got {n_per_arm}")
    d = TTestIndPower().solve_power(nobs1=n_per_arm, alpha=alpha, power=power, ratio=ratio)
    return float(d * sd)


def n_for_proportion(p_control: float, mde_abs: float, *, alpha: float = 0.05, power: float = 0.8,
                     ratio: float = 1.0) -> int:
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    _check(alpha, power)
    p_t = p_control + mde_abs
    if not (0 < p_control < 1 and 0 < p_t < 1) or mde_abs == 0:
        raise InputError(f"baseline rate {p_control} + MDE {mde_abs} must stay inside (0, 1) and differ")
    h = proportion_effectsize(p_t, p_control)
    n = NormalIndPower().solve_power(effect_size=abs(h), alpha=alpha, power=power, ratio=ratio)
    return int(math.ceil(n))


def mde_for_proportion(p_control: float, n_per_arm: float, *, alpha: float = 0.05, power: float = 0.8,
                       ratio: float = 1.0) -> float:
    """Absolute lift in the rate (upwards) detectable with n_per_arm units in control."""
    from statsmodels.stats.power import NormalIndPower

    _check(alpha, power)
    if not 0 < p_control < 1:
        raise InputError(f"baseline rate must be in (0, 1), got {p_control}")
    h = NormalIndPower().solve_power(nobs1=n_per_arm, alpha=alpha, power=power, ratio=ratio)
    # invert Cohen's h = 2 asin(sqrt(p_t)) - 2 asin(sqrt(p_c))
    phi = 2 * math.asin(math.sqrt(p_control)) + h
    if phi >= math.pi:
        return float(1 - p_control)
    return float(math.sin(phi / 2) ** 2 - p_control)


def n_for_paired(mde_abs: float, sd_diff: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Items (pairs) needed for a paired t-test to detect a mean difference `mde_abs` (statsmodels TTestPower)."""
    from statsmodels.stats.power import TTestPower

    _check(alpha, power)
    if sd_diff <= 0 or mde_abs == 0:
        raise InputError(f"need sd_diff > 0 and a non-zero MDE (got sd_diff={sd_diff}, mde={mde_abs})")
    n = TTestPower().solve_power(effect_size=abs(mde_abs) / sd_diff, alpha=alpha, power=power)
    return int(math.ceil(n))


def plan(*, metric_type: str, baseline: float, sd: float | None = None, mde: float | None = None,
         relative: bool = True, n_per_arm: float | None = None, daily_units: float | None = None,
         days: float | None = None, arms: int = 2, alpha: float = 0.05, power: float = 0.8) -> dict:
    """Sample size per arm for an MDE, or the MDE for a given sample (n_per_arm, or daily_units x days split
    evenly over `arms`). metric_type: "mean" (needs sd) or "proportion" (baseline = rate). Returns a dict with
    the answer and every assumption, ready to print."""
    if metric_type not in ("mean", "proportion"):
        raise InputError(f"metric type must be mean or proportion, got {metric_type!r}")
    if metric_type == "mean" and (sd is None or sd <= 0):
        raise InputError("a mean metric needs its standard deviation (--sd, from history)")
    if arms < 2:
        raise InputError(f"need at least 2 arms, got {arms}")
    out = {"metric_type": metric_type, "baseline": baseline, "sd": sd, "alpha": alpha, "power": power,
           "arms": arms, "test": "two-sided two-sample t-test (statsmodels TTestIndPower)" if metric_type == "mean"
           else "two-sided two-proportion normal test on Cohen's h (statsmodels NormalIndPower)",
           "assumptions": ["equal allocation across arms", "independent units (analyse at the randomisation unit)",
                           f"two-sided test at alpha={alpha} per comparison" + (
                               f" (no multiplicity correction: with {arms - 1} comparisons Holm tests the smallest "
                               f"p at alpha/{arms - 1}; plan with --alpha {alpha / (arms - 1):.3g} to be safe)"
                               if arms > 2 else ""),
                           "variance/baseline rate as given, taken from history",
                           "fixed horizon: look once at the end (sequential monitoring costs extra sample)"]}
    if daily_units is not None and days is not None:
        n_per_arm = daily_units * days / arms
        out["traffic"] = {"daily_units": daily_units, "days": days}
    if mde is not None and n_per_arm is None:
        mde_abs = mde * abs(baseline) if relative else mde
        n = n_for_mean(mde_abs, sd, alpha=alpha, power=power) if metric_type == "mean" else \
            n_for_proportion(baseline, mde_abs, alpha=alpha, power=power)
        out.update({"solve": "sample_size", "mde_abs": mde_abs, "mde_relative": mde_abs / baseline if baseline else None,
                    "n_per_arm": n, "n_total": n * arms})
        if daily_units:
            out["days_needed"] = math.ceil(n * arms / daily_units)
        return out
    if n_per_arm is not None:
        m = mde_for_mean(n_per_arm, sd, alpha=alpha, power=power) if metric_type == "mean" else \
            mde_for_proportion(baseline, n_per_arm, alpha=alpha, power=power)
        out.update({"solve": "mde", "n_per_arm": n_per_arm, "mde_abs": m,
                    "mde_relative": m / baseline if baseline else None})
        return out
    raise InputError("give either --mde (to get a sample size) or --n / --daily-units with --days (to get the MDE)")
