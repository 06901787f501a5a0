"""OpenAI-compatible endpoint targets and the judge against a real local HTTP server; adapter checks."""

from __future__ import annotations

import json

import pytest

from flywheel.evals.prompts import harness
from flywheel.evals.prompts.cases import Case
from flywheel.evals.prompts.generate import (AdapterInfo, EndpointAborted, EndpointOptions, EndpointTarget, GenParams,
                                             check_adapter_base, check_endpoint, find_adapter_dir, load_adapter)
from flywheel.evals.prompts.scorers import NoScore
from flywheel.evals.prompts.templates import template_from_dict
from flywheel.foundation.cache import JsonCache
from flywheel.foundation.errors import InputError
from tests.evals.openai_stub import Behaviour, StubServer


def _cases(n=3):
    return [Case(id=f"c{i}", question=f"Q{i}?", reference="echo: Q0?", source=f"f:{i}") for i in range(n)]


PLAIN = template_from_dict({"name": "plain", "version": 1, "user": "{{ question }}"})
FAST = EndpointOptions(connect_timeout_s=2, read_timeout_s=5, max_retries=2, max_consecutive_failures=50)


def _run(target, tmp_path, metrics=("exact_match", "rouge_l", "latency_ms"), **kw):
    return harness.run_matrix(_cases(kw.pop("n", 3)), [PLAIN], [target], params=kw.pop("params", GenParams(max_new_tokens=5)),
                              cache=JsonCache(tmp_path / "cache"), metrics=list(metrics), **kw)


def test_endpoint_sends_every_sampling_parameter_caches_and_has_no_nll(tmp_path):
    with StubServer(Behaviour(meta={"n_params": 1, "size": 2})) as srv:
        t = EndpointTarget("llama", srv.url, "stub", options=FAST)
        res = _run(t, tmp_path, metrics=["exact_match", "nll", "generated_tokens", "latency_ms", "batch_latency_ms"])
        assert [r["output"] for r in res["rows"]] == ["echo: Q0?", "echo: Q1?", "echo: Q2?"]
        assert res["rows"][0]["metrics"]["exact_match"] == 1.0 and "nll" not in res["rows"][0]["metrics"]
        # per-request latency for an endpoint; the local batch metric does not apply
        assert res["rows"][0]["metrics"]["latency_ms"] > 0 and "batch_latency_ms" not in res["rows"][0]["metrics"]
        assert any("nll not available" in n for n in res["notes"])
        req = srv.b.calls[0]
        # greedy spelled out: llama.cpp/Ollama would otherwise apply their repeat_penalty 1.1 and min_p 0.05
        assert {k: req[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                                    "seed")} == {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "top_k": 1,
                                                 "min_p": 0.0, "repeat_penalty": 1.0, "seed": 0}
        assert len(srv.b.calls) == 3 and t.cacheable
        _run(EndpointTarget("llama", srv.url, "stub", options=FAST), tmp_path)
        assert len(srv.b.calls) == 3  # second run: all from the cache


def test_extra_body_adds_and_drops_request_fields(tmp_path):
    with StubServer() as srv:
        opts = EndpointOptions(extra_body={"top_k": None, "mirostat": 0})
        _run(EndpointTarget("x", srv.url, "stub", options=opts), tmp_path, n=1)
        assert "top_k" not in srv.b.calls[0] and srv.b.calls[0]["mirostat"] == 0


def test_500_twice_then_success_is_retried(tmp_path):
    with StubServer(Behaviour(fail_next=2)) as srv:
        res = _run(EndpointTarget("x", srv.url, "stub", options=FAST), tmp_path, n=1)
        assert res["rows"][0]["error"] is None and res["rows"][0]["output"] == "echo: Q0?"
        assert len(srv.b.calls) == 3 and res["rows"][0]["retries"] == 2
        assert harness.failures(res["rows"])["x/plain"] | {} == {**harness.failures(res["rows"])["x/plain"],
                                                                  "failed": 0, "retries": 2}


def test_a_server_that_always_fails_gives_counted_failures_never_scores(tmp_path):
    with StubServer(Behaviour(always_fail=True)) as srv:
        seen = []
        res = _run(EndpointTarget("down", srv.url, "stub", options=FAST), tmp_path,
                   progress=lambda phase, n, detail=None: seen.append((phase, detail)))
        assert len(srv.b.calls) == 3 * 3  # 1 try + 2 retries per case
        assert all(r["failed"] and r["metrics"]["exact_match"] is None and r["metrics"]["rouge_l"] is None
                   for r in res["rows"])
        cells = {c["metric"]: c for c in harness.cells(res["rows"])}
        assert cells["exact_match"]["mean"] is None and cells["exact_match"]["n_failed"] == 3
        assert cells["error_rate"]["mean"] == 1.0
        f = harness.failures(res["rows"])["down/plain"]
        assert f["failed"] == 3 and f["failure_rate"] == 1.0 and "InternalServerError" in f["first_error"]
        # shown as they happen
        assert [p for p, d in seen if p == "failed"] == ["failed"] * 3 and "target 'down'" in seen[1][1]


def test_consecutive_failures_abort_the_run_naming_the_target(tmp_path):
    with StubServer(Behaviour(always_fail=True)) as srv:
        opts = EndpointOptions(max_retries=0, max_consecutive_failures=2)
        with pytest.raises(EndpointAborted, match=r"target 'down' .*2 consecutive requests failed"):
            _run(EndpointTarget("down", srv.url, "stub", options=opts), tmp_path, n=5)
        assert len(srv.b.calls) == 2


