"""The synthetic ``load`` backends: schema-valid, grounded, deterministic, and refused outside
load-test profiles."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from finelake.config import ConfigError, available_profiles, load_config
from finelake.method import prompts
from finelake.models.base import GenerationRequest
from finelake.models.generation import create_generator
from finelake.models.load_backend import LoadEmbedder, LoadEngineDeadError, schema_instance
from finelake.validate import load_checked

DOC = ("The Rhine rises in the Swiss Alps and flows north to the sea. It passes through six "
       "countries on its way. Barges carry coal, grain and containers along its lower course. "
       "Its delta in the Netherlands joins that of the Meuse. Floods in 1995 forced the "
       "evacuation of a quarter of a million people along its banks.")
TEMPLATE = "What are the main facts about <fi>river</fi> and the <fi>economic activity</fi> on it?"


@pytest.fixture(scope="module")
def gen():
    return create_generator({"backend": "load", "model": "load", "batch_size": 8,
                             "options": {"null_rate": 0.0}})


def test_instantiate_replies_are_schema_valid_and_grounded(gen):
    reqs, outs = [], []
    for i in range(20):
        r = prompts.instantiate_request(DOC + f" Item {i}.", TEMPLATE, "decomposed", 4000)
        reqs.append(r)
        outs.append(GenerationRequest(r.messages, json_schema=r.json_schema))
    results = gen.generate(outs)
    for r, res in zip(reqs, results):
        jsonschema.validate(json.loads(res.text), r.json_schema)  # independent validator
        o = prompts.parse_instantiate(DOC, TEMPLATE, r, res.text, "decomposed", 0.8, 4)
        assert o.status == "ok", o.reason
        assert o.answer and o.answer in DOC  # an excerpt of the document, verbatim


def test_same_prompt_same_reply_and_null_rate():
    g = create_generator({"backend": "load", "model": "load", "options": {"null_rate": 1.0}})
    r = prompts.instantiate_request(DOC, TEMPLATE, "decomposed", 4000)
    req = GenerationRequest(r.messages, json_schema=r.json_schema)
    a, b = g.generate([req, req])
    assert a.text == b.text == json.dumps({"compatible": False})


def test_genericize_and_judge_replies_are_valid():
    g = create_generator({"backend": "load", "model": "load"})
    gr = prompts.genericize_request("how do I repair a bicycle chain at home", "decomposed")
    out = g.generate([GenerationRequest(gr.messages, json_schema=gr.json_schema)])[0]
    jsonschema.validate(json.loads(out.text), gr.json_schema)
    assert prompts.parse_genericize("how do I repair a bicycle chain at home", gr, out.text,
                                    "decomposed").template
    from finelake.models.judge import JUDGE_SCHEMA

    scores = [schema_instance(JUDGE_SCHEMA, h)["score"] for h in range(400)]
    assert set(scores) <= {1, 2, 3, 4, 5} and 0.55 < np.mean([s >= 4 for s in scores]) < 0.85


def test_fault_injection_rates_and_engine_error():
    g = create_generator({"backend": "load", "model": "load",
                          "options": {"error_rate": 0.3, "seed": 1}})
    res = g.generate([GenerationRequest([{"role": "user", "content": f"q{i}"}]) for i in range(1000)])
    errors = [r.error for r in res if r.error]
    assert 230 < len(errors) < 370
    assert all("429" in e or "timed out" in e for e in errors)
    dead = create_generator({"backend": "load", "model": "load", "options": {"engine_error_rate": 1.0}})
    with pytest.raises(LoadEngineDeadError):
        dead.generate([GenerationRequest([{"role": "user", "content": "x"}])])
    with pytest.raises(ValueError, match="error_rate"):
        create_generator({"backend": "load", "model": "load", "options": {"error_rate": 2}})


def test_embedder_topic_structure():
    e = LoadEmbedder("load-64", dim=64, topics=3, noise=0.5)
    texts = [f"text {i}" for i in range(60)]
    v = e.embed(texts)
    assert v.shape == (60, 64) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(v, e.embed(texts))  # deterministic
    pooled = e.embed_pooled(texts[:4], chunks=5)
    assert pooled.shape == (4, 6, 64)
    np.testing.assert_allclose(pooled[:, 0], v[:4], atol=1e-6)
    cos = v @ v.T
    # Topics are what the cosines say: a same-topic pair is near 1/(1+noise^2) = 0.8.
    same = cos[cos < 0.999]
    assert (same > 0.6).any() and (same < 0.4).any()


def test_packaged_profiles_refuse_the_load_backend(tmp_path):
    ok = load_config("load-test")
    assert ok.load_test and ok.models.generator.backend == "load"
    for name in available_profiles():
        if name == "load-test":
            continue
        cfg = load_config(name)
        assert not cfg.load_test
        p = tmp_path / f"{name}-load.yaml"
        p.write_text(f"extends: {name}\nmodels:\n  judge:\n    backend: llm\n    model: load\n"
                     "    options: {inner_backend: load, format: json}\n")
        with pytest.raises(ConfigError, match=r"models.judge.options.inner_backend: 'load' is the synthetic"):
            load_checked(str(p))
