"""results.json: the eval shell builds it, the gate reads it; one module holds both sides (round trip)."""

from __future__ import annotations

from types import SimpleNamespace

from flywheel.evals import gate
from flywheel.evals.prompts import results as rs
from flywheel.foundation.io import read_json, write_json


def _built():
    caseset = SimpleNamespace(path="cases.yaml", kind="yaml", cases=[{}] * 30, dataset_version="ds1")
    cells = [{"variant": v, "target": t, "metric": "nll", "mean": m, "ci_low": m - 0.1, "ci_high": m + 0.1,
              "n": 30, "direction": "lower"}
             for v in ("concise", "grounded") for t, m in (("champion", 2.0), ("candidate", 1.6))]
    comparisons = [{"metric": "nll", "control_target": "champion", "treatment_target": "candidate",
                    "control_variant": v, "treatment_variant": v, "control": f"champion/{v}",
                    "variant": f"candidate/{v}", "estimate": -0.4, "ci_low": -0.5, "ci_high": -0.3,
                    "p_value": 0.001, "p_adjusted": 0.002, "n": 30, "test": "paired_t", "direction": "lower"}
                   for v in ("concise", "grounded")]
    return rs.build_results(
        name="t", run_id="r" * 32, child_runs={"candidate/concise": "c" * 32}, primary_metric="nll",
        caseset=caseset, variants=[{"name": "concise"}, {"name": "grounded"}],
        targets=[{"name": "champion"}, {"name": "candidate"}], generation={"max_new_tokens": 1}, cells=cells,
        comparisons=comparisons, cache={"hits": 0, "misses": 4}, rows=[{"cached": False, "error": None}] * 4,
        failures={"candidate/concise": {"rows": 2, "failed": 0, "failure_rate": 0.0}}, max_failure_rate=0.0,
        notes=["a note"])


def test_build_write_read_round_trip(tmp_path):
    built = _built()
    write_json(tmp_path / "results.json", built)
    back = read_json(tmp_path / "results.json")
    assert back == built and back["schema"] == rs.RESULTS_SCHEMA
    assert back["metrics"]["nll"]["direction"] == "lower" and back["cases"]["n"] == 30
    assert back["generated"] == 4 and back["failures"]["candidate/concise"]["failed"] == 0
    assert rs.targets(back) == ["champion", "candidate"]
    assert [c["mean"] for c in rs.cells_for(back, "nll", "candidate", "grounded")] == [1.6]
    assert rs.variants_of(back, "nll", "candidate") == ["concise", "grounded"]
    assert rs.direction(back, "nll") is False
    comp = rs.comparison_for(back, "nll", "champion", "candidate", "grounded")
    assert comp["treatment_variant"] == "grounded" and comp["p_adjusted"] == 0.002
    # ... and the gate decides on exactly what was written (best of two variants: Holm over two).
    variant, family = gate.pick_variant(back, "nll", "candidate")
    out = gate.evaluate(back, gate.GateRules(), baseline="champion", candidate="candidate", variant=variant,
                        variant_family=family)
    assert out["decision"] == "pass" and out["checks"][0]["p_adjusted"] == 0.004


def test_readers_accept_label_only_comparisons():
    res = _built()
    for c in res["comparisons"]:
        for k in ("control_target", "treatment_target", "control_variant", "treatment_variant"):
            c.pop(k)
    assert rs.comparison_for(res, "nll", "champion", "candidate", "concise")["variant"] == "candidate/concise"
    assert rs.comparison_for(res, "nll", "candidate", "champion", "concise") is None
