"""Excerpt tags in generated answers (FineInstructions §3.3).

The instantiator copies most of an answer from the document. Instead of generating the copied
text token by token it writes a tag, expanded afterwards by code:

* ``<excerpt>START<...>END</excerpt>``: a pointer to the span of the document that begins with
  START and ends with END (``<…>``, the one-character ellipsis, is accepted for ``<...>``);
* ``<excerpt>FULL TEXT</excerpt>``: the exact text.

Rules chosen where the paper is silent
--------------------------------------
Matching is whitespace-tolerant and otherwise exact: in both the document and the tag text,
every run of whitespace counts as one space and the tag text is stripped; case, punctuation and
Unicode are compared as they are. The expansion is always the *document's* text (its own
whitespace), never the model's copy.

A pointer denotes every span ``[s, e + len(END))`` where START occurs at ``s`` and END occurs
at ``e >= s + len(START)`` (occurrences may overlap each other; START and END may not). It
expands only when exactly one such span exists. Two or more is ``ambiguous``, even when one of
them is the shortest: picking "START's first occurrence, then the first END after it" would
silently ground the answer in a span the model may not have meant (a longer one with a repeated
closing phrase, or a second copy of the opening), and the ≥ 0.8 excerpt ratio is only a
grounding guarantee if the excerpts are the text the model pointed at. The cost is a few
rejected pointers whose tail phrase repeats; :func:`make_excerpt_pointer` given the document
lengthens head and tail until the pointer is unique.

A full-text excerpt expands to its first exact occurrence in the document, or failing that its
first whitespace-tolerant occurrence; repeats are not ambiguous (every occurrence has the same
text up to whitespace).

A failed tag (``not_found``, ``ambiguous``, ``malformed``) stays in the expanded text as its raw
source, tags included, and counts as generated text; the answer should be rejected (see
:attr:`ExpansionResult.ok`).

Excerpt ratio: excerpted characters / all characters of the expanded answer, both counted over
non-whitespace characters only, so the glue's spacing and line breaks neither help nor hurt.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass, field
from typing import Optional

EXCERPT_OPEN, EXCERPT_CLOSE, ELLIPSIS = "<excerpt>", "</excerpt>", "<...>"
_TAG_RE = re.compile(r"</?excerpt>")
_ELLIPSIS_RE = re.compile(r"<(?:\.\.\.|…)>")
_WS_RE = re.compile(r"\s+")
_RUN_RE = re.compile(r"\s+|\S+")


@dataclass(frozen=True)
class Excerpt:
    """One expanded excerpt.

    Attributes:
        kind: ``"pointer"`` (START<...>END) or ``"full"`` (full text).
        doc_start, doc_end: character offsets into the document, ``[doc_start, doc_end)``.
        answer_start, answer_end: where the text sits in the expanded answer.
        text: ``document[doc_start:doc_end]``.
    """

    kind: str
    doc_start: int
    doc_end: int
    answer_start: int
    answer_end: int
    text: str


@dataclass(frozen=True)
class ExcerptFailure:
    """A tag that did not expand.

    Attributes:
        reason: ``"not_found"``, ``"ambiguous"`` or ``"malformed"``.
        detail: human-readable specifics (which part was not found, how many spans matched...).
        tag: the raw source text of the tag (or of the stray token).
        answer_start: offset of that text in the *input* answer.
    """

    reason: str
    detail: str
    tag: str
    answer_start: int


@dataclass
class ExpansionResult:
    """Output of :func:`expand_excerpts`.

    Attributes:
        text: the expanded answer.
        excerpts: expanded excerpts, in answer order.
        failures: tags that did not expand, in answer order.
        excerpt_ratio: non-whitespace characters inside ``excerpts`` / non-whitespace characters
            of ``text``, in [0, 1]; 0.0 for an empty answer.
    """

    text: str
    excerpts: list[Excerpt] = field(default_factory=list)
    failures: list[ExcerptFailure] = field(default_factory=list)
    excerpt_ratio: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every tag expanded."""
        return not self.failures

    def failure_summary(self) -> str:
        """``"reason: detail"`` of every failure joined by ``"; "`` (empty when ok)."""
        return "; ".join(f"{f.reason}: {f.detail}" for f in self.failures)


