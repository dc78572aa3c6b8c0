"""The chunk loop of the model stages: keys staged once, each chunk's inputs read by key, each
chunk's commit overlapped with the next chunk's model work.

Why chunks: each chunk is merged in its own Delta commit, so a killed job loses at most the chunks
in flight (two: the one being generated and the one being committed). Why this shape (issue 23):
a chunk's cost must not grow with the table. So

* **Only keys are staged.** The pending rows of a stage (keys, the chunk key, order columns and
  ``prior_attempts``; never text) are written once as Parquet partitioned by chunk id under
  ``<lake>/_staging/<stage>``; a chunk reads its own partition (partition pruning), not a cached
  frame of every pending row.
* **Inputs are read by key.** A chunk's text (documents, queries, templates, instantiations) is
  read from its Delta table with the chunk's hash predicate; where the table's key is the chunk
  key, the chunk's key buckets (:func:`finelake.lake.chunk_bucket_range`) let Delta skip every file
  outside them once ``finelake optimize`` has clustered the table by bucket.
* **Commits overlap model work.** A chunk's output is materialized (persisted), then merged on a
  background thread while the next chunk's model job runs; at most one commit is in flight, and
  commits happen in chunk order. The model worker pool does not wait for a MERGE.

The resume guarantee: chunks are drawn over the rows *in scope* (``abs(xxhash64(chunk_key)) %
n_chunks``, ``n_chunks`` from the scope's size, :func:`finelake.lake.chunk_count`), not the
pending ones, and a commit is atomic, so a resumed run rebuilds every unfinished chunk with exactly
the rows it had, in the same partitions (hash of the chunk key over ``plan.tasks``) and order
(chunk key, then the stage's order columns). That matters for batched generation, whose
floating-point results depend on what shares a batch: the resumed run then produces the same
outputs as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from finelake import storage
from finelake.progress import Progress

log = logging.getLogger(__name__)

CHUNK = "_chunk"
"""Column of the staged keys: the chunk id (-1 for the canary)."""
CANARY_CHUNK = -1


@dataclass
class ChunkRun:
    """What one call of :func:`run_chunks` did.

    Attributes:
        chunks: chunks committed (the canary included).
        rows: pending rows processed.
        overhead_s: per chunk, seconds of the loop outside the row function: the chunk's wall time
            (planning, its job: reading its keys and inputs by key, the shuffle; waiting for the
            previous commit) less the seconds its tasks spent in the row function (model call,
            prompt building, parsing) per task. The cost that must not grow with the table.
        model_s: per chunk, wall seconds of its job (materializing its output).
        busy_s: per chunk, seconds in the row function per task (0 without a meter).
        commit_s: per chunk, seconds of its merge (on the commit thread).
        idle_s: longest wait of the model loop for a commit (the model worker pool idle).
    """

    chunks: int = 0
    rows: int = 0
    overhead_s: list[float] = field(default_factory=list)
    model_s: list[float] = field(default_factory=list)
    busy_s: list[float] = field(default_factory=list)
    commit_s: list[float] = field(default_factory=list)
    idle_s: float = 0.0
    n_chunks: int = 0


def staging_path(ctx, stage: str) -> str:
    """``<lake>/_staging/<stage>``: where a stage's pending keys are staged (one run at a time)."""
    return storage.join(storage.root(ctx.cfg.lake), "_staging", stage)


def stage_keys(ctx, stage: str, pending, chunk_key: str, n_chunks: int,
               canary_keys=None) -> tuple[str, dict[int, int]]:
    """Write ``pending`` (keys only) as Parquet partitioned by chunk id; return its path and the
    rows per chunk.

    Args:
        pending: DataFrame of the pending rows: key columns, ``chunk_key``, order columns,
            ``prior_attempts``; no text.
        n_chunks: chunk count (:func:`finelake.lake.chunk_count` of the scope).
        canary_keys: a DataFrame of ``chunk_key`` values that form the canary chunk (id -1)
            instead of their hash chunk; None: no canary.

    Returns:
        ``(path, {chunk id: rows})``.
    """
    from pyspark.sql import functions as F

    chunk = F.abs(F.xxhash64(chunk_key)) % F.lit(n_chunks)
    if canary_keys is not None:
        marked = canary_keys.select(chunk_key).distinct().withColumn("_canary", F.lit(True))
        pending = (pending.join(F.broadcast(marked), chunk_key, "left")
                   .withColumn(CHUNK, F.when(F.col("_canary"), F.lit(CANARY_CHUNK))
                               .otherwise(chunk).cast("int"))
                   .drop("_canary"))
    else:
        pending = pending.withColumn(CHUNK, chunk.cast("int"))
    path = staging_path(ctx, stage)
    # One task per chunk value (a file per chunk, not per task and chunk).
    pending.repartition(CHUNK).write.mode("overwrite").partitionBy(CHUNK).parquet(path)
    if not any(name.startswith(f"{CHUNK}=") for name in storage.children(ctx.spark, path)):
        return path, {}  # nothing pending: Spark wrote no partition (and cannot read none)
    staged = ctx.spark.read.parquet(path)
    sizes = {int(r[CHUNK]): int(r["count"]) for r in staged.groupBy(CHUNK).count().collect()}
    return path, sizes


