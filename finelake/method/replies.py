"""Reading the model stages' JSON replies, and the per-row signals they leave (issue 25 items 2-3).

Every reply the genericize and instantiate stages parse leaves a list of *flags* on its row (the
``flags`` column of ``genericizations`` and ``instantiations``), so a run can be judged by its
rows, queryable in SQL, before or after it finishes:

====================  ============================================================================
flag                  meaning
====================  ============================================================================
``constrained``       the request carried a JSON schema (grammar-constrained decoding)
``lenient_parse``     the reply was not one JSON value: the first JSON object in it was read
                      (text, a code fence or a second object around it)
``unknown_keys:a,b``  the reply object had keys the stage does not read (sorted, comma-joined)
====================  ============================================================================

:func:`read_json_reply` is the one reader: strict (the whole reply is one JSON value, a Markdown
code fence allowed) and, when ``lenient``, the first JSON object of the reply otherwise.
:func:`stage_signals` counts flags and unparseable replies for a stage summary (and for the
canary that stops a bad run early): rows go in as ``(replied, reason, flags, n)`` groups, so a
Spark ``groupBy(...).count()`` and a pandas chunk feed it alike.

Pure functions: text in, values out.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

FLAG_CONSTRAINED = "constrained"
FLAG_LENIENT = "lenient_parse"
FLAG_UNKNOWN_KEYS = "unknown_keys"
UNPARSEABLE = "unparseable_output"
"""The reason (prefix) of a reply that gave no JSON of the expected shape."""

_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


@dataclass(frozen=True)
class JsonReply:
    """A reply read as JSON.

    Attributes:
        data: the decoded value (dict, list, None for ``null``, ...).
        lenient: True when the reply was not one JSON value and the first object in it was read.
    """

    data: Any
    lenient: bool = False


def read_json_reply(text: Optional[str], lenient: bool = False) -> JsonReply:
    """Decode a model reply.

    Strict reading: the reply stripped of whitespace and of one Markdown code fence
    (```` ```json ... ``` ````) must be exactly one JSON value. With ``lenient``, a reply that is
    not is searched for its first JSON *object* (``json.JSONDecoder.raw_decode`` at each ``{``
    in turn); prose, a second object or a cut-off tail after it are ignored.

    Args:
        text: the reply; None when the model gave none.
        lenient: allow the first-object fallback (replies decoded without a JSON schema).

    Returns:
        :class:`JsonReply`; ``lenient`` True only when the fallback was needed.

    Raises:
        ValueError: no reply, or no JSON value (strict) / no JSON object (lenient) in it.
    """
    if text is None:
        raise ValueError("no output")
    body = _FENCE.sub("", text.strip())
    try:
        return JsonReply(json.loads(body))
    except json.JSONDecodeError:
        if not lenient:
            raise ValueError("not one JSON value") from None
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
            return JsonReply(value, lenient=True)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    raise ValueError("no JSON object in the reply")


def unknown_keys_flag(data: Any, known: Iterable[str]) -> Optional[str]:
    """``"unknown_keys:a,b"`` for the keys of ``data`` (a dict) not in ``known``, sorted; None when
    there are none or ``data`` is not a dict. Commas inside a key are replaced by ``_``."""
    if not isinstance(data, dict):
        return None
    known = set(known)
    extra = sorted(str(k).replace(",", "_") for k in data if k not in known)
    return f"{FLAG_UNKNOWN_KEYS}:{','.join(extra)}" if extra else None


def flag_name(flag: str) -> str:
    """The name of a flag without its value (``"unknown_keys:a,b"`` -> ``"unknown_keys"``)."""
    return flag.split(":", 1)[0]


@dataclass
class StageSignals:
    """What a stage's rows say about its model's replies.

    Attributes:
        rows: rows counted.
        replies: rows with a model reply (errors and rows that never reached the model have none).
        unparseable: replies whose reason is ``unparseable_output`` (no JSON of the expected shape).
        flags: rows carrying each flag, by name (:func:`flag_name`).
        unknown_keys: rows whose reply had each unknown key.
    """

    rows: int = 0
    replies: int = 0
    unparseable: int = 0
    flags: dict[str, int] = field(default_factory=dict)
    unknown_keys: dict[str, int] = field(default_factory=dict)

    @property
    def parse_rate(self) -> Optional[float]:
        """Share of replies that parsed into the expected shape, in [0, 1]; None without replies."""
        return (self.replies - self.unparseable) / self.replies if self.replies else None

    def summary(self) -> dict[str, str]:
        """Items for a stage summary line: ``parse_rate`` (``"0.950 (19/20)"`` or ``"n/a"``) and,
        when any row has flags, ``flags`` (``"{constrained:20, lenient_parse:3}"``) and
        ``unknown_keys`` (the five most frequent keys with their row counts)."""
        rate = self.parse_rate
        out = {"parse_rate": "n/a" if rate is None else
               f"{rate:.3f} ({self.replies - self.unparseable}/{self.replies})"}
        if self.flags:
            out["flags"] = "{" + ", ".join(f"{k}:{v}" for k, v in sorted(self.flags.items())) + "}"
        if self.unknown_keys:
            top = sorted(self.unknown_keys.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
            out["unknown_keys"] = "{" + ", ".join(f"{k}:{v}" for k, v in top) + "}"
        return out


def stage_signals(groups: Iterable[tuple[bool, Optional[str], Optional[Sequence[str]], int]]) -> StageSignals:
    """Count replies, unparseable replies and flags over a stage's rows.

    Args:
        groups: ``(replied, reason, flags, n)``: ``n`` rows that had a model reply or not, with
            that ``reason`` (None for ok rows) and that ``flags`` list (None or empty: no flag).
            One group per row (``n=1``) works as well as the result of a ``groupBy().count()``.

    Returns:
        :class:`StageSignals`. A flag repeated within one row counts once.

    Raises:
        ValueError: a negative ``n``.
    """
    out = StageSignals()
    flags: Counter = Counter()
    keys: Counter = Counter()
    for replied, reason, row_flags, n in groups:
        n = int(n)
        if n < 0:
            raise ValueError(f"negative row count {n}")
        out.rows += n
        if replied:
            out.replies += n
            if reason and reason.split(":", 1)[0] == UNPARSEABLE:
                out.unparseable += n
        for f in set(row_flags or ()):
            flags[flag_name(f)] += n
            if flag_name(f) == FLAG_UNKNOWN_KEYS and ":" in f:
                for k in f.split(":", 1)[1].split(","):
                    keys[k] += n
    out.flags = dict(flags)
    out.unknown_keys = dict(keys)
    return out