@functools.lru_cache(maxsize=16)
def _doc_index(document: str) -> "_DocIndex":
    """The :class:`_DocIndex` of ``document``, built once for consecutive uses of one document."""
    return _DocIndex(document)


def _collapse(text: str) -> str:
    return _WS_RE.sub(" ", text).strip()


def _non_ws_len(text: str) -> int:
    return len(text) - sum(len(m) for m in _WS_RE.findall(text))


class _DocIndex:
    """A document with whitespace runs collapsed, and the map back to original offsets.

    Read-only once built; :func:`_doc_index` keeps the last few, since a document is instantiated
    against several templates in a row (six per document, §3.2) and the index costs O(len)
    Python steps to build."""

    def __init__(self, document: str):
        self.document = document
        chars: list[str] = []
        orig: list[int] = []
        for m in _RUN_RE.finditer(document):
            if m.group()[0].isspace():
                chars.append(" ")
                orig.append(m.start())
            else:
                chars.append(m.group())
                orig.extend(range(m.start(), m.end()))
        self.norm = "".join(chars)
        self.orig = orig

    def find_all(self, pattern: str) -> list[int]:
        """Start offsets (normalized text) of every occurrence of ``pattern``, overlapping included."""
        out, i = [], self.norm.find(pattern)
        while i != -1:
            out.append(i)
            i = self.norm.find(pattern, i + 1)
        return out

    def to_doc(self, start: int, end: int) -> tuple[int, int]:
        """Normalized ``[start, end)`` whose ends are non-space → original document offsets."""
        return self.orig[start], self.orig[end - 1] + 1

    def resolve_pointer(self, start: str, end: str) -> tuple[Optional[tuple[int, int]], str, str]:
        """``((doc_start, doc_end), "", "")`` or ``(None, reason, detail)``; see the module rules."""
        ns, ne = _collapse(start), _collapse(end)
        starts = self.find_all(ns)
        if not starts:
            return None, "not_found", f"start {ns[:60]!r} not in document"
        ends = self.find_all(ne)
        spans: list[tuple[int, int]] = []
        for s in starts:
            k = bisect.bisect_left(ends, s + len(ns))
            spans.extend((s, e + len(ne)) for e in ends[k:k + 2])
            if len(spans) > 1:
                break
        if not spans:
            return None, "not_found", f"end {ne[:60]!r} not in document after start {ns[:60]!r}"
        if len(spans) > 1:
            return None, "ambiguous", (f"pointer {ns[:40]!r}<...>{ne[:40]!r} matches more than one "
                                       f"span (start occurs {len(starts)}x, end {len(ends)}x)")
        return self.to_doc(*spans[0]), "", ""

    def resolve_full(self, text: str) -> Optional[tuple[int, int]]:
        exact = self.document.find(text)
        if exact != -1:
            return exact, exact + len(text)
        nt = _collapse(text)
        i = self.norm.find(nt)
        return None if i == -1 else self.to_doc(i, i + len(nt))


