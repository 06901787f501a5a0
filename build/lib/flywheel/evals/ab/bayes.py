"""Bayesian read-outs: chance to beat control and expected loss. These are posterior probabilities, NOT p-values.

Model (as in GrowthBook's default engine): a flat prior on the difference and a normal likelihood, so the
posterior of delta = treatment - control is N(estimate, se^2). Then
  chance_to_beat_control = P(delta is in the good direction)
  expected_loss          = E[max(0, -delta)] (in the good direction): what shipping costs, on average,
                           in the metric's units, if the variant is in fact worse.
The normal approximation is accurate at A/B sample sizes; with a handful of units prefer the frequentist CI.
"""

from __future__ import annotations

import math


def chance_to_beat(estimate: float, se: float, *, higher_is_better: bool = True) -> dict:
    from scipy import stats

    mu = estimate if higher_is_better else -estimate
    if se is None or not math.isfinite(se) or se <= 0:
        p = 1.0 if mu > 0 else 0.0 if mu < 0 else 0.5
        return {"chance_to_beat_control": p, "expected_loss": max(0.0, -mu),
                "model": "flat prior, normal approximation (degenerate: zero standard error)"}
    z = mu / se
    prob = float(stats.norm.cdf(z))
    # E[max(0, -X)] for X ~ N(mu, se^2) = se * phi(mu/se) - mu * Phi(-mu/se)
    loss = float(se * stats.norm.pdf(z) - mu * stats.norm.cdf(-z))
    return {"chance_to_beat_control": prob, "expected_loss": max(0.0, loss),
            "model": "flat prior, normal approximation"}
