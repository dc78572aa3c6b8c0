"""One input record into one prepared row: parse, normalize, validate (pure Python, no Spark).

The readers of ``finelake.jobs.ingestion.readers`` call these inside Spark tasks, one call per
JSONL line, tabular row or text file; every row they return has the columns of
:data:`PREPARED_COLUMNS`. A malformed record is not an exception but a row whose ``reason`` is the
quarantine reason (``"<code>: <detail>"``, codes in the docstring of ``finelake.jobs.ingest``)
and whose ``quarantine_id`` hashes the target, input file, location and raw text, so a rerun
writes the same quarantine row again, never a second one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

from finelake.method.text import clean_text, content_id, has_bad_unicode

#: Characters of the raw input kept in ``quarantine.raw``.
RAW_MAX_CHARS = 4096

#: ``reason`` of a whitespace-only JSONL line: not an input row (counted as ``blank_lines``).
BLANK = "blank_line"

@dataclass(frozen=True)
class RowOptions:
    """What a Spark task needs to turn one input record into a prepared row (picklable)."""

    target: str
    text_field: str
    id_field: Optional[str]
    source_field: str
    default_source: str
    min_chars: int
    max_chars: int
    keep_paragraphs: bool


#: Columns of a prepared row, in order (see :func:`prepare_record`).
PREPARED_COLUMNS = ("src", "row", "location", "raw", "text", "rid", "source", "metadata",
                    "content_id", "reason", "quarantine_id")

_MISSING = object()


def _safe(s: str) -> str:
    """``s`` made encodable as UTF-8 (lone surrogates become ``\\udXXX`` escapes)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _qid(target: str, src: str, location: str, raw: str) -> str:
    h = hashlib.sha1("\x1f".join((target, src, location, raw)).encode("utf-8"))
    return h.hexdigest()[:20]


def _quarantined(o: RowOptions, src: str, row: int, location: str, raw: str, reason: str) -> tuple:
    raw = _safe(raw)
    return (src, row, location, raw[:RAW_MAX_CHARS], None, None, None, None, None, reason,
            _qid(o.target, src, location, raw))


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "asDict"):  # Spark Row (struct column)
        return _jsonable(v.asDict(recursive=True))
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def prepare_record(o: RowOptions, src: str, row: int, location: str, raw: str,
                   obj: Any) -> tuple:
    """Normalize and validate one parsed record.

    Args:
        o: field mapping and limits.
        src: input file (or table) path; ``row``: 1-based row/line number; ``location``: as shown.
        raw: the record as read (stored, truncated, when quarantined).
        obj: the parsed record (a dict for valid input; anything else is quarantined).

    Returns:
        A tuple in :data:`PREPARED_COLUMNS` order; ``reason`` is None for a valid row, else the
        quarantine reason (``"<code>: <detail>"``).
    """
    if not isinstance(obj, dict):
        return _quarantined(o, src, row, location, raw,
                            f"not_an_object: a JSON {type(obj).__name__}, expected an object")
    value = obj.get(o.text_field, _MISSING)
    if value is _MISSING:
        return _quarantined(o, src, row, location, raw, f"missing: no field '{o.text_field}'")
    text, reason = clean_text(value, o.min_chars, o.max_chars, o.keep_paragraphs)
    if reason is not None:
        return _quarantined(o, src, row, location, raw, f"{reason} (field '{o.text_field}')")
    cid = content_id(text)
    rid = obj.get(o.id_field) if o.id_field else None
    if rid is None or rid == "":
        rid = cid
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return _quarantined(o, src, row, location, raw,
                            f"wrong_type: id field '{o.id_field}' is a {type(rid).__name__}")
    rid = str(rid)
    source = obj.get(o.source_field)
    source = o.default_source if source is None or source == "" else str(source)
    meta: dict[str, Any] = {}
    if isinstance(obj.get("metadata"), dict) and "metadata" not in (o.text_field, o.id_field, o.source_field):
        meta.update(obj["metadata"])
    for k, v in obj.items():
        if k not in (o.text_field, o.id_field, o.source_field) and not (k == "metadata" and isinstance(v, dict)):
            meta[k] = v
    metadata = json.dumps(_jsonable(meta), ensure_ascii=False, sort_keys=True) if meta else None
    for name, v in (("id", rid), ("source", source), ("metadata", metadata)):
        if v is not None and has_bad_unicode(v):
            return _quarantined(o, src, row, location, raw,
                                f"wrong_encoding: U+FFFD or a lone surrogate in the {name}")
    return (src, row, location, raw[:RAW_MAX_CHARS], text, rid, source, metadata, cid, None, None)


def prepare_line(o: RowOptions, src: str, index: int, line: str) -> tuple:
    """Parse one JSONL line (``index`` 0-based) into a prepared row (see :func:`prepare_record`).

    A whitespace-only line yields reason :data:`BLANK` (not an input row). A line with U+FFFD
    (undecodable bytes) is ``wrong_encoding`` before any parsing.
    """
    row, location = index + 1, f"line {index + 1}"
    if line.endswith("\r"):
        line = line[:-1]
    if index == 0 and line.startswith("\ufeff"):
        line = line[1:]
    if not line.strip():
        return (src, row, location, "", None, None, None, None, None, BLANK, None)
    if "\ufffd" in line:
        return _quarantined(o, src, row, location, line,
                            f"wrong_encoding: undecodable bytes (U+FFFD at character {line.index(chr(0xFFFD))})")
    try:
        obj = json.loads(line)
    except ValueError as exc:
        msg = f"{exc.msg} at column {exc.colno}" if hasattr(exc, "msg") else str(exc)
        return _quarantined(o, src, row, location, line, f"bad_json: {msg}")
    return prepare_record(o, src, row, location, line, obj)


def prepare_tabular(o: RowOptions, src: str, row: int, record: dict) -> tuple:
    """A Parquet/CSV/Delta row (as a dict, internal columns removed) into a prepared row."""
    raw = json.dumps(_jsonable(record), ensure_ascii=False, default=str)
    return prepare_record(o, src, row, f"row {row}", raw, record)


def prepare_file(o: RowOptions, src: str, content: str) -> tuple:
    """One text file (one document, read whole) into a prepared row.

    Args:
        src: the file's path as displayed and recorded (``/a/b.txt``, ``s3://...``); its base
            name goes into the metadata as ``file``.
    """
    rec = {o.text_field: content, "metadata": {"file": src.rstrip("/").rsplit("/", 1)[-1]}}
    return prepare_record(o, src, 1, "file", content, rec)
