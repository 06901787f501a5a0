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
