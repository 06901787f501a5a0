"""The benchmark's files: leaderboard.csv/.md, comparisons.csv, calibration.csv, per_query/*.csv,
quality_vs_speed.png and summary.json, written into one directory (the shell makes it atomic)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

from flywheel.evals.embeddings.bench import COLUMNS, PRIMARY
from flywheel.evals.embeddings.config import EmbeddingsConfig

COMPARISON_COLUMNS = ["task", "metric", "model_a", "model_b", "n", "mean_a", "mean_b", "estimate", "ci_low",
                      "ci_high", "test", "p_value", "p_adjusted", "significant", "verdict", "detectable_diff", "note"]
CALIBRATION_COLUMNS = ["model", "task", "threshold", "precision", "recall", "f1"]


def fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return ""
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def csv_text(rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: fmt(r.get(c), 6) for c in cols})
    return buf.getvalue()


def per_query_name(r: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{r['model']}__{r['task']}") + ".csv"


def write_outputs(tmp: Path, cfg: EmbeddingsConfig, results, leaderboard, comparisons, tasks) -> None:
    """Every output file into `tmp` (an empty directory)."""
    from flywheel.foundation.io import write_json

    (tmp / "leaderboard.csv").write_text(csv_text(leaderboard, COLUMNS))
    (tmp / "leaderboard.md").write_text(markdown(leaderboard, tasks, cfg))
    (tmp / "comparisons.csv").write_text(csv_text(comparisons, COMPARISON_COLUMNS))
    cal_rows = [{"model": r["model"], "task": r["task"], "threshold": t, "precision": p, "recall": rc, "f1": f}
                for r in results if "curve" in r
                for t, p, rc, f in zip(*(r["curve"][k] for k in ("threshold", "precision", "recall", "f1")))]
    if cal_rows:
        (tmp / "calibration.csv").write_text(csv_text(cal_rows, CALIBRATION_COLUMNS))
    (tmp / "per_query").mkdir()
    for r in results:
        cols = list(r["per_query"])
        n = len(r["per_query"][cols[0]])
        rows = [{c: r["per_query"][c][i] for c in cols} for i in range(n)]
        (tmp / "per_query" / per_query_name(r)).write_text(csv_text(rows, cols))
    plot(tmp / "quality_vs_speed.png", results, tasks)
    write_json(tmp / "summary.json", {
        "config": cfg.model_dump(),
        "tasks": {t.name: {"kind": t.kind, "source": t.source, **t.info} for t in tasks},
        "leaderboard": leaderboard, "comparisons": comparisons})


def _task_section(task, leaderboard, cfg: EmbeddingsConfig) -> list[str]:
    metric_cols = (["ndcg@10", "mrr@10", "map@100", "recall@1", "recall@10", "recall@100"]
                   if task.kind == "retrieval" else
                   ["spearman", "pearson", "dup_threshold_at_target", "dup_recall_at_target", "dup_best_f1"])
    cols = ["model"] + metric_cols + ["texts_per_s", "latency_p50_ms", "latency_p95_ms", "dims", "vs_best"]
    n = task.info.get("queries", task.info.get("pairs"))
    unit = "queries" if task.kind == "retrieval" else "pairs"
    lines = [f"## {task.name} ({task.kind}, {n} {unit}, {task.info.get('docs', '-')} docs)", ""]
    if task.info.get("doc_text"):
        lines += [f"Documents embedded as `{task.info['doc_text']}`.", ""]
    if task.kind == "retrieval" and n < cfg.stats.min_queries:
        lines += [f"> {n} queries: differences between models smaller than the `detectable_diff` column of "
                  "comparisons.csv cannot be told apart; a non-significant result here is not evidence of "
                  "equality.", ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in leaderboard:
        if r["task"] == task.name:
            r = dict(r)
            for m in ("ndcg@10", "spearman"):  # "0.7257 [0.65, 0.80]": the bootstrap CI next to the mean
                if r.get(f"{m}_ci_low") not in ("", None):
                    r[m] = f"{r[m]:.4f} [{r[f'{m}_ci_low']:.3f}, {r[f'{m}_ci_high']:.3f}]"
            lines.append("| " + " | ".join(fmt(r.get(c), 4 if c not in ("texts_per_s",) else 1) for c in cols)
                         + " |")
    return lines + [""]


def markdown(leaderboard, tasks, cfg: EmbeddingsConfig) -> str:
    lines = ["# Embedding benchmark", ""]
    for task in tasks:
        lines += _task_section(task, leaderboard, cfg)
    lines += ["Brackets: 95% bootstrap CI over the task's queries (pairs). `vs_best`: paired comparison with the task's best model (retrieval: Wilcoxon on per-query nDCG@10 "
              f"(`stats.test={cfg.stats.test}`); STS: paired bootstrap of the Spearman difference), Holm-corrected "
              f"across all pairs of the task; `*` = significant at alpha={cfg.stats.alpha}. "
              f"Duplicate threshold: lowest cosine reaching precision {cfg.calibration.target_precision} on pairs "
              f"with gold >= {cfg.calibration.duplicate_min_score}. All pairs: comparisons.csv.", ""]
    return "\n".join(lines)


def plot(path: Path, results: list[dict], tasks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = PRIMARY[task.kind]
        for r in (r for r in results if r["task"] == task.name):
            ax.scatter(r["texts_per_s"], r[metric], s=30 + r["dims"] / 8)
            ax.annotate(r["model"], (r["texts_per_s"], r[metric]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.margins(x=0.3, y=0.15)  # room for the labels
        ax.set_xlabel("texts/s (encode, batch; log)")
        ax.set_ylabel(metric)
        ax.set_title(task.name, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("quality vs speed (marker size ~ dims)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
