"""One verdict per variant, with the reasons in words a reviewer can check against the numbers.

Order of rules (first match wins):
1. invalid      - sample-ratio mismatch alert: assignment or logging is broken, no number can be trusted;
                  or the primary metric cannot be evaluated (no usable data in an arm, overflow).
2. don't ship   - the primary metric is significantly worse, or a guardrail is significantly worse beyond
                  its margin.
3. invalid      - a guardrail cannot be evaluated: "ship" needs every guardrail shown non-inferior, and a
                  guardrail without data (say, latency not logged for one arm) proves nothing.
4. ship         - the primary metric is significantly better (adjusted p < alpha) and every guardrail is shown
                  non-inferior within its margin.
5. don't ship   - "no difference": the primary metric is the same constant in both arms (zero variance);
                  no amount of data changes that.
6. keep running - otherwise, while the planned sample (enough units to detect the MDE with the configured
                  power) is not reached; the units still needed per arm are given.
7. don't ship   - planned sample reached and no significant improvement: the variant is not better by the MDE.
"""

from __future__ import annotations

import math

# Default guardrail non-inferiority margin: a variant may be at most 10 % (of the control mean) worse on a
# guardrail. One number for the engine and the CLI config, so a Python caller and `flywheel ab` agree.
GUARDRAIL_MARGIN = 0.10


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _p(c: dict, sequential: bool) -> float | None:
    if sequential and c.get("sequential"):
        return c["sequential"].get("p_adjusted")
    return c.get("p_adjusted")


def decide(variant: str, comparisons: list[dict], *, srm: dict, alpha: float, primary: str,
           sample_needed: dict | None, sequential: bool = False, not_evaluated: list[dict] = ()) -> dict:
    """comparisons: this variant's comparison dicts (role primary/secondary/guardrail, p_adjusted filled).
    sample_needed: {"needed_per_arm": int, "have_per_arm": int} for the primary metric, or None.
    not_evaluated: this variant's {"metric", "role", "reason"} for metrics no test could be run on."""
    reasons: list[str] = []
    basis = "always-valid (sequential) p-values" if sequential else "fixed-horizon p-values"
    if srm.get("status") == "alert":
        return {"decision": "invalid", "basis": basis,
                "reasons": [f"sample-ratio mismatch alert (chi-square p={_fmt(srm.get('p_value'))} < "
                            f"{srm.get('thresholds', {}).get('alert', 0.001)}): observed {srm.get('observed')} vs "
                            f"expected {srm.get('expected')}; fix assignment/logging before reading any result"],
                "sample_still_needed_per_arm": None}
    if srm.get("status") == "warning":
        reasons.append(f"SRM warning (p={_fmt(srm.get('p_value'))}): check assignment before relying on this")
    prim = next((c for c in comparisons if c["metric"] == primary), None)
    if prim is None:
        why = next((x["reason"] for x in not_evaluated if x["metric"] == primary), "no usable data")
        return _v("invalid", basis, reasons + [f"primary metric {primary} cannot be evaluated: {why}"], None)
    good_sign = 1 if prim.get("higher_is_better", True) else -1
    p = _p(prim, sequential)
    est = prim["estimate"]
    sig = p is not None and p < alpha
    desc = (f"{primary}: {_fmt(prim.get('mean_treatment'))} vs {_fmt(prim.get('mean_control'))} "
            f"(diff {_fmt(est)}, 95% CI [{_fmt(prim['ci_low'])}, {_fmt(prim['ci_high'])}], "
            f"{prim['test']} p={_fmt(prim['p_value'])}, adjusted p={_fmt(p)})")
    guards = [c for c in comparisons if c.get("role") == "guardrail"]
    failed = [g for g in guards if g.get("guardrail_status") == "fail"]
    unproven = [g for g in guards if g.get("guardrail_status") != "pass" and g not in failed]
    needed = None
    if sample_needed:
        needed = max(0, int(sample_needed["needed_per_arm"]) - int(sample_needed["have_per_arm"]))

    if sig and est * good_sign < 0:
        return _v("don't ship", basis, reasons + [f"primary metric significantly worse: {desc}"], 0)
    if failed:
        return _v("don't ship", basis, reasons + [
            f"guardrail {g['metric']} worse beyond its margin {_fmt(g.get('margin_abs'))}: diff {_fmt(g['estimate'])}"
            f" (CI [{_fmt(g['ci_low'])}, {_fmt(g['ci_high'])}])" for g in failed], 0)
    blind = [x for x in not_evaluated if x.get("role") == "guardrail"]
    if blind:
        return _v("invalid", basis, reasons + [
            f"guardrail {x['metric']} cannot be evaluated: {x['reason']}; no ship without it (fix the logging, "
            "or drop the guardrail from the config on purpose)" for x in blind], None)
    if sig and est * good_sign > 0:
        if not unproven:
            extra = [f"guardrail {g['metric']} non-inferior (margin {_fmt(g.get('margin_abs'))}, "
                     f"p={_fmt(g.get('p_adjusted'))})" for g in guards]
            return _v("ship", basis, reasons + [f"primary metric significantly better: {desc}"] + extra, 0)
        return _v("keep running", basis, reasons + [f"primary metric significantly better: {desc}"] + [
            f"guardrail {g['metric']} not yet shown non-inferior within margin {_fmt(g.get('margin_abs'))} "
            f"(diff {_fmt(g['estimate'])}, p={_fmt(g.get('p_adjusted'))})" for g in unproven], needed)
    if est == 0 and _constant(prim):
        return _v("don't ship", basis, reasons + [
            f"no difference: {primary} is {_fmt(prim.get('mean_control'))} for every unit in both arms (zero "
            "variance), so more data cannot change the result"], 0)
    if needed is None or needed > 0:
        more = f"about {needed} more units per arm" if needed else "more data"
        return _v("keep running", basis, reasons + [f"no significant difference yet: {desc}",
                                                     f"needs {more} to detect the planned MDE "
                                                     f"({_fmt(sample_needed and sample_needed.get('mde_abs'))})"],
                  needed)
    return _v("don't ship", basis, reasons + [f"planned sample reached without a significant improvement: {desc}"],
              0)


def _constant(c: dict) -> bool:
    """Zero variance: every unit has the same value in each arm (or, paired, every item the same difference)."""
    return c.get("sd_control") == 0 and c.get("sd_treatment") == 0 or c.get("sd_diff") == 0


def _v(decision: str, basis: str, reasons: list[str], needed) -> dict:
    return {"decision": decision, "basis": basis, "reasons": reasons, "sample_still_needed_per_arm": needed}
