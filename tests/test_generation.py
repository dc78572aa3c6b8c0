"""create_generator and the llama.cpp backend (the embedded default) on the embedded SmolLM2 GGUF."""

from __future__ import annotations

import json
import re
import sys

import pytest

from finelake.models.base import GenerationRequest, GenerationResult
from finelake.models.generation import create_generator, run_isolated

MODEL = "embedded:smollm2-135m-instruct"
SYSTEM = ("You are a careful assistant. Answer the user's question briefly and precisely, in plain "
          "English, in at most two sentences, without lists or code.")
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?",
             "How do plants make food?", "What is a prime number?", "Who was Ada Lovelace?"]


def _llama(**opts):
    options = {"n_threads": 1, "n_ctx": 1024}
    options.update(opts)
    return create_generator({"backend": "llama_cpp", "model": MODEL, "options": options})


def _chat(q, system=SYSTEM, **kw):
    msgs = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": q}]
    return GenerationRequest(messages=msgs, **kw)


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("llama_cpp")
    g = _llama(n_parallel=4)
    yield g
    g.close()


# ----------------------------------------------------------------------------- factory


def test_unknown_backend_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown generation backend 'nope'.*registered"):
        create_generator({"backend": "nope", "model": "m"})
    with pytest.raises(KeyError, match="model"):
        create_generator({"backend": "llama_cpp"})


def test_missing_package_raises_import_error_with_pip_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ImportError, match=r"pip install llama-cpp-python==0\.3\.36"):
        create_generator({"backend": "llama_cpp", "model": MODEL})


def test_backend_modules_do_not_import_their_packages():
    import importlib

    for mod in ("llama_cpp_backend", "transformers_backend", "vllm_backend", "openai_backend"):
        m = importlib.import_module(f"finelake.models.{mod}")
        assert m.__doc__


def _upper_unless_bad(calls, bad=("fail",), error=RuntimeError("model exploded")):
    def run(rs):
        calls.append([r.messages[-1]["content"] for r in rs])
        if any(b in r.messages[-1]["content"] for r in rs for b in bad):
            raise error
        return [GenerationResult(text=r.messages[-1]["content"].upper()) for r in rs]
    return run


def test_run_isolated_bisects_a_failing_batch():
    reqs = [_chat(f"ok {i}", system=None) for i in range(7)] + [_chat("fail", system=None)]
    calls = []
    res = run_isolated(_upper_unless_bad(calls), reqs)
    assert [r.text for r in res] == [f"OK {i}" for i in range(7)] + [None]
    assert res[7].error == "RuntimeError: model exploded"
    # 8 -> halves of 4 -> the failing half's 2 -> its 1 and 1: 7 calls, not 1 + 8
    assert [len(c) for c in calls] == [8, 4, 4, 2, 2, 1, 1]
    assert calls[-1] == ["fail"]


def test_run_isolated_bisects_a_wrong_number_of_results():
    reqs = [_chat(q, system=None) for q in ("a", "b", "c")]
    calls = []

    def run(rs):
        calls.append(len(rs))
        return [GenerationResult(text="x")] * (len(rs) if len(rs) < 3 else 2)

    assert [r.text for r in run_isolated(run, reqs)] == ["x", "x", "x"]
    assert calls == [3, 1, 2]


class EngineDeadError(Exception):
    """Named like vLLM's: what a client raises once its engine-core process is gone."""


def test_run_isolated_raises_a_dead_engine_at_once():
    """A dead engine fails every request: it is raised, so the UDF layer evicts the model, and
    no request is replayed on it."""
    reqs = [_chat(f"ok {i}", system=None) for i in range(4)]
    calls = []
    dead = EngineDeadError("EngineCore encountered an issue. See stack trace (above)")
    with pytest.raises(EngineDeadError):
        run_isolated(_upper_unless_bad(calls, bad=("",), error=dead), reqs)
    assert len(calls) == 1


