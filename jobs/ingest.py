"""Ingestion job: raw queries and documents into the ``queries`` and ``documents`` Delta tables.

FineInstructions §3.1 collects real user queries and decontaminates them against common
benchmarks (Tulu 3 procedure); documents are the pre-training corpus. This job takes both from
files or tables, cleans them and merges them into Delta, accounting for every input row.

Inputs (detected from the path; local paths or any Hadoop URI):

* JSONL (``.jsonl``, ``.ndjson``, ``.json``, optionally ``.gz``/``.bz2``), or a folder of them:
  one JSON object per line, lines split on ``\\n`` only (U+2028 inside strings stays), read with
  ``newAPIHadoopFile`` + ``zipWithIndex`` so each row keeps its 1-based line number. Bytes that
  are not UTF-8 decode to U+FFFD and the line is quarantined as ``wrong_encoding``. Blank lines
  are not rows (as in Spark's own JSON reader); they are counted in ``blank_lines``.
* Parquet (``.parquet``/``.pq`` or a folder of them): 1-based ``row`` from ``_metadata.row_index``.
* CSV / TSV (header line, RFC 4180 quoting, multi-line fields): 1-based data row per file.
* A folder of text files (any other extensions): one document per top-level visible file.
* A Delta table (folder with ``_delta_log``): 1-based row in the snapshot's read order.

Field mapping: the text field defaults to ``query`` (queries) / ``text`` (documents); ``id_field``
(default none) gives the row id when mapped and present, else the id is the content hash of the
normalized text (:func:`finelake.method.text.content_id`); ``source_field`` defaults to ``source``,
falling back to the input file's name. All other fields become the ``metadata`` JSON object (a
``metadata`` field that is an object is merged into it).

Per input row, in this order:

1. parse, normalize and validate (:func:`finelake.method.text.clean_text`; queries collapse all
   whitespace, documents keep paragraph breaks); malformed rows go to ``quarantine`` with the
   input file, location (``line N`` / ``row N`` / ``file``), reason and raw text (first 4,096
   characters). Reason codes: ``wrong_encoding``, ``bad_json``, ``not_an_object``, ``missing``,
   ``wrong_type``, ``empty``, ``too_short``, ``too_long``.
2. queries only: decontamination against ``ingest.eval_sets`` with
   :class:`finelake.method.text.ContaminationIndex` (exact word match, or n-gram share >=
   threshold, or Tulu 3 coverage of one evaluation prompt >= threshold). It runs before dedup so
   that every duplicate points at a row that is in the table and every copy of a benchmark
   prompt counts as contaminated.
3. exact dedup in input order (file path, then line/row): a row whose normalized text (content
   hash) was seen earlier is dropped as ``duplicate``; then a row whose id was seen earlier is
   dropped as ``duplicate_id`` (only possible with ``id_field``).
4. near-duplicates: Spark ML ``MinHashLSH`` on hashed word 5-gram shingles proposes pairs with
   Jaccard >= ``near_dup_threshold`` (the join's Jaccard is exact on the hashed shingle sets).
   Rows are then visited in input order and a row is dropped as ``near_duplicate`` when a pair
   links it to an earlier row that is *kept* (greedy; a chain A~B~C with A and C dissimilar keeps
   A and C). ``kept_id`` is the earliest such kept row.

Every removed row goes to ``ingest_drops`` with its reason and the id it duplicates. Token counts
of the accepted rows use the training tokenizer (``tokenizer.model``), loaded once per Python
worker (:func:`with_token_counts`). All
writes are insert-only merges on deterministic keys (row ids; quarantine and drop ids hash the
target, input file, location and content), so a rerun adds no row.

Each table's :class:`~finelake.runtime.StageStats` line carries the invariant, checked in code::

    input rows = accepted + duplicates removed + decontaminated + quarantined
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional, Sequence
from urllib.parse import unquote

from finelake import storage
from finelake.config import IngestConfig
from finelake.method.text import (
    ContaminationIndex,
    SHINGLE_WORDS,
    clean_text,
    content_id,
    has_bad_unicode,
    shingles,
)
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.stage import Stage
from finelake.tables import DOCUMENTS, INGEST_DROPS, QUARANTINE, QUERIES, TableDef

log = logging.getLogger(__name__)

#: Characters of the raw input kept in ``quarantine.raw``.
RAW_MAX_CHARS = 4096
#: Hashed feature space of the MinHash shingle vectors (collisions are negligible below ~10^5
#: shingles per text).
NUM_FEATURES = 1 << 26
#: Seed of the MinHash functions (fixed: reruns find the same pairs).
MINHASH_SEED = 20240917

BLANK = "blank_line"
#: Reason codes of ``ingest_drops``.
DROP_REASONS = ("contaminated", "duplicate", "duplicate_id", "near_duplicate")

_JSONL_EXT = (".jsonl", ".ndjson", ".json")
_PARQUET_EXT = (".parquet", ".pq")
_CSV_EXT = (".csv", ".tsv")
_COMPRESSED = (".gz", ".bz2")


class IngestInvariantError(RuntimeError):
    """The row accounting of an ingest does not add up (a bug, not a user error)."""


# ----------------------------------------------------------------------------- inputs


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


def _display(uri: str) -> str:
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
    shown = _display(uri)
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


# ----------------------------------------------------------------------------- per-row parsing


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


def prepare_file(o: RowOptions, uri: str, content: str) -> tuple:
    """One text file (one document) into a prepared row; the file name goes into metadata."""
    src = _display(uri)
    rec = {o.text_field: content, "metadata": {"file": os.path.basename(src)}}
    return prepare_record(o, src, 1, "file", content, rec)


# ----------------------------------------------------------------------------- reading


def _prepared_schema():
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    return StructType([StructField(c, LongType() if c == "row" else StringType(), True)
                       for c in PREPARED_COLUMNS])


def read_prepared(spark, lake, spec: InputSpec, o: RowOptions):
    """Read an input into a DataFrame of prepared rows (:data:`PREPARED_COLUMNS`).

    Raises:
        FinelakeError: the text field is not a column of a tabular input (a missing id or
            source column only logs a warning: ids fall back to the content hash).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    sc = spark.sparkContext
    if spec.fmt == "jsonl":
        rdds = []
        for f in spec.files:
            src = _display(f)
            lines = sc.newAPIHadoopFile(
                f, "org.apache.hadoop.mapreduce.lib.input.TextInputFormat",
                "org.apache.hadoop.io.LongWritable", "org.apache.hadoop.io.Text",
                conf={"textinputformat.record.delimiter": "\n"}).values()
            rdds.append(lines.zipWithIndex().map(lambda li, src=src: prepare_line(o, src, li[1], li[0])))
        rdd = rdds[0] if len(rdds) == 1 else sc.union(rdds)
        return spark.createDataFrame(rdd, _prepared_schema())
    if spec.fmt == "text":
        # a single file, or the folder: wholeTextFiles reads its top-level visible files
        rdd = sc.wholeTextFiles(spec.uri).map(lambda kv: prepare_file(o, kv[0], kv[1]))
        return spark.createDataFrame(rdd, _prepared_schema())

    # tabular: Parquet, CSV, Delta -> (file, 1-based row, record dict)
    if spec.fmt == "parquet":
        df = spark.read.parquet(spec.uri)
        df = df.select("*", F.col("_metadata.file_path").alias("__file"),
                       (F.col("_metadata.row_index") + 1).alias("__row"))
    elif spec.fmt == "csv":
        df = (spark.read.option("header", True).option("multiLine", True).option("escape", '"')
              .option("sep", spec.sep).option("mode", "PERMISSIVE").csv(spec.uri))
        # multi-line CSV files are not split: one file is one partition, read in order
        df = df.select("*", F.col("_metadata.file_path").alias("__file"),
                       F.monotonically_increasing_id().alias("__mono"))
        w = Window.partitionBy("__file").orderBy("__mono")
        df = df.withColumn("__row", F.row_number().over(w).cast("long")).drop("__mono")
    elif spec.fmt == "delta":
        if lake.engine == "delta-spark":
            df = spark.read.format("delta").load(spec.uri)
        else:
            from finelake.lake import DATA_SOURCE_NAME

            df = spark.read.format(DATA_SOURCE_NAME).option("delta_path", spec.uri).load()
    else:  # pragma: no cover - resolve_input returns only the formats above
        raise FinelakeError(f"unsupported input format {spec.fmt}")

    data_cols = [c for c in df.columns if c not in ("__file", "__row")]
    if o.text_field not in data_cols:
        raise FinelakeError(f"{spec.path}: text field {o.text_field!r} is not a column of the input "
                            f"(columns: {', '.join(data_cols)})")
    for what, name in (("id", o.id_field), ("source", o.source_field)):
        if name is not None and name not in data_cols and (what == "id" or name != "source"):
            log.warning("%s: %s field %r is not a column; using the %s", spec.path, what, name,
                        "content hash" if what == "id" else f"file name ({o.default_source})")

    if spec.fmt == "delta":  # one partition per data file, in snapshot order
        src = spec.path
        rdd = df.rdd.zipWithIndex().map(
            lambda ri: prepare_tabular(o, src, ri[1] + 1, ri[0].asDict(recursive=False)))
    else:
        def to_row(r):
            d = r.asDict(recursive=False)
            f, row = d.pop("__file"), d.pop("__row")
            return prepare_tabular(o, _display(unquote(f)), int(row), d)  # file_path is URL-encoded

        rdd = df.rdd.map(to_row)
    return spark.createDataFrame(rdd, _prepared_schema())


