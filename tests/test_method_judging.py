"""finelake.method.judging: rubric, judge output parsing, relevance → Likert (§3.4)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finelake.method.judging import (
    DEFAULT_LIKERT_CUTS,
    RUBRIC,
    RUBRIC_LEVELS,
    judge_prompt,
    parse_judge_output,
    relevance_to_likert,
)


def test_rubric_has_five_levels_with_the_papers_ends():
    assert sorted(RUBRIC_LEVELS) == [1, 2, 3, 4, 5]
    assert "irrelevant or off-topic" in RUBRIC_LEVELS[1]
    assert all(w in RUBRIC_LEVELS[5] for w in ("extraneous", "vague", "repetitive"))
    assert [line.split(":")[0] for line in RUBRIC.splitlines()] == ["1", "2", "3", "4", "5"]


def test_judge_prompt_contains_pair_and_rubric():
    p = judge_prompt("what is {x}?", "an answer")
    assert "what is {x}?" in p and "an answer" in p and RUBRIC in p and '"score"' in p


@pytest.mark.parametrize("text,expected", [
    ('{"score": 4, "reason": "clear"}', (4, "clear")),
    ('Sure!\n```json\n{"score": 5, "reason": "direct and complete"}\n```', (5, "direct and complete")),
    ('{"score": "3", "reason": " partial "}', (3, "partial")),
    ('{"score": 2.0}', (2, "")),
    ('{"score": 4, "feedback": "fine"}', (4, "fine")),
    ('{"note": 1} then {"score": 1, "reason": "off-topic"}', (1, "off-topic")),
    ("<feedback>\nAnswers it well.\n</feedback>\n<score>\n5\n</score>", (5, "Answers it well.")),
    ("4 - mostly good", (4, "mostly good")),
    ("  5", (5, "")),
    ("3. Some extraneous content.", (3, "Some extraneous content.")),
    ("Score: 2/5 - weak", (2, "weak")),
    ("1\nThe answer is about something else.", (1, "The answer is about something else.")),
])
def test_parse_judge_output_accepts(text, expected):
    assert parse_judge_output(text) == expected


@pytest.mark.parametrize("text,why", [
    ("", "empty"),
    (None, "empty"),
    ("   ", "empty"),
    ('{"score": 7, "reason": "x"}', "out of range"),
    ('{"score": 0}', "out of range"),
    ('{"score": 4.5}', "not an integer"),
    ('{"score": true}', "not an integer"),
    ("6 stars", "out of range"),
    ("4.5 overall", "unparseable"),
    ("The answer is good.", "unparseable"),
    ("<score>9</score>", "out of range"),
])
def test_parse_judge_output_rejects(text, why):
    score, reason = parse_judge_output(text)
    assert score is None and why in reason


def test_relevance_to_likert_boundaries_and_planning_measurements():
    assert [relevance_to_likert(c) for c in (-1.0, 0.0, 0.149, 0.15, 0.3, 0.45, 0.599, 0.6, 1.0)] == \
        [1, 1, 1, 2, 3, 4, 4, 5, 5]
    # all-MiniLM-L6-v2 planning numbers: irrelevant <= 0.06, relevant 0.56-0.82
    assert relevance_to_likert(0.06) == 1
    assert all(relevance_to_likert(0.56 + i * 0.26 / 20) >= 4 for i in range(21))  # kept at min_score 4
    assert relevance_to_likert(0.82) == 5
    assert relevance_to_likert(0.5, cuts=(0.1, 0.2, 0.3, 0.4)) == 5
    assert relevance_to_likert(0.5, cuts=(0.6, 0.7, 0.8, 0.9)) == 1


@pytest.mark.parametrize("cuts", [(0.1, 0.2, 0.3), (0.1, 0.3, 0.2, 0.4), (0.1, 0.1, 0.2, 0.3),
                                  (0.1, 0.2, 0.3, float("nan"))])
def test_relevance_to_likert_rejects_bad_cuts(cuts):
    with pytest.raises(ValueError, match="cuts"):
        relevance_to_likert(0.5, cuts=cuts)


def test_relevance_to_likert_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        relevance_to_likert(math.nan)


@given(a=st.floats(-1.2, 1.2), b=st.floats(-1.2, 1.2))
def test_relevance_to_likert_is_monotone_and_in_range(a, b):
    lo, hi = sorted((a, b))
    assert 1 <= relevance_to_likert(lo) <= relevance_to_likert(hi) <= 5
    assert relevance_to_likert(hi) == 1 + sum(hi >= c for c in DEFAULT_LIKERT_CUTS)
