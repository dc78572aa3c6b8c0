"""Decomposed and direct prompts: requests are well-formed, outputs become templates and
excerpt-grounded answers, incompatible pairs become null, bad outputs get reasons."""

import json
from importlib import resources

import jsonschema
import pytest

from finelake.method import excerpts, prompts, templates
from finelake.method.spans import candidate_spans, split_sentences


def _sample(name, n):
    text = resources.files("finelake.sample").joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n")[:n] if line.strip()]


def test_candidate_spans_are_exact_substrings_of_real_queries():
    for row in _sample("queries.jsonl", 200):
        q = row["query"]
        for s in candidate_spans(q):
            assert q[s.start:s.end] == s.text
            assert s.text.split()[0].lower() not in {"the", "a", "explain", "write"}


def test_split_sentences_offsets_on_real_documents():
    for row in _sample("documents.jsonl", 50):
        d = row["text"]
        sents = split_sentences(d)
        assert sents, d[:80]
        for s in sents:
            assert d[s.start:s.end] == s.text and s.text == s.text.strip()
        assert all(a.end <= b.start for a, b in zip(sents, sents[1:]))


def test_genericize_decomposed_round_trip():
    q = "explain composition and aggregation in c++ with code examples"
    req = prompts.genericize_request(q, "decomposed", max_slots=3)
    texts = [c.text for c in req.candidates]
    out = {"picks": [{"n": texts.index("c++") + 1, "kind": "programming language"},
                     {"n": texts.index("composition") + 1, "kind": "software design concept"}]}
    jsonschema.validate(out, req.json_schema)
    res = prompts.parse_genericize(q, req, json.dumps(out), "decomposed")
    assert res.ok, res.reason
    assert res.template == ("explain <fi>software design concept</fi> and aggregation in "
                            "<fi>programming language</fi> with code examples")
    assert templates.num_slots(res.template) == 2
    assert "programming language" in res.compatible_document_description


@pytest.mark.parametrize("output,reason", [
    ("not json", "unparseable_output"),
    ('{"picks": []}', "unparseable_output"),
    ('{"picks": [{"n": 99, "kind": "x y"}]}', "bad_pick"),
])
def test_genericize_bad_outputs_have_reasons(output, reason):
    q = "tell me everything about deduplication in php"
    req = prompts.genericize_request(q, "decomposed")
    res = prompts.parse_genericize(q, req, output, "decomposed")
    assert not res.ok and res.reason.startswith(reason)


def test_genericize_direct_contract_and_validation():
    q = "what is the capital of France?"
    req = prompts.genericize_request(q, "direct")
    assert req.messages == [{"role": "user", "content": q}]  # the bare query, as query_templatizer
    good = {"template": "what is the capital of <fi>country</fi>?",
            "compatible_document_description": "A document describing a country and its capital."}
    assert prompts.parse_genericize(q, req, json.dumps(good), "direct").ok
    echo = {"template": q, "compatible_document_description": "x"}
    assert "no_slot" in prompts.parse_genericize(q, req, json.dumps(echo), "direct").reason


DOC = ("The wild boar is a suid native to much of Eurasia and North Africa. It has been introduced "
       "to the Americas and Oceania. The species is now one of the widest-ranging mammals in the "
       "world. Wild boars are omnivores and eat roots, fruit and small animals.")
TPL = "what does the <fi>animal</fi> eat?"


def test_instantiate_decomposed_builds_excerpt_answer():
    req = prompts.instantiate_request(DOC, TPL, "decomposed", 6000)
    assert req.messages[0]["content"].endswith(req.messages[0]["content"].split("Document:\n")[1])
    assert "Document:" in req.messages[0]["content"]  # the document is in the shared prefix
    phrases = [p.text for p in req.phrases]
    assert all(DOC[p.start:p.end] == p.text for p in req.phrases)  # fills come from the document
    out = {"fills": [phrases.index("wild boar") + 1], "first": 4, "last": 4}
    jsonschema.validate(out, req.json_schema)
    res = prompts.parse_instantiate(DOC, TPL, req, json.dumps(out), "decomposed", 0.8)
    assert res.status == "ok", res.reason
    assert res.instruction == "what does the wild boar eat?"
    assert res.answer == "Wild boars are omnivores and eat roots, fruit and small animals."
    assert res.raw_answer.startswith("<excerpt>") and res.excerpt_ratio == 1.0
    assert excerpts.excerpt_ratio(res.answer, DOC) >= 0.99  # independent recomputation


def test_instantiate_null_and_invalid_outputs():
    req = prompts.instantiate_request(DOC, TPL, "decomposed", 6000)
    assert prompts.parse_instantiate(DOC, TPL, req, '{"compatible": false}', "decomposed", 0.8).status == "null"
    bad = prompts.parse_instantiate(DOC, TPL, req, '{"fills": [0], "first": 1, "last": 1}', "decomposed", 0.8)
    assert (bad.status, bad.reason) == ("invalid", "fill_out_of_range")
    oor = prompts.parse_instantiate(DOC, TPL, req, '{"fills": [1], "first": 1, "last": 40}', "decomposed", 0.8)
    assert oor.reason == "sentence_out_of_range"


