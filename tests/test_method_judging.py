"""finelake.method.judging: rubric, judge output parsing, relevance → Likert (§3.4)."""

from __future__ import annotations

import json
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


# ----------------------------------------------------------------------------- Flow Judge format

from finelake.method.judging import (  # noqa: E402
    FLOW_JUDGE_CRITERIA,
    flow_judge_prompt,
    flow_judge_regex,
    flow_judge_rubric,
    flow_judge_vars,
    parse_flow_judge_output,
)


def test_flow_judge_prompt_has_its_sections_in_order_and_the_pair():
    p = flow_judge_prompt("What is {x}?", "X is a letter.")
    heads = ["# GOAL", "# INPUT", "<inputs>", "<query>\nWhat is {x}?\n</query>", "</inputs>",
             "# OUTPUT", "<output>", "<response>\nX is a letter.\n</response>", "</output>",
             "# EVALUATION CRITERIA AND SCORING RUBRIC", "<evaluation_criteria>",
             FLOW_JUDGE_CRITERIA, "<scoring_rubric>", "- Score 1: ", "- Score 5: ",
             "</scoring_rubric>", "# INSTRUCTIONS FOR THE EVALUATION", "## FORMAT FOR THE EVALUATION",
             "<feedback> tags", "<score> tags"]
    pos = [p.index(h) for h in heads]
    assert pos == sorted(pos)
    assert p == p.strip() and "JSON" not in p


def test_flow_judge_rubric_is_the_papers_five_levels_lowest_first():
    lines = flow_judge_rubric(RUBRIC_LEVELS).splitlines()
    assert [ln.split(":")[0] for ln in lines] == [f"- Score {k}" for k in range(1, 6)]
    assert "irrelevant or off-topic" in lines[0]
    assert all(w in lines[4] for w in ("extraneous", "vague", "repetitive"))
    assert flow_judge_rubric({5: "b", 1: "a"}) == "- Score 1: a\n- Score 5: b"


def test_flow_judge_vars_tag_names():
    assert flow_judge_vars([{"User Query": "q"}, {"response": "r"}]) == \
        "<user_query>\nq\n</user_query>\n<response>\nr\n</response>"


@pytest.mark.parametrize("text,expected", [
    ("<feedback>\nAnswers it well.\n</feedback>\n<score>\n5\n</score>", (5, "Answers it well.")),
    ("<feedback>Off-topic.</feedback><score>1</score>", (1, "Off-topic.")),
    ("Sure.\n<feedback>ok</feedback>\n<score> 4 </score>\ntrailing", (4, "ok")),
    ("<score>3</score>", (3, "(no <feedback> in the reply)")),
])
def test_parse_flow_judge_output_accepts(text, expected):
    assert parse_flow_judge_output(text) == expected


@pytest.mark.parametrize("text,why", [
    ("", "empty"),
    (None, "empty"),
    ("<feedback>Good answer, I would give it a 5", "no <score>N</score>"),
    ('{"score": 4, "reason": "json is not its format"}', "no <score>N</score>"),
    ("<feedback>x</feedback><score>0</score>", "not an integer in 1-5"),
    ("<feedback>x</feedback><score>6</score>", "not an integer in 1-5"),
    ("<feedback>x</feedback><score>4.5</score>", "not an integer in 1-5"),
    ("<feedback>x</feedback><score>four</score>", "not an integer in 1-5"),
])
def test_parse_flow_judge_output_rejects_with_a_reason(text, why):
    score, reason = parse_flow_judge_output(text)
    assert score is None and reason.startswith("judge_error: ") and why in reason


@given(st.integers(1, 5), st.text(alphabet=st.characters(blacklist_characters="<"), min_size=1,
                                  max_size=60))
def test_flow_judge_regex_matches_exactly_the_parseable_replies(score, feedback):
    import re

    reply = f"<feedback>{feedback}</feedback>\n<score>{score}</score>"
    assert re.fullmatch(flow_judge_regex(60), reply)
    assert parse_flow_judge_output(reply)[0] == score
    assert not re.fullmatch(flow_judge_regex(60), f"<feedback>{feedback}</feedback><score>6</score>")


