"""OpenAI-compatible endpoint targets and the judge against a local stub server; adapter checks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from flywheel.evals.prompts import harness
from flywheel.evals.prompts.cases import Case
from flywheel.evals.prompts.generate import (AdapterInfo, DiskCache, EndpointTarget, GenParams, check_adapter_base,
                                    check_endpoint, find_adapter_dir, load_adapter)
from flywheel.evals.prompts.templates import template_from_dict
from flywheel.foundation.errors import InputError


class _Handler(BaseHTTPRequestHandler):
    calls: list = []

    def log_message(self, *a):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"data": [{"id": "stub"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.calls.append(req)
        last = req["messages"][-1]["content"]
        text = "Score: 4\nfine" if "ANSWER:" in last else f"echo: {last}"
        self._send({"choices": [{"message": {"content": text}}], "usage": {"completion_tokens": 3}})


@pytest.fixture(scope="module")
def stub_url():
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/v1"
    srv.shutdown()


def test_endpoint_target_generates_caches_and_has_no_nll(stub_url, tmp_path):
    t = EndpointTarget("ollama", stub_url, "stub")
    t.check()
    cases = [Case(id=f"c{i}", question=f"Q{i}?", reference="echo: Q0?", source=f"f:{i}") for i in range(3)]
    variant = template_from_dict({"name": "plain", "version": 1, "user": "{{ question }}"})
    cache = DiskCache(tmp_path)
    _Handler.calls.clear()
    res = harness.run_matrix(cases, [variant], [t], params=GenParams(max_new_tokens=5), cache=cache,
                             metrics=["exact_match", "nll", "generated_tokens"])
    assert [r["output"] for r in res["rows"]] == ["echo: Q0?", "echo: Q1?", "echo: Q2?"]
    assert res["rows"][0]["metrics"]["exact_match"] == 1.0 and "nll" not in res["rows"][0]["metrics"]
    assert any("nll not available" in n for n in res["notes"])
    assert len(_Handler.calls) == 3 and _Handler.calls[0]["max_tokens"] == 5 and _Handler.calls[0]["temperature"] == 0
    harness.run_matrix(cases, [variant], [t], params=GenParams(max_new_tokens=5), cache=cache, metrics=["exact_match"])
    assert len(_Handler.calls) == 3  # second run: all from the cache


def test_unreachable_endpoint_fails_before_generation(tmp_path):
    with pytest.raises(InputError, match=r"target 'x': endpoint http://127.0.0.1:9/v1 is unreachable"):
        EndpointTarget("x", "http://127.0.0.1:9/v1", "m").check()
    with pytest.raises(InputError, match="judge endpoint"):
        check_endpoint("http://127.0.0.1:9/v1", what="judge endpoint", timeout=1)


def test_judge_through_the_eval_shell(stub_url):
    from flywheel.pipelines.eval import EvalConfig, _judge

    judge = _judge(EvalConfig(judge={"endpoint": stub_url, "model": "stub"}))
    assert judge("Q?", "A.", "R.") == 4.0


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
