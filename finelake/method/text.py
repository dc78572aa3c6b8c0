"""Text hygiene for ingestion: normalization, validation, content ids, shingles, decontamination.

Pure Python (``unicodedata``, ``re``, ``hashlib``); the ingest job calls these inside Spark tasks.

Normalization (:func:`normalize_text`)
-------------------------------------
1. Unicode NFKC (full-width forms, ligatures, non-breaking spaces become their plain forms).
2. Line breaks: ``\\r\\n``, ``\\r``, VT, FF, NEL, U+2028 become ``\\n``; U+2029 becomes ``\\n\\n``.
3. Control characters (category Cc other than ``\\t`` and ``\\n``) and the invisible format
   characters U+00AD (soft hyphen), U+200B (zero-width space), U+2060 (word joiner) and U+FEFF
   (BOM) are removed. Zero-width (non-)joiners are kept: emoji and some scripts need them.
4. Whitespace: every run of non-newline whitespace becomes one space and every line is stripped.
   With ``keep_paragraphs`` (documents) single line breaks stay and runs of blank lines become
   one paragraph break (``\\n\\n``); without it (queries) every whitespace run, line breaks
   included, becomes one space.

Validation (:func:`validate_text`, :func:`clean_text`): reasons are ``"<code>: <detail>"`` with the
stable codes of :data:`REASON_CODES`, checked in this order: ``missing`` (None), ``wrong_type``
(not a ``str``), ``wrong_encoding`` (U+FFFD, i.e. bytes that were not valid UTF-8 when decoded with
replacement, or a lone surrogate such as JSON ``"\\ud800"``), ``empty`` (nothing left after
normalization), ``too_short`` / ``too_long`` (normalized length in characters outside
``[min_chars, max_chars]``; over-long texts are rejected, never truncated).

Words (:func:`words`): ``\\w+`` runs of the NFKC-normalized, case-folded text, so punctuation,
case and spacing never matter for shingles and n-gram overlap.

Decontamination rule (:class:`ContaminationIndex`, Tulu 3 style, n = ``decontamination_ngram``)
-----------------------------------------------------------------------------------------------
A text is contaminated when any of these holds, with ``t`` = ``decontamination_threshold``:

* *exact*: its word sequence equals the word sequence of an evaluation text (this is the only
  rule that can fire for texts shorter than n words, which have no n-grams);
* *share*: at least ``t`` of its word n-grams (counted by position) occur anywhere in the
  evaluation sets (:meth:`ContaminationIndex.overlap`);
* *coverage* (the Tulu 3 criterion): for some single evaluation text, at least ``t`` of that
  text's word positions lie inside an n-gram it shares with the text
  (:meth:`ContaminationIndex.coverage`). This catches a long query that embeds an entire
  benchmark prompt, whose own share stays low.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

#: Stable reason codes (the part of a quarantine reason before ``":"``).
REASON_CODES = ("missing", "wrong_type", "wrong_encoding", "empty", "too_short", "too_long")

#: Words per shingle for near-duplicate detection (the config's "word 5-gram shingles").
SHINGLE_WORDS = 5

#: Hex characters of a content id (80 bits of SHA-1).
CONTENT_ID_CHARS = 20

_LINE_BREAKS = str.maketrans({"\r": "\n", "\x0b": "\n", "\x0c": "\n", "\x85": "\n",
                              "\u2028": "\n", "\u2029": "\n\n"})
_REMOVE = "".join(chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if chr(c) not in "\t\n")
_REMOVE_RE = re.compile("[" + re.escape(_REMOVE) + "\u00ad\u200b\u2060\ufeff]")
_HSPACE_RE = re.compile(r"[^\S\n]+")
_ANYSPACE_RE = re.compile(r"\s+")
_BLANKS_RE = re.compile(r"\n{3,}")
_BAD_UNICODE_RE = re.compile("[\ufffd\ud800-\udfff]")
_WORD_RE = re.compile(r"\w+")


def normalize_text(text: str, keep_paragraphs: bool = True) -> str:
    """Normalize one text (see the module docstring for the exact steps).

    Args:
        text: any ``str`` (lone surrogates pass through; :func:`validate_text` rejects them).
        keep_paragraphs: keep line and paragraph breaks (documents); False collapses all
            whitespace to single spaces (queries).

    Returns:
        The normalized text; ``""`` when nothing but whitespace and control characters was left.
    """
    t = unicodedata.normalize("NFKC", text)
    t = t.replace("\r\n", "\n").translate(_LINE_BREAKS)
    t = _REMOVE_RE.sub("", t)
    if not keep_paragraphs:
        return _ANYSPACE_RE.sub(" ", t).strip()
    t = "\n".join(line.strip() for line in _HSPACE_RE.sub(" ", t).split("\n"))
    return _BLANKS_RE.sub("\n\n", t).strip()


def has_bad_unicode(text: str) -> bool:
    """True when ``text`` holds U+FFFD (a decoding replacement) or a lone UTF-16 surrogate."""
    return _BAD_UNICODE_RE.search(text) is not None


def clean_text(value: object, min_chars: int, max_chars: int,
               keep_paragraphs: bool = True) -> tuple[Optional[str], Optional[str]]:
    """Validate and normalize a raw field value in one pass.

    Args:
        value: the field as parsed (anything; only ``str`` can pass).
        min_chars, max_chars: inclusive bounds on the normalized length, in characters.
        keep_paragraphs: see :func:`normalize_text`.

    Returns:
        ``(normalized_text, None)`` when valid, else ``(None, reason)`` where ``reason`` is
        ``"<code>: <detail>"`` with a code from :data:`REASON_CODES`.
    """
    if value is None:
        return None, "missing: no text"
    if not isinstance(value, str):
        return None, f"wrong_type: {type(value).__name__}, expected a string"
    m = _BAD_UNICODE_RE.search(value)
    if m:
        what = "U+FFFD (undecodable bytes)" if m.group() == "\ufffd" else "a lone surrogate"
        return None, f"wrong_encoding: {what} at character {m.start()}"
    t = normalize_text(value, keep_paragraphs)
    if not t:
        return None, "empty: no text after normalization"
    if len(t) < min_chars:
        return None, f"too_short: {len(t)} chars < min_chars {min_chars}"
    if len(t) > max_chars:
        return None, f"too_long: {len(t)} chars > max_chars {max_chars}"
    return t, None


def validate_text(text: object, min_chars: int, max_chars: int,
                  keep_paragraphs: bool = True) -> Optional[str]:
    """Why ``text`` cannot be ingested, or None when it can.

    Args:
        text: a raw field value (None, any type, or a string before normalization).
        min_chars, max_chars: inclusive bounds on the normalized length, in characters.
        keep_paragraphs: normalization mode used to measure the length.

    Returns:
        None, or ``"<code>: <detail>"`` with ``code`` in :data:`REASON_CODES` (checked in that order).
    """
    return clean_text(text, min_chars, max_chars, keep_paragraphs)[1]


def content_id(text: str) -> str:
    """Stable content hash of a (normalized) text: the first 20 hex digits of SHA-1 of its UTF-8.

    Hashes exactly the string given, so normalize first; equal ids mean equal normalized texts.

    Raises:
        UnicodeEncodeError: ``text`` holds a lone surrogate (rejected by :func:`validate_text`).
    """
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:CONTENT_ID_CHARS]


def words(text: str) -> list[str]:
    """The ``\\w+`` words of the NFKC-normalized, case-folded text, in order."""
    return _WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())


def word_ngrams(tokens: Sequence[str], n: int) -> list[str]:
    """Every contiguous n-gram of ``tokens``, by position, each joined by single spaces.

    Returns ``[]`` when there are fewer than ``n`` tokens.

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def shingles(text: str, n: int = SHINGLE_WORDS) -> list[str]:
    """Distinct word n-gram shingles of ``text`` for Jaccard / MinHash, sorted.

    A text with fewer than ``n`` words (but at least one) is a single shingle of all its words,
    so two short texts are similar only when their word sequences are equal. A text without
    words (only punctuation or symbols) has no shingles: ``[]``.
    """
    ws = words(text)
    if not ws:
        return []
    if len(ws) < n:
        return [" ".join(ws)]
    return sorted(set(word_ngrams(ws, n)))


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """Jaccard similarity of two shingle collections (0.0 when both are empty)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return len(sa & sb) / union if union else 0.0


@dataclass(frozen=True)
class ContaminationMatch:
    """How much one text overlaps the evaluation sets.

    Attributes:
        share: fraction of the text's n-grams (by position) found in any evaluation text;
            1.0 for an exact match, 0.0 for a text shorter than n words without one.
        coverage: best Tulu 3 coverage over single evaluation texts (fraction of that
            evaluation text's word positions inside n-grams shared with the text).
        exact: the text's word sequence equals an evaluation text's.
        eval_name: the evaluation text that matched best (exact, else best coverage, else the
            one sharing most n-grams); None when nothing is shared.
    """

    share: float
    coverage: float
    exact: bool
    eval_name: Optional[str]

    def contaminated(self, threshold: float) -> bool:
        """The module's rule: exact match, or share >= threshold, or coverage >= threshold."""
        return self.exact or self.share >= threshold or self.coverage >= threshold


class ContaminationIndex:
    """Word n-gram index over evaluation texts (Tulu 3 style decontamination).

    Args:
        eval_texts: the evaluation prompts (one string per prompt or turn).
        n: n-gram size in words (Tulu 3 uses 8).
        names: one label per text for reports (default ``"eval#<i>"``).

    Raises:
        ValueError: ``n < 1`` or ``names`` has another length than ``eval_texts``.

    Memory is one dict entry per distinct n-gram of the evaluation sets (tens of thousands for
    the common benchmarks), so the index is small enough to broadcast to Spark executors.
    """

    def __init__(self, eval_texts: Iterable[str], n: int = 8, names: Optional[Sequence[str]] = None):
        if n < 1:
            raise ValueError(f"n must be >= 1, not {n}")
        texts = list(eval_texts)
        if names is not None and len(names) != len(texts):
            raise ValueError(f"{len(names)} names for {len(texts)} evaluation texts")
        self.n = n
        self.names = list(names) if names is not None else [f"eval#{i}" for i in range(len(texts))]
        self._lengths: list[int] = []
        self._ngram_positions: list[dict[str, list[int]]] = []  # per eval text: n-gram -> starts
        self._postings: dict[str, list[int]] = {}  # n-gram -> eval texts holding it
        self._exact: dict[str, int] = {}
        for i, t in enumerate(texts):
            ws = words(t)
            self._lengths.append(len(ws))
            if ws:
                self._exact.setdefault(" ".join(ws), i)
            pos: dict[str, list[int]] = {}
            for p, g in enumerate(word_ngrams(ws, n)):
                pos.setdefault(g, []).append(p)
            self._ngram_positions.append(pos)
            for g in pos:
                self._postings.setdefault(g, []).append(i)

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def num_ngrams(self) -> int:
        """Distinct n-grams indexed."""
        return len(self._postings)

    def match(self, text: str) -> ContaminationMatch:
        """Share, best coverage and exact match of ``text`` against the index (see the class)."""
        ws = words(text)
        hit = self._exact.get(" ".join(ws)) if ws else None
        grams = word_ngrams(ws, self.n)
        if hit is not None:
            return ContaminationMatch(1.0, 1.0, True, self.names[hit])
        if not grams:
            return ContaminationMatch(0.0, 0.0, False, None)
        found = 0
        shared: dict[int, set[str]] = {}
        for g in grams:
            ids = self._postings.get(g)
            if ids:
                found += 1
                for i in ids:
                    shared.setdefault(i, set()).add(g)
        best_cov, best = 0.0, None
        for i, gs in shared.items():
            covered: set[int] = set()
            for g in gs:
                for p in self._ngram_positions[i][g]:
                    covered.update(range(p, p + self.n))
            cov = len(covered) / self._lengths[i]
            if best is None or cov > best_cov:
                best_cov, best = cov, i
        return ContaminationMatch(found / len(grams), best_cov, False,
                                  self.names[best] if best is not None else None)

    def overlap(self, text: str) -> float:
        """Fraction of ``text``'s word n-grams (by position) found in any evaluation text.

        Texts shorter than n words: 1.0 when their word sequence equals an evaluation text's,
        else 0.0. An exact match always gives 1.0.
        """
        return self.match(text).share

    def coverage(self, text: str) -> float:
        """Tulu 3 coverage: the largest fraction of one evaluation text's words covered by
        n-grams it shares with ``text`` (1.0 on an exact match)."""
        return self.match(text).coverage

    def contaminated(self, text: str, threshold: float) -> bool:
        """Whether ``text`` is contaminated under the module's rule at ``threshold`` (0-1]."""
        return self.match(text).contaminated(threshold)
