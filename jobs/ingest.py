"""Ingestion job: raw queries and documents into the ``queries`` and ``documents`` Delta tables.

FineInstructions §3.1 collects real user queries and decontaminates them against common
benchmarks (Tulu 3 procedure); documents are the pre-training corpus. This job takes both from
files or tables, cleans them and merges them into Delta, accounting for every input row. Its
parts, one concern each (datatrove's layout: readers, filters, dedup, decont):

* where an input is and its format: :mod:`finelake.jobs.ingestion.inputs`;
* a reader per format (JSONL, Parquet, CSV/TSV, text folder, Delta):
  :mod:`finelake.jobs.ingestion.readers`;
* one record into one normalized, validated row (pure): :mod:`finelake.method.records`;
* decontamination of queries: :mod:`finelake.jobs.ingestion.decontamination`;
* document quality filters (datatrove's, pure wrapper): :mod:`finelake.method.document_filters`,
  run per partition by :mod:`finelake.jobs.ingestion.annotate` (with the token counts);
* exact and near-duplicate removal: :mod:`finelake.jobs.ingestion.dedup`;
* this module: the order of the steps, the accounting and the writes.

Inputs (detected from the path; local paths or any Hadoop URI): JSONL (``.jsonl``, ``.ndjson``,
``.json``, optionally ``.gz``/``.bz2``) or a folder of them; Parquet (``.parquet``/``.pq``) or a
folder; CSV / TSV (header line, RFC 4180 quoting, multi-line fields) or a folder; a folder of text
files (one document per top-level visible file); a Delta table (folder with ``_delta_log``).
Each reader's module says how rows and their 1-based locations are read.

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
2. queries: decontamination against ``ingest.eval_sets`` with
   :class:`finelake.method.text.ContaminationIndex` (exact word match, or n-gram share >=
   threshold, or Tulu 3 coverage of one evaluation prompt >= threshold).
   documents: the quality filters of ``ingest.filters`` (datatrove's Gopher, FineWeb, C4), drop
   reason ``<filter>:<datatrove reason>``.
   Both run before dedup so that every duplicate points at a row that is in the table, every
   copy of a benchmark prompt counts as contaminated and every copy of a rejected document as
   rejected.
3. exact dedup in input order (file path, then line/row): a row whose normalized text (content
   hash) was seen earlier is dropped as ``duplicate``; then a row whose id was seen earlier is
   dropped as ``duplicate_id`` (only possible with ``id_field``).
4. near-duplicates: Spark ML ``MinHashLSH`` on hashed word 5-gram shingles proposes pairs with
   Jaccard >= ``near_dup_threshold``; the connected components of those pairs are the clusters,
   resolved in Spark. Each cluster keeps its earliest row in input order and the others are
   dropped as ``near_duplicate`` with ``kept_id`` that row (a chain A~B~C with A and C
   dissimilar keeps A only).

Every removed row goes to ``ingest_drops`` with its reason and, for duplicates, the id it
duplicates. Token counts of the accepted rows use the training tokenizer (``tokenizer.model``),
loaded once per Python worker. All writes are insert-only merges on deterministic keys (row ids;
quarantine and drop ids hash the target, input file, location and content), so a rerun adds no
row.

Each table's :class:`~finelake.runtime.StageStats` line carries the invariant, checked in code::

    input rows = accepted + duplicates removed + decontaminated + quarantined + filtered
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Optional

from finelake.config import IngestConfig
from finelake.jobs.ingestion.annotate import TOKEN_BATCH, with_filter_reasons, with_token_counts
from finelake.jobs.ingestion.decontamination import contamination_udf, load_eval_texts
from finelake.jobs.ingestion.dedup import (
    DROP_COLUMNS,
    MINHASH_SEED,
    NUM_FEATURES,
    exact_duplicates,
    near_duplicates,
)
from finelake.jobs.ingestion.inputs import InputSpec, resolve_input, sample_path
from finelake.jobs.ingestion.readers import read_prepared
from finelake.method.document_filters import FilterSpec, check_filters, filter_specs
from finelake.method.records import (
    BLANK,
    PREPARED_COLUMNS,
    RAW_MAX_CHARS,
    RowOptions,
    prepare_file,
    prepare_line,
    prepare_record,
    prepare_tabular,
)
from finelake.method.text import ContaminationIndex
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.stage import Stage
from finelake.tables import DOCUMENTS, INGEST_DROPS, QUARANTINE, QUERIES, TableDef

__all__ = [  # what other modules and the tests import from here, wherever it now lives
    "BLANK", "DROP_REASONS", "MINHASH_SEED", "NUM_FEATURES", "PREPARED_COLUMNS", "RAW_MAX_CHARS",
    "TOKEN_BATCH", "IngestInvariantError", "InputSpec", "RowOptions", "check_invariant",
    "load_eval_texts", "near_duplicates", "prepare_file", "prepare_line", "prepare_record",
    "prepare_tabular", "read_prepared", "resolve_input", "run_ingest", "sample_path",
    "with_token_counts",
]

log = logging.getLogger(__name__)

#: Reason codes of ``ingest_drops`` other than the quality filters' (``<filter>:<reason>``).
DROP_REASONS = ("contaminated", "duplicate", "duplicate_id", "near_duplicate")


class IngestInvariantError(RuntimeError):
    """The row accounting of an ingest does not add up (a bug, not a user error)."""


@dataclass(frozen=True)
class _Target:
    tdef: TableDef
    id_col: str
    text_col: str
    keep_paragraphs: bool
    decontaminate: bool
    quality_filters: bool


#: Columns of a well-formed input row on its way through the steps.
_GOOD_COLUMNS = ("src", "row", "location", "text", "rid", "source", "metadata", "content_id")

_QUERIES = _Target(QUERIES, "query_id", "query", keep_paragraphs=False, decontaminate=True,
                   quality_filters=False)
_DOCUMENTS = _Target(DOCUMENTS, "doc_id", "text", keep_paragraphs=True, decontaminate=False,
                     quality_filters=True)

#: Reason codes that count as duplicates in the invariant.
_DUPLICATE_CODES = ("duplicate", "duplicate_id", "near_duplicate")


def check_invariant(table: str, rows_in: int, accepted: int, dropped: dict[str, int],
                    quarantined: int) -> str:
    """Check ``input rows = accepted + duplicates + decontaminated + quarantined + filtered``.

    Args:
        table: target table (for the message).
        rows_in: input rows (blank JSONL lines excluded); ``accepted``: rows written or already
            present; ``dropped``: removed rows by reason code (``contaminated`` is the
            decontaminated count; ``duplicate``, ``duplicate_id`` and ``near_duplicate`` are
            duplicates; any other code, ``<filter>:<reason>``, a quality filter's rejection);
            ``quarantined``: malformed rows.

    Returns:
        The equation as printed, e.g. ``"2000=1956+38+6+0+0 (input=accepted+...)"``.

    Raises:
        IngestInvariantError: the two sides differ.
    """
    n_cont = dropped.get("contaminated", 0)
    n_dups = sum(v for k, v in dropped.items() if k in _DUPLICATE_CODES)
    n_filtered = sum(v for k, v in dropped.items() if k != "contaminated" and k not in _DUPLICATE_CODES)
    equation = (f"{rows_in}={accepted}+{n_dups}+{n_cont}+{quarantined}+{n_filtered}"
                f" (input=accepted+duplicates+decontaminated+quarantined+filtered)")
    if rows_in != accepted + n_dups + n_cont + quarantined + n_filtered:
        raise IngestInvariantError(f"ingest {table}: rows do not add up: {equation} is false")
    return equation


def _ingest_one(ctx: StageContext, t: _Target, spec: InputSpec, o: RowOptions, rows,
                index: Optional[ContaminationIndex], filters: tuple[FilterSpec, ...]) -> StageStats:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StringType, StructField, StructType

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

        drops = []
        good = prepared.filter(F.col("reason").isNull()).select(*_GOOD_COLUMNS)

        def flag(df):  # rows with a drop reason -> drops; the others stay
            df = keep(df)
            drops.append(df.filter(F.col("reason").isNotNull())
                         .withColumn("kept_id", F.lit(None).cast("string")).select(*DROP_COLUMNS))
            return df.filter(F.col("reason").isNull()).drop("reason")

        # 1. decontamination (queries), quality filters (documents)
        if t.decontaminate and index is not None:
            bc = spark.sparkContext.broadcast(index)
            broadcasts.append(bc)
            good = flag(good.withColumn("reason", contamination_udf(bc, cfg.decontamination_threshold)("text")))
        if t.quality_filters and filters:
            text_at = _GOOD_COLUMNS.index("text")
            verdicts = good.rdd.mapPartitions(lambda it: with_filter_reasons(filters, it, text_at))
            good = flag(spark.createDataFrame(verdicts, StructType([
                StructField(c, LongType() if c == "row" else StringType())
                for c in (*_GOOD_COLUMNS, "reason")])))

        # 2. exact duplicates: same normalized text, then same id; the first in input order stays
        good, exact = exact_duplicates(good, by_id=bool(o.id_field))
        drops += exact
        good = keep(good)

        # 3. near duplicates: clusters resolved in Spark, each keeps its earliest row
        if cfg.near_dup:
            plan = keep(near_duplicates(spark, good, cfg.near_dup_threshold,
                                        cfg.near_dup_hash_tables, keep))
            drops.append(plan)
            good = good.join(plan.select("src", "row"), ["src", "row"], "left_anti")
        step("decontaminate, filter, dedup, near-duplicates")

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
        # codes: the reason up to ": " (a quality filter's "<filter>:<reason>" is whole)
        drop_code = F.split(F.col("reason"), ": ").getItem(0)
        drop_counts = ({r["code"]: r["n"] for r in drops_df.groupBy(drop_code.alias("code"))
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
            anything is written); ``ingest.filters`` is set and datatrove or spaCy is missing.
        ConfigError: ``ingest.filters`` gives an option its datatrove filter does not take.
        IngestInvariantError: the row accounting does not add up (a bug).
    """
    cfg: IngestConfig = ctx.cfg.ingest
    spark = ctx.spark
    if queries is None and documents is None:
        raise FinelakeError("ingest needs --queries and/or --documents (only the inputs named are "
                            "read; `finelake run` with neither ingests the shipped sample)")
    filters = filter_specs(cfg.filters) if documents is not None else ()
    if filters:
        check_filters(filters)  # names, options and packages, before anything is read
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
    out = [_ingest_one(ctx, t, spec, o, rows, index, filters) for t, spec, o, rows in jobs]
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
