"""An A/B report as files: `report.json` (exactly what `flywheel ab analyze --json` prints) and one plot per metric.
"""

from __future__ import annotations

import json
from pathlib import Path


def report_json(report: dict) -> str:
    """The report as JSON: NaN is refused (the engine turns it into null), non-ASCII kept."""
    return json.dumps(report, indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False) + "\n"


def plot_metric(report: dict, metric: str, path: Path) -> Path:
    """Mean of `metric` per variant with its CI, the control's mean as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["summaries"] if r["metric"] == metric]
    names = [r["variant"] for r in rows]
    means = [r["mean"] for r in rows]
    err = [[r["mean"] - (r["ci_low"] if r["ci_low"] is not None else r["mean"]) for r in rows],
           [(r["ci_high"] if r["ci_high"] is not None else r["mean"]) - r["mean"] for r in rows]]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 2), 3.5))
    colors = ["#888888"] + ["#1f77b4"] * (len(rows) - 1)
    ax.errorbar(range(len(rows)), means, yerr=err, fmt="none", ecolor="black", capsize=6)
    ax.scatter(range(len(rows)), means, c=colors, zorder=3, s=50)
    if rows:
        ax.axhline(means[0], color="#888888", ls="--", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"{n}\n(n={r['n']})" for n, r in zip(names, rows)], fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean by variant, {int(round((1 - report['alpha']) * 100))}% CI "
                 f"(control {report['control']} grey)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
