"""The earlier looks of one A/B experiment, read from the store: the `flywheel/ab` runs tagged with the same
experiment key (`flywheel.ab.experiment`), whose `report.json` holds each comparison's sequential p and interval.
The statistics across the looks are `flywheel.evals.ab.looks`.
"""

from __future__ import annotations

import json

from flywheel.evals.ab import looks
from flywheel.pipelines import store_read as read
from flywheel.pipelines import tags as T

MAX_REPORT_BYTES = 20 * 1024 * 1024
MAX_LOOKS = 200


def earlier_looks(tracking: str, key: str) -> list[tuple[str, int, dict]]:
    """(run_id, start_time, report) of the logged looks of experiment `key`, oldest first."""
    runs = read.stage_runs(tracking, "ab", f"tags.`{T.AB_EXPERIMENT}` = '{key}'", max_results=MAX_LOOKS)
    found = []
    for run in sorted(runs, key=lambda r: r["start_time"] or 0):
        data = read.download_artifact(tracking, run["run_id"], "report.json", MAX_REPORT_BYTES)
        try:
            report = json.loads(data) if data else None
        except json.JSONDecodeError:
            report = None
        if isinstance(report, dict):
            found.append((run["run_id"], run["start_time"], report))
    return found


def sequential_looks(report: dict, tracking: str) -> dict:
    """report["looks"]: this experiment's earlier looks plus this one, with the running minimum p-value and the
    running intersection of the confidence sequences (`flywheel.evals.ab.looks.across`)."""
    return looks.across(report, earlier_looks(tracking, looks.experiment_key(report)))
