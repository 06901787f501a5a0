"""flywheel.dashboard.store: artifact paths confined to the artifact root, lineage walked through real runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flywheel.dashboard import store


@pytest.mark.parametrize("bad", ["", "../secret", "a/../../b", "/etc/passwd", "..", "a\\..\\b", "C:/x", "~/x",
                                 "a\x00b", "./.."])
def test_safe_relpath_refuses_escapes(bad):
    with pytest.raises(store.ArtifactPathError):
        store.safe_relpath(bad)


@pytest.mark.parametrize("good,norm", [("report.json", "report.json"), ("./adapter//x.json", "adapter/x.json"),
                                       ("a/b/c.csv", "a/b/c.csv")])
def test_safe_relpath_normalises(good, norm):
    assert store.safe_relpath(good) == norm


def test_resolve_local_refuses_symlink_out_of_root(tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("no")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    (root / "ok.txt").write_text("yes")
    assert store.resolve_local(root, "ok.txt").read_text() == "yes"
    with pytest.raises(store.ArtifactPathError):
        store.resolve_local(root, "link.txt")


def test_local_artifact_dir():
    assert store.local_artifact_dir("file:///tmp/a%20b/artifacts") == Path("/tmp/a b/artifacts")
    assert store.local_artifact_dir("/tmp/x") == Path("/tmp/x")
    assert store.local_artifact_dir("s3://bucket/x") is None
    assert store.local_artifact_dir("mlflow-artifacts:/1/abc/artifacts") is None


@pytest.mark.slow
def test_reads_real_artifacts_and_refuses_traversal(dash_store):
    mine = dash_store["expected"]["gate"]["mine_run"]
    assert store.artifact_json(mine, "manifest.json")["version"] == dash_store["expected"]["mine"]["version"]
    assert store.artifact_json(mine, "missing.json") is None
    assert store.artifact_json("not-a-run-id", "manifest.json") is None
    with pytest.raises(store.ArtifactPathError):
        store.artifact_bytes(mine, "../../mlflow.db")
    with pytest.raises(store.ArtifactPathError):
        store.list_artifacts(mine, "../")


@pytest.mark.slow
def test_lineage_walks_back_to_the_logs(dash_store):
    exp = dash_store["expected"]["gate"]
    (champion,) = store.champions()
    assert champion["version"] == exp["champion_version"]
    hops = store.lineage(champion)
    assert hops["gate"]["run_id"] == exp["gate_run"]
    assert hops["train"]["run_id"] == exp["train_run"]
    assert hops["mine"]["run_id"] == exp["mine_run"]
    assert hops["publish"]["run_id"] == exp["publish_run"]
    assert hops["dataset_version"] == exp["dataset_version"]
    assert "oasst1-en-validation" in hops["logs"]


@pytest.mark.slow
def test_runs_filters(dash_store):
    parents = store.runs("embeddings", parents_only=True)
    assert [p["run_id"] for p in parents] == [dash_store["expected"]["embeddings"]["run_id"],
                                              dash_store["expected"]["embeddings_two"]["run_id"]]  # newest first
    assert len(store.children("embeddings", parents[1]["run_id"])) == 2
    assert len(store.runs("embeddings")) == 2 + 2 + 1  # parents + children
    assert store.runs("gate", "tags.`flywheel.gate.decision` = 'fail'")[0]["run_name"] == "gate-refused"
    with pytest.raises(ValueError):
        store.runs("nope")
