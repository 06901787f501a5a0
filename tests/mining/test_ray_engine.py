"""The Ray engine writes the local engine's bytes: real sets, bad lines, a killed worker, an input error.

One local Ray per module (2 CPUs, more blocks than CPUs), shut down in a finalizer."""

from __future__ import annotations

import filecmp
import json
import os

import pytest

from tests.conftest import shared_path
from flywheel.foundation.errors import InputError
from flywheel.mining import engine, ray_engine
from flywheel.mining.config import MineConfig
from flywheel.mining.demo_logs import write_demo_logs

pytestmark = pytest.mark.slow
FILES = ("train.jsonl", "eval.jsonl", "preferences.jsonl", "preferences_eval.jsonl", "rejects.jsonl")


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    ray = pytest.importorskip("ray")
    arm = tmp_path_factory.mktemp("kill") / "armed"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ[ray_engine.KILL_ONCE_ENV] = str(arm)  # inherited by the workers; armed by creating the file
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield arm
    ray.shutdown()
    os.environ.pop(ray_engine.KILL_ONCE_ENV, None)


def _both(inputs, tmp_path, prior=None, **kw):
    local = engine.mine(inputs, tmp_path / "local", MineConfig(progress=False, log_mlflow=False, workers=1, **kw),
                        prior=prior)
    ray = ray_engine.mine(inputs, tmp_path / "ray", MineConfig(progress=False, log_mlflow=False, engine="ray",
                                                               ray={"blocks": 5}, **kw), prior=prior)
    for f in FILES + ("manifest.json", "README.md"):
        assert filecmp.cmp(tmp_path / "local" / f, tmp_path / "ray" / f, shallow=False), f
    assert ray.manifest["version"] == local.manifest["version"]
    return local, ray


@pytest.mark.parametrize("name", ["oasst1-en-validation", "oasst2-vegan-filtered-trees",
                                  "hh-rlhf-harmless-base-test"])
def test_real_sets_byte_identical(ray_local, tmp_path, name):
    local, ray = _both([shared_path(name)], tmp_path)
    assert local.manifest["counts"]["read"] > 100
    assert ray.stats["params"]["ray.cluster_cpus"] == 2
    assert ray.stats["metrics"]["ray.worker_peak_rss_mb.max"] > 50


