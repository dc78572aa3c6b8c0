"""Where an ingest input is and what format it has (the readers then read it by format).

:func:`resolve_input` classifies a path through Spark's Hadoop file system, so any URI the
cluster reads works (``s3://``, ``abfss://``, ``dbfs:/``, local paths): a JSONL, Parquet, CSV/TSV
or text file; a folder of one of those formats; a folder of text files; a Delta table (a folder
with ``_delta_log``). :class:`InputSpec` carries the answer to the matching reader
(:mod:`finelake.jobs.ingestion.readers`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from typing import Optional

from finelake import storage
from finelake.errors import FinelakeError

log = logging.getLogger(__name__)

_JSONL_EXT = (".jsonl", ".ndjson", ".json")
_PARQUET_EXT = (".parquet", ".pq")
_CSV_EXT = (".csv", ".tsv")
_COMPRESSED = (".gz", ".bz2")


@dataclass(frozen=True)
class InputSpec:
    """A resolved input.

    Attributes:
        path: the path as displayed and recorded (local paths absolute, without ``file:``).
        uri: the Hadoop path Spark reads.
        fmt: ``jsonl``, ``parquet``, ``csv``, ``text`` or ``delta``.
        files: for ``jsonl`` and ``text``, the files to read (sorted Hadoop URIs).
        sep: CSV separator.
    """

    path: str
    uri: str
    fmt: str
    files: tuple[str, ...] = ()
    sep: str = ","

    @property
    def default_source(self) -> str:
        """Source name when a row has none: the file or folder name without extensions."""
        name = os.path.basename(self.path.rstrip("/")) or "input"
        for ext in _COMPRESSED + _JSONL_EXT + _PARQUET_EXT + _CSV_EXT + (".txt",):
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
        return name or "input"


def display(uri: str) -> str:
    """``file:/a/b`` and ``file:///a/b`` -> ``/a/b``; other URIs unchanged."""
    if uri.startswith("file:"):
        rest = uri[5:]
        return "/" + rest.lstrip("/")
    return uri


def _fmt_of(name: str) -> Optional[str]:
    n = name.lower()
    for c in _COMPRESSED:
        if n.endswith(c):
            n = n[: -len(c)]
    if n.endswith(_JSONL_EXT):
        return "jsonl"
    if n.endswith(_PARQUET_EXT):
        return "parquet"
    if n.endswith(".tsv"):
        return "tsv"
    if n.endswith(".csv"):
        return "csv"
    return None


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def sample_path(name: str) -> str:
    """Absolute path of a file of the shipped sample (``finelake.sample``), e.g. ``queries.jsonl``."""
    return str(resources.files("finelake.sample").joinpath(name))


def resolve_input(spark, path: Optional[str], what: str) -> InputSpec:
    """Find and classify an input path (see the module docstring for the formats).

    Args:
        spark: the session (its Hadoop file system is used, so any URI Spark reads works).
        path: file, folder or URI; None for the shipped sample (``<what>.jsonl``).
        what: ``"queries"`` or ``"documents"`` (for messages and the default).

    Raises:
        FinelakeError: the path does not exist, is an empty folder, has an unsupported
            extension, or a folder mixes data formats.
    """
    if path is None:
        path = sample_path(f"{what}.jsonl")
    path = str(path)
    uri = path if storage.is_uri(path) else os.path.abspath(os.path.expanduser(path))
    jvm, fs, hpath = storage.hadoop_fs(spark, uri)
    if not fs.exists(hpath):
        raise FinelakeError(f"{what} input not found: {path} (expected a JSONL, Parquet or CSV file "
                            f"or folder, a folder of text files, or a Delta table)")
    shown = display(uri)
    if not fs.getFileStatus(hpath).isDirectory():
        fmt = _fmt_of(uri)
        if fmt is None:
            if uri.lower().endswith((".txt", ".md", ".text")):
                return InputSpec(shown, uri, "text", files=(uri,))
            raise FinelakeError(f"{what} input {path}: unsupported file type (use .jsonl, .parquet, "
                                f".csv, .tsv, .txt, a folder of text files, or a Delta table)")
        return InputSpec(shown, uri, "csv" if fmt == "tsv" else fmt, files=(uri,),
                         sep="\t" if fmt == "tsv" else ",")
    if fs.exists(jvm.org.apache.hadoop.fs.Path(hpath, "_delta_log")):
        return InputSpec(shown, uri, "delta")
    files, top = [], []
    it = fs.listFiles(hpath, True)
    base = hpath.toUri().getPath().rstrip("/")
    while it.hasNext():
        p = it.next().getPath()
        rel = p.toUri().getPath()[len(base):].lstrip("/")
        if not _hidden(rel):
            files.append(p.toString())
            if "/" not in rel:
                top.append(p.toString())
    if not files:
        raise FinelakeError(f"{what} input {path}: the folder holds no visible files")
    fmts = {_fmt_of(f) for f in files}
    if fmts == {"jsonl"}:
        return InputSpec(shown, uri, "jsonl", files=tuple(sorted(files)))
    if fmts == {"parquet"}:
        return InputSpec(shown, uri, "parquet")
    if fmts in ({"csv"}, {"tsv"}):
        return InputSpec(shown, uri, "csv", sep="\t" if fmts == {"tsv"} else ",")
    if fmts == {None}:
        if len(top) < len(files):
            log.warning("%s: text folder: only its %d top-level files are read (%d in sub-folders "
                        "are ignored)", path, len(top), len(files) - len(top))
        if not top:
            raise FinelakeError(f"{what} input {path}: no text files at the top of the folder")
        return InputSpec(shown, uri, "text", files=tuple(sorted(top)))
    raise FinelakeError(f"{what} input {path}: the folder mixes formats "
                        f"({', '.join(sorted(str(f) for f in fmts))}); give one format per input")

