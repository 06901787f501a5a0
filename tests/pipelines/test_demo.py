"""`flywheel demo --traces`: the demo conversations logged as MLflow traces through the application helper mine
back into the same dataset sizes as the demo's JSONL (the whole demo is not run here: it takes minutes)."""

import pytest

from flywheel.mining.demo_logs import generate_demo_records, write_demo_logs
from flywheel.pipelines.demo import TRACES_EXPERIMENT, log_demo_traces
from flywheel.pipelines.mine import MineConfig, run_mine


@pytest.mark.slow  # ~70 traces in sqlite
def test_demo_traces_mine_like_the_demo_jsonl(mlflow_store, tmp_path):
    rows, _ = generate_demo_records(n=60, seed=0)
    logged = log_demo_traces(rows)
    write_demo_logs(tmp_path / "chat.jsonl", n=60, seed=0)
    cfg = MineConfig(progress=False, workers=1, log_mlflow=False)
    a = run_mine([f"mlflow-traces:{TRACES_EXPERIMENT}"], tmp_path / "traces", cfg)
    b = run_mine([tmp_path / "chat.jsonl"], tmp_path / "jsonl", cfg)
    # Of the 7 planted malformed lines the JSONL rejects, an application logs only the two with a bad rating (as
    # unrated interactions); the other five are not interactions at all.
    assert a["counts"]["read"] == logged == b["counts"]["read"] - 5
    assert a["counts"]["rejected"] == 0 and b["counts"]["rejected"] == 7
    assert a["counts"]["filtered"]["no_rating"] == b["counts"]["filtered"].get("no_rating", 0) + 2
    assert a["counts"]["kept"] == b["counts"]["kept"] > 20
    assert a["splits"]["eval"] == b["splits"]["eval"] and a["splits"]["train"] == b["splits"]["train"]
    assert a["counts"]["pii"] == b["counts"]["pii"]
