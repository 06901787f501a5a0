"""Statistics across the looks of one A/B experiment (running minimum p, intersected confidence sequences)."""

from __future__ import annotations

from flywheel.evals.ab.looks import across, experiment_key
from flywheel.evals.ab.sequential import across_looks


def test_across_looks_running_min_and_intersection():
    out = across_looks([0.4, 0.1, 0.3], [-1.0, -0.2, -0.5], [2.0, 1.5, 0.9])
    assert out["p_running_min"] == [0.4, 0.1, 0.1]
    assert out["cs_low"] == [-1.0, -0.2, -0.2] and out["cs_high"] == [2.0, 1.5, 0.9]
    assert not out["empty"]
    assert across_looks([0.5, 0.5], [0.0, 2.0], [1.0, 3.0])["empty"]  # looks that contradict each other


def _report(p, lo, hi, control="a"):
    seq = {"p_value": p, "ci_low": lo, "ci_high": hi}
    return {"design": "independent", "control": control, "variants": [control, "b"],
            "comparisons": [{"variant": "b", "metric": "rating", "n": 10, "estimate": 0.1, "sequential": seq},
                            {"variant": "b", "metric": "tokens", "sequential": {"p_value": None}}]}


def test_across_reports_keeps_this_look_last_and_skips_looks_without_a_sequential_result():
    earlier = [("r1", 1, _report(0.4, -1.0, 2.0)), ("r2", 2, _report(0.1, -0.2, 1.5))]
    out = across(_report(0.3, -0.5, 0.9), earlier)
    assert out["n_looks"] == 3 and out["experiment"] == experiment_key(_report(0.3, -0.5, 0.9))
    [c] = out["comparisons"]  # tokens has no sequential numbers at any look
    assert [s["run_id"] for s in c["looks"]] == ["r1", "r2", None]
    assert (c["p_running_min"], c["cs_low"], c["cs_high"], c["cs_empty"]) == (0.1, -0.2, 0.9, False)


def test_experiment_key_is_design_control_variants_and_metrics():
    assert experiment_key(_report(0.3, 0, 1)) == experiment_key(_report(0.9, -1, 2))  # numbers do not matter
    assert experiment_key(_report(0.3, 0, 1)) != experiment_key(_report(0.3, 0, 1, control="z"))