# ----------------------------------------------------------------------------- eval sets

_EVAL_FIELDS = ("prompt", "instruction", "turns", "question", "query", "text")
_EVAL_KEYS = ("key", "question_id", "id")


def load_eval_texts(specs: Sequence[str], spark=None) -> tuple[list[str], list[str]]:
    """Evaluation prompts for decontamination.

    Args:
        specs: JSONL paths or URIs, or ``"package:eval"`` for the shipped sets
            (``eval_ifeval``, ``eval_alpacaeval``, ``eval_mt_bench``). Each line's text is the
            first present of ``prompt``, ``instruction``, ``turns`` (every turn), ``question``,
            ``query``, ``text``.
        spark: used to read URIs (``scheme://``); local files are read directly.

    Returns:
        ``(texts, names)``: one entry per prompt or turn; names look like ``ifeval:1000`` or
        ``mt_bench:81/turn2``.

    Raises:
        FinelakeError: a file is missing, or a line is not JSON or has none of the fields.
    """
    files: list[str] = []
    for s in specs:
        if s == "package:eval":
            root = resources.files("finelake.sample")
            files += sorted(str(root.joinpath(f.name)) for f in root.iterdir()
                            if f.name.startswith("eval_") and f.name.endswith(".jsonl"))
        else:
            files.append(s)
    texts, names = [], []
    for f in files:
        if storage.is_uri(f):
            lines = spark.sparkContext.textFile(f).collect()
        else:
            if not os.path.isfile(f):
                raise FinelakeError(f"evaluation set not found: {f} (ingest.eval_sets)")
            with open(f, encoding="utf-8") as fh:
                lines = fh.read().split("\n")
        label = os.path.basename(f).rsplit(".", 1)[0]
        label = label[5:] if label.startswith("eval_") else label
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise FinelakeError(f"evaluation set {f} line {i}: not JSON") from None
            fld = next((k for k in _EVAL_FIELDS if isinstance(obj, dict) and obj.get(k)), None)
            if fld is None:
                raise FinelakeError(f"evaluation set {f} line {i}: none of the fields "
                                    f"{', '.join(_EVAL_FIELDS)}")
            key = next((obj[k] for k in _EVAL_KEYS if obj.get(k) is not None), i)
            vals = obj[fld] if isinstance(obj[fld], list) else [obj[fld]]
            for t, v in enumerate(vals, 1):
                if isinstance(v, str) and v.strip():
                    texts.append(v)
                    names.append(f"{label}:{key}" + (f"/turn{t}" if len(vals) > 1 else ""))
    return texts, names


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class _Target:
    tdef: TableDef
    id_col: str
    text_col: str
    keep_paragraphs: bool
    decontaminate: bool


