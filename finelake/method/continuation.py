"""Halving and completion: document sampling, split points and continuation quality checks.

Non-instructional fine-tuning (Xie et al., 2024, arXiv 2409.00096, §3 "halving and completion")
uniformly samples documents, splits each at a random point between the first and the last quarter
of its length, gives the first half to a teacher model and trains on (first half, continuation)
pairs. This module is the pure logic of that recipe; :mod:`finelake.jobs.continuation` runs it.

Sampling (:func:`sample_key`)
-----------------------------
Documents are ordered by ``sha1("continue:<seed>:<doc_id>")`` (hex) and the first N are taken. A
cryptographic hash of the id is a uniformly random permutation for a given seed, so the first N
are a uniform sample without replacement; the same seed always picks the same documents, and
adding documents to the corpus never reorders the ones already there. Spark computes the same key
natively (``sha1(concat(lit("continue:<seed>:"), doc_id))``).

Split rule (:func:`choose_split`)
---------------------------------
For a text of ``L`` characters, a target ``t = u * L`` is drawn with ``u`` uniform in
``[lo, hi]`` (default ``[1/4, 3/4]``), seeded by ``(seed, doc_id)``. The split is the *allowed*
boundary nearest to ``t`` (ties: the earlier one), where a boundary ``c`` is allowed when
``ceil(lo * L) <= c <= floor(hi * L)``, so the split never leaves ``[lo, hi]`` of the text:

1. ``sentence``: the start of a sentence other than the first
   (:func:`finelake.method.spans.split_sentences`: ``.``/``!``/``?`` then white space and a
   capital or digit, a blank line, or a list item line);
2. ``token`` (no sentence start in range): the start of a white-space separated word;
3. ``char`` (no white space in range, e.g. unsegmented scripts): the character at ``t`` clamped
   into range.

``split_char`` is where the original second half starts; the prompt is ``text[:split_char]``
with trailing white space removed.

Quality rules (:func:`assess_continuation`)
-------------------------------------------
Checked in this order; the first that fires gives ``status="dropped"`` and its reason code:

* ``empty``: nothing but white space came back;
* a leading preamble line ("Here is the next paragraph:", "Sure! The continuation:") is removed
  (flag ``preamble_stripped``);
* leading sentences that repeat the prompt verbatim (same words, any case or punctuation) are
  removed first (flag ``echo_stripped``), since chat teachers often restate the text before
  continuing it; ``echo`` when nothing else is left;
* ``meta``: the text talks about the text instead of continuing it: it opens with "The next
  paragraph ...", "This text ...", "In this passage ...", or mentions "the original text",
  "the beginning of the text", "the next paragraph" anywhere (chat artifacts);
* ``repetitive``: a repetition loop: the share of word n-grams (``ngram`` words, counted by
  position) that repeat an earlier n-gram exceeds ``max_repeat_share``, or a unit of 1-12
  characters repeats back to back over at least ``loop_min_chars`` characters;
* ``echo``: the continuation copies the prompt: more than ``max_prompt_overlap`` of its word
  ``echo_ngram``-grams occur in the prompt;
* ``truncated``: ``finish_reason == "length"`` and the text does not end a sentence. With
  ``truncation="trim"`` the text is cut back to its last sentence end instead (flag ``trimmed``)
  and only a text with no sentence end at all is dropped; with ``"drop"`` it is always dropped;
* ``too_short``: fewer than ``min_words`` words remain.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Optional

from finelake.method.sampling import stable_uniform
from finelake.method.spans import split_sentences

PROMPT_VERSION = "continue-v1"

#: How a chat teacher is asked to continue a first half (the paper's "have GPT complete the
#: passage"). The stored ``prompt`` is only the first half itself. One user turn, no system turn:
#: of the wordings tried with the embedded 135M model this one was copied back least often.
CONTINUE_TEMPLATE = ("Here is the beginning of a text:\n\n{prompt}\n\nWrite the next paragraph of "
                     "this text. Do not repeat the beginning.")

SPLIT_UNITS = ("sentence", "token", "char")
DROP_REASONS = ("empty", "echo", "meta", "repetitive", "truncated", "too_short")
QUALITY_FLAGS = ("preamble_stripped", "echo_stripped", "trimmed")

_WS_BOUNDARY = re.compile(r"(?<=\s)(?=\S)")
_WORD = re.compile(r"\w+")
_SENT_END_AT_END = re.compile(r"[.!?…][\"'”’)\]]*\s*$")
_SENT_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s|$)")
_CHAR_LOOP = re.compile(r"(.{1,12}?)\1{3,}", re.DOTALL)
_PREAMBLE = re.compile(r"^(?:sure|okay|ok|certainly|of course)?[!,.]?\s*(?=[^\n:]{0,100}\b(?:paragraph|text|"
                       r"continuation|passage|story|article|rest)\b)[^\n:]{0,100}:[ \t]*\n\s*",
                       re.IGNORECASE)
_META = re.compile(r"^(?:(?:the|this) (?:next |following |above |given |original |rewritten )?"
                   r"(?:paragraph|text|passage|article|continuation|excerpt)s?\b(?! of\b)|"
                   r"(?:in|with) (?:this|the) (?:text|passage|paragraph)\b)", re.IGNORECASE)
_META_ANYWHERE = re.compile(r"\b(?:the (?:original|given|above|provided) text|the text above|"
                            r"the (?:beginning|rest|continuation) of (?:the|this) text|"
                            r"the next paragraph)\b", re.IGNORECASE)


# ----------------------------------------------------------------------------- sampling


def sample_key_prefix(seed: int) -> str:
    """The string hashed in front of the doc id: ``"continue:<seed>:"``."""
    return f"continue:{int(seed)}:"


def sample_key(doc_id: str, seed: int = 0) -> str:
    """Sort key of a document for seeded uniform sampling (§3: "uniformly sample").

    Args:
        doc_id: the document id.
        seed: sampling seed; another seed gives an independent permutation.

    Returns:
        40 lower-case hex digits, ``sha1(sample_key_prefix(seed) + doc_id)``; ascending order of
        this key is a uniformly random order of the documents.
    """
    return hashlib.sha1((sample_key_prefix(seed) + doc_id).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    """Where a text is halved.

    Attributes:
        char: index (in characters) where the original second half starts.
        fraction: ``char / len(text)``, inside ``[lo, hi]``.
        unit: ``"sentence"``, ``"token"`` or ``"char"`` (which boundary it snapped to).
        target: the uniform draw ``u * len(text)`` it was snapped from (characters).
    """

    char: int
    fraction: float
    unit: str
    target: float


def sentence_boundaries(text: str) -> list[int]:
    """Start offsets of every sentence but the first (see the module docstring)."""
    return [s.start for s in split_sentences(text)[1:]]


def token_boundaries(text: str) -> list[int]:
    """Start offsets of every white-space separated word but one at offset 0."""
    return [m.start() for m in _WS_BOUNDARY.finditer(text)]


def _nearest(cands: list[int], target: float) -> int:
    return min(cands, key=lambda c: (abs(c - target), c))


def choose_split(text: str, doc_id: str, seed: int = 0, lo: float = 0.25,
                 hi: float = 0.75) -> Split:
    """Halve a document at a seeded uniform point snapped to a sentence (else token) boundary.

    Args:
        text: the document (``L = len(text)`` characters, ``L >= 2``).
        doc_id, seed: determine the uniform draw, so a rerun splits the same way.
        lo, hi: the allowed range as fractions of ``L`` (paper: between the first and the last
            quarter), ``0 < lo <= hi < 1``.

    Returns:
        A :class:`Split` with ``ceil(lo * L) <= char <= floor(hi * L)``.

    Raises:
        ValueError: bad ``lo``/``hi``, or a text too short to hold a character in range.
    """
    if not 0 < lo <= hi < 1:
        raise ValueError(f"split range must satisfy 0 < lo <= hi < 1, got [{lo}, {hi}]")
    n = len(text)
    a, b = math.ceil(lo * n), math.floor(hi * n)
    if n < 2 or a > b or a < 1:
        raise ValueError(f"text of {n} characters is too short to split in [{lo}, {hi}]")
    target = (lo + (hi - lo) * stable_uniform("continue-split", int(seed), doc_id)) * n
    for unit, finder in (("sentence", sentence_boundaries), ("token", token_boundaries)):
        cands = [c for c in finder(text) if a <= c <= b]
        if cands:
            c = _nearest(cands, target)
            return Split(c, c / n, unit, target)
    c = min(max(int(round(target)), a), b)
    return Split(c, c / n, "char", target)


def halve(text: str, split: Split) -> tuple[str, str]:
    """``(prompt, original_second_half)``: ``text[:split.char]`` without trailing white space,
    and ``text[split.char:]``."""
    return text[:split.char].rstrip(), text[split.char:]


def continuation_messages(prompt: str) -> list[dict[str, str]]:
    """The chat request that asks the teacher to continue ``prompt`` (``PROMPT_VERSION``):
    one user turn, :data:`CONTINUE_TEMPLATE` filled with the first half."""
    return [{"role": "user", "content": CONTINUE_TEMPLATE.format(prompt=prompt)}]


# ----------------------------------------------------------------------------- quality


@dataclass(frozen=True)
class QualityRules:
    """Thresholds of :func:`assess_continuation` (see the module docstring).

    Attributes:
        min_words: fewest ``\\w+`` words a kept continuation has.
        ngram: words per n-gram of the repetition check.
        max_repeat_share: largest share of repeated n-grams, in ``[0, 1]``.
        loop_min_chars: shortest back-to-back character loop that counts as repetition.
        echo_ngram: words per n-gram of the prompt-copy check.
        max_prompt_overlap: largest share of continuation n-grams found in the prompt.
        truncation: ``"trim"`` (cut to the last sentence end) or ``"drop"``.
    """

    min_words: int = 8
    ngram: int = 3
    max_repeat_share: float = 0.3
    loop_min_chars: int = 40
    echo_ngram: int = 6
    max_prompt_overlap: float = 0.5
    truncation: str = "trim"

    def __post_init__(self) -> None:
        if self.truncation not in ("trim", "drop"):
            raise ValueError(f"truncation must be 'trim' or 'drop', not {self.truncation!r}")
        if self.ngram < 1 or self.echo_ngram < 1 or self.min_words < 0:
            raise ValueError("ngram and echo_ngram must be >= 1, min_words >= 0")


@dataclass(frozen=True)
class Assessment:
    """Verdict on one continuation.

    Attributes:
        status: ``"ok"`` or ``"dropped"``.
        reason: ``"<code>: <detail>"`` with a code of :data:`DROP_REASONS`; None when ok.
        text: the continuation to train on (trimmed when flagged so); None when dropped.
        flags: quality notes on a kept text (:data:`QUALITY_FLAGS`).
    """

    status: str
    reason: Optional[str]
    text: Optional[str]
    flags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def words(text: str) -> list[str]:
    """Lower-cased ``\\w+`` words."""
    return _WORD.findall(text.lower())


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the word n-grams (by position) that repeat an earlier n-gram of the same text.

    Returns:
        ``(count - distinct) / count`` in ``[0, 1)``; 0.0 when the text has fewer than ``n`` words.
    """
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def longest_char_loop(text: str) -> tuple[int, str]:
    """Longest back-to-back repetition (at least 4 copies) of a 1-12 character unit.

    Returns:
        ``(length in characters, unit)``; ``(0, "")`` when there is none.
    """
    best = (0, "")
    for m in _CHAR_LOOP.finditer(text):
        if len(m.group(0)) > best[0]:
            best = (len(m.group(0)), m.group(1))
    return best


