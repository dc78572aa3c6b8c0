"""finelake.method.excerpts: <excerpt> pointer expansion and excerpt ratios (§3.3)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from finelake.method.excerpts import excerpt_ratio, expand_excerpts, make_excerpt_pointer

SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "documents.jsonl"
DOCS = [json.loads(line)["text"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:200]]

PAPER_DOC = ("Special relativity. It is known that no preferred inertial frame exists according "
             "to the principle of relativity. Einstein built on this.")
PAPER_SPAN = "It is known that no preferred inertial frame exists according to the principle of relativity."


def non_ws(s: str) -> int:
    return len(re.sub(r"\s", "", s))


def test_paper_example_pointer():
    r = expand_excerpts("Yes. <excerpt>It is known that<...>the principle of relativity.</excerpt>", PAPER_DOC)
    assert r.ok and r.failures == []
    assert r.text == "Yes. " + PAPER_SPAN
    (x,) = r.excerpts
    assert x.kind == "pointer" and x.text == PAPER_SPAN
    assert PAPER_DOC[x.doc_start:x.doc_end] == PAPER_SPAN
    assert r.text[x.answer_start:x.answer_end] == PAPER_SPAN
    assert r.excerpt_ratio == pytest.approx(non_ws(PAPER_SPAN) / non_ws(r.text))


def test_full_text_excerpt_and_unicode_ellipsis():
    r = expand_excerpts("<excerpt>Einstein built on this.</excerpt>", PAPER_DOC)
    assert r.ok and r.text == "Einstein built on this." and r.excerpts[0].kind == "full"
    assert r.excerpt_ratio == 1.0
    r = expand_excerpts("<excerpt>It is known<…>relativity.</excerpt>", PAPER_DOC)
    assert r.ok and r.text == PAPER_SPAN


def test_whitespace_tolerant_but_returns_document_text():
    doc = "Intro.\nThe  quick brown\n\tfox jumps over\nthe lazy dog.  End."
    r = expand_excerpts("<excerpt>The quick brown fox<...>the   lazy dog.</excerpt>", doc)
    assert r.ok and r.text == "The  quick brown\n\tfox jumps over\nthe lazy dog."
    r = expand_excerpts("<excerpt> fox jumps over the lazy </excerpt>", doc)
    assert r.ok and r.text == "fox jumps over\nthe lazy"
    assert doc[r.excerpts[0].doc_start:r.excerpts[0].doc_end] == r.text


def test_matching_is_otherwise_exact():
    r = expand_excerpts("<excerpt>it is known that<...>the principle of relativity.</excerpt>", PAPER_DOC)
    assert not r.ok and r.failures[0].reason == "not_found"
    r = expand_excerpts("<excerpt>It is known that<...>the principle of relativity!</excerpt>", PAPER_DOC)
    assert not r.ok and r.failures[0].reason == "not_found"


def test_not_found_cases():
    r = expand_excerpts("<excerpt>Nowhere to<...>relativity.</excerpt>", PAPER_DOC)
    assert r.failures[0].reason == "not_found" and "start" in r.failures[0].detail
    # END occurs, but only before START
    r = expand_excerpts("<excerpt>Einstein<...>Special relativity.</excerpt>", PAPER_DOC)
    assert r.failures[0].reason == "not_found" and "after start" in r.failures[0].detail
    r = expand_excerpts("<excerpt>absent sentence</excerpt>", PAPER_DOC)
    assert r.failures[0].reason == "not_found"


def test_ambiguity_rule():
    doc = "A one. B two. A three. B four."
    # START twice, each with an END after it: two spans
    r = expand_excerpts("<excerpt>A<...>B four.</excerpt>", doc)
    assert r.failures[0].reason == "ambiguous"
    # START once, END twice after it: the shortest is NOT chosen silently
    r = expand_excerpts("<excerpt>A one.<...>B</excerpt>", doc)
    assert r.failures[0].reason == "ambiguous"
    # START twice, but only the first occurrence has an END after it: one span
    r = expand_excerpts("<excerpt>A<...>two.</excerpt>", doc)
    assert r.ok and r.text == "A one. B two."
    # START and END may not overlap: "one. B" then END "B two" must come after START's end
    r = expand_excerpts("<excerpt>one. B<...>B two.</excerpt>", doc)
    assert r.failures[0].reason == "not_found"


def test_full_text_repeats_are_not_ambiguous_and_prefer_exact_whitespace():
    doc = "x  y z. filler. x y z."
    r = expand_excerpts("<excerpt>x y z.</excerpt>", doc)
    assert r.ok and r.text == "x y z." and r.excerpts[0].doc_start == doc.rindex("x y z.")
    r = expand_excerpts("<excerpt>x\ny z.</excerpt>", doc)
    assert r.ok and r.text == "x  y z." and r.excerpts[0].doc_start == 0


@pytest.mark.parametrize("answer,detail", [
    ("a </excerpt> b", "stray </excerpt>"),
    ("a <excerpt>It is known", "never closed"),
    ("<excerpt>It is <excerpt>Einstein built on this.</excerpt>", "not closed before the next"),
    ("<excerpt>   </excerpt>", "empty excerpt"),
    ("<excerpt><...>relativity.</excerpt>", "empty start or end"),
    ("<excerpt>It is known<...> </excerpt>", "empty start or end"),
    ("<excerpt>It<...>known<...>relativity.</excerpt>", "2 ellipsis markers"),
    ("see <...> here", "ellipsis marker outside"),
])
def test_malformed_tags(answer, detail):
    r = expand_excerpts(answer, PAPER_DOC)
    assert not r.ok
    assert any(f.reason == "malformed" and detail in f.detail for f in r.failures), r.failures
    assert "malformed: " in r.failure_summary()


def test_failed_tags_stay_as_raw_text_and_count_as_generated():
    answer = "Intro <excerpt>Einstein built on this.</excerpt> then <excerpt>missing words</excerpt>"
    r = expand_excerpts(answer, PAPER_DOC)
    assert r.text == "Intro Einstein built on this. then <excerpt>missing words</excerpt>"
    assert [f.reason for f in r.failures] == ["not_found"]
    assert r.failures[0].tag == "<excerpt>missing words</excerpt>"
    assert answer[r.failures[0].answer_start:].startswith(r.failures[0].tag)
    assert r.excerpt_ratio == pytest.approx(non_ws("Einstein built on this.") / non_ws(r.text))
    # the nested case: the inner tag still expands, the outer opening and the stray close fail
    r = expand_excerpts("<excerpt>a <excerpt>Einstein built on this.</excerpt> b</excerpt>", PAPER_DOC)
    assert [x.text for x in r.excerpts] == ["Einstein built on this."]
    assert len(r.failures) == 2


def test_offsets_of_several_excerpts():
    answer = ("Two facts: <excerpt>Special relativity.</excerpt>\nand "
              "<excerpt>It is known<...>inertial frame exists</excerpt>.")
    r = expand_excerpts(answer, PAPER_DOC)
    assert r.ok and len(r.excerpts) == 2
    for x in r.excerpts:
        assert r.text[x.answer_start:x.answer_end] == x.text == PAPER_DOC[x.doc_start:x.doc_end]
    assert r.text == "Two facts: Special relativity.\nand It is known that no preferred inertial frame exists."


def test_no_tags_and_empty_answer():
    r = expand_excerpts("All generated.", PAPER_DOC)
    assert r.ok and r.text == "All generated." and r.excerpt_ratio == 0.0
    assert expand_excerpts("", PAPER_DOC).excerpt_ratio == 0.0


def test_independent_ratio_basics():
    assert excerpt_ratio(PAPER_SPAN, PAPER_DOC) == 1.0
    assert excerpt_ratio("Completely different words here, none copied at all.", PAPER_DOC) == 0.0
    assert excerpt_ratio("", PAPER_DOC) == 0.0
    glue = "QQQQ QQQQ "
    got = excerpt_ratio(glue + PAPER_SPAN, PAPER_DOC)
    assert got == pytest.approx(non_ws(PAPER_SPAN) / non_ws(glue + PAPER_SPAN))
    # whitespace-tolerant like the expansion
    assert excerpt_ratio(PAPER_SPAN.replace(" ", "\n  "), PAPER_DOC) == 1.0
    # a short coincidence does not count, unless min_span_chars allows it
    assert excerpt_ratio("QQ relativity QQ", PAPER_DOC) == 0.0
    assert excerpt_ratio("QQ relativity QQ", PAPER_DOC, min_span_chars=5) == pytest.approx(10 / 14)
    with pytest.raises(ValueError):
        excerpt_ratio("x", "x", min_span_chars=0)


def test_independent_ratio_agrees_with_tagged_ratio_on_sample():
    doc = DOCS[0]
    sents = re.split(r"(?<=[.!?])\s+", doc)
    answer = ("In short, §§ " + make_excerpt_pointer(sents[0], 3, 3, document=doc) + " and also ¤¤ "
              + make_excerpt_pointer(sents[-1], 3, 3, document=doc))
    r = expand_excerpts(answer, doc)
    assert r.ok
    assert excerpt_ratio(r.text, doc) == pytest.approx(r.excerpt_ratio)
    assert 0.8 < r.excerpt_ratio < 1.0


# -- make_excerpt_pointer ------------------------------------------------------------------

def test_make_excerpt_pointer_forms():
    assert make_excerpt_pointer(PAPER_SPAN, head_words=4, tail_words=4) == (
        "<excerpt>It is known that<...>the principle of relativity.</excerpt>")
    assert make_excerpt_pointer("  short span here ", 2, 2) == "<excerpt>short span here</excerpt>"
    for bad in ("", "  ", "a <excerpt> b", "a <...> b"):
        with pytest.raises(ValueError):
            make_excerpt_pointer(bad)
    with pytest.raises(ValueError, match="head_words"):
        make_excerpt_pointer(PAPER_SPAN, head_words=0)
    with pytest.raises(ValueError, match="does not occur"):
        make_excerpt_pointer("not in the document at all", document=PAPER_DOC)


def test_make_excerpt_pointer_grows_until_unique():
    doc = "The cat sat. The dog ran far away. The cat sat on the mat and the dog ran far away."
    span = "The cat sat on the mat and the dog ran far away."
    plain = make_excerpt_pointer(span, 2, 2)
    assert expand_excerpts(plain, doc).failures[0].reason == "ambiguous"
    ptr = make_excerpt_pointer(span, 2, 2, document=doc)
    assert ptr != plain and "<...>" in ptr
    assert expand_excerpts(ptr, doc).text == span
    # a span that occurs twice can only be the full text, which is unambiguous in content
    doc2 = "Alpha beta gamma delta epsilon. Alpha beta gamma delta epsilon."
    ptr2 = make_excerpt_pointer("Alpha beta gamma delta epsilon.", 1, 1, document=doc2)
    assert ptr2 == "<excerpt>Alpha beta gamma delta epsilon.</excerpt>"
    assert expand_excerpts(ptr2, doc2).text == "Alpha beta gamma delta epsilon."


def _sentences(doc: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", doc) if s.strip()]


def test_pointer_identity_on_real_sentences():
    """expand(make_pointer(sentence)) == sentence for every sentence of 200 sample documents."""
    n = pointers = ambiguous_without_doc = 0
    for doc in DOCS:
        for s in _sentences(doc):
            ptr = make_excerpt_pointer(s, head_words=3, tail_words=3, document=doc)
            r = expand_excerpts(ptr, doc)
            assert r.ok and r.text == s, (s, ptr, r.failures)
            pointers += "<...>" in ptr
            # without the document the pointer may be ambiguous, but never expands to other text
            r2 = expand_excerpts(make_excerpt_pointer(s, 3, 3), doc)
            if r2.ok:
                assert r2.text == s
            else:
                assert [f.reason for f in r2.failures] == ["ambiguous"]
                ambiguous_without_doc += 1
            n += 1
    assert n > 1000 and pointers > n // 2
    assert ambiguous_without_doc < n // 20


@settings(max_examples=200, deadline=None)
@given(doc_i=st.integers(0, len(DOCS) - 1), a=st.floats(0, 1), b=st.floats(0, 1),
       head=st.integers(1, 8), tail=st.integers(1, 8))
def test_pointer_identity_on_arbitrary_spans(doc_i, a, b, head, tail):
    doc = DOCS[doc_i]
    i, j = sorted((int(a * len(doc)), int(b * len(doc))))
    span = doc[i:j].strip()
    assume(span)
    ptr = make_excerpt_pointer(span, head, tail, document=doc)
    r = expand_excerpts(ptr, doc)
    assert r.ok and r.text == span


@settings(max_examples=100, deadline=None)
@given(doc_i=st.integers(0, len(DOCS) - 1),
       pieces=st.lists(st.tuples(st.text("§¤¶ \n", max_size=6), st.floats(0, 1), st.integers(20, 300)),
                       min_size=1, max_size=4),
       tail_glue=st.text("§¤¶ ", max_size=5))
def test_tagged_and_independent_ratios_agree(doc_i, pieces, tail_glue):
    """Glue made of characters absent from the documents + excerpts of >= 20 chars: both ratios equal."""
    doc = DOCS[doc_i]
    parts, expected = [], []
    for glue, frac, length in pieces:
        start = int(frac * (len(doc) - 1))
        span = doc[start:start + length].strip()
        if len(re.sub(r"\s+", " ", span)) < 20:
            continue
        parts += [glue, make_excerpt_pointer(span, 2, 2, document=doc)]
        expected += [glue, span]
    assume(parts)
    answer = "".join(parts) + tail_glue
    r = expand_excerpts(answer, doc)
    assert r.ok and r.text == "".join(expected) + tail_glue
    assert excerpt_ratio(r.text, doc) == pytest.approx(r.excerpt_ratio)