_QUERIES = _Target(QUERIES, "query_id", "query", keep_paragraphs=False, decontaminate=True)
_DOCUMENTS = _Target(DOCUMENTS, "doc_id", "text", keep_paragraphs=True, decontaminate=False)


def _contamination_udf(bc, threshold: float):
    from pyspark.sql import functions as F

    def why(text):
        m = bc.value.match(text)
        if not m.contaminated(threshold):
            return None
        rule = "exact match" if m.exact else f"ngram share {m.share:.2f}, coverage {m.coverage:.2f}"
        return f"contaminated: {rule} with {m.eval_name}"

    return F.udf(why, "string")


#: Texts per ``count_tokens`` call.
TOKEN_BATCH = 256


def with_token_counts(model: str, rows, text_index: int):
    """Append the token count of ``row[text_index]`` to every row of one partition.

    Runs in the Python workers of the RDD pool (``mapPartitions``): that pool keeps one worker
    per task slot, so the tokenizer (cached per process by :func:`count_tokens`) loads once per
    slot. A pandas UDF would run in Spark SQL's Python worker pool, which rotates over every
    worker the job's other UDFs started, so each of them paid the 10-20 s tokenizer load.

    Args:
        model: ``tokenizer.model``.
        rows: an iterator of tuples; ``text_index``: position of the text in each.

    Yields:
        ``(*row, num_tokens)`` in input order, counted in batches of :data:`TOKEN_BATCH`.
    """
    from finelake.models.tokenizer import count_tokens

    batch: list = []
    for r in rows:
        batch.append(tuple(r))
        if len(batch) >= TOKEN_BATCH:
            yield from (b + (n,) for b, n in zip(batch, count_tokens(model, [b[text_index] for b in batch])))
            batch = []
    if batch:
        yield from (b + (n,) for b, n in zip(batch, count_tokens(model, [b[text_index] for b in batch])))


