"""Sequential monitoring: always-valid p-values and confidence sequences, so a reviewer may look every day.

A fixed-horizon p-value checked after every batch and acted on at the first p < 0.05 has a false-positive rate
far above 5 %. The mixture sequential probability ratio test (mSPRT; Johari, Pekelis & Walsh 2017, used by
Optimizely, and the normal-mixture boundary of Robbins / Howard et al. behind GrowthBook's sequential mode)
gives a p-value that is valid at any stopping time. For a difference estimate theta_hat with sampling variance
s^2 (Welch's, plugged in) and a normal mixing prior N(0, tau^2) on the true difference, the likelihood ratio is

    Lambda = sqrt(s^2 / (s^2 + tau^2)) * exp(theta_hat^2 tau^2 / (2 s^2 (s^2 + tau^2)))

p = min(1, 1/Lambda) (running minimum over looks), and inverting Lambda >= 1/alpha gives the confidence
sequence theta_hat +- sqrt(2 s^2 (s^2 + tau^2) / tau^2 * (log(1/alpha) + log((s^2 + tau^2) / s^2) / 2)).
tau^2 is set so the boundary is tightest at `tuning_n` units per arm (the normal-mixture optimum
rho^2 = (-2 log alpha + log(1 - 2 log alpha)) / n*). The price of peeking freely: wider intervals than the
fixed-horizon ones at the same n.
"""

from __future__ import annotations

import numpy as np


def tau2(se2, n_per_arm, *, alpha: float = 0.05, tuning_n: float = 5000.0):
    """Mixing variance: s^2 scaled to the tuning sample size, times the normal-mixture optimum constant."""
    c = -2 * np.log(alpha) + np.log(1 - 2 * np.log(alpha))
    return np.asarray(se2, dtype=float) * np.asarray(n_per_arm, dtype=float) / tuning_n * c


def msprt(estimate, se, n_per_arm, *, alpha: float = 0.05, tuning_n: float = 5000.0) -> dict:
    """Always-valid p-value (at this look) and confidence sequence for a difference. Vectorised."""
    est = np.asarray(estimate, dtype=float)
    s2 = np.asarray(se, dtype=float) ** 2
    t2 = tau2(s2, n_per_arm, alpha=alpha, tuning_n=tuning_n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_lr = 0.5 * np.log(s2 / (s2 + t2)) + est ** 2 * t2 / (2 * s2 * (s2 + t2))
        p = np.minimum(1.0, np.exp(-log_lr))
        half = np.sqrt(2 * s2 * (s2 + t2) / t2 * (np.log(1 / alpha) + 0.5 * np.log((s2 + t2) / s2)))
    p = np.where(s2 > 0, p, np.where(est == 0, 1.0, 0.0))
    out = {"p_value": p, "ci_low": est - half, "ci_high": est + half, "log_lr": log_lr}
    if est.ndim == 0:
        return {k: float(v) for k, v in out.items()}
    return out


def running_min_p(pvalues) -> np.ndarray:
    """Always-valid p after each look: the running minimum of the per-look mSPRT p-values (last axis)."""
    return np.minimum.accumulate(np.asarray(pvalues, dtype=float), axis=-1)


def across_looks(p_values, ci_lows, ci_highs) -> dict:
    """Combine the looks of one experiment, oldest first: after each look, the always-valid p-value (running
    minimum) and the running intersection of the confidence sequences. Both stay valid at any stopping time
    because each look's p / sequence is; the intersection is the tightest interval the looks so far support.
    An empty intersection (low > high) means the looks contradict each other (the data changed under the test,
    or the normal approximation fails): `empty` says so, the reviewer should not trust either end."""
    lo = np.maximum.accumulate(np.asarray(ci_lows, dtype=float))
    hi = np.minimum.accumulate(np.asarray(ci_highs, dtype=float))
    p = running_min_p(p_values)
    return {"p_running_min": p.tolist(), "cs_low": lo.tolist(), "cs_high": hi.tolist(),
            "empty": bool(len(lo) and lo[-1] > hi[-1])}
