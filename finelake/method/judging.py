"""Judging instruction-answer pairs on a 1-5 Likert scale (FineInstructions §3.4).

The paper scores every pair with Flow Judge and a 5-point rubric from 1 (irrelevant or
off-topic) to 5 (addresses the query without extraneous, vague or repetitive content), and keeps
pairs scoring >= 4. Only the two ends of the rubric are in the paper; levels 2-4 here are
written to interpolate between them.

Flow Judge is spoken to in its own format (:func:`flow_judge_prompt`, the prompt it was trained on:
``# GOAL``, ``# INPUT`` with ``<inputs>``, ``# OUTPUT`` with ``<output>``, ``# EVALUATION CRITERIA
AND SCORING RUBRIC``, its evaluation instructions) and its ``<feedback>…</feedback><score>N</score>``
reply is read by :func:`parse_flow_judge_output`. Other generative judges may use the JSON-reply
prompt (:func:`judge_prompt`, :func:`parse_judge_output`).

On the embedded profile no small generative model judges reliably, so an embedding relevance
model (cosine between instruction and answer) stands in, mapped onto the same scale by
:func:`relevance_to_likert` and combined with the text-quality rules of
:mod:`finelake.method.quality` by :func:`composite_judgment` (a header that repeats the
instruction's words is relevant, but not an answer).
"""

from __future__ import annotations

import json
import math
import re
from typing import Optional, Sequence

RUBRIC_LEVELS: dict[int, str] = {
    1: "The answer is irrelevant or off-topic: it does not address the instruction at all.",
    2: "The answer touches the topic of the instruction but does not answer it: it is mostly "
       "about something else, or it misreads what is asked.",
    3: "The answer partly addresses the instruction: part of what is asked is missing, or the "
       "useful content is buried in a lot of extraneous, vague or repetitive text.",
    4: "The answer addresses the instruction and is useful, with minor problems: some "
       "extraneous, vague or repetitive content, or a small gap.",
    5: "The answer addresses the instruction fully and directly, without extraneous, vague or "
       "repetitive content.",
}

RUBRIC = "\n".join(f"{k}: {v}" for k, v in sorted(RUBRIC_LEVELS.items()))

JUDGE_PROMPT = """You are judging how well an answer responds to an instruction.

Score the answer on this 5-point scale:
{rubric}

<<<Instruction:
{instruction}
>>>

<<<Answer:
{answer}
>>>

Reply with JSON only: {{"score": <1-5>, "reason": "<one sentence>"}}"""


# ----------------------------------------------------------------------------- Flow Judge format

#: The §3.4 criterion, as Flow Judge's ``<evaluation_criteria>``: the two ends of the paper's rubric
#: (1 irrelevant or off-topic, 5 addresses the query without extraneous, vague or repetitive
#: content) are the two questions it asks.
FLOW_JUDGE_CRITERIA = ("Does the response address the query? Is it relevant and on-topic, and "
                       "does it answer what the query asks without extraneous, vague or "
                       "repetitive content?")