def near_duplicates(spark, df, threshold: float, hash_tables: int) -> list[tuple]:
    """Greedy near-duplicate removal plan for ``df`` (columns ``src``, ``row``, ``rid``, ``text``).

    Candidate pairs come from Spark ML ``MinHashLSH.approxSimilarityJoin`` on binary
    ``HashingTF`` vectors of :func:`~finelake.method.text.shingles` (word 5-grams); the join's
    distance is the exact Jaccard distance of the hashed shingle sets, so only pairs with
    Jaccard >= ``threshold`` are kept. Rows without shingles (no word characters) are skipped.
    Only the pairs come to the driver.

    Returns:
        ``[(src, row, kept_rid, jaccard)]`` for every row to drop: visited in input order, a row
        is dropped when it pairs with an earlier row that is kept; ``kept_rid`` is the earliest
        such row.
    """
    from pyspark.ml.feature import HashingTF, MinHashLSH
    from pyspark.sql import functions as F

    sh = F.udf(lambda t: shingles(t, SHINGLE_WORDS), "array<string>")
    feats = (df.select("src", "row", "rid", sh("text").alias("sh")).filter(F.size("sh") > 0))
    feats = HashingTF(inputCol="sh", outputCol="features", numFeatures=NUM_FEATURES,
                      binary=True).transform(feats).drop("sh")
    lsh = MinHashLSH(inputCol="features", outputCol="hashes", numHashTables=hash_tables,
                     seed=MINHASH_SEED)
    model = lsh.fit(feats)
    hashed = model.transform(feats).persist()
    try:
        max_dist = 1.0 - threshold
        pairs = model.approxSimilarityJoin(hashed, hashed, max_dist + 1e-9, distCol="dist")
        a, b = F.col("datasetA"), F.col("datasetB")
        earlier = (a["src"] < b["src"]) | ((a["src"] == b["src"]) & (a["row"] < b["row"]))
        rows = (pairs.filter(earlier & (F.col("dist") <= max_dist + 1e-12))
                .select(a["src"].alias("a_src"), a["row"].alias("a_row"), a["rid"].alias("a_rid"),
                        b["src"].alias("b_src"), b["row"].alias("b_row"), "dist")
                .collect())
    finally:
        hashed.unpersist()
    earlier_of: dict[tuple, list[tuple]] = {}
    for r in rows:
        earlier_of.setdefault((r.b_src, r.b_row), []).append(((r.a_src, r.a_row), r.a_rid, 1.0 - r.dist))
    dropped: dict[tuple, tuple] = {}
    for key in sorted(earlier_of):
        kept = sorted(c for c in earlier_of[key] if c[0] not in dropped)
        if kept:
            dropped[key] = (kept[0][1], kept[0][2])
    return [(k[0], k[1], rid, sim) for k, (rid, sim) in sorted(dropped.items())]


