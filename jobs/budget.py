"""budget: judged pairs -> ``pairs`` and ``budget_ledger`` (§4.2 and its footnote).

Per document, a seeded random subset of its kept (judged >= min score) pairs is taken whose total
tokens — counted on the formatted text ``Instruction: {instruction}\\n\\nAnswer: {answer}`` with the
training tokenizer — do not exceed the document's own token count plus the budget earlier
documents of its walk left unused.

The walk runs on the executors as ``budget.buckets`` (B) independent walks: a document belongs to
bucket :func:`finelake.method.budget.budget_bucket` (a hash of its id modulo B) and each bucket is
walked sequentially, with its own carry, in the fixed hashed order
(:func:`finelake.method.budget.budget_order_key`; ``budget_order`` is the position within the
bucket). Nothing per pair reaches the driver, only per-bucket totals. B=1 is the single walk of
the paper. The invariant (pair tokens <= document tokens + carry in) holds per bucket, hence
overall.

Incremental runs: the ledger is append-only. A run walks the documents that became ready since
the last run; each bucket continues from its own last ledger row (its ``carry_out``, position + 1),
so rollover is never reset and never moves between buckets. Which documents a run walks depends on
what was ready when it ran; within a run the order depends only on the document ids, so reruns
and a killed-then-resumed run give the same rows as an uninterrupted one. B is fixed per lake
(budget refuses another value: the carries cannot be split or merged). A ledger written before
buckets existed gets the new columns added (null): its rows are the single walk, bucket 0 of 1.

Writes: first the ledger rows, each with ``kept_pair_ids``, in one commit; then ``pairs`` is
derived from the ledger: every kept id that ``pairs`` lacks (this run's, and any left by a run
killed between the two writes) is written. So ``pairs`` is always a subset of the ledger's kept
pairs, and equal to it after any completed run.

Before the walk every kept pair is checked against its own document with the tag-blind grounding
rule (:func:`finelake.method.excerpts.grounding_failure`: >= ``instantiate.min_excerpt_ratio`` of
the answer in runs of >= ``instantiate.grounding_min_run_chars`` characters copied from the
document). Instantiate applies the same rule, so this should never fire; when it does (an older
run's rows, a custom instantiator, a join gone wrong) the pair never reaches ``pairs``: it is
written to ``quarantine`` (target ``pairs``, the reason, the pair as JSON) and spends no budget,
or with ``budget.on_ungrounded: fail`` the stage stops before it writes anything.

A document is ready when every one of its matches has a final instantiation and every ``ok``
instantiation a final judgment (:func:`unready_documents`): a row with status ``retry`` (a
transient failure the next run retries, :mod:`finelake.faults`) holds its document back; an
``error`` row (quarantined) does not.

    spark-submit bin/finelake_job.py budget --conf conf/local.yaml
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

import pandas as pd
import pyarrow as pa

from finelake.jobs.common import fail_point, require
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.stage import Gate, Stage
from finelake.tables import (BUDGET_LEDGER, DOCUMENTS, INSTANTIATIONS, JUDGMENTS, MATCH_LOG, MATCHES,
                             PAIRS, QUARANTINE)

log = logging.getLogger(__name__)

STAGE = "budget"


def count_partition(batches: Iterator[pd.DataFrame], tokenizer: str, min_ratio: float,
                    min_run_chars: int) -> Iterator[pd.DataFrame]:
    """Executor side: pairs with their document's text (``doc_text``) in; the same rows without
    it, plus ``text`` (the formatted pair), ``num_tokens`` (training tokenizer) and ``ungrounded``
    (None, or why the answer is not grounded in the document) out."""
    from finelake.method.budget import format_pair
    from finelake.method.excerpts import grounding_failure
    from finelake.models.tokenizer import count_tokens

    for pdf in batches:
        out = pdf.drop(columns=["doc_text"])
        out["text"] = [format_pair(i, a) for i, a in zip(pdf["instruction"], pdf["answer"])]
        out["num_tokens"] = count_tokens(tokenizer, out["text"])
        out["ungrounded"] = [grounding_failure(a, d, min_ratio, min_run_chars)
                             for a, d in zip(pdf["answer"], pdf["doc_text"])]
        yield out


def quarantine_rows(rows) -> list[dict]:
    """``quarantine`` rows (target ``pairs``) for pairs refused by the grounding check."""
    import json

    from finelake.jobs.common import stable_hash

    return [{"quarantine_id": stable_hash("pairs", "budget", r["pair_key"], n=20), "target": "pairs",
             "source": "budget", "location": f"doc_id={r['doc_id']} pair_key={r['pair_key']}",
             "reason": r["ungrounded"],
             "raw": json.dumps({"instruction": r["instruction"], "answer": r["answer"],
                                "template_id": r["template_id"]}, ensure_ascii=False)}
            for r in rows]


def walk_group(pdf: pd.DataFrame, seed: int, buckets: int) -> pd.DataFrame:
    """Executor side (``groupBy("bucket").applyInPandas``): one bucket's walk (§4.2).

    In: one row per (document, candidate pair) of one bucket, ``bucket``, ``doc_id``,
    ``doc_tokens``, ``pair_key`` / ``pair_tokens`` (null for a document without pairs), and the
    bucket's ``start_carry`` / ``start_position`` (from its last ledger row; 0 for a new bucket).
    Out: one ``budget_ledger`` row per document (less ``run_id``), ``kept_pair_ids`` included.
    The rows may come in any order: :func:`finelake.method.budget.walk_bucket` sorts them.
    """
    from finelake.method.budget import walk_bucket

    bucket = int(pdf["bucket"].iloc[0])
    carry, position = int(pdf["start_carry"].iloc[0]), int(pdf["start_position"].iloc[0])
    docs: dict[str, tuple[int, list]] = {}
    for d, t, p, n in zip(pdf["doc_id"], pdf["doc_tokens"], pdf["pair_key"], pdf["pair_tokens"]):
        entry = docs.setdefault(d, (int(t), []))
        if isinstance(p, str):
            entry[1].append((p, int(n)))
    walked = walk_bucket([(d, t, ps) for d, (t, ps) in docs.items()], seed, carry, position)
    rows = [{**row.as_dict(), "bucket": bucket, "buckets": buckets, "kept_pair_ids": kept}
            for kept, row in walked]
    return pd.DataFrame(rows, columns=LEDGER_COLUMNS)


LEDGER_COLUMNS = [f.name for f in BUDGET_LEDGER.schema if f.name != "run_id"]


def _ledger_buckets(lake, buckets: int):
    """The existing ledger (None when there is none), after checking it was walked with
    ``buckets`` buckets; rows written before buckets existed (null ``buckets``) count as the
    single walk (bucket 0 of 1)."""
    from pyspark.sql import functions as F

    if not lake.exists(BUDGET_LEDGER):
        return None
    added = lake.add_missing_columns(BUDGET_LEDGER)
    if added:
        log.info("budget: budget_ledger had no column(s) %s (a lake from before the bucketed "
                 "walk): added, its rows read as the single walk (bucket 0 of 1)", added)
    ledger = (lake.read(BUDGET_LEDGER)
              .withColumn("bucket", F.coalesce("bucket", F.lit(0)))
              .withColumn("buckets", F.coalesce("buckets", F.lit(1))))
    walked = sorted(r["buckets"] for r in ledger.select("buckets").distinct().collect())
    if walked and walked != [buckets]:
        raise FinelakeError(
            f"budget_ledger was walked with {walked} bucket(s) but budget.buckets is {buckets}: "
            f"the walks' carries cannot be split or merged; keep budget.buckets: {walked[0]} for "
            f"this lake (or start a new ledger: remove budget_ledger and pairs)")
    return ledger


MAX_DOCS_PER_BUCKET = 2_000_000
"""Documents one budget walk should hold at most. A bucket's walk is one ``applyInPandas`` group:
its documents and their kept pairs as pandas in one Python worker, about 0.3-0.5 KB per document
with six pairs (ids, token counts, the sort), so 2M documents is ~1 GB of worker memory (the
default ``spark.executor.pyspark.memory`` budgets of Databricks and EMR nodes are several GB)."""


def bucket_warning(n_documents: int, buckets: int, walked: Optional[int] = None) -> Optional[str]:
    """Why ``buckets`` budget walks are too few for ``n_documents`` documents (None when they
    are enough), with the fix. ``walked``: the bucket count the lake's ledger already uses."""
    if n_documents <= buckets * MAX_DOCS_PER_BUCKET:
        return None
    need = 1 << max(0, (-(-n_documents // MAX_DOCS_PER_BUCKET) - 1).bit_length())
    fix = (f"set budget.buckets: {need} (or more) in the profile before the lake's first budget "
           f"run" if walked is None else
           f"this lake's ledger is walked with {walked} bucket(s), fixed for its life: remove its "
           f"budget_ledger and pairs tables and rerun 'finelake budget' with budget.buckets: "
           f"{need} (the walk restarts: pairs are derived from the ledger)")
    return (f"budget.buckets={buckets if walked is None else walked} for {n_documents:,} documents: "
            f"each budget walk would hold ~{n_documents // (walked or buckets):,} documents in one "
            f"Python worker (more than {MAX_DOCS_PER_BUCKET:,}, about 1 GB): {fix}")


def lake_bucket_warning(lake, buckets: int) -> Optional[str]:
    """:func:`bucket_warning` for a lake: its documents counted from Delta's file statistics
    (delta-rs, no Spark job) and its ledger's bucket count; None when the tables cannot be read
    that way (an object store without credentials on this machine) or there is nothing to warn."""
    try:
        from deltalake import DeltaTable

        from finelake.lake.rs import read_delta

        if not lake.exists(DOCUMENTS):
            return None
        actions = DeltaTable(lake.path(DOCUMENTS)).get_add_actions(flatten=True)
        n_docs = sum(v or 0 for v in actions.column("num_records").to_pylist())
        walked = None
        if lake.exists(BUDGET_LEDGER):
            # read_delta, not to_pyarrow_dataset(): a pyarrow scan over delta-rs's Python file
            # system can kill the process at exit (finelake.lake.rs.read_delta; make exit-check)
            b = read_delta(lake.path(BUDGET_LEDGER), columns=["buckets"], limit=1)
            walked = (b.column("buckets")[0].as_py() or 1) if b.num_rows else None
    except Exception as exc:  # noqa: BLE001 - a warning must never stop a run
        log.debug("budget bucket check skipped: %s", exc)
        return None
    return bucket_warning(n_docs, buckets, walked)


def unready_documents(lake):
    """Document ids (possibly repeated) with unfinished work upstream, not ready for budget:

    * a match without a *final* instantiation (no row, or status ``retry``);
    * an ``ok`` instantiation without a final judgment (no row, or status ``retry``).

    ``error`` rows are final (quarantined, :mod:`finelake.faults`): they do not hold a document
    back. Judgments written before statuses existed (null status) are final.
    """
    from pyspark.sql import functions as F

    lake.add_missing_columns(INSTANTIATIONS)
    lake.add_missing_columns(JUDGMENTS)
    inst = lake.read(INSTANTIATIONS)
    final_inst = inst.where("status <> 'retry'")
    final_judged = lake.read(JUDGMENTS).where(F.coalesce("status", F.lit("")) != "retry")
    return (lake.read(MATCHES).select("doc_id", "template_id")
            .join(final_inst.select("doc_id", "template_id"), ["doc_id", "template_id"],
                  "left_anti")
            .select("doc_id")
            .union(inst.where("status = 'ok'").select("pair_key", "doc_id")
                   .join(final_judged.select("pair_key"), "pair_key", "left_anti")
                   .select("doc_id")))


def run_budget(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Extend the budget walks over newly ready documents, then derive ``pairs`` from the ledger.

    The walk runs on the executors in ``budget.buckets`` independent walks
    (:func:`walk_group`); only per-bucket aggregates reach the driver. Order of writes: the
    ledger rows (with ``kept_pair_ids``) in one commit, then every kept pair that ``pairs`` lacks
    (this run's and any a killed run left unwritten), so a kill at any point leaves ``pairs`` a
    subset of the ledger's kept pairs that the next run completes.

    Raises:
        FinelakeError: judgments or upstream tables missing; a judged pair not grounded in its
            document while ``budget.on_ungrounded`` is ``fail`` (nothing is written then);
            ``budget.buckets`` differs from the ledger's.
    """
    import functools

    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from finelake.method.budget import budget_bucket

    cfg, lake = ctx.cfg, ctx.lake
    buckets = cfg.budget.buckets
    stats = StageStats(STAGE)
    warning = lake_bucket_warning(lake, buckets)
    if warning:
        log.warning("budget: %s", warning)
        print(f"[budget] warning: {warning}", flush=True)
    judged = require(ctx, JUDGMENTS, "judge")
    inst = lake.read(INSTANTIATIONS)
    processed = require(ctx, MATCH_LOG, "match").select("doc_id")
    ready = processed.join(unready_documents(lake), "doc_id", "left_anti")
    ledger = _ledger_buckets(lake, buckets)
    new_docs = ready.join(ledger.select("doc_id"), "doc_id", "left_anti") if ledger is not None else ready

    @F.pandas_udf("int")
    def bucket_of(ids: pd.Series) -> pd.Series:
        return ids.map(lambda d: budget_bucket(d, buckets)).astype("int32")

    new_docs = (new_docs.join(lake.read(DOCUMENTS).select("doc_id", "num_tokens"), "doc_id")
                .select("doc_id", F.coalesce("num_tokens", F.lit(0)).cast("long").alias("doc_tokens"),
                        bucket_of("doc_id").alias("bucket"))
                .cache())

    def unwritten():
        """Kept pair ids in the ledger that ``pairs`` lacks (a run killed between the writes)."""
        want = lake.read(BUDGET_LEDGER).select(
            "doc_id", "budget_order", F.explode("kept_pair_ids").alias("pair_id"))
        if lake.exists(PAIRS):
            want = want.join(lake.read(PAIRS).select("pair_id"), "pair_id", "left_anti")
        return want

    scope = new_docs.select("doc_id")
    if ledger is not None:
        scope = scope.union(unwritten().select("doc_id")).distinct()
    kept = (judged.where("kept").select("pair_key", "judge_score", "judge_model")
            .join(inst.where("status = 'ok'").select("pair_key", "doc_id", "template_id", "instruction",
                                                     "answer", "excerpt_ratio", "model_id"), "pair_key")
            .join(scope, "doc_id", "left_semi")
            .join(lake.read(DOCUMENTS).select("doc_id", F.col("text").alias("doc_text")), "doc_id"))
    schema = T.StructType([f for f in kept.schema.fields if f.name != "doc_text"]
                          + [T.StructField("text", T.StringType()),
                             T.StructField("num_tokens", T.LongType()),
                             T.StructField("ungrounded", T.StringType())])
    checked = kept.mapInPandas(functools.partial(
        count_partition, tokenizer=cfg.tokenizer.model, min_ratio=cfg.instantiate.min_excerpt_ratio,
        min_run_chars=cfg.instantiate.grounding_min_run_chars), schema).cache()
    stats.rows_in = checked.count()
    refused = checked.where("ungrounded IS NOT NULL").select(
        "pair_key", "doc_id", "template_id", "instruction", "answer", "ungrounded").collect()
    if refused:
        shown = "; ".join(f"{r['pair_key']} (doc {r['doc_id']}): {r['ungrounded']}" for r in refused[:3])
        if cfg.budget.on_ungrounded == "fail":
            checked.unpersist()
            new_docs.unpersist()
            raise FinelakeError(f"{len(refused)} judged pair(s) are not grounded in their own "
                                f"document, nothing written (budget.on_ungrounded: fail): {shown}")
        log.warning("budget: %d pair(s) not grounded in their document, quarantined: %s",
                    len(refused), shown)
        lake.merge(QUARANTINE, pa.Table.from_pylist(quarantine_rows(refused)), ctx.run_id)
        stats.quarantined = len(refused)
        stats.drop("ungrounded_answer", len(refused))
    counted = checked.where("ungrounded IS NULL").drop("ungrounded")

    # The walks, on the executors: each bucket continues from its own last ledger row.
    if ledger is not None:
        starts = ledger.groupBy("bucket").agg(
            F.max_by("carry_out", "budget_order").alias("start_carry"),
            (F.max("budget_order") + 1).alias("start_position"))
    else:
        starts = ctx.spark.createDataFrame([], "bucket int, start_carry long, start_position long")
    walk_in = (new_docs
               .join(counted.select(
                   "doc_id", "pair_key", F.col("num_tokens").alias("pair_tokens")), "doc_id", "left")
               .join(F.broadcast(starts), "bucket", "left")
               .fillna(0, ["start_carry", "start_position"]))
    out_schema = T.StructType([f for f in _spark_schema(BUDGET_LEDGER).fields if f.name != "run_id"])
    walked = (walk_in.groupBy("bucket")
              .applyInPandas(_walker(cfg.budget.seed, buckets), out_schema)
              .cache())
    totals = walked.agg(F.count("*").alias("documents"), F.sum("kept").alias("kept"),
                        F.sum("dropped_over_budget").alias("dropped")).collect()[0]
    n_docs = int(totals["documents"])
    stats.rows_out = int(totals["kept"] or 0)
    stats.drop("over_token_budget", int(totals["dropped"] or 0))
    if n_docs:
        lake.merge(BUDGET_LEDGER, walked, ctx.run_id)
    fail_point(STAGE, 1)
    if lake.exists(BUDGET_LEDGER):
        pairs = (unwritten().join(counted.withColumnRenamed("pair_key", "pair_id"),
                                  ["pair_id", "doc_id"])
                 .select("pair_id", "doc_id", "template_id", "instruction", "answer", "text",
                         "excerpt_ratio", F.col("judge_score").cast("int"), "num_tokens",
                         "budget_order", F.col("model_id").alias("generator_model"), "judge_model"))
        lake.merge(PAIRS, pairs, ctx.run_id)
        carry = (lake.read(BUDGET_LEDGER).groupBy(F.coalesce("bucket", F.lit(0)))
                 .agg(F.max_by("carry_out", "budget_order").alias("c")).agg(F.sum("c")).collect()[0][0])
        stats.extra.update(carry_out=int(carry or 0))
    walked.unpersist()
    checked.unpersist()
    new_docs.unpersist()
    stats.extra.update(documents=n_docs, buckets=buckets)
    lake.register(PAIRS)
    lake.register(BUDGET_LEDGER)
    lake.register(QUARANTINE)
    return stats.finish()


def _walker(seed: int, buckets: int):
    """:func:`walk_group` bound to the seed and bucket count (a plain function: applyInPandas
    inspects its argument)."""
    def walk(pdf: pd.DataFrame) -> pd.DataFrame:
        return walk_group(pdf, seed, buckets)
    return walk


def _spark_schema(tdef):
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(tdef.schema)


BUDGET = Stage(
    name=STAGE,
    help="Keep judged pairs within each document's token budget (with rollover) "
         "(judgments -> pairs, budget_ledger).",
    reads=(JUDGMENTS, INSTANTIATIONS, MATCHES, MATCH_LOG, DOCUMENTS),
    writes=(PAIRS, BUDGET_LEDGER, QUARANTINE),
    run=lambda ctx, limits: run_budget(ctx),
    gates=(Gate("instantiate", INSTANTIATIONS), Gate("judge", JUDGMENTS)))
"""budget as a stage (:mod:`finelake.stage`): waits while instantiate or judge has rows to retry."""
