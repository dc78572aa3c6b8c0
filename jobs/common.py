"""Helpers the stage jobs share: model specs, limits, pending work, chunked commits.

Nothing here calls a model: models are reached only through :mod:`finelake.udfs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterable, Optional

import pyarrow as pa

from finelake.config import ModelConfig
from finelake.progress import Progress
from finelake.runtime import FinelakeError, StageContext
from finelake.tables import TableDef

log = logging.getLogger(__name__)


def model_spec(m: ModelConfig, **override) -> dict:
    """The plain-dict form of a model config that travels to executors (and keys the model cache)."""
    spec = m.model_dump()
    spec.update({k: v for k, v in override.items() if v is not None})
    return spec


def model_label(m: ModelConfig | dict) -> str:
    """``backend:model[@revision]`` for lineage columns."""
    d = m if isinstance(m, dict) else m.model_dump()
    rev = f"@{d['revision']}" if d.get("revision") else ""
    return f"{d['backend']}:{d['model']}{rev}"


def stable_hash(*parts: str, n: int = 16) -> str:
    """Hex digest of the parts joined by NUL (a deterministic id, unlike Python's hash())."""
    return hashlib.sha1("\0".join(parts).encode("utf-8")).hexdigest()[:n]


def require(ctx: StageContext, tdef: TableDef, stage_hint: str):
    """The table as a Spark DataFrame; a clear error naming the stage to run when it is missing."""
    if not ctx.lake.exists(tdef):
        raise FinelakeError(f"table {tdef.name} not found under {ctx.cfg.lake}: run "
                            f"'finelake {stage_hint}' first")
    return ctx.lake.read(tdef)


def limit_ordered(df, key: str, n: Optional[int]):
    """The first ``n`` rows by ``key`` (ids are content hashes, so this is a fixed pseudo-random
    subset that does not change between runs); all rows when ``n`` is None."""
    df = df.orderBy(key)
    return df.limit(n) if n else df


def chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def fail_point(name: str, count: int) -> None:
    """Test hooks at a point of stage ``name`` where ``count`` chunks (or writes) are committed.

    * ``FINELAKE_FAIL_AFTER=<name>:<count>``: raise (a failed job; the driver lives on).
    * ``FINELAKE_KILL_AT=<name>:<count>``: the process sends itself SIGKILL when ``count``
      equals the given number (a killed job: no ``finally``, no cleanup, the JVM loses its
      driver); used by ``make fault-test`` (tools/fault_test.py).
    * ``FINELAKE_PAUSE_AT=<name>:<count>:<seconds>``: the driver sleeps that long when ``count``
      equals the given number, printing ``FINELAKE_PAUSE_AT=...: pausing`` first (the model
      workers sit idle past Spark's idle-worker timeout; ``make cluster-test``'s idle-gap).
    """
    spec = os.environ.get("FINELAKE_FAIL_AFTER", "")
    if spec and spec.split(":")[0] == name and count >= int(spec.split(":")[1]):
        raise RuntimeError(f"FINELAKE_FAIL_AFTER={spec}: simulated failure in {name}")
    kill = os.environ.get("FINELAKE_KILL_AT", "")
    if kill and kill.split(":")[0] == name and count == int(kill.split(":")[1]):
        import signal
        import sys

        print(f"FINELAKE_KILL_AT={kill}: SIGKILL", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get("FINELAKE_PAUSE_AT", "")
    if pause and pause.split(":")[0] == name and count == int(pause.split(":")[1]):
        import time

        print(f"FINELAKE_PAUSE_AT={pause}: pausing {pause.split(':')[2]} s", flush=True)
        time.sleep(float(pause.split(":")[2]))
        print(f"FINELAKE_PAUSE_AT={pause}: resumed", flush=True)


def unfinished(lake, scope, tdef: TableDef, key: str):
    """The rows of ``scope`` still to do in a model stage writing ``tdef`` (keyed by ``key``):
    those without a row in ``tdef`` and those whose row has status ``retry`` (a transient failure,
    :mod:`finelake.faults`), with column ``prior_attempts`` (runs that tried the row before: 0 for
    a new row). Rows with any other status (null included: rows from before statuses) are final.
    """
    from pyspark.sql import functions as F

    if not lake.exists(tdef):
        return scope.withColumn("prior_attempts", F.lit(0))
    lake.add_missing_columns(tdef)
    rows = lake.read(tdef).select(key, F.coalesce("status", F.lit("")).alias("_status"),
                                  F.coalesce("attempts", F.lit(0)).alias("_attempts"))
    return (scope.join(rows, key, "left").where("_status IS NULL OR _status = 'retry'")
            .withColumn("prior_attempts", F.coalesce("_attempts", F.lit(0)).cast("int"))
            .drop("_status", "_attempts"))


RETRY_MERGE = dict(update=True, update_when="t.status = 'retry'")
"""Merge arguments of the model stages: new rows are inserted, and a row the table holds with
status ``retry`` is overwritten by its new try; finished rows are never rewritten."""


def quarantine_failures(ctx: StageContext, stage: str, tdef: TableDef, key: str, scope=None) -> int:
    """Copy the ``error`` rows of ``tdef`` (failed for good) to ``quarantine`` (target the table,
    source ``stage``, ``row_key`` the key, the reason and ``attempts``), insert-only, so a rerun
    (or a run killed before this point) adds exactly the missing ones.

    Returns:
        The number of ``error`` rows among ``scope`` (a DataFrame holding ``key``; None: all).
    """
    from pyspark.sql import functions as F

    from finelake.tables import QUARANTINE

    lake = ctx.lake
    if not lake.exists(tdef):
        return 0
    failed = lake.read(tdef).where("status = 'error'")
    reason = "judge_reason" if "judge_reason" in tdef.schema.names else "reason"
    raw = F.col("raw_output") if "raw_output" in tdef.schema.names else F.lit(None).cast("string")
    rows = failed.select(
        F.substring(F.sha1(F.concat_ws("\u0000", F.lit(tdef.name), F.lit(stage), key)), 1, 20)
        .alias("quarantine_id"),
        F.lit(tdef.name).alias("target"), F.lit(stage).alias("source"),
        F.concat(F.lit(f"{key}="), F.col(key)).alias("location"),
        F.col(reason).alias("reason"), raw.alias("raw"), F.col(key).alias("row_key"),
        F.col("attempts").cast("int").alias("attempts"))
    lake.add_missing_columns(QUARANTINE)
    lake.merge(QUARANTINE, rows, ctx.run_id)
    if scope is not None:
        failed = failed.join(scope.select(key), key, "left_semi")
    return failed.count()


def spread(df, key: str, n: int):
    """``df`` in exactly ``n`` partitions by a hash of ``key``: which rows share a task depends on
    the keys alone, not on the plan above.

    Not ``df.repartition(n, key)``: when ``df`` comes out of a join on ``key`` that is already
    hash-partitioned on it, Spark drops that repartition as redundant, and adaptive execution may
    then coalesce the join's small shuffle into one partition, so one task (one GPU) would do all
    the model work. Partitioning on ``xxhash64(key)`` is never satisfied by a child's
    partitioning, and an explicit partition count is never coalesced.
    """
    from pyspark.sql import functions as F

    return df.repartition(n, F.xxhash64(key))


def commit_in_chunks(ctx: StageContext, stage: str, tdef: TableDef, pending, key: str,
                     n_scope: int, chunk_size: int, transform, order: tuple = (),
                     plan=None, **merge_kwargs) -> int:
    """Run ``transform`` over ``pending`` chunk by chunk and merge each chunk into ``tdef`` in its
    own Delta commit, so a killed job loses at most one chunk of work.

    A chunk is the set of rows whose ``xxhash64(key) % n_chunks`` equals its number, with
    ``n_chunks = ceil(n_scope / chunk_size)`` rounded by :func:`finelake.lake.chunk_count` (so a
    chunk's merge reads only its key buckets), taken from the rows *in scope* (e.g. every document
    of the run), not from the pending ones. Each commit is atomic, so a chunk is either wholly
    committed or wholly pending: a resumed run rebuilds every unfinished chunk with exactly the
    rows it had, in the same partitions (hash of ``key``) and order (``key``, ``order``). That
    matters for batched generation, whose floating-point results depend on what shares a batch:
    the resumed run then produces the same outputs as an uninterrupted one.

    Args:
        pending: Spark DataFrame of the rows still to do (holds ``key``).
        n_scope: rows (or keys) in scope this run; 0 means nothing to do.
        chunk_size: target rows (keys) per chunk, >= 1.
        transform: ``DataFrame -> DataFrame`` applied to one chunk (the model call, e.g.
            :func:`map_rows`); its result is merged with ``ctx.lake.merge(tdef, ..., **merge_kwargs)``.
            It is built inside :func:`finelake.resources.model_worker_pool` when ``plan`` is given.
        plan: the stage's :class:`finelake.resources.StagePlan`: a chunk is spread over
            ``plan.tasks`` partitions (one per GPU task, so each engine call gets a whole batch);
            None: ``defaultParallelism``. A resumed run rebuilds the same chunks as long as the
            plan's task count is the same (the same cluster size).

    Returns:
        The number of chunks committed by this call.
    """
    from pyspark.sql import functions as F

    if n_scope <= 0:
        return 0
    from finelake.lake import chunk_count

    n_chunks = chunk_count(n_scope, chunk_size)  # aligned with key buckets: merges prune
    par = plan.tasks if plan is not None else ctx.spark.sparkContext.defaultParallelism
    bucketed = pending.withColumn("_chunk", F.abs(F.xxhash64(key)) % F.lit(n_chunks))
    sizes = {r["_chunk"]: r["count"] for r in bucketed.groupBy("_chunk").count().collect()}
    todo = sorted(sizes)
    with Progress(stage, sum(sizes.values()), unit="rows") as progress:
        for done, c in enumerate(todo, start=1):
            part = (spread(bucketed.where(F.col("_chunk") == c).drop("_chunk"), key, par)
                    .sortWithinPartitions(key, *order))
            if plan is not None:
                from finelake.resources import model_worker_pool

                with model_worker_pool(ctx.spark):
                    out = transform(part)
            else:
                out = transform(part)
            ctx.lake.merge(tdef, out, ctx.run_id, **merge_kwargs)
            progress.update(sizes[c])
            fail_point(stage, done)
    return len(todo)


def to_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def arrow_from_rows(rows: list[dict], tdef: TableDef) -> pa.Table:
    """Rows (dicts) to an Arrow table with the table's schema (missing columns become null)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in tdef.schema}
    return pa.Table.from_pydict(cols, schema=tdef.schema)


def coalesce_batches(batches, min_rows: int):
    """Arrow record batches regrouped so that each holds at least ``min_rows`` rows (the last
    one may hold fewer): consecutive batches are concatenated, in order, never split. Which rows
    share a group depends only on the input's order and sizes, so a rebuilt partition gives the
    same groups. Empty batches are skipped.

    Args:
        batches: iterable of ``pyarrow.RecordBatch`` with one schema.
        min_rows: target rows per group (<= 1: every non-empty batch on its own).

    Yields:
        ``pyarrow.Table`` groups.
    """
    held, n = [], 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        held.append(batch)
        n += batch.num_rows
        if n >= max(1, min_rows):
            yield pa.Table.from_batches(held)
            held, n = [], 0
    if held:
        yield pa.Table.from_batches(held)


class _PairSum:
    """Accumulator parameter adding ``[model calls, prompts]`` pairs (see :func:`call_meter`)."""

    def zero(self, value):
        return [0, 0]

    def addInPlace(self, a, b):  # noqa: N802 - Spark's AccumulatorParam interface
        return [a[0] + b[0], a[1] + b[1]]


def call_meter(spark):
    """A Spark accumulator of ``[model calls, prompts]`` that :func:`map_rows` fills on the
    executors (from :data:`finelake.udfs.cache.CALLS`); read ``.value`` on the driver after the
    job. None under Spark Connect (no accumulators)."""
    try:
        return spark.sparkContext.accumulator([0, 0], _PairSum())
    except Exception:  # noqa: BLE001 - Spark Connect
        return None


def record_meter(stats, meter) -> None:
    """Put a :func:`call_meter`'s mean prompts per model call into a stage's summary
    (``prompts_per_call=..`` and ``model_calls=..``)."""
    if meter is None:
        return
    calls, prompts = meter.value
    if calls:
        stats.extra["model_calls"] = int(calls)
        stats.extra["prompts_per_call"] = f"{prompts / calls:.1f}"
        log.info("%s: %d prompts in %d model calls (%.1f per call)", stats.stage, prompts, calls,
                 prompts / calls)


def _rows_to_batches(batches, fn, schema, min_rows: int = 0, meter=None):
    from finelake.udfs import cache

    for table in coalesce_batches(batches, min_rows):
        before = (cache.CALLS["calls"], cache.CALLS["prompts"])
        rows = fn(table.to_pandas())
        if meter is not None:
            meter.add([cache.CALLS["calls"] - before[0], cache.CALLS["prompts"] - before[1]])
        if rows:
            yield pa.RecordBatch.from_pylist(rows, schema=schema)


def map_rows(df, fn, tdef: TableDef, drop=("run_id",), min_rows: int = 0, meter=None,
             profile=None):
    """Apply ``fn(pandas.DataFrame) -> list[dict]`` to the rows of ``df`` on the executors and
    return the rows as a DataFrame with ``tdef``'s columns (less ``drop``).

    Rows are built into Arrow record batches with the table's own schema (``mapInArrow``), so
    a missing value is simply ``None`` and no pandas dtype inference happens on the way back.

    Args:
        min_rows: ``fn`` gets at least this many rows per call (Arrow batches of a partition
            concatenated in order, :func:`coalesce_batches`), so a model sees its configured
            ``batch_size`` whatever ``spark.sql.execution.arrow.maxRecordsPerBatch`` is; 0: one
            call per Arrow batch.
        meter: a :func:`call_meter` accumulator to add this job's model calls and prompts to.
        profile: a ``pyspark.resource.ResourceProfile`` for the stage (stage-level scheduling,
            :func:`finelake.resources.plan_stage`); None: the default profile.
    """
    import functools

    from pyspark.sql.pandas.types import from_arrow_schema

    schema = pa.schema([f for f in tdef.schema if f.name not in drop])
    func = functools.partial(_rows_to_batches, fn=fn, schema=schema, min_rows=int(min_rows),
                             meter=meter)
    if profile is not None:
        return df.mapInArrow(func, from_arrow_schema(schema), profile=profile)
    return df.mapInArrow(func, from_arrow_schema(schema))


def count_outcomes(stats, df, ok_status: str = "ok") -> None:
    """Add a stage table's rows to ``stats``: ``status == ok_status`` counts as output, every other
    (status, reason prefix) as a drop reason. ``df`` has ``status`` and ``reason`` columns."""
    for r in df.groupBy("status", "reason").count().collect():
        if r["status"] == ok_status:
            stats.rows_out += r["count"]
        else:
            stats.drop(f"{r['status']}:{(r['reason'] or '').split(':')[0]}", r["count"])


def job_main(command: str, argv=None) -> None:
    """``spark-submit jobs/<job>.py ARGS`` entry point: the same as ``finelake <command> ARGS``."""
    import sys

    from finelake.cli import main as cli_main

    cli_main([command, *(sys.argv[1:] if argv is None else argv)])