def check_invariant(table: str, rows_in: int, accepted: int, dropped: dict[str, int],
                    quarantined: int) -> str:
    """Check ``input rows = accepted + duplicates removed + decontaminated + quarantined``.

    Args:
        table: target table (for the message).
        rows_in: input rows (blank JSONL lines excluded); ``accepted``: rows written or already
            present; ``dropped``: removed rows by reason code (``contaminated`` is the
            decontaminated count, every other code a duplicate); ``quarantined``: malformed rows.

    Returns:
        The equation as printed, e.g. ``"2000=1956+38+6+0 (input=accepted+...)"``.

    Raises:
        IngestInvariantError: the two sides differ.
    """
    n_cont = dropped.get("contaminated", 0)
    n_dups = sum(v for k, v in dropped.items() if k != "contaminated")
    equation = (f"{rows_in}={accepted}+{n_dups}+{n_cont}+{quarantined}"
                f" (input=accepted+duplicates+decontaminated+quarantined)")
    if rows_in != accepted + n_dups + n_cont + quarantined:
        raise IngestInvariantError(f"ingest {table}: rows do not add up: {equation} is false")
    return equation


def _ingest_one(ctx: StageContext, t: _Target, spec: InputSpec, o: RowOptions, rows,
                index: Optional[ContaminationIndex]) -> StageStats:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StringType, StructField, StructType
    from pyspark.sql.window import Window

    cfg: IngestConfig = ctx.cfg.ingest
    spark, lake, name = ctx.spark, ctx.lake, t.tdef.name
    stats = StageStats(f"ingest:{name}")
    cached, broadcasts = [], []
    clock = [time.monotonic()]

    def step(what: str) -> None:
        now = time.monotonic()
        log.info("ingest %s: %s %.1fs", name, what, now - clock[0])
        clock[0] = now

    def keep(df):
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(df)
        return df

    try:
        prepared = keep(rows)
        code = F.split(F.col("reason"), ":").getItem(0)
        by_code = {r["code"]: r["n"] for r in
                   prepared.groupBy(code.alias("code")).agg(F.count(F.lit(1)).alias("n")).collect()}
        blank = by_code.pop(BLANK, 0)
        valid = by_code.pop(None, 0)
        quarantined = sum(by_code.values())
        if not valid and set(by_code) == {"missing"}:
            log.warning("ingest %s: no row of %s has the field %r; map it with --%s-field", name,
                        spec.path, o.text_field, "query" if name == "queries" else "text")
        rows_in = valid + quarantined
        step("read and validate")

        drop_cols = ["src", "row", "location", "content_id", "reason", "kept_id"]
        drops = []
        good = prepared.filter(F.col("reason").isNull()).select(
            "src", "row", "location", "text", "rid", "source", "metadata", "content_id")

        # 1. decontamination (queries)
        if t.decontaminate and index is not None:
            bc = spark.sparkContext.broadcast(index)
            broadcasts.append(bc)
            flagged = keep(good.withColumn("reason", _contamination_udf(bc, cfg.decontamination_threshold)("text")))
            drops.append(flagged.filter(F.col("reason").isNotNull())
                         .withColumn("kept_id", F.lit(None).cast("string")).select(*drop_cols))
            good = flagged.filter(F.col("reason").isNull()).drop("reason")

        # 2. exact duplicates: same normalized text, then same id; the first in input order stays
        for col, reason in (("content_id", "duplicate: same normalized text as the kept row"),
                            ("rid", "duplicate_id: same id as the kept row")):
            if col == "rid" and not o.id_field:
                continue
            w = Window.partitionBy(col).orderBy("src", "row")
            ranked = (good.withColumn("__rn", F.row_number().over(w))
                      .withColumn("kept_id", F.first("rid").over(w)))
            drops.append(ranked.filter(F.col("__rn") > 1).withColumn("reason", F.lit(reason))
                         .select(*drop_cols))
            good = ranked.filter(F.col("__rn") == 1).drop("__rn", "kept_id")
        good = keep(good)

        # 3. near duplicates
        if cfg.near_dup:
            plan = near_duplicates(spark, good, cfg.near_dup_threshold, cfg.near_dup_hash_tables)
            plan_df = spark.createDataFrame(
                [(s, r, k, f"near_duplicate: word-5-gram jaccard {j:.2f} with the kept row")
                 for s, r, k, j in plan],
                StructType([StructField("src", StringType()), StructField("row", LongType()),
                            StructField("kept_id", StringType()), StructField("reason", StringType())]))
            drops.append(good.join(plan_df, ["src", "row"], "inner").select(*drop_cols))
            good = good.join(plan_df.select("src", "row"), ["src", "row"], "left_anti")
            step(f"decontaminate, dedup, near-duplicates ({len(plan)} found)")

        # 4. token counts and the table rows
        model = ctx.cfg.tokenizer.model
        rows = good.select("rid", "text", "source", "metadata").rdd.mapPartitions(
            lambda it: with_token_counts(model, it, 1))
        accepted = keep(spark.createDataFrame(rows, StructType([
            StructField(c, LongType() if c == "n" else StringType())
            for c in ("rid", "text", "source", "metadata", "n")])).select(
            F.col("rid").alias(t.id_col), F.col("text").alias(t.text_col), "source",
            F.col("n").alias("num_tokens"), "metadata", F.lit(ctx.run_id).alias("run_id")))
        n_accepted = accepted.count()
        step("token counts")

        drops_df = keep(functools.reduce(lambda a, b: a.unionByName(b), drops)) if drops else None
        drop_counts = ({r["code"]: r["n"] for r in drops_df.groupBy(code.alias("code"))
                        .agg(F.count(F.lit(1)).alias("n")).collect()} if drops_df is not None else {})
        for k, v in sorted(drop_counts.items()):
            stats.drop(k, v)
        equation = check_invariant(name, rows_in, n_accepted, drop_counts, quarantined)

        # 5. writes (insert-only merges on deterministic keys)
        res = lake.merge(t.tdef, accepted, ctx.run_id)
        q = (prepared.filter(F.col("reason").isNotNull() & (F.col("reason") != BLANK))
             .select("quarantine_id", F.lit(name).alias("target"), F.col("src").alias("source"),
                     "location", "reason", "raw", F.lit(ctx.run_id).alias("run_id")))
        q_res = lake.merge(QUARANTINE, q, ctx.run_id)
        d_res = None
        if drops_df is not None:
            d = drops_df.select(
                F.substring(F.sha1(F.concat_ws("\u001f", F.lit(name), "src", "location", "content_id")),
                            1, 20).alias("drop_id"),
                F.lit(name).alias("target"), F.col("src").alias("source"), "location", "reason",
                "kept_id", F.lit(ctx.run_id).alias("run_id"))
            d_res = lake.merge(INGEST_DROPS, d, ctx.run_id)
        else:
            lake.create(INGEST_DROPS)

        step("merge")
        stats.rows_in = rows_in
        stats.rows_out = n_accepted
        stats.quarantined = quarantined
        stats.extra["inserted"] = res.inserted
        if quarantined:
            stats.extra["quarantine"] = "(" + ", ".join(f"{k}={v}" for k, v in sorted(by_code.items())) + ")"
        if blank:
            stats.extra["blank_lines"] = blank
        stats.extra["check"] = equation
        stats.extra["input"] = f"{spec.fmt}:{spec.path}"
        log.info("ingest %s: %s; merged %d new rows, %d quarantine rows, %d drop rows", name, equation,
                 res.inserted, q_res.inserted, d_res.inserted if d_res else 0)
        return stats.finish()
    finally:
        for df in cached:
            df.unpersist()
        for b in broadcasts:
            b.unpersist()