class _Replies:
    """A generator stand-in that answers each request with the next canned reply and records the
    requests, to test LLMJudge's own request building and parsing."""

    model_id = "canned"

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []

    def generate(self, reqs):
        from finelake.models.base import GenerationResult

        self.requests += reqs
        out = []
        for _ in reqs:
            text, err, finish = self.replies.pop(0)
            out.append(GenerationResult(text=text, error=err, finish_reason=finish))
        return out


def test_llm_judge_speaks_flow_judge_and_reports_unscored_replies():
    from finelake.models.judge import LLMJudge

    gen = _Replies([("<feedback>Direct.</feedback>\n<score>5</score>", None, "stop"),
                    ("<feedback>It goes on and on", None, "length"),
                    (None, "HTTP 500: busy", None)])
    judge = LLMJudge(gen, max_tokens=300)
    out = judge.score(["q1", "q2", "q3"], ["a1", "a2", "a3"])
    assert out[0] == (5, "Direct.")
    assert out[1][0] is None and "no <score>" in out[1][1] and "max_tokens=300" in out[1][1]
    assert out[2] == (None, "judge_error: HTTP 500: busy")
    r = gen.requests[0]
    assert r.json_schema is None and r.regex is None and len(r.messages) == 1
    assert r.messages[0]["role"] == "user" and r.messages[0]["content"] == flow_judge_prompt("q1", "a1")


def test_llm_judge_constrained_and_json_formats():
    from finelake.models.judge import JUDGE_SCHEMA, LLMJudge

    gen = _Replies([("<feedback>ok</feedback><score>4</score>", None, "stop")])
    judge = LLMJudge(gen, max_tokens=128, constrained=True)
    assert judge.score(["q"], ["a"]) == [(4, "ok")]
    assert gen.requests[0].regex == flow_judge_regex(128 - 24)
    gen = _Replies([('{"score": 2, "reason": "weak"}', None, "stop"), ("nonsense", None, "stop")])
    judge = LLMJudge(gen, format="json")
    assert judge.score(["q", "q"], ["a", "a"]) == [(2, "weak"),
                                                   (None, "judge_error: unparseable judge output: 'nonsense'")]
    assert gen.requests[0].json_schema == JUDGE_SCHEMA
    with pytest.raises(ValueError, match="format"):
        LLMJudge(gen, format="yaml")
    with pytest.raises(ValueError, match="max_tokens"):
        LLMJudge(gen, max_tokens=20, constrained=True)


# ----------------------------------------------------------------------------- embedded composite


def test_composite_judgment_keeps_relevance_when_the_quality_rules_pass():
    from finelake.method.judging import COMPOSITE_RULE, composite_judgment

    score, reason, parts = composite_judgment(0.52, None, None, {"prose_share": 1.0, "words": 40})
    assert score == 4 == parts["relevance"]["score"] == parts["score"]
    assert parts["answer"] == {"rule": None, "prose_share": 1.0, "words": 40}
    assert parts["instruction"] == {"rule": None} and parts["combine"] == COMPOSITE_RULE
    assert reason.startswith("relevance cosine 0.520 -> 4; quality rules passed (prose share 1.00)")
    assert "not an LLM judgment" in reason
    json.dumps(parts)  # stored as JSON in judgments.judge_parts


def test_composite_judgment_scores_1_when_a_rule_fails_however_relevant():
    from finelake.method.judging import composite_judgment

    nav = "quality:answer_navigation: navigation line 'polkit   May 2009   POLKITD(8)'"
    score, reason, parts = composite_judgment(0.81, nav, None)
    assert (score, parts["score"], parts["relevance"]["score"]) == (1, 1, 5)
    assert parts["answer"]["rule"] == nav and reason.startswith(nav + " -> 1 (relevance cosine 0.810 -> 5")
    rep = "quality:instruction_repetition: '53.33' occurs twice"
    assert composite_judgment(0.7, None, rep)[2]["instruction"]["rule"] == rep
    with pytest.raises(ValueError):
        composite_judgment(math.nan, None, None)
