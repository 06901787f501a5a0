"""Run data is someone else's text, and one run can be broken: pages render it inert and survive it.

Each test builds its own small MLflow store (sqlite, real client, real artifacts) and renders pages with
Streamlit's AppTest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.dashboard.conftest import _log_text, _metrics, _mlflow_uris_restored, _run
from tests.dashboard.test_app import render
from tests.evals.test_markdown import EVIL, outside_refs

from flywheel.pipelines import tags as T

EVIL_IMAGE = "![q](http://evil.example/q.png)"


@pytest.fixture(autouse=True)
def _fresh_cache():
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    yield


@pytest.fixture
def small_store(tmp_path, monkeypatch):
    """An empty Flywheel store the test fills with a few runs through the real MLflow client."""
    home = tmp_path / ".flywheel"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    from mlflow.tracking import MlflowClient

    from flywheel.pipelines.tracking import setup

    with _mlflow_uris_restored():
        setup()
        yield MlflowClient(), tmp_path / "staging"


def markdown_sources(at) -> list[str]:
    """Every string Streamlit renders as Markdown on the page: bodies, captions, alerts, headings and labels."""
    out = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "title", "header", "subheader"):
        out += [str(e.value) for e in at.get(kind)]
    out += [str(e.label) for e in at.get("expander")]
    out += [str(m.label) for m in at.metric]
    return out


def assert_inert(at):
    bad = {src: refs for src in markdown_sources(at) if (refs := outside_refs(src))}
    assert not bad, bad


@pytest.mark.slow
def test_hostile_strings_render_as_text(small_store):
    """A candidate URI with a backtick, an image in gate_report.md, hostile run names, tags and samples."""
    from flywheel.evals.gate import report_markdown

    client, tmp = small_store
    mine = _run(client, "mine", EVIL, tags={T.DATASET_VERSION: EVIL, T.DATASET_PATH: EVIL})
    _metrics(client, mine, {"read": 3, "kept": 2, "rejected": 1, "pii.email": 1})
    _log_text(client, mine, "samples.jsonl", json.dumps({
        "id": EVIL, "rating": EVIL_IMAGE, "source": "http://evil.example/s", "messages": [
            {"role": EVIL_IMAGE, "content": f"mail <EMAIL> then {EVIL_IMAGE} or http://evil.example/x"}]}) + "\n", tmp)
    client.set_terminated(mine)

    gate = _run(client, "gate", EVIL, inputs={T.IN_CANDIDATE: EVIL},
                tags={T.GATE_DECISION: "fail" + EVIL_IMAGE})
    report = report_markdown({"decision": "error", "exit_code": 2, "checks": [], "reasons": [EVIL]},
                             baseline_label="base", candidate_label=EVIL)
    # An old or hand-made report is no safer than run tags: the page must not render whatever the file holds.
    _log_text(client, gate, "gate_report.md", report + f"\n{EVIL_IMAGE}\n", tmp)
    client.set_terminated(gate)

    at = render("gate")
    assert_inert(at)
    assert any(EVIL_IMAGE in c.value for c in at.code)  # the report is shown, as its source
    at = render("datasets")
    assert_inert(at)
    assert ":orange-background[**&lt;EMAIL&gt;**]" in "\n".join(markdown_sources(at))  # PII highlight kept
    assert_inert(render("overview"))


def _symlinked_artifact(client, run_id: str, name: str, target: Path) -> None:
    """Replace the run's logged artifact by a symlink leaving the artifact root (a refused artifact)."""
    from flywheel.dashboard.store import local_artifact_dir

    path = local_artifact_dir(client.get_run(run_id).info.artifact_uri) / name
    path.unlink()
    path.symlink_to(target)


def _two_runs(client, tmp, stage: str, artifact: str, good: str, **tags) -> tuple[str, str]:
    """An older good run and a newer bad one (its artifact a symlink to a file outside the store)."""
    secret = tmp / "outside" / "secret.json"
    secret.parent.mkdir(parents=True)
    secret.write_text(good, encoding="utf-8")
    ids = []
    for name in ("good-run", "bad-run"):
        run = _run(client, stage, name, tags=tags)
        _metrics(client, run, {"read": 3, "kept": 2})
        _log_text(client, run, artifact, good, tmp)
        client.set_terminated(run)
        ids.append(run)
        time.sleep(0.01)  # start times differ: the bad run is the newest, so the preselected one
    _symlinked_artifact(client, ids[1], artifact, secret)
    return ids[0], ids[1]


@pytest.mark.slow
@pytest.mark.parametrize("page,stage,artifact,good", [
    ("datasets", "mine", "samples.jsonl", json.dumps({"id": "rec-ok", "messages": [
        {"role": "user", "content": "hello from the good run"}]}) + "\n"),
    ("ab", "ab", "report.json", json.dumps({"control": "A", "srm": {"status": "ok"}, "comparisons": [],
                                            "warnings": ["hello from the good run"]})),
])
def test_one_bad_run_does_not_take_the_page_down(small_store, page, stage, artifact, good):
    client, tmp = small_store
    good_id, bad_id = _two_runs(client, tmp, stage, artifact, good, **{T.DATASET_VERSION: "ds-1"})

    at = render(page)  # asserts no exception: the page lives with the bad run preselected
    warnings = " ".join(w.value for w in at.warning)
    assert "bad-run" in warnings and "ArtifactPathError" in warnings  # the run, and why
    assert at.title

    at = render(page, run=good_id)  # the good run still shows in full
    assert "hello from the good run" in "\n".join(markdown_sources(at))
    assert not [w.value for w in at.warning if "bad-run" in w.value]
