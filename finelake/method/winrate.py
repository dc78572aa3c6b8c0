"""LLM-as-judge evaluation logic: pairwise win rates with a length correction, multi-aspect 1-5
scores, and single-answer 1-10 grades. Pure logic: prompts, parsers and statistics; the judge model
is whatever generation backend the profile configures (``evaluate.judge``).

* **Pairwise (AlpacaEval, FineInstructions §4.3).** The judge sees the instruction and two responses
  (the model's and the shipped GPT-4-turbo reference) and answers ``1`` or ``2``. Each pair is
  judged in both orders and the two verdicts are averaged, so a judge that always names the same
  position yields 0.5 rather than a spurious win or loss. ``win_rate`` is the mean preference for the
  model (ties count 0.5); ``win_margin`` = wins - losses (the paper's Δ).
* **Length control.** AlpacaEval 2's length-controlled win rate fits a GLM with a length term and
  reports the win rate with that term set to zero. :func:`length_controlled_win_rate` is the simple
  one-model version: ``logit P(model preferred) = theta + phi * tanh(Δlen / sd(Δlen))`` fitted by
  maximum likelihood (soft labels, a weak ridge penalty 1e-2 so a judge that always prefers one
  side gives a finite answer); the LC win rate is ``sigmoid(theta)``, the predicted preference at
  equal length. Δlen is the difference in characters. With few items the fit is noisy: ``n``
  is reported beside it.
* **Multi-aspect scores** (Ghosh et al., limitations of instruction tuning, after just-eval):
  helpfulness, clarity, factuality, depth and engagement, each 1-5, one JSON reply per response.
* **Single-answer grade** (MT-Bench, first turn): 1-10.

A weak judge gives weak numbers: on the embedded profile the judge is SmolLM2-135M-Instruct, which
mostly repeats one answer; treat its win rates and scores as a wiring check, not a measurement.
"""

from __future__ import annotations

import json
import math
import re
from typing import Optional, Sequence

ASPECTS = ("helpfulness", "clarity", "factuality", "depth", "engagement")

_ASPECT_DEFS = {
    "helpfulness": "Does the response address the user's request and solve the problem?",
    "clarity": "Is the response well-structured, with ideas presented clearly and coherently?",
    "factuality": "Is the information in the response accurate and free of errors?",
    "depth": "Does the response cover the topic thoroughly, with relevant detail?",
    "engagement": "Does the response read naturally, like a thoughtful human conversation?",
}

PAIRWISE_REGEX = "[12]"
GRADE_REGEX = "(10|[1-9])"

ASPECT_SCHEMA = {
    "type": "object",
    "properties": {a: {"type": "integer", "enum": [1, 2, 3, 4, 5]} for a in ASPECTS},
    "required": list(ASPECTS),
}


def _clip(text: Optional[str], max_chars: int) -> str:
    text = (text or "").strip()
    return text if len(text) <= max_chars else text[:max_chars] + " [...]"


def pairwise_messages(instruction: str, first: str, second: str,
                      max_chars: int = 3000) -> list[dict[str, str]]:
    """Chat messages asking which of two responses is better; the judge answers ``1`` or ``2``."""
    return [
        {"role": "system", "content": "You compare two responses to the same instruction and "
                                      "choose the better one."},
        {"role": "user", "content": (
            "Which response follows the instruction better and is more helpful, accurate and "
            "clear? Answer with the number 1 or 2 only.\n\n"
            f"# Instruction\n{_clip(instruction, max_chars)}\n\n"
            f"# Response 1\n{_clip(first, max_chars)}\n\n"
            f"# Response 2\n{_clip(second, max_chars)}\n\n"
            "The better response is number:")},
    ]


def parse_pairwise(text: Optional[str]) -> Optional[int]:
    """``1`` or ``2`` from a judge reply (the first such digit), None when absent."""
    m = re.search(r"[12]", text or "")
    return int(m.group(0)) if m else None


def preference(model_first: Optional[int], model_second: Optional[int]) -> Optional[float]:
    """Preference for the model (1 win, 0 loss) from the verdicts of both orders.

    Args:
        model_first: the verdict when the model's response was shown as response 1.
        model_second: the verdict when it was shown as response 2 (None: not judged/unparsed).

    Returns:
        The mean over the parsed verdicts, or None when neither parsed.
    """
    votes = []
    if model_first is not None:
        votes.append(1.0 if model_first == 1 else 0.0)
    if model_second is not None:
        votes.append(1.0 if model_second == 2 else 0.0)
    return sum(votes) / len(votes) if votes else None