# Flow Judge's user prompt, reproduced from the flow-judge package (flowaicom/flow-judge, Apache-2.0;
# release 0.1.2, flow_judge/utils/prompt_formatter.py: USER_PROMPT_TEMPLATE), the prompt
# flowaicom/Flow-Judge-v0.1 was trained on. Kept character for character (the missing space in
# "criterion,decide" included): the model answers in its trained format only on this prompt.
FLOW_JUDGE_TEMPLATE = """# GOAL
Your job is to evaluate a task carried out by an AI system powered by a large \
language model.

You will be provided with the inputs and output of the task, as well as the evaluation criteria \
and scoring rubric. Your task is to evaluate the output of the AI system based on the evaluation \
criteria and scoring rubric provided.

# INPUT
Below are the inputs required for performing the task:
<inputs>
{INPUTS}
</inputs>

# OUTPUT
Below is the output of the task:
<output>
{OUTPUT}
</output>

# EVALUATION CRITERIA AND SCORING RUBRIC
Here are the evaluation criteria and the rubric that you need to use for evaluating the task:
<evaluation_criteria>
{EVALUATION_CRITERIA}
</evaluation_criteria>

<scoring_rubric>
{RUBRIC}
</scoring_rubric>

# INSTRUCTIONS FOR THE EVALUATION
1. Understand the task and criteria: Familiarize yourself with the task to be evaluated. \
Review the evaluation criteria and scoring rubric to understand the different levels of \
performance and the descriptions for each score.
2. Review the inputs and output: Look at the inputs provided for the task. Examine the output \
generated from completing the task.
3. Compare output to score descriptions: Compare the output against the criteria and score \
descriptions in the scoring rubric. For each criterion,decide which description best matches the \
output.
4. After comparing the output to the score descriptions, pay attention to the small details that \
might impact the final score that you assign. Sometimes a small difference can dictate the final \
score.
5. Write verbal feedback justifying your evaluation that includes a detailed rationale, referring \
to specific aspects of the output and comparing them to the rubric.
6. Assign a final score based on the scoring rubric.

## FORMAT FOR THE EVALUATION
- Write the verbal feedback inside <feedback> tags without any additional surrounding text.
- Write the numeric score inside <score> tags, without any additional surrounding text and always \
after the feedback.

Please accurately evaluate the task. Strictly adhere to the evaluation criteria and rubric."""


def flow_judge_vars(variables: list[dict[str, str]]) -> str:
    """Flow Judge's variable block (flow-judge ``format_vars``): each ``{name: value}`` becomes
    ``<name>\nvalue\n</name>``, the tag lower-cased with spaces as underscores; one per line."""
    out = []
    for var in variables:
        for key, value in var.items():
            tag = key.lower().replace(" ", "_")
            out.append(f"<{tag}>\n{value}\n</{tag}>")
    return "\n".join(out)


def flow_judge_rubric(levels: dict[int, str]) -> str:
    """Flow Judge's rubric block (flow-judge ``format_rubric``): ``- Score k: description``,
    lowest score first."""
    return "\n".join(f"- Score {k}: {v}" for k, v in sorted(levels.items()))


def flow_judge_prompt(instruction: str, answer: str, *, criteria: str = FLOW_JUDGE_CRITERIA,
                      levels: Optional[dict[int, str]] = None) -> str:
    """The Flow Judge prompt for one pair (§3.4): the instruction as the task's ``<query>`` input,
    the answer as its ``<response>`` output, the paper's 1-5 rubric (:data:`RUBRIC_LEVELS`).

    Sent as the only (user) message, stripped, as the flow-judge package sends it. The reply is
    read by :func:`parse_flow_judge_output`.
    """
    return FLOW_JUDGE_TEMPLATE.format(
        INPUTS=flow_judge_vars([{"query": instruction}]),
        OUTPUT=flow_judge_vars([{"response": answer}]),
        EVALUATION_CRITERIA=criteria,
        RUBRIC=flow_judge_rubric(levels or RUBRIC_LEVELS)).strip()


def flow_judge_regex(max_feedback_chars: int = 1000) -> str:
    """A regular expression for Flow Judge's reply format, for judges too small to keep to it
    unprompted (``options.constrained`` of the ``llm`` judge; Flow Judge itself runs without it):
    ``<feedback>`` with 1..``max_feedback_chars`` characters other than ``<``, then
    ``<score>1``-``5</score>``.

    Raises:
        ValueError: ``max_feedback_chars`` < 1.
    """
    if max_feedback_chars < 1:
        raise ValueError(f"max_feedback_chars must be >= 1, not {max_feedback_chars}")
    return rf"<feedback>[^<]{{1,{int(max_feedback_chars)}}}</feedback>\s?<score>[1-5]</score>"


_FLOW_SCORE_RE = re.compile(r"<score>\s*([^<]*?)\s*</score>", re.IGNORECASE | re.DOTALL)
_FLOW_FEEDBACK_RE = re.compile(r"<feedback>\s*(.*?)\s*</feedback>", re.IGNORECASE | re.DOTALL)


