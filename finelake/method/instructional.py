"""A scored heuristic that flags texts which are themselves instructional.

Non-instructional fine-tuning (Xie et al., 2024, arXiv 2409.00096) argues that the gains do not
come from instruction-like content hidden in web text, and checks it by removing the samples that
look instructional (questions, how-to guides, Q&A) and retraining (§5, "filtering": the filtered
set performs about the same). This module gives every text a score in ``[0, 1)`` and named flags
so the same filter can be applied here: train on ``NOT instructional``.

Why a heuristic and not a classifier: the signals are few, surface-level and well known (a how-to
article is written in the imperative and the second person; a Q&A page is made of questions), the
paper's notion of "instructional" is exactly these surface forms, and a transparent rule can be
audited per row through its flags. No labelled data ships with this project to train a classifier.

Features (each a number; a flag is set when its contribution is non-zero)
-------------------------------------------------------------------------
``imperative``     share of sentences that start with a base-form instruction verb ("Add", "Keep",
                   "Make sure", "Don't"), also after a leading clause ("If it rains, cover ...");
                   quoted sentences (speech, titles) never count;
``question``       share of sentences ending with ``?``;
``second_person``  you/your/yourself words per 100 words;
``advice``         advice phrases ("you should", "make sure", "be sure to", "it is important to");
``howto``          how-to markers ("how to", "step-by-step", "follow these steps", "tips");
``qa_format``      lines that start with ``Q:``/``A:``/``Question:``/``Answer:``;
``list_steps``     lines that start a numbered step or bullet (``1.``, ``2)``, ``Step 3``, ``-``).

Score: ``z = 4.0*imperative + 2.5*question + 0.1*min(second_person, 6) + 0.3*min(advice, 3)
+ 0.35*min(howto, 2) + 1.5*[qa_format >= 2] + 0.5*[list_steps >= 2]`` and
``score = 1 - exp(-z)``; ``imperative`` counts only when at least two sentences (or every sentence
of a one-sentence text) are imperative. Independent pieces of evidence add up, while the weak
signals alone (second person, advice phrases, how-to words, a list: at most 0.6, 0.9, 0.7 and 0.5)
stay below the default threshold of 0.5 (``z >= 0.69``) unless they pile up; one dominant signal
(a fifth of the sentences imperative, a third of them questions, a Q&A layout) passes alone.

On the shipped sample (1000 documents) this flags 41 of the 43 wikiHow passages and 2 of the other
957 (a news story with a bulleted list of safety tips, a blog post of questions).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from finelake.method.spans import split_sentences

#: Default score above which a text counts as instructional.
DEFAULT_THRESHOLD = 0.5

FEATURES = ("imperative", "question", "second_person", "advice", "howto", "qa_format", "list_steps")

WEIGHTS = {"imperative": 4.0, "question": 2.5, "second_person": 0.1, "advice": 0.3,
           "howto": 0.35, "qa_format": 1.5, "list_steps": 0.5}
CAPS = {"second_person": 6.0, "advice": 3.0, "howto": 2.0}

# Base-form verbs that open instructions (how-to guides, recipes, prompts to an assistant).
_VERBS = frozenset("""
add adjust allow apply arrange ask attach avoid bake be begin blend boil book bring brush buy
calculate call change check choose clean clear click close combine compare consider contact
continue cook copy count cover create cut decide define delete describe determine discuss do
drain draw drink drive drop dry eat empty enter explain fill find finish fix fold follow forget
freeze gather get give go grab heat help hold identify imagine include insert install join keep
know label lay learn leave let lift limit list listen look make mark measure mix move name note
open order paint pay pick place plan plant plug pour prepare press print pull push put read
register remember remove repeat replace research rinse rub run save scroll season select sell
send set share show sign simmer sit slice soak sort speak spray spread start stay stir stop store
stretch submit summarize summarise take talk tell test think tie tighten translate try turn type
unplug update use visit wait walk wash watch water wear wipe wrap write
""".split())
_OPENERS = ("don't ", "do not ", "please ", "make sure", "be sure", "be careful")
_ADVERBS = ("always", "never", "just", "simply", "carefully", "gently", "slowly")
_LEAD_CLAUSE = re.compile(r"^(?:if|when|once|before|after|while|for|to|in|on|at|during|"
                          r"whenever|as soon as)\b[^,]{0,120},\s*", re.IGNORECASE)
_LEAD_ITEM = re.compile(r"^(?:(?:step\s+)?\d+[.):]\s*|[-*•]\s*|(?:first|then|next|finally|also|"
                        r"now|lastly|second|third),?\s+)", re.IGNORECASE)
_FIRST_WORD = re.compile(r"[A-Za-z][a-z']*")
_YOU = re.compile(r"\b(?:you|your|yours|yourself|yourselves|you're|you'll|you've|you'd)\b",
                  re.IGNORECASE)
_ADVICE = re.compile(r"\b(?:you (?:should|must|need to|have to|may want to|might want to|"
                     r"will want to|will need to)|you'll (?:want|need) to|"
                     r"make sure|be sure to|it is (?:important|best|a good idea) to|"
                     r"it's (?:important|best|a good idea) to|we recommend|i recommend|"
                     r"remember to|don't forget to)\b", re.IGNORECASE)
_HOWTO = re.compile(r"\b(?:how to|step[- ]by[- ]step (?:guide|instructions)|follow these|"
                    r"the following steps|here's how|here is how|tips? (?:for|on)|tutorial|"
                    r"step \d+)\b", re.IGNORECASE)
_QA_LINE = re.compile(r"^\s*(?:q|a|question|answer)\s*\d*\s*[:.)]\s", re.IGNORECASE | re.MULTILINE)
_STEP_LINE = re.compile(r"^\s*(?:(?:step\s+)?\d+[.):]\s+\S|[-*•]\s+\S)", re.IGNORECASE | re.MULTILINE)
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class InstructionalScore:
    """How instructional one text looks.

    Attributes:
        score: ``1 - exp(-z)`` in ``[0, 1)`` (module docstring).
        instructional: ``score >= threshold``.
        flags: names of the features that contributed, in :data:`FEATURES` order.
        features: the raw value of every feature.
    """

    score: float
    instructional: bool
    flags: tuple[str, ...]
    features: dict


def _is_imperative(sentence: str) -> bool:
    """A sentence that tells the reader to do something.

    Quoted sentences (speech, titles) never count. The first word, after a list marker or a
    sequencing word ("Then", "Next,") and optionally after a leading subordinate clause ("If it
    rains, ..."), must be an instruction verb (or "Don't", "Make sure", ...; "Always"/"Never" only
    before a verb) that is not used as a noun: not followed by a hyphen, a comma, a capitalized
    word (a name: "Mark Williams") or a verb of its own ("Water is ...", "Use of ...").
    """
    s = _LEAD_ITEM.sub("", sentence.strip(), count=1)
    if not s or s[0] in "\"'“‘([":
        return False
    low = s.lower()
    if any(low.startswith(o) for o in _OPENERS):
        return True
    for candidate in (s, _LEAD_CLAUSE.sub("", s, count=1)):
        m = _FIRST_WORD.match(candidate)
        if m and m.group(0).lower() in _ADVERBS:
            candidate = candidate[m.end():].lstrip()
            m = _FIRST_WORD.match(candidate)
        if m and m.group(0).lower() in _VERBS:
            rest = candidate[m.end():]
            if not re.match(r"(?:-|,|'s\b|\s+(?:[A-Z][a-z]|(?:of|is|was|are|were|has|had|will|"
                            r"can|may|and|or)\b))", rest):
                return True
        if candidate is not s:
            break
    return False


def features(text: str) -> dict:
    """The raw feature values of ``text`` (see the module docstring); all 0 for an empty text."""
    sents = [s.text for s in split_sentences(text or "")]
    n_s = len(sents)
    n_w = len(_WORD.findall(text or ""))
    if not n_s or not n_w:
        return {f: 0.0 for f in FEATURES} | {"sentences": 0.0, "imperative_sentences": 0.0}
    n_imp = sum(_is_imperative(s) for s in sents)
    return {
        "sentences": float(n_s),
        "imperative_sentences": float(n_imp),
        "imperative": n_imp / n_s,
        "question": sum(s.rstrip("\"'”’) ").endswith("?") for s in sents) / n_s,
        "second_person": 100.0 * len(_YOU.findall(text)) / n_w,
        "advice": float(len(_ADVICE.findall(text))),
        "howto": float(len(_HOWTO.findall(text))),
        "qa_format": float(len(_QA_LINE.findall(text))),
        "list_steps": float(len(_STEP_LINE.findall(text))),
    }


def contributions(feats: dict) -> dict:
    """Each feature's share of ``z`` (weights, caps and the >= 2 line rules applied)."""
    out = {}
    for f in FEATURES:
        v = feats.get(f, 0.0)
        if f in ("qa_format", "list_steps"):
            v = 1.0 if v >= 2 else 0.0
        elif f == "imperative" and feats.get("imperative_sentences", 0) < min(2, feats.get("sentences", 0)):
            v = 0.0  # one imperative sentence among several is not a how-to
        out[f] = WEIGHTS[f] * min(v, CAPS.get(f, math.inf))
    return out


def score_text(text: str, threshold: float = DEFAULT_THRESHOLD) -> InstructionalScore:
    """Score one text (a document, a prompt half or a continuation).

    Args:
        text: any string ("" or None scores 0).
        threshold: score at or above which ``instructional`` is True, in ``(0, 1)``.

    Returns:
        An :class:`InstructionalScore`.

    Raises:
        ValueError: threshold outside ``(0, 1)``.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    feats = features(text or "")
    contrib = contributions(feats)
    z = sum(contrib.values())
    score = 1.0 - math.exp(-z)
    return InstructionalScore(score, score >= threshold,
                              tuple(f for f in FEATURES if contrib[f] > 0), feats)
