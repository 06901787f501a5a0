"""The looks of one A/B experiment: every analysis of the same experiment is a look.

The always-valid p-value and confidence sequence of one analysis are valid for that look only; a reviewer who
re-runs the analysis as data arrives needs them across the looks: the running minimum p-value and the running
intersection of the confidence sequences (math in `flywheel.evals.ab.sequential.across_looks`). The shell
(`flywheel.pipelines.ab_looks`) finds the earlier looks' reports in the store.
"""

from __future__ import annotations

import hashlib
import json
import math

from flywheel.evals.ab.sequential import across_looks


def experiment_key(report: dict) -> str:
    """Same design, control, variants and metrics = same experiment (the logs grow between looks)."""
    ident = {"design": report.get("design"), "control": report.get("control"),
             "variants": sorted(report.get("variants") or []),
             "metrics": sorted({c["metric"] for c in report.get("comparisons", [])})}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def look(run_id: str | None, when: int | None, report: dict) -> dict:
    """{(variant, metric): this look's sequential numbers}."""
    out = {}
    for c in report.get("comparisons", []):
        sq = c.get("sequential") or {}
        values = (sq.get("p_value"), sq.get("ci_low"), sq.get("ci_high"))
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            continue  # no sequential result at this look (too few units): it adds nothing to the running ones
        out[(c["variant"], c["metric"])] = {"run_id": run_id, "start_time": when, "n": c.get("n"),
                                            "estimate": c.get("estimate"), "p_value": sq["p_value"],
                                            "ci_low": sq["ci_low"], "ci_high": sq["ci_high"]}
    return out


def across(report: dict, earlier: list[tuple[str, int, dict]]) -> dict:
    """report["looks"]: the `earlier` looks (run id, start time, report; oldest first) plus this one (last), per
    comparison, with the running minimum p-value and the running intersection of the confidence sequences after
    each look."""
    per_look = [look(r, t, rep) for r, t, rep in earlier] + [look(None, None, report)]
    comparisons = []
    for variant, metric in look(None, None, report):
        seq = [lk[(variant, metric)] for lk in per_look if (variant, metric) in lk]
        combined = across_looks([s["p_value"] for s in seq], [s["ci_low"] for s in seq],
                                [s["ci_high"] for s in seq])
        for s, p, lo, hi in zip(seq, combined["p_running_min"], combined["cs_low"], combined["cs_high"]):
            s.update(p_running_min=p, cs_low=lo, cs_high=hi)
        comparisons.append({"variant": variant, "metric": metric, "looks": seq,
                            "p_running_min": combined["p_running_min"][-1], "cs_low": combined["cs_low"][-1],
                            "cs_high": combined["cs_high"][-1], "cs_empty": combined["empty"]})
    return {"experiment": experiment_key(report), "n_looks": len(per_look), "comparisons": comparisons}