def expand_excerpts(answer: str, document: str) -> ExpansionResult:
    """Expand the ``<excerpt>`` tags of a generated answer against its document (§3.3).

    Args:
        answer: generated answer, free text with ``<excerpt>…</excerpt>`` tags.
        document: the source document the tags point into.

    Returns:
        :class:`ExpansionResult` (expanded text, excerpts with document offsets, failures with
        reasons, excerpt ratio). Never raises on bad tags: they become failures with reason
        ``malformed`` (stray ``</excerpt>``, an ``<excerpt>`` never closed or opened inside
        another, an empty tag, START or END empty, more than one ``<...>`` in a tag, or a
        ``<...>`` outside any tag), ``not_found`` or ``ambiguous`` (rules in the module doc).
    """
    doc = _doc_index(document)
    out: list[str] = []
    out_len = 0
    excerpts: list[Excerpt] = []
    failures: list[ExcerptFailure] = []

    def emit_plain(s: int, e: int) -> None:
        nonlocal out_len
        piece = answer[s:e]
        for m in _ELLIPSIS_RE.finditer(piece):
            failures.append(ExcerptFailure("malformed", "ellipsis marker outside an excerpt tag",
                                           m.group(), s + m.start()))
        out.append(piece)
        out_len += len(piece)

    def fail(s: int, e: int, reason: str, detail: str) -> None:
        nonlocal out_len
        failures.append(ExcerptFailure(reason, detail, answer[s:e], s))
        out.append(answer[s:e])
        out_len += e - s

    def expand_tag(s: int, e: int) -> None:
        nonlocal out_len
        content = answer[s + len(EXCERPT_OPEN):e - len(EXCERPT_CLOSE)]
        parts = _ELLIPSIS_RE.split(content)
        if len(parts) > 2:
            return fail(s, e, "malformed", f"{len(parts) - 1} ellipsis markers in one excerpt")
        if len(parts) == 2:
            head, tail = parts[0].strip(), parts[1].strip()
            if not head or not tail:
                return fail(s, e, "malformed", "pointer with an empty start or end")
            span, reason, detail = doc.resolve_pointer(head, tail)
            kind = "pointer"
        else:
            text = content.strip()
            if not text:
                return fail(s, e, "malformed", "empty excerpt")
            span = doc.resolve_full(text)
            reason, detail, kind = "not_found", f"text {_collapse(text)[:60]!r} not in document", "full"
        if span is None:
            return fail(s, e, reason, detail)
        text = document[span[0]:span[1]]
        excerpts.append(Excerpt(kind, span[0], span[1], out_len, out_len + len(text), text))
        out.append(text)
        out_len += len(text)

    pos, open_at = 0, None
    for m in _TAG_RE.finditer(answer):
        if m.group() == EXCERPT_OPEN:
            if open_at is not None:
                fail(open_at, m.start(), "malformed", "<excerpt> not closed before the next <excerpt>")
            else:
                emit_plain(pos, m.start())
            open_at = m.start()
        elif open_at is None:
            emit_plain(pos, m.start())
            fail(m.start(), m.end(), "malformed", "stray </excerpt>")
            pos = m.end()
        else:
            expand_tag(open_at, m.end())
            open_at, pos = None, m.end()
    if open_at is not None:
        fail(open_at, len(answer), "malformed", "<excerpt> never closed")
    else:
        emit_plain(pos, len(answer))

    failures.sort(key=lambda f: f.answer_start)
    text = "".join(out)
    total = _non_ws_len(text)
    copied = sum(_non_ws_len(x.text) for x in excerpts)
    return ExpansionResult(text, excerpts, failures, copied / total if total else 0.0)


def excerpt_ratio(answer_expanded: str, document: str, min_span_chars: int = 20) -> float:
    """Share of a plain-text answer copied verbatim from the document: an independent check of §3.3.

    Knows nothing about tags. Both texts are whitespace-collapsed; a character of the answer is
    *covered* when it lies inside some substring of the answer, at least ``min_span_chars``
    characters long (collapsed), that occurs verbatim in the document. The result is covered
    non-whitespace characters / all non-whitespace characters of the answer (0.0 if it has
    none), the same unit as :attr:`ExpansionResult.excerpt_ratio`.

    Since every excerpt of :func:`expand_excerpts` is document text, this is >= the tagged ratio
    whenever each excerpt has at least ``min_span_chars`` characters; it can be higher when
    glue text happens to repeat a document phrase of that length.

    Computed with matching statistics: for each start ``i``, the longest ``L(i)`` with
    ``answer[i:i+L(i)]`` in the document, using ``L(i+1) >= L(i) - 1`` so there are O(len(answer))
    substring searches.

    Args:
        answer_expanded: the answer as plain text.
        document: the source document.
        min_span_chars: shortest copied run that counts (>= 1); shorter coincidences (common
            words, short phrases) do not.

    Raises:
        ValueError: ``min_span_chars < 1``.
    """
    if min_span_chars < 1:
        raise ValueError("min_span_chars must be >= 1")
    a, d = _collapse(answer_expanded), _collapse(document)
    n = len(a)
    covered = [False] * n
    j, reach = 0, 0
    for i in range(n):
        j = max(j, i)
        while j < n and a[i:j + 1] in d:
            j += 1
        if j - i >= min_span_chars:
            for k in range(max(i, reach), j):
                covered[k] = True
            reach = max(reach, j)
    total = sum(1 for c in a if c != " ")
    hit = sum(1 for c, cov in zip(a, covered) if cov and c != " ")
    return hit / total if total else 0.0