def test_instantiate_direct_mode_expands_pointers_and_enforces_ratio():
    req = prompts.instantiate_request(DOC, TPL, "direct", 6000)
    payload = json.loads(req.messages[0]["content"])
    assert payload == {"instruction_template": TPL, "document": DOC}
    grounded = {"instruction": "what does the wild boar eat?",
                "answer": "In short: <excerpt>Wild boars are<...>small animals.</excerpt>"}
    ok = prompts.parse_instantiate(DOC, TPL, req, json.dumps(grounded), "direct", 0.8)
    assert ok.status == "ok" and ok.answer.endswith("eat roots, fruit and small animals.")
    assert 0.8 <= ok.excerpt_ratio < 1.0
    made_up = {"instruction": "what does the wild boar eat?",
               "answer": "Mostly acorns and beech nuts gathered in autumn forests, plus insects."}
    rej = prompts.parse_instantiate(DOC, TPL, req, json.dumps(made_up), "direct", 0.8)
    assert rej.status == "excerpt_rejected" and rej.excerpt_ratio < 0.8
    assert prompts.parse_instantiate(DOC, TPL, req, "null", "direct", 0.8).status == "null"
    unfilled = {"instruction": TPL, "answer": "<excerpt>Wild boars are<...>small animals.</excerpt>"}
    assert prompts.parse_instantiate(DOC, TPL, req, json.dumps(unfilled), "direct", 0.8).reason == "unfilled_slot"


def test_genericize_constrained_or_not():
    """genericize.constrained: the schema is sent or not; unconstrained replies are read leniently
    (first JSON object, extra keys tolerated), constrained ones strictly; both say so in flags."""
    q = "what is the capital of France?"
    good = {"template": "what is the capital of <fi>country</fi>?",
            "compatible_document_description": "A document describing a country and its capital."}
    free = prompts.genericize_request(q, "direct", constrained=False)
    assert free.json_schema is None and free.messages == [{"role": "user", "content": q}]
    chatty = "Here is the template:\n" + json.dumps({**good, "notes": "x", "id": 3}) + "\nDone."
    res = prompts.parse_genericize(q, free, chatty, "direct")
    assert res.ok and res.template == good["template"]
    assert res.flags == ["lenient_parse", "unknown_keys:id,notes"]
    clean = prompts.parse_genericize(q, free, json.dumps(good), "direct")
    assert clean.ok and clean.flags == []
    missing = prompts.parse_genericize(q, free, json.dumps({"template": good["template"]}), "direct")
    assert not missing.ok and "lenient_parse" not in missing.flags
    tight = prompts.genericize_request(q, "direct", constrained=True)
    assert tight.json_schema == prompts.DIRECT_GENERICIZE_SCHEMA
    strict = prompts.parse_genericize(q, tight, chatty, "direct")
    assert (strict.reason, strict.flags) == ("unparseable_output", ["constrained"])
    assert prompts.parse_genericize(q, tight, json.dumps(good), "direct").flags == ["constrained"]
    dec = prompts.genericize_request("tell me about deduplication in php", "decomposed",
                                     constrained=False)
    assert dec.json_schema is None and dec.candidates


def test_instantiate_reads_the_released_key_and_flags_unknown_ones():
    req = prompts.instantiate_request(DOC, TPL, "direct", 6000)
    answer = "<excerpt>Wild boars are<...>small animals.</excerpt>"
    released = {"instantiated_instruction": "what does the wild boar eat?", "answer": answer}
    ok = prompts.parse_instantiate(DOC, TPL, req, json.dumps(released), "direct", 0.8)
    assert ok.status == "ok" and ok.instruction == "what does the wild boar eat?"
    assert ok.flags == []
    extra = {**released, "template_id": "t1", "confidence": 0.9}
    chatty = "Output: " + json.dumps(extra)
    o = prompts.parse_instantiate(DOC, TPL, req, chatty, "direct", 0.8)
    assert o.status == "ok" and o.flags == ["lenient_parse", "unknown_keys:confidence,template_id"]
    bad = prompts.parse_instantiate(DOC, TPL, req, "I cannot do that.", "direct", 0.8)
    assert (bad.status, bad.reason, bad.flags) == ("invalid", "unparseable_output", [])


@pytest.mark.parametrize("instruction", [
    "what does the <excerpt>wild boar</excerpt> eat?",
    "what does the wild boar eat</excerpt>?",
    "what does the wild<...>boar eat?",
])
def test_instantiate_rejects_excerpt_markup_in_the_instruction(instruction):
    req = prompts.instantiate_request(DOC, TPL, "direct", 6000)
    out = {"instruction": instruction, "answer": "<excerpt>Wild boars are<...>small animals.</excerpt>"}
    o = prompts.parse_instantiate(DOC, TPL, req, json.dumps(out), "direct", 0.8)
    assert (o.status, o.reason) == ("invalid", "excerpt_markup_in_instruction")


def test_decomposed_instantiate_replies_are_flagged_constrained():
    req = prompts.instantiate_request(DOC, TPL, "decomposed", 6000)
    assert req.json_schema is not None
    o = prompts.parse_instantiate(DOC, TPL, req, '{"compatible": false}', "decomposed", 0.8)
    assert o.status == "null" and o.flags == ["constrained"]