def win_rates(prefs: Sequence[Optional[float]]) -> dict[str, float]:
    """``win_rate`` (mean preference), ``win_margin`` (wins - losses), ``n`` judged, ``n_unparsed``.

    Raises:
        ValueError: nothing was judged.
    """
    ok = [p for p in prefs if p is not None]
    if not ok:
        raise ValueError("no parsed pairwise verdicts")
    return {"win_rate": sum(ok) / len(ok), "win_margin": sum(2 * p - 1 for p in ok) / len(ok),
            "n": float(len(ok)), "n_unparsed": float(len(prefs) - len(ok))}


def length_controlled_win_rate(prefs: Sequence[Optional[float]], model_lengths: Sequence[int],
                               reference_lengths: Sequence[int], ridge: float = 1e-2) -> dict[str, float]:
    """Length-controlled win rate (module docstring): ``sigmoid(theta)`` of the fitted GLM.

    Args:
        prefs: preference for the model per item in [0, 1] (None: skipped).
        model_lengths, reference_lengths: response lengths in characters, same order.
        ridge: L2 penalty on (theta, phi).

    Returns:
        ``lc_win_rate``, ``length_coef`` (phi: > 0 means the judge favours the longer response),
        ``n``.

    Raises:
        ValueError: lengths and preferences disagree in length, or nothing was judged.
    """
    import numpy as np
    from scipy.optimize import minimize

    if not (len(prefs) == len(model_lengths) == len(reference_lengths)):
        raise ValueError("prefs, model_lengths and reference_lengths must have the same length")
    rows = [(p, m - r) for p, m, r in zip(prefs, model_lengths, reference_lengths) if p is not None]
    if not rows:
        raise ValueError("no parsed pairwise verdicts")
    y = np.array([p for p, _ in rows], dtype=float)
    d = np.array([x for _, x in rows], dtype=float)
    sd = d.std()
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)

    def nll(w):
        z = w[0] + w[1] * x
        # log(1 + e^z) computed stably; soft labels y in [0, 1]
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * ridge * np.dot(w, w))

    def grad(w):
        z = w[0] + w[1] * x
        p = 1.0 / (1.0 + np.exp(-z))
        g = p - y
        return np.array([g.sum(), (g * x).sum()]) + ridge * w

    fit = minimize(nll, np.zeros(2), jac=grad, method="L-BFGS-B")
    theta, phi = fit.x
    return {"lc_win_rate": 1.0 / (1.0 + math.exp(-theta)), "length_coef": float(phi),
            "n": float(len(rows))}


def aspect_messages(instruction: str, response: str, max_chars: int = 3000) -> list[dict[str, str]]:
    """Chat messages asking for 1-5 scores on the five aspects as JSON."""
    defs = "\n".join(f"- {a}: {_ASPECT_DEFS[a]}" for a in ASPECTS)
    return [
        {"role": "system", "content": "You rate responses to user instructions."},
        {"role": "user", "content": (
            "Rate the response on each aspect from 1 (very poor) to 5 (excellent).\n"
            f"{defs}\n\n# Instruction\n{_clip(instruction, max_chars)}\n\n"
            f"# Response\n{_clip(response, max_chars)}\n\n"
            "Reply with JSON only, one integer 1-5 per aspect: "
            + json.dumps({a: "<1-5>" for a in ASPECTS}).replace('"<1-5>"', "<1-5>"))},
    ]


def parse_aspects(text: Optional[str]) -> dict[str, Optional[int]]:
    """Aspect -> 1-5 score from a judge reply (JSON, or ``name: digit`` pairs); None if absent."""
    out: dict[str, Optional[int]] = {a: None for a in ASPECTS}
    if not text:
        return out
    try:
        obj = json.loads(text[text.index("{"): text.rindex("}") + 1])
        for a in ASPECTS:
            v = obj.get(a)
            if isinstance(v, (int, float)) and 1 <= int(v) <= 5:
                out[a] = int(v)
    except (ValueError, AttributeError):
        pass
    for a in ASPECTS:
        if out[a] is None:
            m = re.search(rf'"?{a}"?\s*[:=]\s*([1-5])', text, re.IGNORECASE)
            out[a] = int(m.group(1)) if m else None
    return out


def grade_messages(question: str, response: str, max_chars: int = 3000) -> list[dict[str, str]]:
    """MT-Bench style single-answer grading: the judge replies with a number 1-10."""
    return [
        {"role": "system", "content": "You are an impartial judge of response quality."},
        {"role": "user", "content": (
            "Rate the helpfulness, relevance, accuracy, depth and level of detail of the response "
            "to the question on a scale of 1 to 10. Reply with the number only.\n\n"
            f"# Question\n{_clip(question, max_chars)}\n\n# Response\n{_clip(response, max_chars)}\n\n"
            "Rating:")},
    ]


def parse_grade(text: Optional[str]) -> Optional[int]:
    """The first integer 1-10 in a reply, None when absent."""
    m = re.search(r"\b(10|[1-9])\b", text or "")
    return int(m.group(1)) if m else None
