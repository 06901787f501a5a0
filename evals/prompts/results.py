"""`results.json`: what `flywheel eval` writes and `flywheel gate` (and the dashboard) read. One schema, one place.

Shape (schema 1):
- `name`, `run_id`, `child_runs` ({"target/variant": run id}), `primary_metric`;
- `metrics`: {metric: {direction ("higher" | "lower"), description, binary}} for every metric with a cell;
- `cases` ({path, kind, n, dataset_version}), `variants` ([{name, version, sha256, source, prompt_uri}]),
  `targets` ([target descriptions, each with `name`]), `generation` (the decoding settings);
- `cells`: one per variant x target x metric: {variant, target, metric, mean, ci_low, ci_high, n, direction, ...};
- `comparisons`: paired differences on the same cases: {metric, control_target, control_variant,
  treatment_target, treatment_variant, estimate (treatment - control), ci_low, ci_high, p_value, p_adjusted, n,
  test, direction}; files written before the targets were split out carry only the labels
  `control`/`variant` ("target/variant"), which the readers accept too;
- `cache`, `generated`, `failures`, `notes`.
"""

from __future__ import annotations

from typing import Any, Sequence

RESULTS_SCHEMA = 2  # 2: `failures` is per cell (was one count)


def build_results(*, name: str, run_id: str, child_runs: dict[str, str], primary_metric: str, caseset: Any,
                  variants: Sequence[dict], targets: Sequence[dict], generation: dict, cells: list[dict],
                  comparisons: list[dict], cache: dict, rows: Sequence[dict], failures: dict,
                  max_failure_rate: float, notes: Sequence[str]) -> dict:
    """The results.json document. `caseset` has path/kind/cases/dataset_version (flywheel.evals.prompts.cases);
    `rows` are the per-case rows (their `cached` field gives the generated count); `failures` is per cell
    (`rows`, `failed`, `failure_rate`, `first_error`, `retries`, `misses`)."""
    from flywheel.evals.prompts.scorers import METRICS

    return {
        "schema": RESULTS_SCHEMA,
        "name": name,
        "run_id": run_id,
        "child_runs": dict(child_runs),
        "primary_metric": primary_metric,
        "metrics": {m: {"direction": spec.direction, "description": spec.description, "binary": spec.binary}
                    for m, spec in METRICS.items() if any(c["metric"] == m for c in cells)},
        "cases": {"path": caseset.path, "kind": caseset.kind, "n": len(caseset.cases),
                  "dataset_version": caseset.dataset_version},
        "variants": list(variants),
        "targets": list(targets),
        "generation": dict(generation),
        "cells": cells,
        "comparisons": comparisons,
        "cache": dict(cache),
        "generated": sum(1 for r in rows if not r["cached"]),
        "failures": dict(failures),
        "max_failure_rate": max_failure_rate,
        "notes": list(notes),
    }


# -- readers --------------------------------------------------------------------------------------------------

def targets(results: dict) -> list[str]:
    """Target names, from `targets` or (hand-written files) from the cells."""
    named = [t["name"] for t in results.get("targets", []) if isinstance(t, dict) and "name" in t]
    return named or list(dict.fromkeys(c.get("target") for c in results.get("cells", [])))


def cells_for(results: dict, metric: str, target: str | None = None, variant: str | None = None) -> list[dict]:
    """The cells of `metric`, narrowed to a target and/or variant when given."""
    return [c for c in results.get("cells", []) if c.get("metric") == metric
            and (target is None or c.get("target") == target) and (variant is None or c.get("variant") == variant)]


def variants_of(results: dict, metric: str, target: str) -> list[str]:
    """The prompt variants `target` has a cell for on `metric`, sorted."""
    return sorted({c.get("variant") for c in cells_for(results, metric, target)} - {None})


def direction(results: dict, metric: str) -> bool | None:
    """True when higher is better, False when lower is, None when the file does not say (or disagrees)."""
    dirs = {c.get("direction") for c in cells_for(results, metric)}
    if not dirs - {None}:
        dirs = {(results.get("metrics", {}).get(metric) or {}).get("direction")}
    return {frozenset({"higher"}): True, frozenset({"lower"}): False}.get(frozenset(dirs))


def comparison_for(results: dict, metric: str, baseline: str, candidate: str,
                   variant: str | None = None) -> dict | None:
    """The paired comparison of `candidate` against `baseline` on `metric` (same variant on both sides)."""
    for x in results.get("comparisons", []):
        if x.get("metric") != metric:
            continue
        if "control_target" in x:
            hit = (x.get("control_target") == baseline and x.get("treatment_target") == candidate
                   and (variant is None or (x.get("control_variant") == variant
                                            and x.get("treatment_variant") == variant)))
        else:
            hit = (x.get("control") in (baseline, f"{baseline}/{variant}")
                   and x.get("variant") in (candidate, f"{candidate}/{variant}"))
        if hit:
            return x
    return None
