"""An EvalConfig resolved before any generation: the plan, its refusals, and the failure limit."""

from __future__ import annotations

import pytest

from flywheel.evals.prompts import suite
from flywheel.evals.prompts.config import EvalConfig
from flywheel.foundation.errors import FlywheelError, InputError


def test_plan_resolves_the_demo_suite_without_generating(tmp_path):
    cfg = EvalConfig(out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), limit=3,
                     judge={}, metrics=["exact_match", "nll"])
    plan = suite.plan(cfg)
    assert [v.name for v in plan.variants] == ["concise", "grounded"] and len(plan.caseset.cases) == 3
    assert plan.judge is None and plan.pairs is None and plan.metrics == ["exact_match", "nll"]
    assert plan.params.max_new_tokens == cfg.generation.max_new_tokens and not (tmp_path / "out").exists()


def test_plan_refuses_a_primary_metric_that_is_not_computed(tmp_path):
    with pytest.raises(InputError, match="primary_metric 'rouge_l' is not among metrics"):
        suite.plan(EvalConfig(out=str(tmp_path / "o"), metrics=["nll"], primary_metric="rouge_l"))


def test_enough_cases_names_the_suite():
    suite.check_enough_cases(EvalConfig(limit=3), 3)
    with pytest.raises(InputError, match="min_cases 5: the eval suite has only 3 cases .*limit 3"):
        suite.check_enough_cases(EvalConfig(limit=3), 5)


def test_failures_above_the_limit_are_an_error_naming_the_cell():
    failures = {"candidate/concise": {"failed": 2, "rows": 10, "failure_rate": 0.2, "first_error": "timeout"}}
    suite.check_failures({"failures": failures, "max_failure_rate": 0.2})
    with pytest.raises(FlywheelError, match=r"candidate/concise: 2/10 failed \(first: timeout\)"):
        suite.check_failures({"failures": failures, "max_failure_rate": 0.1, "results_path": "r.json"})


def test_cells_table_puts_outputs_beside_their_scores():
    rows = [{"case_id": "c1", "question": "q", "reference": "r", "output": "o", "error": None, "cached": True,
             "assertions": [{"name": "contains", "reason": "no 'x'", "passed": False}], "metrics": {"nll": 1.5}},
            {"case_id": "c2", "question": "q2", "reference": None, "output": "o2", "error": None, "cached": False,
             "assertions": [], "metrics": {"exact_match": 1.0}}]
    t = suite.cells_table(rows)
    assert t["case_id"] == ["c1", "c2"] and t["failed_assertions"] == ["contains: no 'x'", ""]
    assert t["m.nll"] == [1.5, None] and t["m.exact_match"] == [None, 1.0]
