"""The OpenAI-compatible HTTP backend against a fake chat-completions server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from finelake.models.base import GenerationRequest
from finelake.models.generation import create_generator


class FakeServer:
    """Answers POST /v1/chat/completions. The user message steers it: "fail-503-once" answers 503
    on its first attempt, "bad" answers 400, "always-500" always 500; anything else echoes."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                with server.lock:
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    server.seen[user] = server.seen.get(user, 0) + 1
                    attempt = server.seen[user]
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if user == "bad":
                    return self._send(400, {"error": {"message": "bad request"}})
                if user == "always-500" or (user == "fail-503-once" and attempt == 1):
                    return self._send(503 if user != "always-500" else 500, {"error": "busy"})
                text = json.dumps({"echo": user}) if "response_format" in body else "echo:" + user
                words = sum(len(m["content"].split()) for m in body["messages"])
                return self._send(200, {
                    "id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": words, "completion_tokens": len(text.split()),
                              "total_tokens": words + len(text.split())}})

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def _gen(server, **opts):
    options = {"base_url": server.url, "concurrency": 4, "max_retries": 3,
               "backoff_initial": 0.01, "backoff_max": 0.05, "api_key_env": "FINELAKE_TEST_KEY"}
    options.update(opts)
    return create_generator({"backend": "openai", "model": "served-model", "options": options})


def _req(text, **kw):
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kw)


def test_batch_results_in_order_with_usage_and_auth(server, monkeypatch):
    monkeypatch.setenv("FINELAKE_TEST_KEY", "sekret")
    gen = _gen(server)
    try:
        res = gen.generate([_req(f"q{i} words here", max_tokens=7, seed=3) for i in range(6)])
    finally:
        gen.close()
    assert [r.text for r in res] == [f"echo:q{i} words here" for i in range(6)]
    assert all(r.error is None and r.finish_reason == "stop" for r in res)
    assert [r.prompt_tokens for r in res] == [3] * 6
    assert all(r.completion_tokens == 3 for r in res)
    assert len(server.bodies) == 6
    b = server.bodies[0]
    assert b["model"] == "served-model" and b["max_tokens"] == 7 and b["temperature"] == 0.0
    assert b["seed"] == 3 and "response_format" not in b
    assert all(h.get("Authorization") == "Bearer sekret" for h in server.headers)


def test_retry_after_503_and_per_request_errors(server):
    gen = _gen(server)
    try:
        res = gen.generate([_req("ok"), _req("fail-503-once"), _req("bad"), _req("always-500")])
    finally:
        gen.close()
    ok, retried, bad, dead = res
    assert ok.text == "echo:ok" and ok.error is None
    assert retried.text == "echo:fail-503-once" and retried.error is None
    assert server.seen["fail-503-once"] == 2  # one 503, then success
    assert bad.text is None and "HTTP 400" in bad.error
    assert server.seen["bad"] == 1  # 4xx is not retried
    assert dead.text is None and "HTTP 500" in dead.error
    assert server.seen["always-500"] == 4  # first try + max_retries=3
    assert gen.attempts == 1 + 2 + 1 + 4


def test_json_schema_and_regex_passthrough(server):
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"]}
    gen = _gen(server)
    old = _gen(server, regex_style="guided_regex")
    try:
        (r,) = gen.generate([_req("structured", json_schema=schema)])
        gen.generate([_req("digits", regex=r"\d+")])
        old.generate([_req("digits-old", regex=r"\d+")])
    finally:
        gen.close()
        old.close()
    assert json.loads(r.text) == {"echo": "structured"}
    by_user = {b["messages"][-1]["content"]: b for b in server.bodies}
    rf = by_user["structured"]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == schema
    assert by_user["digits"]["structured_outputs"] == {"regex": r"\d+"}
    assert by_user["digits-old"]["guided_regex"] == r"\d+"


def test_connection_refused_is_an_error_result_after_retries():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen = create_generator({"backend": "openai", "model": "m", "options": {
        "base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 2, "backoff_initial": 0.01,
        "backoff_max": 0.02}})
    try:
        (r,) = gen.generate([_req("hello")])
    finally:
        gen.close()
    assert r.text is None and "ConnectError" in r.error
    assert gen.attempts == 3


def test_bad_options_rejected():
    with pytest.raises(ValueError, match="base_url"):
        create_generator({"backend": "openai", "model": "m"})
    with pytest.raises(ValueError, match="unknown options"):
        create_generator({"backend": "openai", "model": "m",
                          "options": {"base_url": "http://x/v1", "bogus": 1}})
