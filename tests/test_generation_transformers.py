"""The transformers backend on the embedded SmolLM2 (converted once to safetensors), on CPU."""

from __future__ import annotations

import json
import re

import pytest

from finelake.models.base import GenerationRequest
from finelake.models.generation import create_generator

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("xgrammar")

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 30},
                         "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}


def _req(q, **kw):
    return GenerationRequest(messages=[{"role": "user", "content": q}], **kw)


@pytest.fixture(scope="module")
def gen():
    g = create_generator({"backend": "transformers", "model": "embedded:smollm2-135m-instruct",
                          "batch_size": 4, "options": {"torch_threads": 1}})
    yield g
    g.close()


@pytest.mark.slow
def test_mixed_batch_constraints_counts_and_left_padding(gen):
    import jsonschema

    free = _req("What is the capital of Italy? Answer in one sentence.", max_tokens=24)
    reqs = [
        _req("Name a city and whether it is sunny there, as JSON.", max_tokens=40,
             json_schema=SCHEMA),
        _req("Which year did the Apollo 11 mission land on the Moon? Give only the year, "
             "as a four digit number, please.", max_tokens=6, regex=r"19[0-9]{2}"),
        free,
        _req("Write a long story about a dragon.", max_tokens=5),
    ]
    res = gen.generate(reqs)
    assert all(r.error is None for r in res), [r.error for r in res]
    jsonschema.validate(json.loads(res[0].text), SCHEMA)
    assert res[0].finish_reason == "stop"
    assert re.fullmatch(r"19[0-9]{2}", res[1].text), res[1].text
    assert res[3].finish_reason == "length" and res[3].completion_tokens == 5
    for r, q in zip(res, reqs):
        ids = gen.tokenizer.apply_chat_template(q.messages, add_generation_prompt=True,
                                                tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert r.prompt_tokens == len(ids)
        assert 0 < r.completion_tokens <= q.max_tokens
    # Left padding: the free prompt, padded inside the batch, decodes as it does alone.
    (alone,) = gen.generate([free])
    assert alone.text == res[2].text


def test_bad_requests_are_error_results(gen):
    res = gen.generate([_req("Hi", max_tokens=3),
                        GenerationRequest(messages=[{"role": "user", "content": "x"}],
                                          max_tokens=3, json_schema={"type": "nonsense"}),
                        _req("word " * 9000, max_tokens=3)])
    assert res[0].error is None and res[0].text is not None
    assert res[1].error and res[2].error and "positions" in res[2].error


@pytest.mark.slow
def test_generate_tokens_gives_each_prompt_its_unpadded_greedy_ids_and_logits_pick_them(gen):
    """generate_tokens (prompts as ids, sorted by length into one left-padded batch) returns, in
    input order, the ids transformers' own generate gives each prompt alone and unpadded, cut at
    the first end-of-sequence token; next_token_logits' argmax is that greedy choice at every
    position (one teacher-forced pass against step-by-step decoding)."""
    import torch

    tok = gen.tokenizer
    prompts = [tok(t)["input_ids"] for t in (
        "Instruction: Count from one to ten in words, slowly, one number a line.\n\nAnswer:",
        "Instruction: Name a colour.\n\nAnswer:",
        "Hello")]
    got = gen.generate_tokens(prompts, max_new_tokens=8, batch_size=3)
    assert len(got) == 3 and any(got)
    for p, out in zip(prompts, got):
        with torch.no_grad():
            ref = gen.model.generate(input_ids=torch.tensor([p]),
                                     attention_mask=torch.ones((1, len(p)), dtype=torch.long),
                                     max_new_tokens=8, do_sample=False,
                                     pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        stop = next((k for k, t in enumerate(ref) if t == tok.eos_token_id), len(ref))
        assert out == ref[:stop]
        if out:
            logits = gen.next_token_logits(p, out)
            assert logits.dtype == torch.float32 and logits.shape[0] == len(out)
            assert logits.argmax(dim=-1).tolist() == out
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate_tokens([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        gen.next_token_logits([], [1])
