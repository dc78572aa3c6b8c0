"""Running a stage: the model-stage skeleton, written once.

:func:`run_model_stage` is what genericize, match, instantiate, judge and continue share:

1. the rows in scope (:attr:`ModelStage.scope`, keys only) and the pending ones among them (no row
   yet, or ``retry``: :func:`finelake.jobs.common.unfinished`);
2. the resource plan (:func:`finelake.resources.plan_stage`: one GPU per task on GPU clusters) and
   one checked model spec, built on the driver and shipped unchanged to the executors;
3. the chunk size (a floor raised so each GPU task gets a whole batch) and the pending keys staged
   by chunk (:mod:`finelake.jobs.chunks`);
4. the canary (:mod:`finelake.jobs.canary`), where the profile turns it on and the stage has gates;
5. the chunk loop: inputs read by key, the row function on the executors in the model worker pool,
   each chunk committed while the next one runs;
6. the meter (prompts per model call), the outcome counts, ``error`` rows copied to ``quarantine``,
   the rows left to retry (:attr:`StageStats.retry`), and the stage's own summary.

:func:`run_stage` runs any stage of :data:`finelake.jobs.pipeline.PIPELINE` after its gates.
"""

from __future__ import annotations

import functools
import logging
from typing import Union

from finelake import storage
from finelake.jobs import chunks as chunk_loop
from finelake.jobs.common import (RETRY_MERGE, call_meter, count_outcomes, fail_point, map_rows,
                                  quarantine_failures, record_meter, unfinished)
from finelake.lake import chunk_count
from finelake.resources import chunk_size as sized_chunks
from finelake.models.spec import ModelSpec
from finelake.resources import model_resources, model_worker_pool, plan_stage
from finelake.runtime import StageContext, StageStats
from finelake.stage import Limits, ModelStage, Stage

log = logging.getLogger(__name__)


def run_stage(ctx: StageContext, stage: Union[Stage, ModelStage], limits: Limits = Limits(),
              **options):
    """Run one stage after its gates (:func:`finelake.jobs.gates.check_gates`).

    Args:
        options: the stage's own options (ingest's inputs, report's output folder).

    Returns:
        The stage's :class:`StageStats` (ingest: one per input).

    Raises:
        GateHeld: a gate holds (rows of an upstream stage left to retry) and ``limits.force`` is
            false; or whatever the stage raises.
    """
    from finelake.jobs.gates import check_gates

    check_gates(ctx, stage, force=limits.force)
    if isinstance(stage, ModelStage):
        return run_model_stage(ctx, stage, limits)
    return stage.run(ctx, limits, **options)


