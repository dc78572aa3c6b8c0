"""Halving and completion (arXiv 2409.00096 §3): seeded sampling, split points inside [1/4, 3/4]
on every real sample document, and the continuation quality rules (no Spark)."""

import json
import statistics
from importlib import resources

import pytest

from finelake.method import continuation as C
from finelake.method.spans import split_sentences


def _documents():
    text = resources.files("finelake.sample").joinpath("documents.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    return [(f"doc{i}", r["text"], r["source"]) for i, r in enumerate(rows)]


DOCS = _documents()


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_inside_range_on_every_sample_document(seed):
    units = set()
    for doc_id, text, _ in DOCS:
        s = C.choose_split(text, doc_id, seed)
        n = len(text)
        assert n / 4 <= s.char <= 3 * n / 4, (doc_id, s, n)
        assert s.fraction == pytest.approx(s.char / n) and 0.25 <= s.fraction <= 0.75
        assert 0.25 * n <= s.target <= 0.75 * n
        prompt, rest = C.halve(text, s)
        assert text.startswith(prompt) and prompt == prompt.rstrip() and prompt
        assert text[s.char:] == rest and rest
        in_range = [c for c in C.sentence_boundaries(text) if n / 4 <= c <= 3 * n / 4]
        if s.unit == "sentence":
            assert s.char in in_range
            assert abs(s.char - s.target) == min(abs(c - s.target) for c in in_range)
        else:
            assert s.unit == "token" and not in_range  # token only when no sentence start fits
            assert text[s.char - 1].isspace() and not text[s.char].isspace()
        units.add(s.unit)
    assert "sentence" in units


def test_split_is_seeded_and_spread_over_the_range():
    text = DOCS[0][1]
    assert C.choose_split(text, "a", 3) == C.choose_split(text, "a", 3)
    fracs = [C.choose_split(t, d, 0).fraction for d, t, _ in DOCS]
    other = [C.choose_split(t, d, 1).fraction for d, t, _ in DOCS]
    assert sum(a != b for a, b in zip(fracs, other)) > len(DOCS) / 2  # the seed matters
    assert 0.45 < statistics.mean(fracs) < 0.55
    assert sum(f < 0.4 for f in fracs) > len(fracs) / 10 and sum(f > 0.6 for f in fracs) > len(fracs) / 10


def test_custom_range_and_fallbacks():
    for doc_id, text, _ in DOCS[:200]:
        s = C.choose_split(text, doc_id, 0, lo=0.4, hi=0.6)
        assert 0.4 * len(text) <= s.char <= 0.6 * len(text)
    words = " ".join(["lowercase"] * 40)  # no sentence boundary anywhere
    s = C.choose_split(words, "w", 0)
    assert s.unit == "token" and words[s.char - 1] == " " and len(words) / 4 <= s.char <= 3 * len(words) / 4
    blob = "x" * 101  # no white space: a character split, still in range
    s = C.choose_split(blob, "b", 0)
    assert s.unit == "char" and 101 / 4 <= s.char <= 3 * 101 / 4
    with pytest.raises(ValueError):
        C.choose_split("a", "t", 0)
    with pytest.raises(ValueError):
        C.choose_split(DOCS[0][1], "t", 0, lo=0.8, hi=0.2)


def test_sample_key_is_a_seeded_permutation():
    ids = [d for d, _, _ in DOCS]
    k0 = sorted(ids, key=lambda d: C.sample_key(d, 0))
    assert k0 == sorted(ids, key=lambda d: C.sample_key(d, 0))
    assert k0[:50] != sorted(ids, key=lambda d: C.sample_key(d, 1))[:50]
    assert all(len(C.sample_key(d)) == 40 for d in ids[:5])
    # Adding documents never reorders the ones already there.
    half = sorted(ids[:500], key=lambda d: C.sample_key(d, 0))
    assert [d for d in k0 if d in set(ids[:500])] == half


# ----------------------------------------------------------------------------- quality rules

RULES = C.QualityRules()


def test_real_second_halves_pass_every_rule():
    """The original second halves of all sample documents are what good continuations look like:
    none may be called repetitive, short or empty (a false-positive check of the thresholds)."""
    for doc_id, text, _ in DOCS:
        prompt, rest = C.halve(text, C.choose_split(text, doc_id, 0))
        v = C.assess_continuation(rest, "stop", prompt, RULES)
        assert v.ok, (doc_id, v.reason)


@pytest.mark.parametrize("text", [
    "I like it a lot. " * 15,
    "the cat sat on the mat and " * 12 + "then it left.",
    "The model said: " + "ha" * 40 + ".",
    "Sure! " + "!" * 80,
    "Paris is the capital of France. Paris is the capital of France. Paris is the capital of "
    "France. Paris is the capital of France. Paris is the capital of France.",
])
def test_repetition_loops_are_dropped(text):
    v = C.assess_continuation(text, "length", "", RULES)
    assert v.status == "dropped" and v.reason.startswith("repetitive:"), v
    assert v.text is None


def test_repetition_measures():
    assert C.repeated_ngram_share("a b c a b c a b c", 3) == pytest.approx(4 / 7)
    assert C.repeated_ngram_share("one two", 3) == 0.0
    assert C.longest_char_loop("xx abababababab yy") == (12, "ab")
    assert C.longest_char_loop("no loops here") == (0, "")


def test_empty_short_echo_and_truncation():
    assert C.assess_continuation(None, "stop").reason.startswith("empty:")
    assert C.assess_continuation("  \n ", "stop").reason.startswith("empty:")
    assert C.assess_continuation("Yes, indeed it was.", "stop").reason.startswith("too_short:")
    prompt = DOCS[0][1]
    v = C.assess_continuation(prompt[:400], "stop", prompt, RULES)
    assert v.reason.startswith("echo:")

    body = ("The river rose through the night and reached the bridge by morning. Crews closed the "
            "road and moved the cars away. Nobody was hurt, but the water stayed high until the")
    trimmed = C.assess_continuation(body, "length", "", RULES)
    assert trimmed.ok and trimmed.flags == ("trimmed",)
    assert trimmed.text.endswith("moved the cars away.") and body.startswith(trimmed.text)
    dropped = C.assess_continuation(body, "length", "", C.QualityRules(truncation="drop"))
    assert dropped.status == "dropped" and dropped.reason.startswith("truncated:")
    no_end = C.assess_continuation("and then the water kept rising over the old stone wall while",
                                   "length", "", RULES)
    assert no_end.reason.startswith("truncated:")
    # Stopping on its own mid-sentence is not truncation; ending a sentence at the limit is fine.
    assert C.assess_continuation(body, "stop", "", RULES).ok
    assert C.assess_continuation(body + " evening.", "length", "", RULES).flags == ()
    short_after_trim = C.assess_continuation("It rained. Then the wind came and the", "length")
    assert short_after_trim.reason.startswith("too_short:")


def test_leading_echo_is_stripped():
    prompt = "The bridge opened in 1932. It carried trams until 1960. Cars replaced them."
    cont = ("The bridge opened in 1932. It carried trams until 1960! A new deck was laid in 1985 "
            "and the old rails were taken up by the city.")
    rest, removed = C.strip_echo(cont, prompt)
    assert removed == 2 and rest.startswith("A new deck")
    v = C.assess_continuation(cont, "stop", prompt)
    assert v.ok and v.flags == ("echo_stripped",) and v.text == rest
    assert C.assess_continuation("It carried trams until 1960.", "stop", prompt).reason.startswith("echo:")
    assert C.strip_echo("Something new. The bridge opened in 1932.", prompt) == (
        "Something new. The bridge opened in 1932.", 0)  # only leading copies go


@pytest.mark.parametrize("text", [
    "The next paragraph continues with the same information but with a different name.",
    "This text is about a medical condition called astigmatism, which affects vision.",
    "The text has been rewritten to convey the same information more concisely.",
    "In this passage the author explains why the river flooded every spring.",
    "I threw on some clothes and ran out. I made a mistake in the beginning of the text. The "
    "original text was: I threw on some clothes.",
])
def test_meta_commentary_is_dropped(text):
    v = C.assess_continuation(text, "stop")
    assert v.status == "dropped" and v.reason.startswith("meta:"), v


def test_preamble_is_stripped_but_real_openings_stay():
    v = C.assess_continuation("Here is the next paragraph:\n\nThe rain stopped at noon and the "
                              "crowds came back to the square.", "stop")
    assert v.ok and v.flags == ("preamble_stripped",) and v.text.startswith("The rain stopped")
    for text in ["The text of the treaty was signed by both parties in 1920 and ratified soon.",
                 "Ingredients: flour, salt and water are mixed and left to rise overnight."]:
        v = C.assess_continuation(text, "stop")
        assert v.ok and v.flags == () and v.text == text


def test_rules_validate():
    with pytest.raises(ValueError):
        C.QualityRules(truncation="keep")
    msgs = C.continuation_messages("Some text {with braces}.")
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    assert "\n\nSome text {with braces}.\n\n" in msgs[0]["content"]


def test_trim_and_sentence_end():
    assert C.ends_sentence('He said "go."') and C.ends_sentence("Done!  ")
    assert not C.ends_sentence("and the")
    assert C.trim_to_sentence_end("A b. C d? E f") == "A b. C d?"
    assert C.trim_to_sentence_end("no end here") is None
    # split_sentences and the sentence boundaries agree
    text = DOCS[1][1]
    assert C.sentence_boundaries(text) == [s.start for s in split_sentences(text)[1:]]