def parse_flow_judge_output(text: Optional[str]) -> tuple[Optional[int], str]:
    """Read a Flow Judge reply, ``<feedback>…</feedback>`` then ``<score>N</score>`` (§3.4).

    The first ``<score>`` tag must hold an integer 1..5 (surrounding whitespace allowed); the
    reason is the ``<feedback>`` text (flow-judge's own ``EvalOutput.parse`` reads the same two
    tags).

    Returns:
        ``(score, feedback)`` for a valid reply; a reply with a score but no ``<feedback>``
        gets ``(score, "(no <feedback> in the reply)")``. ``(None, "judge_error: <why>: <start
        of the reply>")`` when the reply is empty, has no ``<score>`` tag (a reply cut by
        ``max_tokens`` before it, free text), or its score is not an integer in 1..5; the pair
        is then an error row with that reason, never dropped silently. Never raises.
    """
    if not text or not text.strip():
        return None, "judge_error: empty judge reply"
    head = repr(text.strip()[:120])
    m = _FLOW_SCORE_RE.search(text)
    if not m:
        return None, f"judge_error: no <score>N</score> in the reply: {head}"
    raw = m.group(1)
    if not raw.isdigit() or not 1 <= int(raw) <= 5:
        return None, f"judge_error: score {raw!r} is not an integer in 1-5: {head}"
    fb = _FLOW_FEEDBACK_RE.search(text[:m.start()]) or _FLOW_FEEDBACK_RE.search(text)
    return int(raw), fb.group(1) if fb else "(no <feedback> in the reply)"


# ----------------------------------------------------------------------------- JSON-reply format


def judge_prompt(instruction: str, answer: str) -> str:
    """The judge prompt for one pair: rubric, the pair, and the JSON reply format that
    :func:`parse_judge_output` reads."""
    return JUDGE_PROMPT.format(rubric=RUBRIC, instruction=instruction, answer=answer)


_SCORE_TAG_RE = re.compile(r"<score>\s*(\d+)\s*</score>", re.IGNORECASE)
_FEEDBACK_TAG_RE = re.compile(r"<feedback>(.*?)</feedback>", re.IGNORECASE | re.DOTALL)
_LEADING_RE = re.compile(r"^\s*(?:score\s*[:=]?\s*)?([0-9]+)(?![0-9]|\.[0-9])\s*(?:/\s*5)?[\s.:,)\-–—]*(.*)$",
                         re.IGNORECASE | re.DOTALL)


def _as_score(value) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _json_objects(text: str):
    dec = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, _ = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            yield obj
        i = text.find("{", i + 1)


def parse_judge_output(text: Optional[str]) -> tuple[Optional[int], str]:
    """Read a judge's reply into ``(score, reason)`` (§3.4).

    Tried in order:

    1. the first JSON object with a ``"score"`` key, anywhere in the text (code fences and
       chatter around it are fine); ``"reason"`` (or ``"feedback"``) is the reason; the score may
       be an int, an integral float or a digit string;
    2. Flow Judge's format, ``<feedback>…</feedback> <score>N</score>``;
    3. a leading integer, optionally after ``Score:`` and followed by ``/5``; the rest of the
       text is the reason (``"4 - clear and direct"`` → ``(4, "clear and direct")``).

    Returns:
        ``(score, reason)`` with score in 1..5; ``(None, why)`` when no score is found or it is
        outside 1..5 (the reply is then unusable and the pair unjudged). Never raises.
    """
    if not text or not text.strip():
        return None, "empty judge output"
    for obj in _json_objects(text):
        if "score" in obj:
            score = _as_score(obj["score"])
            reason = obj.get("reason", obj.get("feedback", ""))
            reason = reason.strip() if isinstance(reason, str) else json.dumps(reason)
            return _checked(score, reason, repr(obj["score"]))
    m = _SCORE_TAG_RE.search(text)
    if m:
        fb = _FEEDBACK_TAG_RE.search(text)
        return _checked(int(m.group(1)), fb.group(1).strip() if fb else "", m.group(1))
    m = _LEADING_RE.match(text)
    if m:
        return _checked(int(m.group(1)), m.group(2).strip(), m.group(1))
    return None, f"unparseable judge output: {text.strip()[:80]!r}"