def test_bad_lines_near_duplicates_and_files_byte_identical(ray_local, tmp_path):
    """Demo logs (malformed lines, planted exact and near duplicates, PII) cut into two rotated files."""
    write_demo_logs(tmp_path / "all.jsonl", n=400)
    lines = (tmp_path / "all.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"".join(lines[:250]))
    (tmp_path / "in" / "b.jsonl").write_bytes(b"".join(lines[250:]) + b"{not json\n")
    local, ray = _both([tmp_path / "in"], tmp_path)
    c = local.manifest["counts"]
    assert c["rejected"] > 0 and c["filtered"].get("near_duplicate", 0) > 0
    assert ray.stats["params"]["ray.block_tasks"] > 2  # more blocks than CPUs


def test_killed_worker_is_retried_same_output(ray_local, tmp_path):
    write_demo_logs(tmp_path / "in.jsonl", n=200)
    ray_local.write_text("")
    _both([tmp_path / "in.jsonl"], tmp_path)
    assert not ray_local.exists() and ray_local.with_name("armed.fired").exists()  # a worker did die


def test_input_error_names_the_file_and_leaves_no_output(ray_local, tmp_path):
    good = tmp_path / "good.jsonl"
    write_demo_logs(good, n=50)
    bad = tmp_path / "bad.csv"
    bad.write_text("\nrating,messages\n")
    out = tmp_path / "out"
    cfg = MineConfig(progress=False, log_mlflow=False, engine="ray", format="chatlog")
    with pytest.raises(InputError, match=r"bad\.csv:1: CSV has no header row"):
        ray_engine.mine([good, bad], out, cfg)
    assert not out.exists()  # nor a temp sibling; only the writers' lock file stays
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == [".out.output.lock"]


def test_run_mine_logs_engine_and_memory(ray_local, tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    from flywheel.pipelines.mine import run_mine

    write_demo_logs(tmp_path / "in.jsonl", n=100)
    res = run_mine([tmp_path / "in.jsonl"], tmp_path / "out", MineConfig(progress=False, engine="ray"))
    run = MlflowClient().get_run(res["run_id"])
    p, m = run.data.params, run.data.metrics
    assert p["engine"] == "ray" and p["ray.cluster_cpus"] == "2" and p["ray.cluster_address"] == "local"
    assert m["driver_peak_rss_mb"] > 50 and m["ray.worker_peak_rss_mb.max"] > 50
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["version"] == res["version"]


# ------------------------------------------------------------------------------------------ an earlier batches' index
from tests.pipelines.test_mine_batches import batches  # noqa: E402,F401 (the fixture: two days, 6 repeats)


def _same_index(a, b):
    import numpy as np

    assert a.keys == b.keys and len(a.sigs) == len(b.sigs)
    assert all(np.array_equal(x, y) for x, y in zip(a.sigs, b.sigs))


def test_prior_index_byte_identical_and_same_index(ray_local, batches):
    """Against batch 1's index (through its file, as the loop reads it), batch 2 drops the 5 exact copies and
    the one-word edit as `duplicate_earlier_batch`; then a third run against batch 2's index drops everything."""
    from flywheel.mining.dedupe import DedupeIndex

    d, first = batches
    first["index"].save(d / "index.npz")
    prior = DedupeIndex.load(d / "index.npz")
    local, ray = _both([d / "day2.jsonl"], d / "two", prior=prior)
    assert ray.manifest["counts"]["filtered"]["duplicate_earlier_batch"] == 6
    _same_index(local.index, ray.index)
    assert len(ray.index.sigs) > len(prior.sigs) and ray.index.keys[:len(prior.keys)] == prior.keys
    local3, ray3 = _both([d / "day2.jsonl"], d / "three", prior=ray.index)
    assert ray3.manifest["counts"]["kept"] == 0
    _same_index(local3.index, ray3.index)


def test_prior_index_exact_only_byte_identical(ray_local, batches):
    d, first = batches
    local, ray = _both([d / "day2.jsonl"], d / "exact", prior=first["index"], dedupe={"near": False})
    assert ray.manifest["counts"]["filtered"]["duplicate_earlier_batch"] == 5  # the edit is not an exact copy
    _same_index(local.index, ray.index)


def test_the_loop_mines_on_ray_against_its_index(ray_local, batches, mlflow_store):
    from flywheel.pipelines.loop import INDEX_FILE, LoopConfig, run_loop

    d, first = batches
    (d / "work").mkdir()
    first["index"].save(d / "work" / INDEX_FILE)
    (d / "logs").mkdir()
    (d / "logs" / "day2.jsonl").write_bytes((d / "day2.jsonl").read_bytes())
    res = run_loop(LoopConfig(inputs=[str(d / "logs")], work_dir=str(d / "work"), min_new_records=10_000,
                              mine={"engine": "ray", "progress": False}))
    assert res["status"] == "skipped"
    manifest = json.loads((d / "work" / "datasets" / res["batch"] / "manifest.json").read_text())
    assert manifest["counts"]["filtered"]["duplicate_earlier_batch"] == 6


def test_default_blocks_stay_under_the_byte_cap(tmp_path):
    """Worker memory follows block size: a big input gets more blocks than 4 per CPU, each under the cap."""
    write_demo_logs(tmp_path / "in.jsonl", n=400)
    plan = engine.plan_inputs([tmp_path / "in.jsonl"], MineConfig())
    size = (tmp_path / "in.jsonl").stat().st_size
    assert len(ray_engine.plan_blocks(plan, 2)) == 2
    capped = ray_engine.plan_blocks(plan, 2, max_bytes=size // 10)
    n_lines = len((tmp_path / "in.jsonl").read_bytes().splitlines())
    assert len(capped) >= 10 and sum(t["lines"] for t in capped) == n_lines


def test_rating_lines_in_another_block_byte_identical(ray_local, tmp_path):
    """A chat log may rate a conversation on a later line: the block holding the conversation must see it."""
    write_demo_logs(tmp_path / "in.jsonl", n=200, dirty=False)
    ids = [json.loads(x)["conversation_id"] for x in (tmp_path / "in.jsonl").read_text().splitlines()]
    with open(tmp_path / "in.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps({"rating_for": i, "rating": 1}) + "\n" for i in ids[:60])
    local, ray = _both([tmp_path / "in.jsonl"], tmp_path)
    assert local.manifest["counts"]["filtered"]["low_rating"] >= 60
