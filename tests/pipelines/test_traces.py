"""`flywheel mine mlflow-traces:<experiment>`: real traces in a temporary MLflow store (spans, retriever documents,
feedback from humans and an LLM judge) mined into the same dataset as the same conversations written as JSONL."""

import json

import pytest
from typer.testing import CliRunner

from flywheel.foundation.io import read_jsonl
from flywheel.pipelines.mine import MineConfig, run_mine

EXP = "assistant"


def cfg(**kw):
    return MineConfig(progress=False, workers=1, log_mlflow=False, **kw)


def _answer_fn():
    import mlflow
    from mlflow.entities import Document, SpanType

    @mlflow.trace(span_type=SpanType.RETRIEVER)
    def retrieve(question: str):
        return [Document(page_content=f"Fact sheet on {question[:20]}", metadata={"doc_uri": "kb"}),
                Document(page_content="Fibre keeps you full.")]

    @mlflow.trace(span_type=SpanType.CHAT_MODEL)
    def chat(messages: list, answer: str, variant: str, docs: bool):
        if docs:
            retrieve(messages[-1]["content"])
        mlflow.update_current_trace(tags={"prompt_variant": variant, "model": "m-1"})
        return {"choices": [{"message": {"role": "assistant", "content": answer}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

    @mlflow.trace
    def custom(query: str):  # a custom function: no `messages` in its inputs
        return "an answer"

    return chat, custom


def _feedback(tid, value, source):
    import mlflow
    from mlflow.entities import AssessmentSource

    mlflow.log_feedback(trace_id=tid, name="user_rating", value=value,
                        source=AssessmentSource(source_type=source, source_id="u" if source == "HUMAN" else "judge"))


def make_traces(n: int = 36):
    """Creates the traces; returns (expected JSONL lines of the mappable ones, ids of the unmappable ones)."""
    import mlflow

    mlflow.set_experiment(EXP)
    chat, custom = _answer_fn()
    lines, bad = [], []
    for i in range(n):
        q = f"How much fibre is in {['oats', 'beans', 'apples', 'rice', 'kale', 'lentils'][i % 6]} portion {i % 12}?"  # i and i + 12 ask alike: rating-gap pairs
        a = f"About {i % 7 + 2} grams of fibre per portion; pair it with water and vegetables for balance."
        if i % 9 == 4:
            a = "About 2 grams of fibre per portion; pair it with water and vegetables for balance."  # near dupes
        msgs = ([{"role": "system", "content": "You are a nutrition assistant."}] if i % 4 == 0 else []) + \
            [{"role": "user", "content": q}]
        docs = i % 3 != 0
        chat(msgs, a, "v2" if i % 2 else "v1", docs)
        tid = mlflow.get_last_active_trace_id()
        kind = i % 6
        rating = None
        if kind == 0:
            rating = 1 + i % 5
            _feedback(tid, rating, "HUMAN")
        elif kind == 1:
            rating = 5 if i % 4 == 1 else 1
            _feedback(tid, rating == 5, "HUMAN")  # thumbs up/down
        elif kind == 2:
            _feedback(tid, 2, "LLM_JUDGE")
            rating = 4
            _feedback(tid, 4, "HUMAN")  # the human wins over the judge, whatever the order
            _feedback(tid, 1, "LLM_JUDGE")
        elif kind == 3:
            rating = 3 + i % 3
            _feedback(tid, rating, "LLM_JUDGE")  # only a judge: it counts
        elif kind == 4:
            pass  # never rated
        else:
            rating = 5
            _feedback(tid, 5.0, "HUMAN")
        ctx = [f"Fact sheet on {q[:20]}", "Fibre keeps you full."] if docs else None
        lines.append({"conversation_id": tid, "messages": msgs + [{"role": "assistant", "content": a}],
                      "rating": rating, "retrieved_context": ctx, "prompt_variant": "v2" if i % 2 else "v1",
                      "model": "m-1"})
    for i in range(3):
        custom(f"question {i}")
        bad.append(mlflow.get_last_active_trace_id())
        _feedback(bad[-1], 5, "HUMAN")
    return lines, bad


def _records(d, name):
    return [{k: v for k, v in r.items() if k != "source"} for r in read_jsonl(d / name)]


@pytest.mark.slow  # creating traces in sqlite: ~0.1 s each
def test_traces_mine_like_the_same_jsonl(mlflow_store, tmp_path):
    lines, bad = make_traces()
    logs = tmp_path / "logs.jsonl"
    logs.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")

    res = run_mine([f"mlflow-traces:{EXP}"], tmp_path / "from_traces", cfg())
    ref = run_mine([logs], tmp_path / "from_jsonl", cfg())
    m = res["manifest"]
    (inp,) = m["inputs"]
    # every trace accounted for: read = kept + rejected + filtered, the unmappable ones rejected by trace id
    assert inp["path"] == "mlflow-traces:assistant" and inp["format"] == "mlflow-traces"
    assert inp["read"] == len(lines) + len(bad) == inp["kept"] + inp["rejected"] + sum(inp["filtered"].values())
    rejects = list(read_jsonl(tmp_path / "from_traces" / "rejects.jsonl"))
    assert sorted(r["raw"] for r in rejects) == sorted(bad)
    assert all("no messages" in r["reason"] and r["raw"] in r["reason"] for r in rejects)
    assert inp["filtered"]["no_rating"] == sum(x["rating"] is None for x in lines)
    assert inp["experiment"] == EXP and inp["filter"] is None and inp["newest_trace_ms"] > 0
    # the dataset equals the one mined from the JSONL (apart from each record's `source`)
    for name in ("train.jsonl", "eval.jsonl", "preferences.jsonl", "preferences_eval.jsonl"):
        assert _records(tmp_path / "from_traces", name) == _records(tmp_path / "from_jsonl", name), name
    assert m["splits"] == ref["manifest"]["splits"] and m["counts"]["filtered"] == ref["counts"]["filtered"]
    assert res["counts"]["kept"] == ref["counts"]["kept"] > 0 and m["splits"]["preferences"] > 0
    train = list(read_jsonl(tmp_path / "from_traces" / "train.jsonl"))
    assert {r["source"] for r in train} == {"mlflow-traces"}
    assert any("Fibre keeps you full." in (r["context"] or "") for r in train)


@pytest.mark.slow  # creating traces in sqlite: ~0.1 s each
def test_rating_rules_filter_and_window(mlflow_store, tmp_path):
    lines, _ = make_traces(12)
    human_only = run_mine([f"mlflow-traces:{EXP}"], tmp_path / "h", cfg(**{"traces": {"rating_rule": "human_only"}}))
    judged = sum(1 for i in range(12) if i % 6 == 3)  # judge-only traces count as unrated under human_only
    assert human_only["manifest"]["inputs"][0]["filtered"]["no_rating"] == judged + 2
    newest = human_only["manifest"]["inputs"][0]["newest_trace_ms"]
    from flywheel.pipelines.traces import resolve_inputs
    from flywheel.pipelines.mine import _mine

    # what the loop does: only traces newer than the last run's newest; none here, so the input is empty
    later = _mine(resolve_inputs([f"mlflow-traces:{EXP}", ], cfg(), {f"mlflow-traces:{EXP}": newest}) + [],
                  tmp_path / "later", cfg(), False).manifest
    assert later["inputs"][0]["read"] == 0 and later["inputs"][0]["empty"]
    flt = run_mine([f"mlflow-traces:{EXP}"], tmp_path / "f",
                   cfg(**{"traces": {"filter_string": "tags.prompt_variant = 'v2'"}}))
    assert flt["manifest"]["inputs"][0]["read"] == 6 and flt["manifest"]["inputs"][0]["filter"]


@pytest.mark.slow  # creating traces in sqlite: ~0.1 s each
def test_cli_and_errors(mlflow_store, tmp_path):
    from flywheel.pipelines.cli import app

    _, bad = make_traces(6)
    r = CliRunner().invoke(app, ["mine", f"mlflow-traces:{EXP}", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "read 9 = kept" in r.output and "mlflow run" in r.output
    # a custom @mlflow.trace function: its question is at `query`; a rating outside 1-5 is a reject naming it
    _feedback(bad[0], 7, "HUMAN")
    m = run_mine([f"mlflow-traces:{EXP}"], tmp_path / "q", cfg(**{"traces": {"question_field": "query"}}))["manifest"]
    (rej,) = read_jsonl(tmp_path / "q" / "rejects.jsonl")
    assert rej["raw"] == bad[0] and "7 is outside 1-5" in rej["reason"] and m["counts"]["rejected"] == 1
    r = CliRunner().invoke(app, ["mine", "mlflow-traces:nope", "--out", str(tmp_path / "o2"), "log_mlflow=false"])
    assert getattr(r.exception, "exit_code", None) == 2  # an InputError: one line, exit 2 from `main`
    assert "mlflow-traces:nope: no such experiment" in str(r.exception)


@pytest.mark.parametrize("outputs,field,expected", [
    ("plain", None, "plain"),
    ({"content": "c"}, None, "c"),
    ({"message": {"content": [{"type": "text", "text": "parts"}]}}, None, "parts"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "last"}], None, "last"),
    ({"result": {"text": "deep"}}, "result.text", "deep"),
])
def test_answer_shapes(outputs, field, expected):
    from flywheel.mining.traces import _answer

    assert _answer(outputs, field) == expected