def run_ingest(ctx: StageContext, queries: Optional[str] = None, documents: Optional[str] = None,
               query_field: Optional[str] = None, text_field: Optional[str] = None,
               id_field: Optional[str] = None, source_field: Optional[str] = None) -> list[StageStats]:
    """Ingest queries and documents into Delta (see the module docstring for every rule).

    Args:
        ctx: stage context (config ``ingest.*`` and ``tokenizer.model``, run id, Spark, lake).
        queries, documents: input paths (JSONL/Parquet/CSV file or folder, text folder, Delta
            table, any Hadoop URI). Only the inputs named are read: None leaves that table as it
            is (the shipped sample is the input of ``finelake run`` alone, when it names neither).
        query_field: text field of queries (default ``query``); ``text_field``: of documents
            (default ``text``).
        id_field: field holding the row id (default: the content hash of the normalized text).
        source_field: field holding the source name (default ``source``; else the file name).

    Returns:
        One :class:`StageStats` per input named (queries first); each ``rows_in`` = ``rows_out`` + dropped +
        ``quarantined`` and ``extra["check"]`` spells the equation out.

    Raises:
        FinelakeError: neither input named; an input or evaluation set is missing or unreadable,
            or a mapped field is not a column of a tabular input (both inputs are checked before
            anything is written).
        IngestInvariantError: the row accounting does not add up (a bug).
    """
    cfg: IngestConfig = ctx.cfg.ingest
    spark = ctx.spark
    if queries is None and documents is None:
        raise FinelakeError("ingest needs --queries and/or --documents (only the inputs named are "
                            "read; `finelake run` with neither ingests the shipped sample)")
    specs = (resolve_input(spark, queries, "queries") if queries is not None else None,
             resolve_input(spark, documents, "documents") if documents is not None else None)
    index = None
    if cfg.decontaminate:
        texts, names = load_eval_texts(cfg.eval_sets, spark)
        if texts:
            index = ContaminationIndex(texts, cfg.decontamination_ngram, names=names)
            log.info("decontamination: %d evaluation prompts, %d distinct %d-grams", len(index),
                     index.num_ngrams, cfg.decontamination_ngram)
        else:
            log.warning("ingest.decontaminate is on but ingest.eval_sets gave no prompts")
    jobs = []
    for t, spec, fld in ((_QUERIES, specs[0], query_field or "query"),
                         (_DOCUMENTS, specs[1], text_field or "text")):
        if spec is None:
            continue
        o = RowOptions(target=t.tdef.name, text_field=fld, id_field=id_field,
                       source_field=source_field or "source", default_source=spec.default_source,
                       min_chars=cfg.min_chars, max_chars=cfg.max_chars,
                       keep_paragraphs=t.keep_paragraphs)
        # built (lazily) for both inputs first: a bad field mapping fails before any write
        jobs.append((t, spec, o, read_prepared(spark, ctx.lake, spec, o)))
    out = [_ingest_one(ctx, t, spec, o, rows, index) for t, spec, o, rows in jobs]
    for tdef in (QUERIES, DOCUMENTS, QUARANTINE, INGEST_DROPS):
        if ctx.lake.exists(tdef):
            ctx.lake.register(tdef)
    return out


INGEST = Stage(
    name="ingest",
    help="Ingest queries and/or documents into Delta (normalize, dedup, decontaminate, "
         "quarantine); only the inputs named are read.",
    reads=(), writes=(QUERIES, DOCUMENTS, QUARANTINE, INGEST_DROPS),
    run=lambda ctx, limits, **inputs: run_ingest(ctx, **inputs), options=("inputs",))
"""ingest as a stage (:mod:`finelake.stage`)."""


def main(argv: Optional[list[str]] = None) -> None:
    """``spark-submit jobs/ingest.py --conf conf/local.yaml [--queries PATH ...]``: the CLI's ingest."""
    from finelake.jobs.common import job_main

    job_main("ingest", argv)


if __name__ == "__main__":  # pragma: no cover
    main()
