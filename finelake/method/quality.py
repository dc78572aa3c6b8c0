"""Quality rules for instantiated pairs: the answer must be prose, the instruction a request.

FineInstructions restructures documents into pairs so that the token budget goes to "the
educational parts of a document" rather than "footers, headers, less educational content" (§1),
and its answers come mostly from 19-71% of the way through a document (§3.2). Excerpt grounding
(§3.3) and the judge (§3.4) do not see this: an excerpt of a page header is 100% grounded, and an
embedding-relevance judge scores a header that repeats the instruction's words high. These rules
run after an instantiation parses and before the judge, so no judge call is spent on a pair that
fails them.

Each rule follows datatrove's filter convention, keep or a reason: :func:`check_answer` and
:func:`check_instruction` return ``None`` (keep) or ``"quality:<rule>: <detail>"``, the first rule
that fails in :data:`RULES` order. The text heuristics are datatrove's (0.10.1), called as a
library with their published defaults (FineWeb's, Gopher's from Rae et al. 2021 table A1, C4's
from Raffel et al. 2020), less the rules that count over a whole document and misfire on a few
sentences (each one left out is named, with why, in :func:`_filters`):

================================  ===========================================================
rule                              fails when
================================  ===========================================================
``answer_short``                  fewer than ``answer_min_words`` words (Gopher's word count)
``answer_header_block``           the answer starts in the document's leading header block
                                  (:func:`header_end`; needs the document)
``answer_navigation``             a line of links or running heads (``Prev Up Home Next``,
                                  ``GZIP(1)  General Commands Manual  GZIP(1)``)
``answer_markup``                 a line of source markup (reStructuredText directives,
                                  roles and underlines, roff requests, Markdown headings,
                                  HTML tags)
``answer_headings``               a heading line (``SEE ALSO``, ``53.33. pg_opclass``): the
                                  answer runs across sections
``answer_repetition``             Gopher repetition's duplicate lines and paragraphs, or
                                  FineWeb's duplicated-line characters (> 1%)
``answer_not_prose``              Gopher quality (word length, ``#`` and ellipsis ratios,
                                  bullet and ellipsis lines), FineWeb quality (short lines,
                                  list ratio), or under ``answer_min_prose_share`` of its
                                  characters in C4 prose sentences (terminal punctuation,
                                  >= 3 words)
``instruction_section_number``    a slot filled with a section number (``53.33``, ``§ 4``)
``instruction_path``              a slot filled with a file path or URL
``instruction_repetition``        two slots filled with the same text (with the template), or
                                  a word with a digit or a 3-word run repeated (without)
================================  ===========================================================

Manual pages and other plain-text manuals are hard-wrapped at 80 columns, so line rules made for
web text (FineWeb: one paragraph per line) would call every wrapped prose line "no terminal
punctuation". :func:`~finelake.method.furniture.unwrap_lines` joins a wrapped paragraph's lines
first; navigation, markup and heading lines are :mod:`finelake.method.furniture`'s.

Everything here is pure (strings in, verdicts out); datatrove's English word splitter (spaCy's
rule-based ``blank("en")`` tokenizer, no model download) loads once per process on first use.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, fields
from typing import Optional, Sequence

from finelake.method.furniture import furniture_kind, non_ws, trim_furniture, unwrap_lines
from finelake.method.spans import Span

RULES: tuple[str, ...] = (
    "answer_short", "answer_header_block", "answer_navigation", "answer_markup",
    "answer_headings", "answer_repetition", "answer_not_prose",
    "instruction_section_number", "instruction_path", "instruction_repetition",
)
"""Rule names in the order they are tried; a reason is ``quality:<rule>: <detail>``."""

PREFIX = "quality:"


@dataclass(frozen=True)
class QualityRules:
    """Thresholds of the rules (``instantiate.quality`` in the profile; defaults there).

    Attributes:
        answer_min_words: shortest answer, in words (non-symbol words, Gopher's count).
        answer_min_prose_share: least share of the answer's non-whitespace characters in C4
            prose sentences (C4).
        skip: rule names (:data:`RULES`) not applied.
    """

    answer_min_words: int = 10
    answer_min_prose_share: float = 0.5
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = sorted(set(self.skip) - set(RULES))
        if unknown:
            raise ValueError(f"unknown quality rule(s) {unknown}; known: {list(RULES)}")
        if self.answer_min_words < 1 or not 0 <= self.answer_min_prose_share <= 1:
            raise ValueError("answer_min_words must be >= 1 and answer_min_prose_share in [0, 1]")

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "QualityRules":
        """From a config mapping; keys other than the fields (``enabled``, ...) are ignored."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in (d or {}).items() if k in names}
        if "skip" in kw:
            kw["skip"] = tuple(kw["skip"] or ())
        return cls(**kw)

    def on(self, rule: str) -> bool:
        return rule not in self.skip


# ----------------------------------------------------------------------------- datatrove


@functools.lru_cache(maxsize=1)
def _filters():
    """datatrove's filters with their published defaults (built once per process)."""
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter,
                                            GopherQualityFilter, GopherRepetitionFilter)

    return {
        # Gopher quality's word-length, symbol, bullet and ellipsis rules. Not its length rules
        # (answer_short has its own minimum) nor its alphabetic-word (>= 80% of words) and
        # stop-word (>= 2 of 8) rules: they count over the whole text with punctuation tokens
        # as words and were set for documents of >= 50 words; on a one-sentence answer they
        # fail plain prose ("Villa served as provisional governor of Chihuahua from 1913 to
        # 1914." has 9 alphabetic words of 12 tokens).
        "gopher_quality": GopherQualityFilter(min_doc_words=None, max_doc_words=None,
                                              max_non_alpha_words_ratio=None, min_stop_words=None),
        # Gopher's duplicate line and paragraph rules, not its n-gram ones: those were set for
        # documents, and in a few sentences one parallel phrase ("phonological typology, which
        # deals with sound features; syntactic typology, which deals with word order") is over
        # the 15% of duplicated 5-grams; datatrove's top n-gram rule also counts an n-gram that
        # occurs once, so any text under ~100 characters fails it.
        "gopher_repetition": GopherRepetitionFilter(top_n_grams=(), dup_n_grams=()),
        # FineWeb's short-line, list and duplicated-line rules. Not its line-punctuation rule
        # (>= 12% of lines end in terminal punctuation): C4's prose share below measures the
        # same by characters, and FineWeb's stop characters leave out closing quotes, so a
        # one-line answer ending in ."  would fail it.
        "fineweb": FineWebQualityFilter(line_punct_thr=0.0),
        # C4's rules per sentence (its split_paragraph=False mode; sentences may cross the hard
        # wraps of a manual page) without the page-level ones (>= 5 sentences, no "{"): a
        # one-line answer whose last fragment is an unpunctuated list would lose all of its
        # prose under the per-line mode.
        "c4": C4QualityFilter(split_paragraph=False, min_num_sentences=-1,
                              filter_curly_bracket=False),
    }


