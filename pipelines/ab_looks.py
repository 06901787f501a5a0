"""The looks of one A/B experiment: every `flywheel ab analyze` of the same experiment is a look.

The always-valid p-value and confidence sequence of one analysis are valid for that look only; a reviewer who
re-runs the analysis as data arrives needs them across the looks: the running minimum p-value and the running
intersection of the confidence sequences (math in flywheel.evals.ab.sequential.across_looks). Earlier looks are
the `flywheel/ab` runs tagged with the same experiment key (`flywheel.ab.experiment`); their `report.json`
holds each comparison's sequential p and interval.
"""

from __future__ import annotations

import hashlib
import json
import math

from flywheel.evals.ab.sequential import across_looks
from flywheel.pipelines import store_read as read
from flywheel.pipelines import tags as T

MAX_REPORT_BYTES = 20 * 1024 * 1024
MAX_LOOKS = 200


def experiment_key(report: dict) -> str:
    """Same design, control, variants and metrics = same experiment (the logs grow between looks)."""
    ident = {"design": report.get("design"), "control": report.get("control"),
             "variants": sorted(report.get("variants") or []),
             "metrics": sorted({c["metric"] for c in report.get("comparisons", [])})}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _look(run_id: str | None, when: int | None, report: dict) -> dict:
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


def earlier_looks(tracking: str, key: str) -> list[tuple[str, int, dict]]:
    """(run_id, start_time, report) of the logged looks of experiment `key`, oldest first."""
    runs = read.stage_runs(tracking, "ab", f"tags.`{T.AB_EXPERIMENT}` = '{key}'", max_results=MAX_LOOKS)
    looks = []
    for run in sorted(runs, key=lambda r: r["start_time"] or 0):
        data = read.download_artifact(tracking, run["run_id"], "report.json", MAX_REPORT_BYTES)
        try:
            report = json.loads(data) if data else None
        except json.JSONDecodeError:
            report = None
        if isinstance(report, dict):
            looks.append((run["run_id"], run["start_time"], report))
    return looks


def sequential_looks(report: dict, tracking: str) -> dict:
    """report["looks"]: the earlier looks of this experiment plus this one (last), per comparison, with the
    running minimum p-value and the running intersection of the confidence sequences after each look."""
    key = experiment_key(report)
    per_look = [_look(r, t, rep) for r, t, rep in earlier_looks(tracking, key)] + [_look(None, None, report)]
    comparisons = []
    for variant, metric in _look(None, None, report):
        seq = [look[(variant, metric)] for look in per_look if (variant, metric) in look]
        combined = across_looks([s["p_value"] for s in seq], [s["ci_low"] for s in seq],
                                [s["ci_high"] for s in seq])
        for s, p, lo, hi in zip(seq, combined["p_running_min"], combined["cs_low"], combined["cs_high"]):
            s.update(p_running_min=p, cs_low=lo, cs_high=hi)
        comparisons.append({"variant": variant, "metric": metric, "looks": seq,
                            "p_running_min": combined["p_running_min"][-1], "cs_low": combined["cs_low"][-1],
                            "cs_high": combined["cs_high"][-1], "cs_empty": combined["empty"]})
    return {"experiment": key, "n_looks": len(per_look), "comparisons": comparisons}
