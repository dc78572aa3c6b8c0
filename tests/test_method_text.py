"""finelake.method.text: normalization, validation, content ids, shingles, decontamination."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest

from finelake.method.text import (
    ContaminationIndex,
    clean_text,
    content_id,
    has_bad_unicode,
    jaccard,
    normalize_text,
    shingles,
    validate_text,
    word_ngrams,
    words,
)


def test_normalize_nfkc_controls_and_whitespace():
    # full-width letters, ligature, NBSP, BOM, zero-width space, soft hyphen, NUL, bell
    raw = "\ufeff\uff28\uff49  \ufb01ne\u00a0wi\u00adne\u200b\x00\x07!\t\tok"
    assert normalize_text(raw) == "Hi fine wine! ok"
    assert normalize_text(raw, keep_paragraphs=False) == "Hi fine wine! ok"


def test_normalize_paragraphs_kept_for_documents_collapsed_for_queries():
    raw = "  First  line\r\nsecond line \n\n\n\n  Next\u2029para\u2028x\x85y  "
    assert normalize_text(raw) == "First line\nsecond line\n\nNext\n\npara\nx\ny"
    assert normalize_text(raw, keep_paragraphs=False) == "First line second line Next para x y"
    assert normalize_text(" \n\t \u200b ") == ""
    # idempotent
    once = normalize_text(raw)
    assert normalize_text(once) == once


@pytest.mark.parametrize("value, code", [
    (None, "missing"),
    (42, "wrong_type"),
    (["a"], "wrong_type"),
    ({"a": 1}, "wrong_type"),
    ("caf\ufffd au lait", "wrong_encoding"),
    ("lone \ud800 surrogate", "wrong_encoding"),
    ("   \n\t ", "empty"),
    ("\x00\x01\ufeff", "empty"),
    ("ab", "too_short"),
    ("x" * 11, "too_long"),
])
def test_validate_text_reasons(value, code):
    reason = validate_text(value, min_chars=3, max_chars=10)
    assert reason is not None and reason.split(":")[0] == code, reason


def test_validate_measures_normalized_length_and_accepts_bounds():
    assert validate_text("abc", 3, 10) is None
    assert validate_text("x" * 10, 3, 10) is None
    # 10 chars after collapsing whitespace, 30 before
    assert validate_text("  a b c d e" + " " * 20, 3, 10) is None
    assert "12 chars > max_chars 10" in validate_text("x" * 12, 1, 10)
    text, reason = clean_text("  Hello\n\n\n world ", 1, 100)
    assert (text, reason) == ("Hello\n\nworld", None)
    text, reason = clean_text("  Hello\n\n\n world ", 1, 100, keep_paragraphs=False)
    assert (text, reason) == ("Hello world", None)
    assert has_bad_unicode("a\ufffdb") and not has_bad_unicode("a\u2028b é 中")


def test_content_id_is_sha1_prefix_and_stable():
    assert content_id("hello") == hashlib.sha1(b"hello").hexdigest()[:20]
    assert len(content_id("x")) == 20 and int(content_id("x"), 16) >= 0
    assert content_id(normalize_text(" hello \n")) == content_id("hello")
    assert content_id("Hello") != content_id("hello")


def test_words_ngrams_and_shingles():
    assert words("Hello, WORLD! Ünïcode — ｆｕｌｌ") == ["hello", "world", "ünïcode", "full"]
    assert word_ngrams(["a", "b", "c"], 2) == ["a b", "b c"]
    assert word_ngrams(["a"], 2) == []
    with pytest.raises(ValueError):
        word_ngrams(["a"], 0)
    assert shingles("one two three four five six", 5) == ["one two three four five",
                                                         "two three four five six"]
    assert shingles("Just three words!", 5) == ["just three words"]
    assert shingles("?!?") == []
    a = shingles("the quick brown fox jumps over the lazy dog", 3)
    b = shingles("The quick brown fox jumps over the lazy cat.", 3)
    assert jaccard(a, b) == pytest.approx(6 / 8)
    assert jaccard([], []) == 0.0


EVAL = [
    "Write a 300+ word summary of the wikipedia page about Raymond III. Do not use any commas.",
    "What are the names of some famous actors that started their careers on Broadway?",
    "Hello there",
]


def test_contamination_exact_and_short_queries():
    idx = ContaminationIndex(EVAL, n=8, names=["ifeval:1", "alpaca:1", "short:1"])
    assert len(idx) == 3 and idx.num_ngrams > 0
    # copied verbatim, different case/punctuation/spacing: exact word match
    m = idx.match("what are the names of some famous actors that started their careers on broadway")
    assert m.exact and m.share == 1.0 and m.eval_name == "alpaca:1" and m.contaminated(0.5)
    # shorter than n words: only an exact match counts
    assert idx.overlap("HELLO there!") == 1.0 and idx.contaminated("hello there", 0.5)
    assert idx.overlap("hello there friend") == 0.0
    assert not idx.contaminated("hello there friend", 0.5)
    assert idx.overlap("") == 0.0


def test_contamination_share_and_tulu_coverage():
    idx = ContaminationIndex(EVAL, n=8)
    q = "What are the names of some famous actors that started their careers on Broadway in 1990?"
    # 16 words -> 9 eight-grams, 7 of them in the eval text
    m = idx.match(q)
    assert not m.exact and m.share == pytest.approx(7 / 9)
    assert m.coverage == pytest.approx(1.0) and m.eval_name == "eval#1"
    assert idx.contaminated(q, 0.5)
    # a long query embedding the whole eval prompt: low share, full coverage (Tulu 3 criterion)
    filler = " ".join(f"w{i}" for i in range(60))
    long_q = f"{filler} {EVAL[1]} {filler}"
    m = idx.match(long_q)
    assert m.share < 0.2 and m.coverage == pytest.approx(1.0) and m.contaminated(0.5)
    # an unrelated query shares nothing
    m = idx.match("How do I bake sourdough bread with a stiff starter at home in winter?")
    assert (m.share, m.coverage, m.exact, m.eval_name) == (0.0, 0.0, False, None)
    assert not m.contaminated(0.5)
    # the threshold is inclusive: share 2/3 (coverage of the long eval text 9/40)
    long_eval = " ".join(f"e{i}" for i in range(40))
    idx2 = ContaminationIndex([long_eval], n=8)
    q2 = " ".join(f"e{i}" for i in range(9)) + " other"
    m2 = idx2.match(q2)
    assert m2.share == pytest.approx(2 / 3) and m2.coverage == pytest.approx(9 / 40)
    assert m2.contaminated(2 / 3) and not m2.contaminated(0.7)
    with pytest.raises(ValueError):
        ContaminationIndex(EVAL, n=0)
    with pytest.raises(ValueError):
        ContaminationIndex(EVAL, names=["a"])


def test_shipped_ifeval_prompt_is_contaminated():
    path = resources.files("finelake.sample").joinpath("eval_ifeval.jsonl")
    prompts = [json.loads(line)["prompt"] for line in path.read_text("utf-8").splitlines()[:50]]
    idx = ContaminationIndex(prompts, n=8)
    assert all(idx.contaminated(p, 0.5) for p in prompts)
    assert idx.contaminated("Please: " + prompts[3].upper(), 0.5)
    assert not idx.contaminated("Explain how a B-tree differs from a binary search tree and when "
                                "databases prefer one over the other.", 0.5)