def test_an_engine_that_dies_while_bisecting_is_raised():
    reqs = [_chat(f"ok {i}", system=None) for i in range(4)]
    outcomes = iter([RuntimeError("a request the engine refused"), EngineDeadError("gone")])
    calls = []

    def run(rs):
        calls.append(len(rs))
        raise next(outcomes)

    with pytest.raises(EngineDeadError):
        run_isolated(run, reqs)
    assert calls == [4, 2]


def test_run_isolated_cuda_errors_count_as_a_dead_engine():
    calls = []
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_isolated(_upper_unless_bad(calls, bad=("",), error=RuntimeError(
            "CUDA error: an illegal memory access was encountered")),
            [_chat("a", system=None), _chat("b", system=None)])
    assert len(calls) == 1


def test_model_config_object_and_options_are_validated():
    pytest.importorskip("llama_cpp")
    from finelake.config import ModelConfig

    cfg = ModelConfig(backend="llama_cpp", model=MODEL, batch_size=3,
                      options={"n_threads": 1, "n_ctx": 512})
    g = create_generator(cfg)
    try:
        assert g.n_parallel == 3 and g.n_ctx == 512 and g.n_threads == 1
    finally:
        g.close()
    with pytest.raises(ValueError, match="unknown options"):
        create_generator({"backend": "llama_cpp", "model": MODEL, "options": {"n_gpus": 1}})


# ----------------------------------------------------------------------------- llama.cpp


def test_batched_engine_matches_llama_cpp_chat_completion(llama):
    """Greedy output of the continuous-batching engine (4 slots, shared-prefix cache) is the same
    text, token counts and finish reason as llama-cpp-python's own create_chat_completion."""
    reqs = [_chat(q, max_tokens=20) for q in QUESTIONS[:4]]
    simple = _llama(mode="simple")
    try:
        want = simple.generate(reqs)
    finally:
        simple.close()
    got = llama.generate(reqs)
    assert all(r.error is None for r in want + got)
    assert [r.text for r in got] == [r.text for r in want]
    assert [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in got] == \
        [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in want]


def test_token_counts_and_finish_reasons(llama):
    reqs = [_chat("Count from one to fifty in words.", max_tokens=5),
            _chat("Reply with just the word yes.", max_tokens=40)]
    short, long_ = llama.generate(reqs)
    assert short.finish_reason == "length" and short.completion_tokens == 5 and short.text
    assert long_.finish_reason == "stop" and 0 < long_.completion_tokens < 40
    for r, req in zip((short, long_), reqs):
        assert r.prompt_tokens == len(llama.prompt_tokens(req.messages))
        assert r.request_id is None and r.error is None


def test_shared_prefix_is_evaluated_once_and_kept_between_calls(llama):
    before = dict(llama.stats)
    first = llama.generate([_chat(q, max_tokens=4) for q in QUESTIONS[:3]])
    mid = dict(llama.stats)
    second = llama.generate([_chat(q, max_tokens=4) for q in QUESTIONS[3:]])
    after = dict(llama.stats)
    sys_len = len(llama.prompt_tokens([{"role": "system", "content": SYSTEM}]))
    # Call 1: each of the 3 slots copies the shared prefix (>= the system turn) from the cache.
    assert mid["prefix_reused_tokens"] - before["prefix_reused_tokens"] >= 3 * (sys_len - 2)
    # Call 2 reuses the cached prefix: it prefills only the 2 new question tails.
    new_prefill = after["prefill_tokens"] - mid["prefill_tokens"]
    tails = sum(r.prompt_tokens for r in second) - 2 * (sys_len - 2)
    assert new_prefill <= tails
    assert all(r.error is None and r.text for r in first + second)


def test_prefix_cache_does_not_change_results():
    reqs = [_chat(q, max_tokens=12) for q in QUESTIONS]
    a, b = _llama(n_parallel=3), _llama(n_parallel=2, prefix_cache=False)
    try:
        assert [r.text for r in a.generate(reqs)] == [r.text for r in b.generate(reqs)]
    finally:
        a.close()
        b.close()


