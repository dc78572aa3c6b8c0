"""Instruction templates with ``<fi>…</fi>`` slots (FineInstructions §3.1).

A template is a real user query in which the spans that name a specific entity or scenario are
replaced by ``<fi>description</fi>``: a slot whose content is a short natural-language
description of what may go there, e.g. ``what effects does <fi>a medical condition</fi> have?``.
Instantiation (§3.3) replaces every slot by text taken from a matched document.

Tags are exactly ``<fi>`` and ``</fi>`` (lower case, no spaces); slots never nest.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Optional, Sequence

OPEN, CLOSE = "<fi>", "</fi>"
#: One slot: group 1 is its description (unstripped). Only meaningful on well-formed templates
#: (see :func:`validate_template`); on ``<fi>a <fi>b</fi>`` it would match ``<fi>a <fi>b</fi>``.
SLOT_RE = re.compile(r"<fi>(.*?)</fi>", re.DOTALL)
_TAG_RE = re.compile(r"</?fi>")
# Tag look-alikes that must not survive in an instruction: any case, inner spaces, ``<fi/>``.
_LOOSE_TAG_RE = re.compile(r"<\s*/?\s*fi\s*/?\s*>", re.IGNORECASE)
_WS_RE = re.compile(r"\s+")
_WORD_RE = re.compile(r"\w")


def _tag_problems(template: str) -> list[str]:
    """Structural problems of the tags, in text order: stray ``</fi>``, nested or unclosed ``<fi>``."""
    problems: list[str] = []
    open_at: Optional[int] = None
    for m in _TAG_RE.finditer(template):
        if m.group() == OPEN:
            if open_at is not None:
                problems.append(f"nested_tag: <fi> at char {m.start()} opens inside the slot "
                                f"opened at char {open_at}")
                continue  # keep the outer slot open; its </fi> then closes it
            open_at = m.start()
        elif open_at is None:
            problems.append(f"stray_close_tag: </fi> at char {m.start()} closes no slot")
        else:
            open_at = None
    if open_at is not None:
        problems.append(f"unclosed_tag: <fi> at char {open_at} is never closed")
    return problems


def parse_slots(template: str) -> list[str]:
    """Slot descriptions of a template, in order, each stripped of surrounding whitespace.

    Args:
        template: a template string (§3.1).

    Returns:
        One description per ``<fi>…</fi>`` slot (``[]`` for plain text). A slot with an empty
        description gives ``""`` (which :func:`validate_template` rejects).

    Raises:
        ValueError: the tags are unbalanced, nested or stray (the message lists the problems);
            call :func:`validate_template` to get them as data instead.
    """
    problems = _tag_problems(template)
    if problems:
        raise ValueError("malformed template: " + "; ".join(problems))
    return [m.group(1).strip() for m in SLOT_RE.finditer(template)]


def num_slots(template: str) -> int:
    """Number of slots: the template's complexity in §3.2. Raises ValueError like :func:`parse_slots`."""
    return len(parse_slots(template))


