"""Every dashboard page rendered by Streamlit's AppTest on a real, filled MLflow store (and on an empty one)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
PAGES = ["overview", "datasets", "training", "embeddings", "prompt_eval", "ab", "gate"]


def render(page: str, run: str | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=120)
    if run:
        at.query_params["run"] = run
    at.run()
    if page != "overview":
        at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at) -> str:
    """Everything a reader sees as text: markdown, captions, metrics, code, titles, tables."""
    parts = []
    for kind in ("markdown", "caption", "code", "title", "header", "subheader", "info", "warning", "text",
                 "success", "error"):
        parts += [str(e.value) for e in at.get(kind)]
    parts += [f"{m.label}={m.value}" for m in at.metric]
    parts += [e.value.to_csv() for e in at.dataframe]
    return "\n".join(parts)


@pytest.fixture(autouse=True)
def _fresh_cache():
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    yield


@pytest.mark.slow
def test_overview_shows_champion_and_lineage(dash_store):
    exp = dash_store["expected"]["gate"]
    at = render("overview")
    shown = texts(at)
    assert "`flywheel-demo` v2" in shown
    assert "oasst1-en-validation" in shown  # logs, from the mine run's manifest
    assert dash_store["expected"]["mine"]["version"][:12] in shown  # dataset version
    links = {(p.proto.label, p.proto.page) for p in at.get("page_link")}
    assert any("train run" == label for label, _ in links)
    assert "never run" not in shown  # every stage has a last run
    assert "decision: **pass**" in shown
    assert exp["gate_run"]


@pytest.mark.slow
def test_datasets_funnel_and_samples(dash_store):
    exp = dash_store["expected"]["mine"]
    at = render("datasets")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Read"] == f"{exp['read']:,}" and metrics["Kept"] == f"{exp['kept']:,}"
    shown = texts(at)
    funnel = at.get("plotly_chart")[0].proto.spec
    for reason, count in exp["filtered"].items():
        assert f"{reason} ({count:,})" in funnel  # a funnel step per filter reason, with its count
    assert ":orange-background[**&lt;EMAIL&gt;**]" in shown  # the PII placeholder is highlighted, escaped
    assert len(at.get("plotly_chart")) == 1  # the funnel


@pytest.mark.slow
def test_training_overlays_runs_and_shows_audit(dash_store):
    at = render("training")
    shown = texts(at)
    assert "0.61" in shown and "0.92" in shown  # both default-selected runs' final losses
    assert len(at.get("plotly_chart")) == 4  # loss + tokens/s + lr + grad norm
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["examples used"] == "50 / 50" and metrics["zero-trained examples"] == "0"
    assert metrics["end-of-turn <|im_end|> trained"] == "50 ex."
    assert "Audit passed" in shown
    assert "Tofu is" in shown  # generations table


@pytest.mark.slow
def test_embeddings_real_benchmark(dash_store):
    exp = dash_store["expected"]["embeddings"]
    at = render("embeddings")
    shown = texts(at)
    assert exp["model"] in shown and ui_num(exp["spearman"], 4)[:5] in shown
    assert len(at.get("plotly_chart")) >= 2  # bars + quality vs speed
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("spearman on stsb (95 % CI)" in c for c in charts)  # the stage's own CI columns
    assert "cosine" in shown  # per-pair drill-down of STS


@pytest.mark.slow
def test_embeddings_significance_cis_and_drilldown(dash_store):
    exp = dash_store["expected"]["embeddings_two"]
    at = render("embeddings", run=exp["run_id"])
    shown = texts(at)
    assert exp["best"] in shown and "worse* (p_adj=3.11e-05)" in shown
    assert "★ significant" in shown
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("95 % CI" in c for c in charts)  # per-model CI from per-query vectors
    assert "shared queries: B better on" in shown


@pytest.mark.slow
def test_prompt_eval_matrix_comparisons_cases(dash_store):
    at = render("prompt_eval")
    shown = texts(at)
    assert "0.34" in shown and "★ significant" in shown
    assert "v1-adapter says kale is great" in shown and "v2-base says kale is great" in shown
    assert {m.label: m.value for m in at.metric}["Variants"] == "2"


@pytest.mark.slow
def test_ab_report(dash_store):
    exp = dash_store["expected"]["ab"]
    at = render("ab")
    shown = texts(at)
    assert f"SRM {exp['srm']}" in shown and exp["variant"] in shown and exp["control"] in shown
    assert ui_num(exp["estimate"]) in shown
    assert "not a p-value" in shown and "chance to beat control" in shown  # Bayesian block, labelled apart
    assert exp["decision"] in shown
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("p-values at each look (2)" in c for c in charts)  # two analyses of one experiment: two looks
    assert len(at.get("plotly_chart")) >= 4


def ui_num(x, digits=3):
    from flywheel.dashboard import ui

    return ui.num(x, digits)


@pytest.mark.slow
def test_gate_history_registry_and_modelfile(dash_store):
    at = render("gate")
    shown = texts(at)
    assert {m.label: m.value for m in at.metric} == {"Decisions": "3", "pass": "2", "fail": "1", "error": "0"}
    assert "Gate: FAIL" in shown or "Gate: PASS" in shown
    assert "now" in shown and len(at.get("plotly_chart")) == 1  # alias history: table + timeline
    assert 'PARAMETER stop "<|im_end|>"' in shown


@pytest.mark.slow
def test_query_param_preselects_run(dash_store):
    gate_run = dash_store["expected"]["gate"]["gate_run"]
    at = render("gate", run=gate_run)
    assert "Gate: PASS" in texts(at)


@pytest.mark.slow
def test_pages_do_not_write_to_the_store(dash_store):
    db = Path(dash_store["home"]) / "mlflow.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    for page in PAGES:
        render(page)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


COMMANDS = {"overview": "flywheel demo", "datasets": "flywheel mine", "training": "flywheel train",
            "embeddings": "flywheel bench-embeddings", "prompt_eval": "flywheel eval", "ab": "flywheel ab analyze",
            "gate": "flywheel gate"}


@pytest.mark.parametrize("page", PAGES)
def test_empty_store_names_the_command(empty_store, page):
    at = render(page)
    codes = " ".join(c.value for c in at.code)
    assert COMMANDS[page] in codes


@pytest.mark.slow
def test_pages_tolerate_runs_without_artifacts(bare_runs_store):
    for page in PAGES:
        at = render(page)  # asserts no exception
        assert at.title, page
    assert "no `leaderboard.csv`" in texts(render("embeddings"))
    assert "no `report.json`" in texts(render("ab"))