def _run(name: str, text: str):
    from datatrove.data import Document

    doc = Document(text=text, id="answer")
    res = _filters()[name].filter(doc)
    keep, reason = (res if isinstance(res, tuple) else (res, None))
    return bool(keep), reason, doc.text


def word_count(text: str) -> int:
    """Words with at least one non-punctuation character (Gopher's count, datatrove's English
    word splitter)."""
    from datatrove.utils.text import PUNCTUATION_SET, split_into_words

    return sum(1 for w in split_into_words(text) if any(c not in PUNCTUATION_SET for c in w))


def prose_share(text: str) -> float:
    """Share of the non-whitespace characters of ``text`` in prose sentences: C4's rules
    (terminal punctuation, >= 3 words, no ``javascript`` / cookie-policy sentence, citations
    removed) applied to each sentence (datatrove's sentence splitter) of
    :func:`unwrap_lines`; 0.0 for an empty text."""
    lines = unwrap_lines(text)
    total = sum(non_ws(x) for x in lines)
    if not total:
        return 0.0
    keep, _, kept = _run("c4", "\n".join(lines))
    return min(1.0, non_ws(kept) / total) if keep else 0.0


# ----------------------------------------------------------------------------- answer


def _fail(rule: str, detail: str) -> str:
    return f"{PREFIX}{rule}: {detail}"