def _norm_text(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed and stripped: for comparing a template with its query."""
    return _WS_RE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def validate_template(template: str, compatible_document_description: Optional[str],
                      source_query: Optional[str] = None) -> list[str]:
    """Reasons a genericizer output is not a usable template (§3.1); ``[]`` means valid.

    Each reason is ``"<code>: <detail>"`` with code one of ``nested_tag``, ``stray_close_tag``,
    ``unclosed_tag`` (tag structure, one reason per offending tag), ``no_slot``,
    ``empty_slot`` (one per slot with a blank description), ``empty_description`` (blank
    compatible document description), ``same_as_query``, ``only_slot``.

    ``same_as_query``: after NFKC, case folding and whitespace collapsing, the template equals
    the source query, either as written or with its tags removed (slot descriptions kept). The
    second form catches the common small-model failure of wrapping the original words in tags
    (``what is <fi>diabetes</fi>`` for ``what is diabetes``): nothing was genericized.

    ``only_slot``: outside its slots the template has no word character (``<fi>question</fi>?``),
    so it is not a reusable instruction.

    Args:
        template: the genericized query.
        compatible_document_description: the paragraph describing documents that can
            instantiate and answer it (§3.1); None counts as blank.
        source_query: the query it came from; None skips the ``same_as_query`` check.

    Returns:
        The reasons, in the order above; empty when the template is valid.
    """
    reasons = _tag_problems(template)
    structural_ok = not reasons
    if structural_ok:
        slots = [m.group(1) for m in SLOT_RE.finditer(template)]
        if not slots:
            reasons.append("no_slot: the template has no <fi>…</fi> slot")
        for i, desc in enumerate(slots):
            if not desc.strip():
                reasons.append(f"empty_slot: slot {i} has an empty description")
    if not (compatible_document_description or "").strip():
        reasons.append("empty_description: the compatible document description is empty")
    if source_query is not None:
        q = _norm_text(source_query)
        untagged = _TAG_RE.sub("", template)
        if q and (_norm_text(template) == q or _norm_text(untagged) == q):
            reasons.append("same_as_query: the template equals the source query after normalization")
    if structural_ok and SLOT_RE.search(template) and not _WORD_RE.search(SLOT_RE.sub("", template)):
        reasons.append("only_slot: the template has no words outside its slots")
    return reasons


def assemble_template(query: str, spans: Sequence[tuple[str, str]]) -> str:
    """Turn a query and the spans chosen to genericize into a template ('decomposed' mode, §3.1).

    Spans are placed in the order given: each takes the leftmost occurrence of its text in the
    query that does not overlap a span already placed, and is replaced by
    ``<fi>description</fi>`` (description stripped). Matching is exact (case and whitespace).

    Args:
        query: the source query; must not contain ``<fi>``/``</fi>`` itself.
        spans: ``(exact substring of query, slot description)`` pairs. An empty list returns the
            query unchanged (which :func:`validate_template` then rejects as ``no_slot``).

    Returns:
        The template.

    Raises:
        ValueError: the query already has tags; a span text or description is empty; a
            description contains a tag; a span text does not occur in the query ("not found");
            every occurrence overlaps an earlier span ("overlapping").
    """
    if _TAG_RE.search(query):
        raise ValueError("query already contains <fi> tags")
    placed: list[tuple[int, int, str]] = []
    for text, desc in spans:
        if not text:
            raise ValueError("empty span text")
        desc = (desc or "").strip()
        if not desc:
            raise ValueError(f"empty description for span {text!r}")
        if _TAG_RE.search(desc):
            raise ValueError(f"description {desc!r} contains a <fi> tag")
        found = False
        start = query.find(text)
        while start != -1:
            found = True
            end = start + len(text)
            if all(end <= s or start >= e for s, e, _ in placed):
                placed.append((start, end, desc))
                break
            start = query.find(text, start + 1)
        else:
            if not found:
                raise ValueError(f"span {text!r} not found in the query")
            raise ValueError(f"span {text!r} overlaps spans already placed at every occurrence")
    out, pos = [], 0
    for s, e, desc in sorted(placed):
        out.append(query[pos:s])
        out.append(f"{OPEN}{desc}{CLOSE}")
        pos = e
    out.append(query[pos:])
    return "".join(out)


def fill_template(template: str, fills: Sequence[str]) -> str:
    """Instantiate a template: replace slot i by ``fills[i]`` (§3.3). Text outside slots is kept as is.

    Args:
        template: a well-formed template.
        fills: one non-blank string per slot, in slot order; inserted verbatim.

    Returns:
        The instruction (no ``<fi>`` tag left).

    Raises:
        ValueError: malformed template; ``len(fills) != num_slots(template)``; a blank fill; a
            fill containing a ``<fi>``-like tag.
    """
    n = num_slots(template)
    if len(fills) != n:
        raise ValueError(f"template has {n} slots but {len(fills)} fills were given")
    for i, f in enumerate(fills):
        if not isinstance(f, str) or not f.strip():
            raise ValueError(f"fill {i} is empty")
        if _LOOSE_TAG_RE.search(f):
            raise ValueError(f"fill {i} contains a <fi> tag: {f!r}")
    it = iter(fills)
    return SLOT_RE.sub(lambda _m: next(it), template)


def unfilled_slots(text: str) -> int:
    """How many ``<fi>`` slots or tag remnants an instantiated instruction still has (must be 0).

    Scans tag-like tokens left to right: an opening tag counts 1 (an opening tag inside an open
    slot counts again), a closing tag that closes an open slot counts 0, a lone closing tag or a
    self-closing ``<fi/>`` counts 1. So ``<fi>a</fi>`` is 1 and the result is 0 exactly when no
    tag-like token is left. Looser than the template grammar on purpose: ``<FI>``, ``< fi >``
    and ``<fi/>`` count too, since none may reach training data.
    """
    count, is_open = 0, False
    for m in _LOOSE_TAG_RE.finditer(text):
        tag = _WS_RE.sub("", m.group()).lower()
        if tag == "<fi>":
            count += 1
            is_open = True
        elif tag == "</fi>" and is_open:
            is_open = False
        else:
            count += 1
    return count


def normalize_template(template: str) -> str:
    """Canonical form used for identity: NFC, whitespace runs collapsed to one space and stripped,
    slot descriptions stripped (``<fi> a  b </fi>`` → ``<fi>a b</fi>``). Case is kept."""
    t = _WS_RE.sub(" ", unicodedata.normalize("NFC", template)).strip()
    return SLOT_RE.sub(lambda m: f"{OPEN}{m.group(1).strip()}{CLOSE}", t)


def template_id(template: str) -> str:
    """Stable content id: ``"t" + 32 hex`` of BLAKE2b-128 over :func:`normalize_template`'s UTF-8.

    Templates that normalize equal get the same id, so identical genericizer outputs from
    different queries merge into one row of the templates table. Independent of process,
    platform and Python's hash randomization.
    """
    digest = hashlib.blake2b(normalize_template(template).encode("utf-8"), digest_size=16)
    return "t" + digest.hexdigest()
