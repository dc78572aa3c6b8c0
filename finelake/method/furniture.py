"""Page furniture of plain-text documents: the lines that are not the document's substance.

Headings (``SYNOPSIS``, ``53.33. pg_opclass``), navigation (``Prev Up Home Next``) and a manual
page's running head and foot (``GZIP(1)  General Commands Manual  GZIP(1)``), source markup
(reStructuredText directives and roles, roff requests, Markdown headings, HTML tags). FineInstructions
spends its token budget on "the educational parts of a document" rather than "footers, headers"
(§1); :mod:`finelake.method.quality` uses these to reject answers made of them and to find where a
document's body starts. Pure functions of strings (regular expressions; no library does this for
plain text: trafilatura and jusText work on HTML trees).
"""

from __future__ import annotations

import re
from typing import Optional

from finelake.method.spans import Span

TERMINAL = (".", "?", "!", '"', "'")  # C4's END_PUNCTUATION (datatrove c4_filters)
_BULLET = re.compile(r"^\s*(?:[-*•+·▪◦‣–]|\d{1,3}[.)]|\([a-zA-Z0-9]{1,3}\))\s")
_NAV_WORDS = frozenset("""prev previous next up home top back index contents table of skip to
main content menu search toc « » ‹ › ← → ↑ | < > << >> ^""".split())
_NAV_CORE = frozenset("prev previous next up home top back index contents toc".split())
_RUNNING_HEAD = re.compile(r"^\s*(?:\S.*?\s{3,})?[\w.:+\-]+\(\d[\w]*\)\s*$")
_HTML_TAGS = ("a", "abbr", "b", "blockquote", "body", "br", "button", "center", "code", "dd", "div",
              "dl", "dt", "em", "font", "footer", "form", "h[1-6]", "head", "header", "hr", "html",
              "i", "iframe", "img", "input", "li", "link", "meta", "nav", "noscript", "ol",
              "option", "p", "pre", "script", "section", "select", "small", "span", "strong",
              "style", "sub", "sup", "table", "td", "th", "title", "tr", "tt", "u", "ul")
_MARKUP = re.compile(
    r"^\s*\.\.(?:\s|$)"                                     # rST directive, comment, label, SPDX
    r"|^\s*([=\-~^\"'`#*+_<>:])\1{3,}\s*$"                  # rST/Markdown underline, rule
    r"|:[\w-]+:`[^`]*`"                                     # rST role  :mod:`os`
    r"|^\.[A-Za-z]{1,3}(?:\s|$)|\\f[BIRP]"                  # roff request, font escape
    r"|^\s*#{1,6}\s"                                        # Markdown ATX heading
    r"|</?(?:" + "|".join(_HTML_TAGS) + r")(?:\s[^<>]*)?/?>"  # HTML tag
    r"|^\s*\+[-=+]{3,}\+\s*$"                               # rST grid table border
    r"|\{\{|\}\}|\[\[|\]\]")                                # wiki templates and links
_NUMBERED_TITLE = re.compile(r"^\s*(?:\d+(?:\.\d+)*\.?|[IVX]+\.|(?:chapter|section|part)\s+\d+\.?)\s+\S",
                             re.IGNORECASE)


def ends_terminal(line: str) -> bool:
    """The line ends in C4's terminal punctuation (not an ellipsis)."""
    s = line.rstrip()
    return s.endswith(TERMINAL) and not s.endswith("...")


