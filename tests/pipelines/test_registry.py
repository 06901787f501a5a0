"""Registry: adapters as model versions with lineage tags, champion alias history, model references."""

from __future__ import annotations

import json

import pytest

from flywheel.pipelines import registry, tracking
from flywheel.foundation.errors import InputError


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """mlflow.set_registry_uri exports MLFLOW_REGISTRY_URI, and tracking.setup prefers that variable: without
    this, a test would read the previous test's registry."""
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def fake_adapter(path, **meta):
    """A dummy adapter folder: enough for the registry (real weights are tested in test_publish)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (path / "flywheel_adapter.json").write_text(json.dumps({"base_model": "smollm2-135m-instruct",
                                                            "base_model_sha256": "ab" * 32, **meta}))
    return path


def train_run(tmp_path, name, dataset="v1"):
    import mlflow

    d = fake_adapter(tmp_path / name, dataset_version=dataset)
    with tracking.start_run("train", inputs={"dataset_version": dataset}) as run:
        meta = json.loads((d / "flywheel_adapter.json").read_text())
        meta["train_run_id"] = run.info.run_id
        (d / "flywheel_adapter.json").write_text(json.dumps(meta))
        mlflow.log_artifacts(str(d), "adapter")
    return run.info.run_id


def test_resolve_every_kind_of_reference(mlflow_store, tmp_path):
    run_id = train_run(tmp_path, "a1")
    for ref in (run_id, f"runs:/{run_id}/adapter", f"runs:/{run_id}"):
        m = registry.resolve_model(ref, "candidate")
        assert (m.adapter_dir / "adapter_config.json").exists() and m.run_id == run_id
        assert m.meta["dataset_version"] == "v1"
    local = registry.resolve_model(str(tmp_path / "a1"))
    assert local.meta["train_run_id"] == run_id
    with pytest.raises(InputError, match="candidate"):
        registry.resolve_model("runs:/" + "0" * 32 + "/adapter", "candidate")
    with pytest.raises(InputError, match="not in the registry"):
        registry.resolve_model("models:/nope@champion", "champion")
    with pytest.raises(InputError, match="not a LoRA adapter"):
        (tmp_path / "empty").mkdir()
        registry.resolve_model(str(tmp_path / "empty"))


def test_register_promote_and_history(mlflow_store, tmp_path):
    name = "flywheel-test"
    assert registry.champion(name) is None
    assert registry.history(name) == []
    r1, r2 = train_run(tmp_path, "a1", "v1"), train_run(tmp_path, "a2", "v2")

    v1 = registry.register_adapter(name, registry.resolve_model(r1), tags={"flywheel.input.eval_run": "e1"})
    out = registry.promote(name, v1, "gate1")
    assert out == {"previous": None, "version": v1, "since": out["since"]}
    champ = registry.resolve_model(f"models:/{name}@champion")
    assert champ.version == v1 and champ.meta["dataset_version"] == "v1"
    assert champ.tags["flywheel.base_model_sha256"] == "ab" * 32
    assert champ.tags["flywheel.input.train_run"] == r1 and champ.tags["flywheel.input.eval_run"] == "e1"
    assert champ.tags[registry.TAG_BY_GATE] == "gate1" and registry.TAG_UNTIL not in champ.tags

    v2 = registry.register_adapter(name, registry.resolve_model(f"runs:/{r2}/adapter"))
    assert registry.promote(name, v2, "gate2")["previous"] == v1
    old = registry.get_version(f"models:/{name}/{v1}")
    assert old.tags[registry.TAG_UNTIL] >= old.tags[registry.TAG_SINCE]
    assert str(registry.champion(name).version) == v2

    # Rollback: v1 comes back; its first interval is kept, a second one opens.
    registry.promote(name, v1, "gate3")
    rows = registry.history(name)
    assert [(r["version"], r["gate_run"], r["current"]) for r in rows] == [
        (v1, "gate1", False), (v2, "gate2", False), (v1, "gate3", True)]
    assert rows[0]["until"] is not None and rows[-1]["until"] is None
    assert registry.TAG_UNTIL not in registry.get_version(f"models:/{name}/{v1}").tags
    assert registry.promote(name, v1, "gate4").get("unchanged") is True


def test_history_command(mlflow_store, tmp_path):
    import typer
    from typer.testing import CliRunner

    r1 = train_run(tmp_path, "a1")
    v = registry.register_adapter("flywheel-demo", registry.resolve_model(r1))
    registry.promote("flywheel-demo", v, "g" * 32)
    app = typer.Typer()
    registry.history_command(app)
    app.command("noop")(lambda: None)  # a second command so typer keeps `history` as a subcommand
    res = CliRunner().invoke(app, ["history", "flywheel-demo", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert rows[0]["version"] == v and rows[0]["current"] and rows[0]["gate_run"] == "g" * 32
    res = CliRunner().invoke(app, ["history", "flywheel-demo"])
    assert "champion history" in res.output and "(current)" in res.output


# -- compare-and-set promotion ---------------------------------------------------------------------------------

def _promote_worker(uri, name, adapter_dir, attempts, barrier, queue):
    """One process promoting its adapter `attempts` times, each time against the champion it has just read."""
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    from flywheel.pipelines import registry, tracking

    tracking.setup(uri)
    try:
        model = registry.resolve_model(adapter_dir)
    except Exception as e:  # noqa: BLE001 - reported to the parent instead of leaving it waiting
        barrier.abort()
        queue.put([("crash", None, repr(e), None)])
        return
    # The first attempt reads the champion before the barrier: every process then races on the same state (read
    # after it, a slow process could legitimately see the winner's version and win the next round).
    first = registry.champion(name)
    barrier.wait()
    out = []
    for i in range(attempts):
        cur = first if i == 0 else registry.champion(name)
        expected = str(cur.version) if cur is not None else None
        try:
            r = registry.promote_new(name, model, expected=expected, gate_run_id=f"{os.getpid()}-{i}")
            out.append(("won", expected, r["version"], r["previous"]))
        except registry.ChampionMoved as e:
            out.append(("moved", expected, str(e), None))
        except Exception as e:  # noqa: BLE001
            out.append(("crash", expected, repr(e), None))
    queue.put(out)


def _race(tmp_path, uri, name, procs, attempts):
    import multiprocessing as mp

    assert registry.champion(name) is None  # creates the store here: concurrent first-time migrations would race
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(procs, timeout=120), ctx.Queue()
    # Train runs with logged adapters: a server accepts only run artifacts as version sources.
    dirs = [train_run(tmp_path, f"p{i}") for i in range(procs)]
    ps = [ctx.Process(target=_promote_worker, args=(uri, name, str(d), attempts, barrier, queue)) for d in dirs]
    for p in ps:
        p.start()
    results = [r for _ in ps for r in queue.get(timeout=300)]
    assert not [r for r in results if r[0] == "crash"], results
    for p in ps:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _assert_consistent_history(name, wins):
    from mlflow.tracking import MlflowClient

    rows = registry.history(name)
    assert len(rows) == len(wins)  # one interval per successful promotion: nothing doubled, nothing lost
    assert len({(r["version"], r["since"]) for r in rows}) == len(rows)
    assert [r["until"] for r in rows[:-1]] == [r["since"] for r in rows[1:]]  # contiguous, never overlapping
    assert rows[-1]["until"] is None and rows[-1]["current"] and not any(r["current"] for r in rows[:-1])
    assert str(registry.champion(name).version) == rows[-1]["version"]
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == sorted(int(w[2]) for w in wins)  # no orphan version
    prevs = [w[3] for w in wins]
    assert len(set(prevs)) == len(prevs)  # each champion state was replaced at most once


@pytest.mark.slow
def test_racing_promotions_one_winner(mlflow_store, tmp_path):
    results = _race(tmp_path, mlflow_store, "flywheel-race", procs=4, attempts=1)
    wins = [r for r in results if r[0] == "won"]
    assert len(wins) == 1 and wins[0][1] is None
    moved = [r for r in results if r[0] == "moved"]
    assert len(moved) == 3 and all(m[2].startswith("champion moved") and "v1" in m[2] for m in moved)
    _assert_consistent_history("flywheel-race", wins)


@pytest.mark.slow
def test_promotion_stress_keeps_history_consistent(mlflow_store, tmp_path):
    results = _race(tmp_path, mlflow_store, "flywheel-stress", procs=3, attempts=6)
    wins = [r for r in results if r[0] == "won"]
    assert len(wins) >= 6  # every round someone wins (the first attempt of each process at least sees a state)
    _assert_consistent_history("flywheel-stress", wins)


def test_promote_checks_the_expected_champion(mlflow_store, tmp_path):
    name = "flywheel-cas"
    m1 = registry.resolve_model(train_run(tmp_path, "a1"))
    m2 = registry.resolve_model(train_run(tmp_path, "a2"))
    assert registry.promote_new(name, m1, expected=None, gate_run_id="g1")["version"] == "1"
    with pytest.raises(registry.ChampionMoved, match="champion moved.*no champion.*v1"):
        registry.promote_new(name, m2, expected=None, gate_run_id="g2")
    with pytest.raises(registry.ChampionMoved, match="v7"):
        registry.promote(name, "1", "g3", expected="7")
    out = registry.promote_new(name, m2, expected="1", gate_run_id="g4")
    assert out["previous"] == "1" and out["version"] == "2"
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == 2  # the refused one left none
    assert (tracking.flywheel_home() / f".registry-{name}.lock").exists()  # the lock lives next to the db


def test_lease_guard_for_servers_excludes_a_second_promotion(mlflow_store, tmp_path, monkeypatch):
    """The optimistic scheme used against a server, exercised on a real store: a held lease refuses a second
    promotion; a released one lets it through with the next sequence number; a stolen one fails verify()."""
    monkeypatch.setattr(registry, "SETTLE_SECONDS", 0.05)
    name = "flywheel-lease"
    a = registry._LeaseGuard(name)
    with a:
        with pytest.raises(registry.ChampionMoved, match="holds the registry lease"):
            registry._LeaseGuard(name).__enter__()
        a.verify()
    b = registry._LeaseGuard(name)
    with b:
        assert b.seq == a.seq + 1
        registry._LeaseGuard(name)._write({"owner": "someone-else", "seq": b.seq + 1, "expires": 1e12})
        with pytest.raises(registry.ChampionMoved, match="took the registry lease"):
            b.verify()


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real `mlflow server` on 127.0.0.1 (its own sqlite store): the registry as a remote user sees it."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "server"
    store.mkdir()
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{store / 'db.sqlite'}",
                             "--default-artifact-root", (store / "artifacts").as_uri(), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(uri + "/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / ".flywheel"))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        tracking.setup(uri)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_racing_promotions_on_a_server_one_winner(mlflow_server, tmp_path):
    """Against a server there is no local lock: the lease tag lets exactly one racing promotion through."""
    results = _race(tmp_path, mlflow_server, "flywheel-remote", procs=3, attempts=1)
    wins = [r for r in results if r[0] == "won"]
    assert len(wins) == 1, results
    assert all(r[0] == "moved" for r in results if r[0] != "won")
    _assert_consistent_history("flywheel-remote", wins)
    lease = json.loads(registry._client().get_registered_model("flywheel-remote").tags[registry.TAG_LEASE])
    assert lease["owner"] is None and lease["seq"] >= 1  # released; the counter says promotions happened