def answer_measures(answer: str) -> dict:
    """What the answer rules look at: ``words``, ``prose_share`` and the first furniture line
    of each kind (``navigation``, ``markup``, ``heading``; None when there is none)."""
    lines = unwrap_lines(answer)
    first: dict[str, Optional[str]] = {"navigation": None, "markup": None, "heading": None}
    for raw in answer.splitlines():
        k = furniture_kind(raw)
        if k and first[k] is None:
            first[k] = raw.strip()[:80]
    return {"words": word_count(answer), "prose_share": round(prose_share(answer), 3),
            "lines": len(lines), **first}


def check_answer(answer: str, rules: QualityRules = QualityRules(), document: Optional[str] = None,
                 answer_start: Optional[int] = None,
                 min_sentence_chars: int = 40) -> Optional[str]:
    """None when the answer passes every rule, else ``"quality:<rule>: <detail>"`` of the first
    that fails (module table).

    Args:
        answer: the expanded answer.
        rules: thresholds and skipped rules.
        document, answer_start: the source document and the answer's offset in it; with both,
            ``answer_header_block`` applies (:func:`header_end`, units of
            ``min_sentence_chars``).
    """
    m = answer_measures(answer)
    if rules.on("answer_short") and m["words"] < rules.answer_min_words:
        return _fail("answer_short", f"{m['words']} words < {rules.answer_min_words}")
    if rules.on("answer_header_block") and document is not None and answer_start is not None:
        end = header_end(document, min_sentence_chars)
        if answer_start < end:
            return _fail("answer_header_block", f"starts at character {answer_start}, inside the "
                                                f"document's leading header block (0-{end})")
    for rule, kind in (("answer_navigation", "navigation"), ("answer_markup", "markup"),
                       ("answer_headings", "heading")):
        if rules.on(rule) and m[kind] is not None:
            return _fail(rule, f"{kind} line {m[kind]!r}")
    text = "\n".join(unwrap_lines(answer))
    if rules.on("answer_repetition"):
        keep, why, _ = _run("gopher_repetition", answer)
        if not keep:
            return _fail("answer_repetition", f"gopher_repetition {why}")
        keep, why, _ = _run("fineweb", text)
        if not keep and why == "char_dup_ratio":
            return _fail("answer_repetition", f"fineweb {why}")
    if rules.on("answer_not_prose"):
        keep, why, _ = _run("gopher_quality", answer)
        if not keep:
            return _fail("answer_not_prose", f"gopher_quality {why}")
        keep, why, _ = _run("fineweb", text)
        if not keep and why != "char_dup_ratio":
            return _fail("answer_not_prose", f"fineweb {why}")
        if m["prose_share"] < rules.answer_min_prose_share:
            return _fail("answer_not_prose", f"{m['prose_share']:.2f} of its characters in prose "
                                             f"lines < {rules.answer_min_prose_share}")
    return None


# ----------------------------------------------------------------------------- document body


def body_units(document: str, units: Sequence[Span], min_prose_share: float = 0.5) -> list[Span]:
    """The units (numbered sentences) an answer may be drawn from: the document's substance.

    Furniture lines (:func:`furniture_kind`) are cut off the start and end of each unit's span
    (a heading joined to the paragraph under it, a running head or foot); units that were only
    furniture go. Then the leading header block goes: every unit before the first one whose
    :func:`prose_share` reaches ``min_prose_share`` (title lines, ``NAME`` / ``SYNOPSIS``
    blocks, rST labels). A document with no such unit keeps all its (cut) units.

    Returns:
        Spans of ``document`` in order, ``document[s.start:s.end] == s.text``.
    """
    cut: list[Span] = []
    for u in units:
        start, end = trim_furniture(u.text)
        if start < end:
            cut.append(Span(u.text[start:end], u.start + start, u.start + end))
    for i, u in enumerate(cut):
        if prose_share(u.text) >= min_prose_share:
            return cut[i:]
    return cut or list(units)


@functools.lru_cache(maxsize=16)
def header_end(document: str, min_sentence_chars: int = 40) -> int:
    """Offset where the document's body starts: the first unit :func:`body_units` keeps
    (units from :func:`~finelake.method.spans.split_sentences` with ``min_sentence_chars``);
    0 when the document has no leading header block."""
    from finelake.method.spans import split_sentences

    units = split_sentences(document, min_chars=min_sentence_chars)
    body = body_units(document, units)
    return body[0].start if body and units and body[0].start > units[0].start else 0