def read_staged(ctx, path: str, chunk: int):
    """One chunk's staged keys (a partition-pruned read), without the chunk column."""
    from pyspark.sql import functions as F

    return ctx.spark.read.parquet(path).where(F.col(CHUNK) == chunk).drop(CHUNK)


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


def run_chunks(ctx, stage: str, path: str, sizes: dict[int, int], build: Callable[[int], object],
               commit: Callable[[object], None], after_canary: Optional[Callable[[object], None]] = None,
               on_commit: Optional[Callable[[int], None]] = None,
               busy: Optional[Callable[[], float]] = None, tasks: int = 1) -> ChunkRun:
    """Run every staged chunk through the model and commit it, overlapping each commit with the
    next chunk's model job.

    Args:
        path, sizes: from :func:`stage_keys`.
        build: ``build(chunk) -> DataFrame``: the chunk's model output (inputs read by key,
            spread over the plan's tasks, the row function applied); not yet computed.
        commit: merges one chunk's materialized output (runs on the commit thread).
        after_canary: called with the canary chunk's materialized output before it is committed;
            raises to stop the stage (:class:`finelake.method.canary.CanaryFailed`): the canary's
            rows are then not committed and stay pending.
        on_commit: called with the number of chunks committed so far, after each commit
            (``fail_point``: test kills).
        busy: returns the cumulative seconds the executors spent in the row function (the call
            meter's third figure), read after each chunk's job; ``tasks``: tasks per chunk.

    Returns:
        :class:`ChunkRun`.

    Raises:
        Whatever a model job or a commit raises (a failed commit surfaces in the loop before the
        next commit starts; nothing after it is committed).
    """
    from pyspark import StorageLevel

    run = ChunkRun(n_chunks=len(sizes))
    todo = sorted(sizes)
    if not todo:
        return run
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{stage}-commit")
    in_flight: Optional[Future] = None

    def commit_one(out, chunk: int) -> None:
        t0 = time.monotonic()
        try:
            commit(out)
        finally:
            out.unpersist()
        run.commit_s.append(time.monotonic() - t0)
        run.chunks += 1
        run.rows += sizes[chunk]
        progress.update(sizes[chunk])
        if on_commit is not None:
            on_commit(run.chunks)

    try:
        with Progress(stage, sum(sizes.values()), unit="rows") as progress:
            for chunk in todo:
                t0 = time.monotonic()
                b0 = busy() if busy is not None else 0.0
                out = build(chunk).persist(StorageLevel.MEMORY_AND_DISK)
                try:
                    t1 = time.monotonic()
                    out.count()  # the model job
                    t2 = time.monotonic()
                    run.model_s.append(t2 - t1)
                    run.busy_s.append(((busy() - b0) if busy is not None else 0.0) / max(1, tasks))
                    if chunk == CANARY_CHUNK and after_canary is not None:
                        after_canary(out)  # raises to stop: nothing of the canary is committed
                except BaseException:
                    out.unpersist()  # a failed job or canary leaves nothing cached
                    raise
                waited = 0.0
                if in_flight is not None:
                    w0 = time.monotonic()
                    in_flight.result()
                    waited = time.monotonic() - w0
                    run.idle_s = max(run.idle_s, waited)
                run.overhead_s.append(max(0.0, (t2 - t0) + waited - run.busy_s[-1]))
                if chunk == CANARY_CHUNK:
                    commit_one(out, chunk)  # the canary commits before the rest starts
                    in_flight = None
                else:
                    in_flight = pool.submit(commit_one, out, chunk)
            if in_flight is not None:
                in_flight.result()
    finally:
        pool.shutdown(wait=True)
    return run