def furniture_kind(line: str) -> Optional[str]:
    """``"navigation"``, ``"markup"``, ``"heading"`` or None for one line (stripped or not).

    Navigation: only link words (``Prev``, ``Next``, ``Up``, ``Home``, ``Contents``, arrows,
    ``|``), at least two, one of them a core link word; or a manual page's running head/foot
    (ends with ``NAME(1)`` after a gap of three spaces or more). Markup: see :data:`_MARKUP`.
    Heading: no terminal punctuation and either all upper case (>= 2 letters, <= 6 words,
    indented 3 columns or less, no ``_``, ``=`` or ``$``: not a manual's indented
    ``XDG_CONFIG_HOME`` entry) or a numbered title (``2.1 Installation``, ``53.33. pg_opclass``, ``Chapter 4 ...``; <= 8 words).
    """
    s = line.strip()
    if not s:
        return None
    words = s.split()
    low = [w.lower().strip("[]():,") for w in words]
    if len(words) >= 2 and all(w in _NAV_WORDS or not w for w in low) and _NAV_CORE & set(low):
        return "navigation"
    if _RUNNING_HEAD.match(line) and (re.search(r"\s{3,}", s) or len(words) == 1):
        return "navigation"
    if _MARKUP.search(line):
        return "markup"
    if not ends_terminal(s):
        letters = [c for c in s if c.isalpha()]
        indent = len(line) - len(line.lstrip(" \t"))
        if (len(letters) >= 2 and all(c.isupper() for c in letters) and len(words) <= 6
                and indent <= 3 and not re.search(r"[_=$]", s)):
            return "heading"
        if _NUMBERED_TITLE.match(s) and len(words) <= 8:
            return "heading"
    return None


def unwrap_lines(text: str) -> list[str]:
    """Logical lines of a text: a hard-wrapped paragraph's lines joined with a space.

    A line joins the one before it when the one before has at least 3 words (C4's
    ``min_words_per_line``), no terminal punctuation and is not furniture
    (:func:`furniture_kind`), the line does not start a list item, and its indentation is one
    the line before wraps to: that line's own, or the column of a word after a gap of two
    spaces or more (a manual's hanging option paragraph, ``-a     ignore ...``); the first line
    of a text (an excerpt that starts mid-line, stripped) wraps to any. Blank lines end a
    paragraph. Lines are returned stripped; blank lines are dropped.
    """
    out: list[str] = []
    cols: Optional[set] = None
    joinable = False
    for n, raw in enumerate(text.splitlines()):
        s = raw.strip()
        if not s:
            joinable = False
            continue
        indent = len(raw) - len(raw.lstrip())
        if out and joinable and (cols is None or indent in cols) and not _BULLET.match(raw):
            out[-1] += " " + s
        else:
            out.append(s)
        cols = None if n == 0 else {indent} | {m.end() for m in re.finditer(r"\S\s{2,}(?=\S)", raw)}
        joinable = len(s.split()) >= 3 and not ends_terminal(s) and furniture_kind(raw) is None
    return out


def non_ws(s: str) -> int:
    """Non-whitespace characters of ``s``."""
    return len(s) - sum(c.isspace() for c in s)


def trim_furniture(text: str) -> tuple[int, int]:
    """``(start, end)`` of ``text`` without its leading and trailing furniture: the start moves
    past the last furniture line before the first line of 3 words or more that is not
    furniture (``SYNOPSIS / polkitd / DESCRIPTION`` above a paragraph), the end back over
    furniture lines at the end (a running foot). Stripped of white space; start >= end when
    nothing is left."""
    lines = list(re.finditer(r"[^\n]+", text))
    start, first_body = 0, len(lines)
    for i, m in enumerate(lines):
        kind = furniture_kind(m.group())
        if kind:
            start = m.end()
        elif len(m.group().split()) >= 3:
            first_body = i
            break
    end = len(text)
    for m in reversed(lines[first_body:]):
        if m.group().strip() and furniture_kind(m.group()) is None:
            break
        end = m.start()
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def in_furniture(document: str, span: Span) -> bool:
    """True when ``span`` lies on a furniture line of ``document`` (:func:`furniture_kind`): a
    heading such as ``SYNOPSIS``, a running head, a markup line; such a phrase would paste page
    furniture into an instruction's slot."""
    lo = document.rfind("\n", 0, span.start) + 1
    hi = document.find("\n", span.end)
    return furniture_kind(document[lo:hi if hi != -1 else len(document)]) is not None