GROUNDING_MIN_RUN_CHARS = 20
"""Default shortest copied run (collapsed characters) that counts as excerpted in :func:`grounding_failure`."""


def grounding_failure(answer: str, document: str, min_ratio: float = 0.8,
                      min_run_chars: int = GROUNDING_MIN_RUN_CHARS) -> Optional[str]:
    """Why ``answer`` is not grounded in ``document``, or None when it is (§3.3: an answer is
    mostly excerpt of its own document; ``instantiate.min_excerpt_ratio`` = 0.8).

    The rule knows nothing about tags or about how the answer was made, so it holds whatever
    the instantiator wrote and however the pair travelled to ``pairs``: at least ``min_ratio``
    of the answer's non-whitespace characters lie in runs of ``min_run_chars`` or more
    characters copied verbatim (whitespace-collapsed) from the document
    (:func:`excerpt_ratio`). An answer with fewer than ``min_run_chars`` non-whitespace
    characters fails outright: a fragment such as ``OPTIONS`` occurs in many documents and
    grounds nothing.

    Returns:
        None, or a reason: ``"answer_too_short: ..."`` or ``"ungrounded: ..."`` with the ratio.

    Raises:
        ValueError: ``min_run_chars < 1``.
    """
    n = _non_ws_len(answer or "")
    if n < min_run_chars:
        return (f"answer_too_short: {n} non-whitespace characters < {min_run_chars} "
                f"(shortest copied run that counts as an excerpt)")
    ratio = excerpt_ratio(answer, document, min_span_chars=min_run_chars)
    if ratio < min_ratio:
        return (f"ungrounded: {ratio:.2f} of the answer lies in runs of >= {min_run_chars} "
                f"characters copied from the document (< {min_ratio})")
    return None


def make_excerpt_pointer(span_text: str, head_words: int = 6, tail_words: int = 6,
                         document: Optional[str] = None) -> str:
    """Build the excerpt tag for a span of a document (the embedded path's answers, §3.3).

    ``<excerpt>first head_words words<...>last tail_words words</excerpt>``, or the full-text
    form ``<excerpt>span</excerpt>`` when the span has at most ``head_words + tail_words`` words.

    With ``document``, head and tail grow two words at a time until the pointer denotes only
    this span under :func:`expand_excerpts`' rule, falling back to the full-text form; then
    ``expand_excerpts(pointer, document).text == span_text.strip()`` whenever the stripped span
    is a literal substring of the document.

    Args:
        span_text: the excerpt (stripped before use).
        head_words, tail_words: words kept at each end (>= 1).
        document: the source document, to guarantee the pointer is unambiguous.

    Raises:
        ValueError: empty span; head/tail < 1; the span contains excerpt tags or ``<...>``; the
            span (whitespace-tolerantly) does not occur in ``document``.
    """
    if head_words < 1 or tail_words < 1:
        raise ValueError("head_words and tail_words must be >= 1")
    span = span_text.strip()
    if not span:
        raise ValueError("empty span")
    if _TAG_RE.search(span) or _ELLIPSIS_RE.search(span):
        raise ValueError("span contains excerpt tags or an ellipsis marker")
    words = span.split()
    full = f"{EXCERPT_OPEN}{span}{EXCERPT_CLOSE}"
    if document is None:
        if len(words) <= head_words + tail_words:
            return full
        head, tail = " ".join(words[:head_words]), " ".join(words[-tail_words:])
        return f"{EXCERPT_OPEN}{head}{ELLIPSIS}{tail}{EXCERPT_CLOSE}"
    doc = _doc_index(document)
    if doc.resolve_full(span) is None:
        raise ValueError("span does not occur in the document")
    h, t = head_words, tail_words
    while h + t < len(words):
        head, tail = " ".join(words[:h]), " ".join(words[-t:])
        if doc.resolve_pointer(head, tail)[0] is not None:
            return f"{EXCERPT_OPEN}{head}{ELLIPSIS}{tail}{EXCERPT_CLOSE}"
        h, t = h + 2, t + 2
    return full
