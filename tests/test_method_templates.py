"""finelake.method.templates: <fi> slot grammar, validation, assembly, filling, ids (§3.1)."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finelake.method.templates import (
    SLOT_RE,
    assemble_template,
    fill_template,
    normalize_template,
    num_slots,
    parse_slots,
    template_id,
    unfilled_slots,
    validate_template,
)

# Templates from Appendix A of the paper.
PAPER_SIMPLE = "what effects does <fi>a medical or psychological condition</fi> have?"
PAPER_TWO = ("how to <fi>a few word description of the action to be performed</fi> "
             "<fi>name of a service, system, or platform</fi>?")
DESC = "Articles describing a medical condition and its consequences."


def codes(reasons: list[str]) -> list[str]:
    return [r.split(":", 1)[0] for r in reasons]


def test_parse_slots_in_order_and_stripped():
    assert parse_slots(PAPER_TWO) == ["a few word description of the action to be performed",
                                      "name of a service, system, or platform"]
    assert parse_slots("compare <fi> entity A </fi> and <fi>entity\nB</fi>") == ["entity A", "entity\nB"]
    assert parse_slots("no slots here") == []
    assert num_slots(PAPER_SIMPLE) == 1 and num_slots(PAPER_TWO) == 2
    assert SLOT_RE.findall("<fi>x</fi> y <fi>z</fi>") == ["x", "z"]


@pytest.mark.parametrize("bad", ["a <fi>b", "a </fi> b", "<fi>a <fi>b</fi> c</fi>", "<fi>a</fi></fi>"])
def test_parse_slots_rejects_malformed(bad):
    with pytest.raises(ValueError, match="malformed template"):
        parse_slots(bad)
    with pytest.raises(ValueError):
        num_slots(bad)


def test_valid_paper_templates():
    assert validate_template(PAPER_SIMPLE, DESC, "what effects does diabetes have?") == []
    assert validate_template(PAPER_TWO, DESC, "how to create a GraphQL schema?") == []
    assert validate_template(PAPER_SIMPLE, DESC) == []  # no source query: check skipped


@pytest.mark.parametrize("template,description,query,expected", [
    ("a <fi>b", DESC, None, ["unclosed_tag"]),
    ("a </fi> b <fi>c</fi>", DESC, None, ["stray_close_tag"]),
    ("x <fi>a <fi>b</fi> c</fi> y", DESC, None, ["nested_tag", "stray_close_tag"]),
    ("what is diabetes", DESC, None, ["no_slot"]),
    ("compare <fi> </fi> and <fi>b</fi> and <fi></fi>", DESC, None, ["empty_slot", "empty_slot"]),
    (PAPER_SIMPLE, "   ", None, ["empty_description"]),
    (PAPER_SIMPLE, None, None, ["empty_description"]),
    ("What is  Diabetes?", DESC, "what is diabetes?", ["no_slot", "same_as_query"]),
    # the small-model failure: original words wrapped in tags, nothing genericized
    ("what is <fi>diabetes</fi>?", DESC, "What is diabetes?", ["same_as_query"]),
    ("<fi>a question</fi>?", DESC, None, ["only_slot"]),
    ("<fi>a</fi> <fi>b</fi>", DESC, None, ["only_slot"]),
    ("a <fi>b", "", "a b", ["unclosed_tag", "empty_description", "same_as_query"]),
])
def test_validate_template_reasons(template, description, query, expected):
    reasons = validate_template(template, description, query)
    assert codes(reasons) == expected
    assert all(": " in r for r in reasons)  # "<code>: <detail>"


def test_validate_same_as_query_does_not_fire_on_real_genericization():
    assert validate_template("what is <fi>a disease</fi>?", DESC, "what is diabetes?") == []


def test_assemble_template_basic_and_order_independent_of_span_order():
    q = "how to install numpy on windows"
    spans = [("windows", "operating system"), ("numpy", "python package")]
    t = assemble_template(q, spans)
    assert t == "how to install <fi>python package</fi> on <fi>operating system</fi>"
    assert assemble_template(q, list(reversed(spans))) == t
    assert validate_template(t, DESC, q) == []


def test_assemble_template_leftmost_non_overlapping():
    q = "the cat and the dog"
    assert assemble_template(q, [("the", "article")]) == "<fi>article</fi> cat and the dog"
    # the second "the" skips the occurrence the first one took
    assert assemble_template(q, [("the", "a1"), ("the", "a2")]) == "<fi>a1</fi> cat and <fi>a2</fi> dog"
    # an occurrence overlapping an earlier span is skipped for the next one that does not
    assert assemble_template("ab ab ab", [("b a", "m"), ("ab", "n")]) == "a<fi>m</fi>b <fi>n</fi>"


def test_assemble_template_errors():
    q = "flights from new york to boston"
    with pytest.raises(ValueError, match="not found"):
        assemble_template(q, [("chicago", "city")])
    with pytest.raises(ValueError, match="overlaps"):
        assemble_template(q, [("new york", "city"), ("york", "place")])
    with pytest.raises(ValueError, match="not found"):
        assemble_template(q, [("Boston", "city")])  # exact: case matters
    with pytest.raises(ValueError, match="empty description"):
        assemble_template(q, [("boston", "  ")])
    with pytest.raises(ValueError, match="empty span"):
        assemble_template(q, [("", "city")])
    with pytest.raises(ValueError, match="contains a <fi> tag"):
        assemble_template(q, [("boston", "<fi>city</fi>")])
    with pytest.raises(ValueError, match="already contains"):
        assemble_template("what is <fi>x</fi>", [("what", "w")])
    assert assemble_template(q, []) == q


WORDS = st.sampled_from(["how", "to", "fix", "my", "bike", "chain", "in", "the", "rain", "a", "an"])


@settings(max_examples=150, deadline=None)
@given(words=st.lists(WORDS, min_size=1, max_size=12), data=st.data())
def test_assemble_then_fill_gives_back_the_query(words, data):
    """fill_template(assemble_template(q, spans), the span texts in slot order) == q."""
    q = " ".join(words)
    # choose disjoint word ranges; their texts (which may recur elsewhere) become spans
    cuts = sorted(data.draw(st.sets(st.integers(0, len(words)), min_size=2, max_size=6)))
    ranges = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    chosen = data.draw(st.lists(st.sampled_from(ranges), min_size=1, unique=True)) if ranges else []
    spans = [(" ".join(words[a:b]), f"desc{i}") for i, (a, b) in enumerate(chosen)]
    try:
        t = assemble_template(q, spans)
    except ValueError as e:  # leftmost placement can make a later span overlap: must be reported
        assert "overlaps" in str(e)
        return
    by_desc = dict((d, text) for text, d in spans)
    fills = [by_desc[d] for d in parse_slots(t)]
    assert num_slots(t) == len(spans)
    assert fill_template(t, fills) == q


def test_fill_template():
    out = fill_template(PAPER_TWO, ["create a GraphQL schema with", "type-graphql"])
    assert out == "how to create a GraphQL schema with type-graphql?"
    assert unfilled_slots(out) == 0
    assert fill_template("  <fi>x</fi>\n\n<fi>y</fi> ", ["A", "B"]) == "  A\n\nB "


@pytest.mark.parametrize("fills,match", [
    ([], "1 slots but 0 fills"),
    (["a", "b"], "1 slots but 2 fills"),
    ([" "], "empty"),
    (["<fi>x</fi>"], "contains a <fi> tag"),
    (["x < FI >"], "contains a <fi> tag"),
])
def test_fill_template_errors(fills, match):
    with pytest.raises(ValueError, match=match):
        fill_template(PAPER_SIMPLE, fills)


@pytest.mark.parametrize("text,n", [
    ("what effects does diabetes have?", 0),
    ("what effects does <fi>a condition</fi> have?", 1),
    ("<fi>a</fi> and <fi>b</fi>", 2),
    ("left over </fi>", 1),
    ("unclosed <fi>thing", 1),
    ("nested <fi>a <fi>b</fi>", 2),
    ("odd forms <FI>x</Fi> and < fi > and <fi/>", 3),
    ("a < b and c > d, fine", 0),
])
def test_unfilled_slots(text, n):
    assert unfilled_slots(text) == n


def test_template_id_merges_whitespace_variants_only():
    a = "what effects does <fi>a medical condition</fi> have?"
    b = "  what effects  does\n<fi> a medical  condition </fi> have? "
    assert normalize_template(b) == a
    assert template_id(a) == template_id(b)
    assert template_id(a) != template_id(a.replace("have", "cause"))
    assert template_id(a) != template_id(a.capitalize())  # case is kept
    assert re.fullmatch(r"t[0-9a-f]{32}", template_id(a))


def test_template_id_is_pinned():
    """The id is stored in Delta tables: its normalization and hash must not drift."""
    expected = hashlib.blake2b(b"Give me a summary of <fi>topic</fi>", digest_size=16).hexdigest()
    assert template_id("  Give me a summary of <fi> topic </fi>") == "t" + expected