def prompt_overlap(continuation: str, prompt: str, n: int = 6) -> float:
    """Share of the continuation's word n-grams that also occur in the prompt (0.0 when the
    continuation has fewer than ``n`` words)."""
    c, p = words(continuation), words(prompt)
    grams = [tuple(c[i:i + n]) for i in range(len(c) - n + 1)]
    if not grams:
        return 0.0
    pset = {tuple(p[i:i + n]) for i in range(len(p) - n + 1)}
    return sum(g in pset for g in grams) / len(grams)


def ends_sentence(text: str) -> bool:
    """True when ``text`` ends with ``.``, ``!``, ``?`` or ``…`` (closing quotes allowed)."""
    return _SENT_END_AT_END.search(text) is not None


def trim_to_sentence_end(text: str) -> Optional[str]:
    """``text`` up to and including its last sentence end, or None when it has none."""
    last = None
    for m in _SENT_END.finditer(text):
        last = m.end()
    return text[:last].rstrip() if last else None


def strip_echo(text: str, prompt: str) -> tuple[str, int]:
    """Remove the leading sentences of ``text`` whose words occur contiguously in ``prompt``.

    Returns:
        ``(rest, removed)``: the text from its first new sentence on ("" when every sentence
        repeats the prompt) and how many sentences were removed.
    """
    pw = " " + " ".join(words(prompt)) + " "
    sents = split_sentences(text)
    k = 0
    while k < len(sents):
        w = words(sents[k].text)
        if not w or (" " + " ".join(w) + " ") not in pw:
            break
        k += 1
    if k == 0:
        return text, 0
    return (text[sents[k].start:] if k < len(sents) else ""), k


