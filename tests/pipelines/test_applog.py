"""`flywheel.pipelines.applog`: an application records interactions and later ratings as MLflow traces or as chat-log
JSONL; both mine into the same examples, and importing it loads no torch/transformers."""

import json
import os
import subprocess
import sys

import pytest

from flywheel.foundation.errors import InputError
from flywheel.foundation.io import read_jsonl
from flywheel.pipelines.applog import ChatLogger
from flywheel.pipelines.mine import MineConfig, run_mine


def cfg():
    return MineConfig(progress=False, workers=1, log_mlflow=False)


def test_import_is_light():
    code = ("import sys, flywheel.pipelines.applog; bad = [m for m in ('torch', 'transformers', 'mlflow') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _session(log: ChatLogger) -> list[str]:
    ids = []
    for i in range(12):
        user = f"user-{i}"
        variant = log.variant(user, "prompt-v2", ["v1", "v2"])
        q = f"Is {['kale', 'rice', 'tofu'][i % 3]} good for breakfast, question {i}?"
        tid = log.interaction(user_id=user, messages=[{"role": "user", "content": q}],
                              answer=f"Yes, {i} portions of it make a balanced breakfast with some fruit.",
                              context=["Breakfast guide.", f"Entry {i}."] if i % 2 else None,
                              prompt_variant=variant, latency_ms=250 + i, tokens=40 + i, model="m-1")
        ids.append(tid)
        if i % 4 == 0:
            log.rating(tid, 5)
        elif i % 4 == 1:
            log.rating(tid, False)  # thumbs down
        elif i % 4 == 2:
            log.rating(tid, 2)
            log.rating(tid, 4)  # changed their mind: the latest counts
    return ids


def _examples(d):
    return sorted((json.dumps(r["messages"]), r["rating"], r["context"], r["prompt_variant"])
                  for name in ("train.jsonl", "eval.jsonl") for r in read_jsonl(d / name))


@pytest.mark.slow  # ~0.2 s per trace in sqlite
def test_traces_and_jsonl_mine_alike(mlflow_store, tmp_path):
    import mlflow

    ids = _session(ChatLogger(experiment="app", tracking_uri=mlflow_store))
    _session(ChatLogger(log_path=tmp_path / "chat.jsonl", tracking_uri=""))
    t = mlflow.get_trace(ids[3])
    assert 0.25 < t.info.execution_duration / 1000 < 0.3 + 1  # the latency given, not the logging time
    assert t.info.tags["prompt_variant"] in ("v1", "v2") and t.info.trace_metadata["mlflow.trace.user"] == "user-3"
    root = next(s for s in t.data.spans if s.parent_id is None)
    assert root.get_attribute("mlflow.chat.tokenUsage") == {"total_tokens": 43}

    a = run_mine(["mlflow-traces:app"], tmp_path / "a", cfg())
    b = run_mine([tmp_path / "chat.jsonl"], tmp_path / "b", cfg())
    assert a["counts"]["read"] == b["counts"]["read"] == 12  # rating lines are not records
    assert a["counts"]["filtered"] == b["counts"]["filtered"] == {"low_rating": 3, "no_rating": 3}
    assert _examples(tmp_path / "a") == _examples(tmp_path / "b") and len(_examples(tmp_path / "a")) == 6
    lines = [json.loads(x) for x in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert {"user_id", "prompt_variant", "latency_ms", "tokens", "rating"} <= set(lines[0])


def test_jsonl_rating_lines_merge(tmp_path):
    log = ChatLogger(log_path=tmp_path / "chat.jsonl", tracking_uri="")
    first = log.interaction(messages=[{"role": "user", "content": "What is fibre good for?"}],
                            answer="Digestion and feeling full for longer.")
    log.interaction(messages=[{"role": "user", "content": "Never rated?"}], answer="Right, never rated here.")
    log.rating(first, 5)
    m = run_mine([tmp_path / "chat.jsonl"], tmp_path / "o", cfg())["manifest"]
    assert m["counts"]["read"] == 2 and m["counts"]["kept"] == 1 and m["counts"]["filtered"] == {"no_rating": 1}
    with pytest.raises(InputError):
        log.rating(first, 7)
    with pytest.raises(InputError):
        ChatLogger(tracking_uri="")


@pytest.mark.slow  # a fresh interpreter that imports mlflow: ~5 s
def test_rating_right_after_the_interaction_with_async_trace_export(tmp_path):
    """MLflow's default exports traces from a background queue: the rating must still find its trace."""
    code = ("from flywheel.pipelines.applog import ChatLogger\n"
            "import mlflow\n"
            f"log = ChatLogger(experiment='app', tracking_uri='sqlite:///{tmp_path / 'm.db'}')\n"
            "tid = log.interaction(messages=[{'role': 'user', 'content': 'Is rice gluten free?'}],\n"
            "                      answer='Yes, plain rice is naturally gluten free.', rating=5)\n"
            "t = mlflow.get_trace(tid)\n"
            "print([a.value for a in t.info.assessments])\n")
    env = {**os.environ, "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "true"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[5]"
