"""`flywheel mine` end to end on the embedded demo logs: accounting, determinism, no PII leak, dedupe vs split,
atomic output, MLflow logging per the contract, CLI errors."""

import json

import pytest
from typer.testing import CliRunner

from flywheel.pipelines.config import load_config
from flywheel.mining.demo_logs import write_demo_logs
from flywheel.foundation.errors import InputError
from flywheel.foundation.io import read_jsonl
from flywheel.pipelines.mine import MineConfig, mine_to_dir, run_mine


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    d = tmp_path_factory.mktemp("logs")
    summary = write_demo_logs(d / "demo.jsonl", n=240, seed=1)
    return d / "demo.jsonl", summary


def cfg(**kw):
    return MineConfig(progress=False, workers=1, **kw)


def _all_text(out):
    return "".join(p.read_text(encoding="utf-8") for p in out.iterdir() if p.is_file())


def test_counts_reconcile_and_outputs(logs, tmp_path):
    path, summary = logs
    m = mine_to_dir([path], tmp_path / "ds", cfg())
    c = m["counts"]
    assert c["read"] == summary["n_lines"] == c["kept"] + c["rejected"] + sum(c["filtered"].values())
    assert c["rejected"] == summary["malformed"] == 7
    # every planted copy is caught; exact vs near is judged against the cluster's winner, so when a near copy
    # outranks its original, the original and its exact copy count as near duplicates of it
    assert c["filtered"]["duplicate"] + c["filtered"]["near_duplicate"] == \
        summary["duplicates"] + summary["near_duplicates"]
    assert c["filtered"]["duplicate"] > 0 and c["filtered"]["near_duplicate"] > 0
    assert m["splits"]["train"] + m["splits"]["eval"] == c["kept"] and m["splits"]["eval"] > 0
    out = tmp_path / "ds"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "eval.jsonl", "manifest.json",
                                                      "preferences.jsonl", "rejects.jsonl", "samples.jsonl",
                                                      "train.jsonl"]
    train = read_jsonl(out / "train.jsonl")
    rec = train[0]
    assert set(rec) == {"id", "messages", "rating", "source", "prompt_variant", "context", "cluster"}
    assert rec["messages"][0]["role"] == "system" and rec["context"] in rec["messages"][0]["content"]
    assert all(r["rating"] >= 4 for r in train)
    rejects = read_jsonl(out / "rejects.jsonl")
    assert {r["file"] for r in rejects} == {f"{path.parent.name}/demo.jsonl"}
    assert any("five" in r["reason"] for r in rejects) and any("UTF-8" in r["reason"] for r in rejects)
    # no planted PII string anywhere in what we wrote; the placeholders are there instead
    text = _all_text(out)
    leaks = [p["value"] for p in summary["pii"] if p["value"] in text]
    assert leaks == []
    assert "<EMAIL>" in text and "<CARD>" in text and "<IBAN>" in text
    # a duplicate cluster keeps one member, and everything from one cluster is on one side of the split
    ev = read_jsonl(out / "eval.jsonl")
    assert not {r["cluster"] for r in train} & {r["cluster"] for r in ev}
    assert len({r["cluster"] for r in train + ev}) == len(train) + len(ev)
    assert json.loads((out / "manifest.json").read_text())["version"] == m["version"]
    assert m["version"] in (out / "README.md").read_text()


def test_same_input_same_bytes_any_worker_count(logs, tmp_path):
    path, _ = logs
    a = mine_to_dir([path], tmp_path / "a", cfg())
    b = mine_to_dir([path], tmp_path / "b", MineConfig(progress=False, workers=2, batch_size=37))
    assert a["version"] == b["version"]
    for name in ("train.jsonl", "eval.jsonl", "preferences.jsonl", "rejects.jsonl", "manifest.json", "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    c = mine_to_dir([path], tmp_path / "c", cfg(min_rating=5))
    assert c["version"] != a["version"] and c["counts"]["filtered"]["low_rating"] > a["counts"]["filtered"][
        "low_rating"]


def test_exact_only_and_failed_run_leaves_nothing(logs, tmp_path):
    path, summary = logs
    m = mine_to_dir([path], tmp_path / "x", cfg(**{"dedupe": {"near": False}}))
    assert "near_duplicate" not in m["counts"]["filtered"]
    (tmp_path / "x" / "keep").write_text("old")  # a failing re-run must leave the old dir untouched
    bad = tmp_path / "bad.parquet"  # fails mid-run, after the first input was mined into the temp dir
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet"):
        mine_to_dir([path, bad], tmp_path / "x", cfg())
    assert (tmp_path / "x" / "keep").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_mlflow_run_follows_the_contract(logs, tmp_path, mlflow_store):
    import mlflow
    from mlflow.tracking import MlflowClient

    path, _ = logs
    res = run_mine([path], tmp_path / "ds", cfg())
    assert set(res) >= {"run_id", "out", "manifest"}
    run = MlflowClient().get_run(res["run_id"])
    exp = MlflowClient().get_experiment(run.info.experiment_id)
    assert exp.name == "flywheel/mine"
    t, m, p = run.data.tags, run.data.metrics, run.data.params
    assert t["flywheel.stage"] == "mine" and t["flywheel.dataset_version"] == res["version"]
    assert t["flywheel.dataset_path"] == res["out"] and "flywheel.input.logs_sha256" in t
    c = res["counts"]
    assert m["read"] == c["read"] and m["kept"] == c["kept"] and m["rejected"] == c["rejected"]
    assert m["filtered.duplicate"] == c["filtered"]["duplicate"] and m["split.train"] == res["splits"]["train"]
    assert m["preferences"] == c["preferences"]
    assert p["min_rating"] == "4" and p["dedupe.threshold"] == "0.8"
    arts = {a.path for a in MlflowClient().list_artifacts(res["run_id"])}
    assert {"manifest.json", "README.md", "samples.jsonl"} <= arts
    assert run.inputs.dataset_inputs[0].dataset.digest == res["version"]
    assert mlflow.get_tracking_uri() == mlflow_store


def test_cli_errors_are_one_line_exit_2(logs, tmp_path, monkeypatch):
    from flywheel.pipelines.cli import app

    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    path, _ = logs
    for args, msg in [([str(tmp_path / "nope.jsonl")], "does not exist"),
                      ([str(path), "min_ratin=3"], "min_ratin: unknown key"),
                      ([str(path), "min_rating=9"], "min_rating")]:
        r = runner.invoke(app, ["mine", *args, "--out", str(tmp_path / "o")])
        assert isinstance(r.exception, Exception) and msg in str(r.exception)
        assert getattr(r.exception, "exit_code", None) == 2
    r = runner.invoke(app, ["mine", str(path), "--out", str(tmp_path / "o"), "log_mlflow=false", "progress=false"])
    assert r.exit_code == 0, r.output
    assert "read 247 = kept" in r.output or "read " in r.output


def test_config_file_matches_defaults():
    from pathlib import Path

    f = Path(__file__).resolve().parents[2] / "configs" / "mine.yaml"
    assert f.read_text().startswith("# Run with: flywheel mine")
    assert load_config(MineConfig, f) == MineConfig()