def test_results_do_not_depend_on_what_the_process_served_before():
    """A worker's earlier calls must not change a prompt's output (a resumed Spark job equals an
    uninterrupted one): a cached prefix that only partly matches is evaluated afresh."""
    long_system = SYSTEM + " " + " ".join(f"Rule {i}: keep answers factual and short." for i in range(40))
    reqs = [_chat(q, system=long_system, max_tokens=12) for q in QUESTIONS]
    fresh, used = _llama(n_parallel=3, n_batch=64), _llama(n_parallel=3, n_batch=64)
    try:
        # ``used`` first serves prompts sharing only part of that prefix (so its cached prefix is
        # a strict prefix of the next call's, and the next call's prefix spans several n_batch chunks)
        used.generate([_chat(q, system=long_system[:300] + " Reply in French.", max_tokens=4)
                       for q in QUESTIONS[:2]])
        assert [r.text for r in used.generate(reqs)] == [r.text for r in fresh.generate(reqs)]
    finally:
        fresh.close()
        used.close()


def test_json_schema_and_regex_constraints(llama):
    schema = {"type": "object",
              "properties": {"answer": {"type": "string", "maxLength": 40},
                             "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    reqs = [_chat(q, system="Answer in JSON.", max_tokens=60, json_schema=schema)
            for q in QUESTIONS[:3]]
    reqs.append(_chat("What year did WW2 end?", max_tokens=8, regex=r"(19|20)[0-9]{2}"))
    reqs.append(_chat("Tell me anything.", max_tokens=8))  # unconstrained in the same batch
    res = llama.generate(reqs)
    import jsonschema

    for r in res[:3]:
        assert r.error is None and r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), schema)
    assert re.fullmatch(r"(19|20)[0-9]{2}", res[3].text), res[3].text
    assert res[4].error is None and res[4].text


def test_a_bad_request_is_an_error_result_not_an_exception():
    g = _llama(n_parallel=2, n_ctx=128)
    try:
        res = g.generate([
            _chat("Say hello.", max_tokens=4),
            GenerationRequest(messages=[{"role": "user"}]),  # no content
            _chat("word " * 300, max_tokens=4),  # longer than n_ctx
            _chat("Digits?", max_tokens=4, regex=r"(?<=x)\d"),  # unsupported regex
            _chat("Say bye.", max_tokens=4),
        ])
    finally:
        g.close()
    assert [r.error is None for r in res] == [True, False, False, False, True]
    assert "content" in res[1].error and "n_ctx" in res[2].error
    assert res[0].text and res[4].text


def test_sampling_is_reproducible_with_a_seed(llama):
    reqs = [_chat("Invent a name for a cat.", max_tokens=12, temperature=1.0, seed=s)
            for s in (1, 1, 2)]
    a, b, c = llama.generate(reqs)
    assert a.text == b.text
    greedy = llama.generate([_chat("Invent a name for a cat.", max_tokens=12)])[0]
    assert len({a.text, c.text, greedy.text}) >= 2  # sampling is not greedy decoding


def test_requantize_auto_converts_q4_1_once_to_q8_0(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from finelake.models.llama_cpp_backend import requantized_gguf

    monkeypatch.setenv("FINELAKE_CACHE", str(tmp_path))
    g = _llama(n_parallel=1)
    try:
        assert g.requantize == "q8_0" and g.path.startswith(str(tmp_path))
        assert g._file_type(g.source_path) == 3 and g._file_type(g.path) == 7  # Q4_1 -> Q8_0
        mtime = (tmp_path / "gguf" / g.path.split("/")[-1]).stat().st_mtime_ns
        assert requantized_gguf(g.source_path, "q8_0") == g.path  # cached, not redone
        assert (tmp_path / "gguf" / g.path.split("/")[-1]).stat().st_mtime_ns == mtime
        (r,) = g.generate([_chat("Say hi.", max_tokens=3)])
        assert r.error is None and r.text
    finally:
        g.close()
    raw = _llama(n_parallel=1, requantize=None)
    try:
        assert raw.path == raw.source_path and raw.path.endswith("Q4_1.gguf")
    finally:
        raw.close()
    with pytest.raises(ValueError, match="requantize must be one of"):
        requantized_gguf(g.source_path, "q3_k")