def _repetition(text: str, rules: QualityRules) -> Optional[str]:
    share = repeated_ngram_share(text, rules.ngram)
    if share > rules.max_repeat_share:
        return (f"repetitive: {share:.2f} of word {rules.ngram}-grams repeat "
                f"(max {rules.max_repeat_share})")
    size, unit = longest_char_loop(text)
    if size >= rules.loop_min_chars:
        return f"repetitive: {unit!r} repeated over {size} characters"
    return None


def assess_continuation(text: Optional[str], finish_reason: Optional[str], prompt: str = "",
                        rules: QualityRules = QualityRules()) -> Assessment:
    """Keep or drop one teacher continuation (rules and their order: module docstring).

    Args:
        text: what the teacher wrote (None or blank: ``empty``).
        finish_reason: the backend's ``"stop"``/``"length"``/... (``"length"`` means the token
            limit cut it).
        prompt: the first half it continues (for the ``echo`` check; "" disables it).
        rules: thresholds.

    Returns:
        An :class:`Assessment`; dropped ones carry ``"<code>: <detail>"``.
    """
    raw = (text or "").strip()
    if not raw:
        return Assessment("dropped", "empty: no text came back", None)
    flags: tuple[str, ...] = ()
    pre = _PREAMBLE.match(raw)
    if pre and raw[pre.end():].strip():
        raw, flags = raw[pre.end():], ("preamble_stripped",)
    if prompt:
        raw, removed = strip_echo(raw, prompt)
        if removed and not raw.strip():
            return Assessment("dropped", f"echo: all {removed} sentences repeat the prompt", None)
        flags += ("echo_stripped",) if removed else ()
    meta = _META.match(raw) or _META_ANYWHERE.search(raw)
    if meta:
        return Assessment("dropped", f"meta: talks about the text ({meta.group(0)!r}) instead of "
                          "continuing it", None)
    why = _repetition(raw, rules)
    if why:
        return Assessment("dropped", why, None)
    if prompt:
        ov = prompt_overlap(raw, prompt, rules.echo_ngram)
        if ov > rules.max_prompt_overlap:
            return Assessment("dropped", f"echo: {ov:.2f} of word {rules.echo_ngram}-grams copy "
                              f"the prompt (max {rules.max_prompt_overlap})", None)
    out = raw
    if finish_reason == "length" and not ends_sentence(raw):
        if rules.truncation == "drop":
            return Assessment("dropped", "truncated: hit the token limit mid-sentence", None)
        out = trim_to_sentence_end(raw)
        if out is None:
            return Assessment("dropped", "truncated: hit the token limit with no sentence end", None)
        flags += ("trimmed",)
    n = len(words(out))
    if n < rules.min_words:
        return Assessment("dropped", f"too_short: {n} words < {rules.min_words}"
                          + (" after trimming" if "trimmed" in flags else ""), None)
    if "trimmed" in flags:
        why = _repetition(out, rules)
        if why:
            return Assessment("dropped", why, None)
    return Assessment("ok", None, out, flags)
