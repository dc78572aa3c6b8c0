"""Judging instruction-answer pairs on a 1-5 Likert scale (FineInstructions §3.4).

The paper scores every pair with Flow Judge and a 5-point rubric from 1 (irrelevant or
off-topic) to 5 (addresses the query without extraneous, vague or repetitive content), and keeps
pairs scoring >= 4. Only the two ends of the rubric are in the paper; levels 2-4 here are
written to interpolate between them.

On the embedded profile no small generative model judges reliably, so an embedding relevance
model (cosine between instruction and answer) stands in, mapped onto the same scale by
:func:`relevance_to_likert`.
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
