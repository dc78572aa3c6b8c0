"""Constrained JSON from the embedded generator parses for every one of 20 real queries."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from finelake.models.base import GenerationRequest
from finelake.models.generation import create_generator

SPANS_SCHEMA = {
    "type": "object",
    "properties": {
        "spans": {
            "type": "array", "minItems": 1, "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 60},
                               "description": {"type": "string", "minLength": 1,
                                               "maxLength": 60}},
                "required": ["text", "description"], "additionalProperties": False,
            },
        },
    },
    "required": ["spans"], "additionalProperties": False,
}
PROMPT = ("Copy up to three specific phrases (names, topics, objects) from the user's query and "
          "describe each one generically. Answer with JSON only, like "
          '{"spans": [{"text": "Python", "description": "a programming language"}]}.')


def _queries(n=20, max_chars=400):
    lines = resources.files("finelake.sample").joinpath("queries.jsonl").read_text("utf-8")
    out = []
    for line in lines.split("\n"):
        if not line.strip():
            continue
        q = json.loads(line)["query"]
        if len(q) <= max_chars:
            out.append(q)
        if len(out) == n:
            break
    return out


@pytest.mark.slow
def test_spans_json_parses_for_all_20_queries():
    pytest.importorskip("llama_cpp")
    import jsonschema

    queries = _queries()
    assert len(queries) == 20
    gen = create_generator({"backend": "llama_cpp", "model": "embedded:smollm2-135m-instruct",
                            "batch_size": 20, "options": {"n_ctx": 1024, "n_threads": 1}})
    try:
        res = gen.generate([GenerationRequest(
            messages=[{"role": "system", "content": PROMPT}, {"role": "user", "content": q}],
            max_tokens=512, json_schema=SPANS_SCHEMA) for q in queries])
    finally:
        gen.close()
    bad = []
    for q, r in zip(queries, res):
        try:
            assert r.error is None, r.error
            assert r.finish_reason == "stop", r.finish_reason
            jsonschema.validate(json.loads(r.text), SPANS_SCHEMA)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            bad.append((q[:60], r.text, str(exc)[:200]))
    assert not bad, f"{len(bad)}/20 did not parse: {bad}"