def answer_start(raw_answer: Optional[str], document: str) -> Optional[int]:
    """Character offset in ``document`` where the answer's first excerpt begins (its
    ``<excerpt>`` tag expanded, :func:`~finelake.method.excerpts.expand_excerpts`); None when
    the answer has no excerpt that expands."""
    from finelake.method.excerpts import expand_excerpts

    if not raw_answer:
        return None
    found = expand_excerpts(raw_answer, document).excerpts
    return found[0].doc_start if found else None


def answer_position(answer_start: Optional[int], document: str) -> Optional[float]:
    """Where an answer starts in its document, as a fraction of the document's characters (§3.2
    reports 19-71% for most answer excerpts); None when the start is unknown."""
    if answer_start is None or not document:
        return None
    return round(answer_start / len(document), 4)


# ----------------------------------------------------------------------------- instruction

_SECTION_NUMBER = re.compile(r"^\s*(?:§\s*)?\d+(?:\.\d+)+\.?(?:\s|$)|^\s*§\s*\d")
_PATH = re.compile(r"(?:^|[\s(\"'`])(?:~|\.{1,2})?/[\w.@+-]+|\b[\w.-]+/[\w.-]+/[\w./-]*"
                   r"|\b[A-Za-z]:\\|\b[a-z][a-z0-9+.-]*://")
_SLOT = re.compile(r"<fi>(.*?)</fi>", re.DOTALL)
_STOP = frozenset("a an the of to in on for and or with is are be how what why do does i you".split())


def slot_fills(template: str, instruction: str) -> Optional[list[str]]:
    """The texts that filled the template's ``<fi>`` slots in ``instruction``, in slot order;
    None when the instruction does not have the template's shape."""
    parts = _SLOT.split(template)
    literals = parts[0::2]
    if len(literals) < 2:
        return None
    pattern = "(.+?)".join(re.escape(x) for x in literals)
    m = re.fullmatch(pattern, instruction, re.DOTALL)
    return [g.strip() for g in m.groups()] if m else None


def check_instruction(instruction: str, rules: QualityRules = QualityRules(),
                      template: Optional[str] = None) -> Optional[str]:
    """None when the instruction reads as a request, else ``"quality:<rule>: <detail>"``.

    With the template, the rules look at the slot fills (:func:`slot_fills`): a fill that starts
    with a section number, holds a file path or URL, or fills two slots. Without it (a judge
    that sees only the pair) only the repetition rule applies, to the whole instruction: a word
    with a digit, or a 3-word run, that occurs twice.
    """
    fills = slot_fills(template, instruction) if template else None
    if fills:
        for f in fills:
            if rules.on("instruction_section_number") and _SECTION_NUMBER.match(f):
                return _fail("instruction_section_number", f"slot filled with {f[:60]!r}")
            if rules.on("instruction_path") and _PATH.search(f):
                return _fail("instruction_path", f"slot filled with {f[:60]!r}")
        seen: dict[str, int] = {}
        for i, f in enumerate(fills, 1):
            key = f.lower()
            if rules.on("instruction_repetition") and key and key in seen:
                return _fail("instruction_repetition",
                             f"slots {seen[key]} and {i} both filled with {f[:60]!r}")
            seen.setdefault(key, i)
        return None
    if rules.on("instruction_repetition"):
        words = [w.strip(".,;:!?()[]\"'").lower() for w in instruction.split()]
        words = [w for w in words if w]
        digits = [w for w in words if any(c.isdigit() for c in w)]
        rep = next((w for w in digits if digits.count(w) > 1), None)
        if rep is None:
            grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
            grams = [g for g in grams if not set(g) <= _STOP]
            rep = next((" ".join(g) for g in grams if grams.count(g) > 1), None)
        if rep is not None:
            return _fail("instruction_repetition", f"{rep!r} occurs twice")
    return None


def check_pair(document: str, template: str, instruction: str, answer: str,
               answer_start: Optional[int], rules: QualityRules = QualityRules(),
               min_sentence_chars: int = 40) -> Optional[str]:
    """:func:`check_answer` then :func:`check_instruction` (with the template) for one
    instantiated pair; the first failing rule's reason, or None to keep it."""
    return (check_answer(answer, rules, document, answer_start, min_sentence_chars)
            or check_instruction(instruction, rules, template))