def run_model_stage(ctx: StageContext, stage: ModelStage, limits: Limits = Limits()) -> StageStats:
    """Run a model stage over its pending rows (see the module docstring).

    Returns:
        Stats: ``rows_in`` = rows in scope, ``skipped`` = rows already final, outcomes by
        ``status:reason`` (or the stage's own counts), ``quarantined`` = ``error`` rows,
        ``retry`` = rows left to retry, ``model_calls`` / ``prompts_per_call``.

    Raises:
        FinelakeError: an input table is missing (the message names the stage to run).
        CanaryFailed: the canary chunk failed a quality gate (nothing of it committed).
    """
    cfg, lake = ctx.cfg, ctx.lake
    stats = StageStats(stage.name)
    settings = stage.settings(cfg)
    scope = stage.scope(ctx, limits).cache()
    try:
        stats.rows_in = scope.count()
        pending = unfinished(lake, scope, stage.table, stage.key)
        n_pending = pending.count()
        stats.skipped = stats.rows_in - n_pending
        if n_pending:
            # One checked, frozen spec, built here and shipped unchanged to the executors.
            spec = ModelSpec.of(settings.model, settings.kind, key=f"{stage.name} model")
            # A vLLM model spanning tensor_parallel_size GPUs asks for that many per task; a model
            # behind an endpoint for none (finelake.resources.model_resources).
            plan = plan_stage(ctx.spark, model_resources(spec) if stage.resources.uses_gpu
                              else stage.resources)
            meter = call_meter(ctx.spark)
            n_keys = (scope.select(stage.chunk_key).distinct().count()
                      if stage.chunk_key != stage.key else stats.rows_in)
            per_key = stage.prompts_per_key(ctx, scope, n_keys) if stage.prompts_per_key else 1.0
            size = sized_chunks(settings.chunk_size, spec["batch_size"], plan.tasks, per_key)
            n_chunks = chunk_count(n_keys, size)  # drawn over the scope: a resumed run sizes alike
            log.info("%s: %s; %d %ss per chunk, %d chunks", stage.name, plan.note, size,
                     stage.chunk_key, n_chunks)
            canary = _canary(ctx, stage, limits)
            canary_keys = (scope.select(stage.chunk_key).distinct()
                           .orderBy(_hash(stage.chunk_key), stage.chunk_key).limit(canary.rows)
                           if canary is not None else None)
            path, sizes = chunk_loop.stage_keys(ctx, stage.name, pending, stage.chunk_key, n_chunks,
                                                canary_keys)
            fn = functools.partial(stage.rows, **stage.row_args(ctx, spec))
            output = stage.output or stage.table

            def build(chunk: int):
                keys = chunk_loop.read_staged(ctx, path, chunk)
                # The canary's keys come from every hash chunk: read their inputs from the whole
                # table.
                part = stage.inputs(ctx, keys, n_chunks, None if chunk < 0 else chunk)
                part = (chunk_loop.spread(part, stage.chunk_key, plan.tasks)
                        .sortWithinPartitions(stage.chunk_key, *stage.order))
                with model_worker_pool(ctx.spark):
                    return map_rows(part, fn, output, min_rows=spec["batch_size"], meter=meter,
                                    profile=plan.profile)

            commit = stage.commit or (lambda c, out: c.lake.merge(stage.table, out, c.run_id,
                                                                  **RETRY_MERGE))
            try:
                run = chunk_loop.run_chunks(
                    ctx, stage.name, path, sizes, build, lambda out: commit(ctx, out),
                    after_canary=canary.check if canary is not None else None,
                    on_commit=lambda done: fail_point(stage.name, done),
                    busy=(lambda: float(meter.value[2])) if meter is not None else None,
                    tasks=plan.tasks)
            finally:
                storage.remove_tree(ctx.spark, path)
            record_meter(stats, meter)
            stats.extra["chunks"] = run.chunks
            stats.chunk_run = run
        scope_keys = scope.select(stage.key)
        lake.create(stage.table)  # empty when nothing was in scope: later stages still read it
        lake.add_missing_columns(stage.table)
        rows = lake.read(stage.table).join(scope_keys, stage.key, "left_semi")
        if stage.summarize is not None:
            stage.summarize(ctx, stats, scope)
        else:
            count_outcomes(stats, rows)
        stats.quarantined = quarantine_failures(ctx, stage.name, stage.table, stage.key, scope_keys)
        stats.retry = rows.where("status = 'retry'").count()
    finally:
        scope.unpersist()
    for t in stage.writes:
        lake.register(t)
    return stats.finish()


def _hash(column: str):
    from pyspark.sql import functions as F

    return F.xxhash64(F.concat(F.lit("canary\u0000"), F.col(column)))


def _canary(ctx: StageContext, stage: ModelStage, limits: Limits):
    """The stage's canary (:class:`finelake.jobs.canary.Canary`) when it runs: the profile (or
    ``limits.canary``) turns it on and the stage has gates in ``quality:``; else None."""
    from finelake.jobs.canary import Canary

    on = ctx.cfg.quality.canary if limits.canary is None else limits.canary
    gates = getattr(ctx.cfg.quality, stage.name, None)
    if not on or gates is None:
        return None
    return Canary(ctx, stage, gates.model_dump(), ctx.cfg.quality.canary_rows)
