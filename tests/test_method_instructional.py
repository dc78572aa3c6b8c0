"""Instructional-content filter: separates how-to passages from encyclopedia and news text in the
real sample, and each feature fires on the form it is meant for."""

import json
from importlib import resources

import pytest

from finelake.method import instructional as I


def _documents():
    text = resources.files("finelake.sample").joinpath("documents.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n") if line.strip()]


DOCS = _documents()


def _by_opening(opening):
    hits = [d for d in DOCS if d["text"].startswith(opening)]
    assert len(hits) == 1, opening
    return hits[0]


# Chosen by reading sample/documents.jsonl: wikiHow passages (instructions to the reader) and
# Wikipedia leads / news reports (descriptions of the world).
HOWTO = ["This prevents the spray from drying out", "Many pasta dishes, especially vegetable ones",
         "You need to be prepared for accidents while camping",
         "You can also double-click an existing Word document",
         "This won’t help, and it might just dilute"]
NOT_HOWTO = ["The wild boar, also known as", "The nuclear arms race was",
             "Moscow is the capital and largest city", "Driving is the controlled operation",
             "A new report suggests the costs of an aging", "The US space shuttle Endeavour",
             "Tom Lucking found a gold pendant"]


def test_separates_real_howto_from_encyclopedia_and_news():
    pos = [_by_opening(o) for o in HOWTO]
    neg = [_by_opening(o) for o in NOT_HOWTO]
    assert {d["source"] for d in pos} == {"wikihow_article"}
    assert "wikihow_article" not in {d["source"] for d in neg}
    pos_s = [I.score_text(d["text"]) for d in pos]
    neg_s = [I.score_text(d["text"]) for d in neg]
    assert min(s.score for s in pos_s) > max(s.score for s in neg_s)
    assert all(s.instructional for s in pos_s) and not any(s.instructional for s in neg_s)
    assert all({"imperative", "second_person"} & set(s.flags) for s in pos_s)


def test_whole_sample_ranking():
    """Over all 1000 documents: wikiHow ranks above Wikipedia leads and news almost always."""
    score = {id(d): I.score_text(d["text"]) for d in DOCS}
    pos = [score[id(d)].score for d in DOCS if d["source"] == "wikihow_article"]
    neg = [score[id(d)].score for d in DOCS if d["source"] in ("wikipedia_lead", "lee_news")]
    auc = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auc > 0.97
    assert sum(s >= I.DEFAULT_THRESHOLD for s in pos) >= 0.8 * len(pos)
    assert sum(s >= I.DEFAULT_THRESHOLD for s in neg) <= 0.02 * len(neg)


@pytest.mark.parametrize("text,flag", [
    ("Q: What is the boiling point of water?\nA: 100 degrees Celsius at sea level.\n"
     "Q: And of ethanol?\nA: About 78 degrees.", "qa_format"),
    ("How to repot a fern.\n1. Water the plant a day before.\n2. Loosen the root ball.\n"
     "3. Place it in the new pot and fill with soil.", "list_steps"),
    ("What is the best way to learn Spanish? Should I take classes? Or is an app enough?", "question"),
    ("Write a short poem about the sea.", "imperative"),
    ("If the dough is sticky, add more flour. Knead it for ten minutes. Let it rest in a warm "
     "place.", "imperative"),
    ("You should always back up your files. Make sure you keep a copy offline, and remember to "
     "test your backups.", "advice"),
])
def test_instructional_forms_are_flagged(text, flag):
    s = I.score_text(text)
    assert s.instructional and flag in s.flags, s


@pytest.mark.parametrize("text", [
    "The town grew around a mill in the 1820s. By 1900 it had a railway station and two schools. "
    "Its population peaked in 1960.",
    # Quoted speech and titles are not instructions to the reader.
    '"Stop the war," the protesters chanted outside the embassy. "Bring them home," one banner '
    'read. Police said the march was peaceful.',
    '"Don\'t Stop the Music" is a song by Rihanna. It reached number one in nine countries.',
    # Verbs used as nouns or names.
    "Water is the main part of the droplets. Mark Williams said crews were ready. Use of the road "
    "was restricted.",
])
def test_descriptive_text_is_not_flagged(text):
    s = I.score_text(text)
    assert not s.instructional, s
    assert "imperative" not in s.flags


def test_edge_cases():
    assert I.score_text("").score == 0.0 and I.score_text(None).flags == ()
    s = I.score_text("Add salt. Stir well. Serve hot.", threshold=0.9)
    assert s.score < 1.0 and s.instructional == (s.score >= 0.9)
    with pytest.raises(ValueError):
        I.score_text("x", threshold=1.0)