def _checked(score: Optional[int], reason: str, raw: str) -> tuple[Optional[int], str]:
    if score is None or not 1 <= score <= 5:
        return None, f"score out of range or not an integer: {raw}"
    return score, reason


#: Default cut points for all-MiniLM-L6-v2 cosine(instruction, answer). Planning measurements:
#: relevant pairs 0.56-0.82, irrelevant <= 0.06. Irrelevant pairs land on 1; the weakest relevant
#: pair (0.56) on 4 and the strong ones (>= 0.60) on 5, so ``judge.min_score = 4`` keeps them;
#: 0.30, the embedded profile's template-match threshold, separates "related" (3) from
#: "barely related" (2). Other embedding models need their own cut points.
DEFAULT_LIKERT_CUTS: tuple[float, float, float, float] = (0.15, 0.30, 0.45, 0.60)


def relevance_to_likert(cosine: float, cuts: Sequence[float] = DEFAULT_LIKERT_CUTS) -> int:
    """Map a relevance score (cosine similarity) to the 1-5 scale of §3.4.

    ``score = 1 + #{c in cuts : cosine >= c}``: with the defaults, < 0.15 → 1, [0.15, 0.30) → 2,
    [0.30, 0.45) → 3, [0.45, 0.60) → 4, >= 0.60 → 5.

    Args:
        cosine: relevance in [-1, 1] (values slightly outside, from float error, are fine).
        cuts: four strictly increasing thresholds.

    Raises:
        ValueError: cosine is NaN; cuts are not four strictly increasing finite numbers.
    """
    if len(cuts) != 4 or not all(math.isfinite(c) for c in cuts) or \
            any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"cuts must be 4 strictly increasing finite numbers, got {tuple(cuts)}")
    if math.isnan(cosine):
        raise ValueError("cosine is NaN")
    return 1 + sum(1 for c in cuts if cosine >= c)


# ----------------------------------------------------------------------------- embedded composite

COMPOSITE_RULE = ("the relevance score, unless a quality rule fails (finelake.method.quality): "
                  "then 1")
"""How :func:`composite_judgment` combines its parts (recorded in every ``judge_parts``)."""


def composite_judgment(cosine: float, answer_rule: Optional[str], instruction_rule: Optional[str],
                       answer_measures: Optional[dict] = None,
                       cuts: Sequence[float] = DEFAULT_LIKERT_CUTS) -> tuple[int, str, dict]:
    """The embedded judge's verdict on one pair: embedding relevance and the quality rules.

    Parts: ``relevance`` (the cosine and its 1-5 level, :func:`relevance_to_likert`),
    ``answer`` and ``instruction`` (the first failing quality rule or None, and what the answer
    rules measured). The score is the relevance level when both quality parts pass, else 1:
    an answer made of navigation, markup, headings or repeated lines, or an instruction with a
    section number in a slot, "does not address the instruction" (rubric level 1) however many
    words it shares with it. Neither part is an LLM's judgment of helpfulness (§3.4's Flow Judge);
    the reason says so.

    Returns:
        ``(score 1-5, reason, parts)``; ``parts`` is JSON-serializable and holds ``score`` and
        ``combine`` (:data:`COMPOSITE_RULE`).

    Raises:
        ValueError: cosine is NaN, or bad cuts (:func:`relevance_to_likert`).
    """
    rel = relevance_to_likert(cosine, cuts)
    failed = answer_rule or instruction_rule
    score = 1 if failed else rel
    parts = {"relevance": {"cosine": round(float(cosine), 4), "score": rel},
             "answer": {"rule": answer_rule, **(answer_measures or {})},
             "instruction": {"rule": instruction_rule},
             "combine": COMPOSITE_RULE, "score": score}
    if failed:
        reason = f"{failed} -> 1 (relevance cosine {cosine:.3f} -> {rel} not used)"
    else:
        prose = (answer_measures or {}).get("prose_share")
        reason = (f"relevance cosine {cosine:.3f} -> {rel}; quality rules passed"
                  + (f" (prose share {prose:.2f})" if prose is not None else ""))
    return score, reason + " (embedding relevance and text-quality rules, not an LLM judgment)", parts
