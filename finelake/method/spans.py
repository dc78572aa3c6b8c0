"""Candidate spans and sentences: what a small model chooses from in the decomposed prompts.

A 135M-parameter model cannot write a template freehand (it echoes the query), but it can pick
from a short numbered list under constrained decoding. These functions build those lists:
:func:`candidate_spans` proposes the specific phrases of a query (§3.1: "spans in the query that
refer to specific entities or scenarios"), :func:`split_sentences` numbers a document's sentences
so an answer can be chosen as a sentence range and turned into an excerpt pointer (§3.3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Function words and request verbs: a candidate span never starts or ends with one.
_STOP = frozenset("""
a an the this that these those some any each every all both either neither no not
i me my mine we us our you your yours he him his she her it its they them their
is am are was were be been being do does did doing have has had having will would shall should
can could may might must of in on at by for with about against between into through during before
after above below to from up down out off over under again further then once here there when where
why how what which who whom whose whether if or and but nor so than too very just also only own
same such as until while because per via vs etc please pls thanks thank hi hello hey
explain write tell give make create list describe summarize summarise help show provide suggest
generate draft compose rewrite translate find compare define answer act pretend imagine let lets
want need like know think use using used get got way ways thing things something anything
""".split())

_WORD = re.compile(r"[\w][\w+#.'’\-/]*[\w+#]|[\w]", re.UNICODE)


@dataclass(frozen=True)
class Span:
    """A phrase of the source text: ``text`` equals ``source[start:end]``."""

    text: str
    start: int
    end: int


def candidate_spans(query: str, max_spans: int = 8, max_words: int = 4,
                    scan_chars: int = 600) -> list[Span]:
    """Specific phrases of a query that a template could turn into ``<fi>`` slots.

    Runs of content words (no stop word or request verb, no punctuation between them) of at most
    ``max_words`` words; longer runs are cut into their leading ``max_words`` words. Ordered by
    position, deduplicated case-insensitively, at most ``max_spans``.

    Args:
        query: the user query or document (only the first ``scan_chars`` characters are scanned).
        max_spans: list length limit.
        max_words: words per span limit.

    Returns:
        Spans whose ``text`` is an exact substring of ``query`` at ``[start:end]``.
    """
    text = query[:scan_chars]
    words = list(_WORD.finditer(text))
    spans: list[Span] = []
    seen: set[str] = set()
    run: list[re.Match] = []

    def flush():
        if not run:
            return
        part = run[:max_words]
        s, e = part[0].start(), part[-1].end()
        phrase = text[s:e]
        key = phrase.lower()
        if key not in seen and (len(phrase) >= 3 or any(c.isdigit() or c in "+#" for c in phrase)):
            seen.add(key)
            spans.append(Span(phrase, s, e))
        run.clear()

    prev_end = 0
    for m in words:
        gap = text[prev_end:m.start()]
        if run and (gap.strip() or "\n" in gap):  # punctuation or line break ends a run
            flush()
        if m.group(0).lower() in _STOP or m.group(0).isdigit() and len(m.group(0)) > 4:
            flush()
        else:
            run.append(m)
        prev_end = m.end()
    flush()
    return spans[:max_spans]


_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])|\n\s*\n|\n(?=[-*•\d])")


def split_sentences(text: str, max_chars: int | None = None, min_chars: int = 0) -> list[Span]:
    """Split a document into sentences with character offsets.

    Sentence ends: ``.``, ``!`` or ``?`` followed by white space and an upper-case letter or digit,
    a blank line, or a line that starts a list item. Each span is stripped of surrounding
    white space; empty pieces are skipped.

    With ``min_chars``, a piece with fewer non-whitespace characters is joined to the pieces
    after it until the unit reaches ``min_chars`` (a short last unit joins the one before it).
    Manual pages, READMEs and code-heavy text split into fragments such as ``OPTIONS``,
    ``[FILE]...`` or ``--debug``; as a whole answer such a fragment says nothing and no
    grounding check can tell a 7-character excerpt from a coincidence (§3.3), so the
    instantiation prompt numbers whole units instead.

    Args:
        text: the document.
        max_chars: only sentences that end within the first ``max_chars`` characters are kept.
        min_chars: smallest unit, in non-whitespace characters (0: no joining).

    Returns:
        Spans in document order; ``text[s.start:s.end] == s.text``.
    """
    out: list[Span] = []
    pos = 0
    for m in list(_SENT_END.finditer(text)) + [None]:
        end = m.start() if m is not None else len(text)
        piece = text[pos:end]
        lead = len(piece) - len(piece.lstrip())
        s, e = pos + lead, pos + len(piece.rstrip())
        if e > s:
            if max_chars is not None and e > max_chars:
                break
            out.append(Span(text[s:e], s, e))
        pos = m.end() if m is not None else len(text)
    return _join_short(text, out, min_chars) if min_chars > 0 else out


def _non_ws(s: str) -> int:
    return len(s) - sum(c.isspace() for c in s)


def _join_short(text: str, spans: list[Span], min_chars: int) -> list[Span]:
    """Contiguous units of ``spans`` with at least ``min_chars`` non-whitespace characters each
    (a document shorter than that stays one unit)."""
    units: list[Span] = []
    start = None
    for sp in spans:
        start = sp.start if start is None else start
        if _non_ws(text[start:sp.end]) >= min_chars:
            units.append(Span(text[start:sp.end], start, sp.end))
            start = None
    if start is not None:  # a short tail: join it to the previous unit
        s = units.pop().start if units else start
        units.append(Span(text[s:spans[-1].end], s, spans[-1].end))
    return units
