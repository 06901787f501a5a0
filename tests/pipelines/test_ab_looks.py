"""Sequential A/B across looks: earlier `flywheel/ab` runs of the same experiment, read back from the store."""

from __future__ import annotations

import pytest

from flywheel.pipelines import store_read
from flywheel.pipelines import tags as T
from flywheel.evals.ab.config import AbConfig
from flywheel.pipelines.ab import run_ab


@pytest.mark.slow
def test_three_looks_of_one_experiment(mlflow_store, tmp_path):
    from flywheel.mining.demo_logs import write_demo_logs

    runs = []
    for n in (120, 200, 300):  # the logs grow between looks, as a reviewer re-runs `flywheel ab analyze`
        logs = tmp_path / f"logs-{n}.jsonl"
        write_demo_logs(logs, n=n, seed=0)
        runs.append(run_ab([logs], AbConfig(n_boot=200)))
    looks = runs[-1]["report"]["looks"]
    assert looks["n_looks"] == 3
    key = looks["experiment"]
    logged = store_read.stage_runs(mlflow_store, "ab")
    assert {r["tags"][T.AB_EXPERIMENT] for r in logged} == {key}
    assert runs[0]["report"]["looks"]["n_looks"] == 1 and runs[1]["report"]["looks"]["n_looks"] == 2
    for c in looks["comparisons"]:
        seq = c["looks"]
        assert [s["run_id"] for s in seq] == [runs[0]["run_id"], runs[1]["run_id"], None]  # this look is last
        per_look = [next(x["sequential"] for x in r["report"]["comparisons"]
                         if (x["variant"], x["metric"]) == (c["variant"], c["metric"])) for r in runs]
        assert [s["p_value"] for s in seq] == pytest.approx([s["p_value"] for s in per_look])
        assert c["p_running_min"] == pytest.approx(min(s["p_value"] for s in per_look))
        assert c["cs_low"] == pytest.approx(max(s["ci_low"] for s in per_look))
        assert c["cs_high"] == pytest.approx(min(s["ci_high"] for s in per_look))
        assert all(a >= b for a, b in zip([s["p_running_min"] for s in seq], [s["p_running_min"] for s in seq][1:]))

    other = run_ab([tmp_path / "logs-300.jsonl"], AbConfig(n_boot=200, control="v2"))  # another experiment
    assert other["report"]["looks"]["n_looks"] == 1
