"""Helpers the stage jobs share: model specs, limits, pending work, reads by key, the executor
row mapping, outcome counts and quarantine. The chunk loop is :mod:`finelake.jobs.chunks`, the
model-stage skeleton :mod:`finelake.jobs.runner`.

Nothing here calls a model: models are reached only through :mod:`finelake.udfs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Iterable, Mapping, Optional

import pyarrow as pa

from finelake import storage
from finelake.config import ModelConfig
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.tables import TableDef

log = logging.getLogger(__name__)


def model_label(m: "ModelConfig | Mapping") -> str:
    """``backend:model[@revision]`` for lineage columns (a model config, a
    :class:`~finelake.models.spec.ModelSpec` or a dict of their fields)."""
    d = m.model_dump() if hasattr(m, "model_dump") else dict(m)
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


def read_for_keys(ctx: StageContext, tdef: TableDef, keys, column: str, n_chunks: int,
                  chunk: Optional[int], columns: Iterable[str]):
    """The ``columns`` of ``tdef`` for the rows whose ``column`` is in ``keys`` (a DataFrame with
    ``column``): a chunk's inputs, read by key.

    With ``chunk`` (one hash chunk of ``n_chunks`` over ``column``) only that chunk's share of the
    table is read (:meth:`finelake.lake.Lake.read_chunk`: its key buckets, where ``column`` is the
    table's key); None (the canary, whose keys come from every chunk) reads the table and keeps
    the rows of ``keys``.
    """
    cols = list(dict.fromkeys([column, *columns]))
    if chunk is None:
        rows = ctx.lake.read(tdef).select(*cols)
        return rows.join(keys.select(column).distinct(), column, "left_semi")
    return ctx.lake.read_chunk(tdef, column, n_chunks, chunk).select(*cols)


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


class _MeterSum:
    """Accumulator parameter adding ``[model calls, prompts, row-function seconds]`` (see
    :func:`call_meter`)."""

    def zero(self, value):
        return [0, 0, 0.0]

    def addInPlace(self, a, b):  # noqa: N802 - Spark's AccumulatorParam interface
        return [a[0] + b[0], a[1] + b[1], a[2] + b[2]]


def call_meter(spark):
    """A Spark accumulator of ``[model calls, prompts, seconds]`` that :func:`map_rows` fills on
    the executors (calls and prompts from :data:`finelake.udfs.cache.CALLS`; seconds spent in the
    row function, model call included, summed over tasks); read ``.value`` on the driver after
    the job. None under Spark Connect (no accumulators)."""
    try:
        return spark.sparkContext.accumulator([0, 0, 0.0], _MeterSum())
    except Exception:  # noqa: BLE001 - Spark Connect
        return None


def record_meter(stats, meter) -> None:
    """Put a :func:`call_meter`'s mean prompts per model call into a stage's summary
    (``prompts_per_call=..`` and ``model_calls=..``)."""
    if meter is None:
        return
    calls, prompts = meter.value[:2]
    if calls:
        stats.extra["model_calls"] = int(calls)
        stats.extra["prompts_per_call"] = f"{prompts / calls:.1f}"
        log.info("%s: %d prompts in %d model calls (%.1f per call)", stats.stage, prompts, calls,
                 prompts / calls)


def _rows_to_batches(batches, fn, schema, min_rows: int = 0, meter=None):
    from finelake.udfs import cache

    for table in coalesce_batches(batches, min_rows):
        before = (cache.CALLS["calls"], cache.CALLS["prompts"], time.monotonic())
        rows = fn(table.to_pandas())
        if meter is not None:
            meter.add([cache.CALLS["calls"] - before[0], cache.CALLS["prompts"] - before[1],
                       time.monotonic() - before[2]])
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


def runs_dir(lake_root: str) -> str:
    """``<lake>/_runs``: where each ``finelake run`` leaves its stage statistics (a path or URI)."""
    return storage.join(storage.root(lake_root), "_runs")


def save_run_stats(ctx: StageContext, stats: list[StageStats]) -> str:
    """Write this run's stage statistics as JSON under :func:`runs_dir` (through
    :mod:`finelake.storage`, so an object-store lake works too); returns the file's path or URI."""
    path = storage.join(runs_dir(ctx.cfg.lake), f"{ctx.run_id}.json")
    storage.write_text(ctx.spark, path, json.dumps(
        {"run_id": ctx.run_id, "profile": ctx.cfg.profile, "stages": [s.as_dict() for s in stats]},
        indent=1, default=str))
    return path