def test_a_stalled_server_times_out_per_the_config(tmp_path):
    import time

    with StubServer(Behaviour(stall_s=2.0)) as srv:
        opts = EndpointOptions(read_timeout_s=0.3, max_retries=0, max_consecutive_failures=5)
        t0 = time.perf_counter()
        res = _run(EndpointTarget("slow", srv.url, "stub", options=opts), tmp_path, n=1)
        assert time.perf_counter() - t0 < 1.8
        assert res["rows"][0]["failed"] and "Timeout" in res["rows"][0]["error"]


def test_other_weights_under_the_same_name_are_not_served_from_the_cache(tmp_path):
    with StubServer(Behaviour(meta={"size": 1})) as srv:
        _run(EndpointTarget("x", srv.url, "stub", options=FAST), tmp_path)
        # the server restarts with other weights: same URL and name, another fingerprint, other answers
        srv.b.meta, srv.b.prefix = {"size": 2}, "new: "
        res = _run(EndpointTarget("x", srv.url, "stub", options=FAST), tmp_path)
        assert [r["output"] for r in res["rows"]] == ["new: Q0?", "new: Q1?", "new: Q2?"]
        assert len(srv.b.calls) == 6 and not any(r["cached"] for r in res["rows"])


def test_ollama_digest_is_the_fingerprint(tmp_path):
    with StubServer(Behaviour(digest="sha256:aaa")) as srv:
        a = EndpointTarget("x", srv.url, "stub")
        a.check()
        srv.b.digest = "sha256:bbb"
        b = EndpointTarget("x", srv.url, "stub")
        b.check()
        assert a.fingerprint == {"digest": "sha256:aaa"} and a.cacheable and a.identity != b.identity


def test_a_server_that_reports_nothing_is_not_cached_unless_a_revision_is_pinned(tmp_path):
    with StubServer() as srv:  # a bare model id, like llama-cpp-python
        res = _run(EndpointTarget("x", srv.url, "stub", options=FAST), tmp_path)
        _run(EndpointTarget("x", srv.url, "stub", options=FAST), tmp_path)
        assert len(srv.b.calls) == 6
        assert any("target 'x': not cached" in n for n in res["notes"])
        for _ in range(2):
            _run(EndpointTarget("x", srv.url, "stub", options=FAST, revision="gguf-sha-1"), tmp_path)
        assert len(srv.b.calls) == 9


def test_unreachable_endpoint_fails_before_generation(tmp_path):
    with pytest.raises(InputError, match=r"target 'x': endpoint http://127.0.0.1:9/v1 is unreachable"):
        EndpointTarget("x", "http://127.0.0.1:9/v1", "m").check()
    with pytest.raises(InputError, match="judge endpoint"):
        check_endpoint("http://127.0.0.1:9/v1", what="judge endpoint", timeout=1)


def test_judge_scores_and_counts_unparseable_and_failed_judgements(tmp_path):
    from flywheel.evals.prompts.config import EvalConfig
    from flywheel.evals.prompts.suite import make_judge

    with StubServer() as srv:
        cfg = EvalConfig(judge={"endpoint": srv.url, "model": "stub"}, endpoints={"max_retries": 0})
        judge = make_judge(cfg)
        assert judge("Q?", "A.", "R.") == 4.0
        t = EndpointTarget("x", srv.url, "stub", options=FAST)
        srv.b.judge_reply = "I think it is quite good."  # a small model ignoring the format
        res = _run(t, tmp_path, metrics=["judge_score"], judge=judge)
        cell = next(c for c in harness.cells(res["rows"]) if c["metric"] == "judge_score")
        assert cell["n"] == 0 and cell["n_missing"] == {"unparseable": 3}
        assert any("the judge produced no score at all (3 unparseable)" in n for n in res["notes"])
        comps, notes = harness.compare(res["rows"] + [{**r, "target": "y"} for r in res["rows"]],
                                       [(("plain", "x"), ("plain", "y"))])
        assert any("no values" in n and "judge_score" in n for n in notes)
        assert not any("fewer than 2" in n for n in notes)
    # the judge's server goes away mid-run: failed judgements, counted separately
    with pytest.raises(NoScore, match="failed"):
        judge("Q?", "A.", "R.")


def test_adapter_dir_discovery_and_base_check(tmp_path):
    run = tmp_path / "run" / "adapter"
    run.mkdir(parents=True)
    (run / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match="no adapter_model.safetensors"):
        load_adapter(tmp_path / "run")
    (run / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "flywheel_adapter.json").write_text(json.dumps({"base_model": "m", "base_model_sha256": "a" * 64}))
    assert find_adapter_dir(tmp_path / "run") == run
    info = load_adapter(tmp_path)
    assert info.path == run and info.meta["base_model"] == "m"
    check_adapter_base(info, "a" * 64, "m", "cand")
    with pytest.raises(InputError, match="target 'cand': adapter .* trained on base m"):
        check_adapter_base(info, "b" * 64, "other", "cand")
    check_adapter_base(AdapterInfo(run, "x", {}), "b" * 64, "other", "cand")  # no record: nothing to check
    with pytest.raises(InputError, match="no adapter here"):
        find_adapter_dir(tmp_path / "run" / "nothing")
