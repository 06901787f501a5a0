"""A real OpenAI-compatible HTTP server for tests (127.0.0.1, a thread): /v1/chat/completions, /v1/models, and
llama.cpp's /props or Ollama's /api/tags when told to. It can fail N times, always fail, stall, change its answers
or report another model fingerprint, like a server restarted with other weights."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Behaviour:
    fail_next: int = 0             # answer 500 to this many chat requests, then succeed
    always_fail: bool = False      # every chat request: 500
    stall_s: float = 0.0           # sleep before answering a chat request
    prefix: str = "echo: "         # the answer is prefix + the last user message
    meta: dict | None = None       # llama.cpp-style /v1/models `meta` (None: a bare id, like llama-cpp-python)
    digest: str | None = None      # Ollama-style /api/tags digest
    judge_reply: str = "Score: 4\nfine"
    system_fingerprint: str | None = None
    calls: list = field(default_factory=list)   # every chat request body


class StubServer:
    def __init__(self, behaviour: Behaviour | None = None):
        self.b = behaviour or Behaviour()
        b = self.b

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj, status=200, headers=None):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout under test)

            def do_GET(self):
                if self.path == "/v1/models":
                    entry = {"id": "stub", "object": "model", "owned_by": "test"}
                    if b.meta is not None:
                        entry["meta"] = b.meta
                    self._send({"object": "list", "data": [entry]})
                elif self.path == "/api/tags" and b.digest:
                    self._send({"models": [{"name": "stub:latest", "model": "stub:latest", "digest": b.digest}]})
                else:
                    self._send({"error": "not found"}, 404)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                b.calls.append(req)
                if b.stall_s:
                    time.sleep(b.stall_s)
                if b.always_fail or b.fail_next > 0:
                    b.fail_next = max(0, b.fail_next - 1)
                    # retry-after-ms keeps the SDK's backoff short in tests (it honours the header)
                    self._send({"error": {"message": "boom"}}, 500, {"retry-after-ms": "10"})
                    return
                last = req["messages"][-1]["content"]
                text = b.judge_reply if "ANSWER:" in last else f"{b.prefix}{last}"
                self._send({"id": "x", "object": "chat.completion", "created": 0, "model": req["model"],
                            "system_fingerprint": b.system_fingerprint,
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": text}}],
                            "usage": {"completion_tokens": 3, "prompt_tokens": 5, "total_tokens": 8}})

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_port}/v1"
        self._thread = threading.Thread(target=self.srv.serve_forever, daemon=True)

    def __enter__(self) -> "StubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.srv.shutdown()
        self.srv.server_close()
