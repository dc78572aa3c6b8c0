"""judge: ``instantiations`` (status ok) -> ``judgments`` (§3.4).

Each instantiated pair is scored 1-5 with the rubric of :mod:`finelake.method.judging`; pairs under
``judge.min_score`` (4) are marked ``kept = false``. Scores and reasons stay in ``judgments`` so a
user can ask in SQL why pairs were dropped::

    finelake sql "SELECT judge_score, count(*) FROM finelake.judgments GROUP BY 1 ORDER BY 1"

Rows (``judgments``): ``status`` ``ok`` (scored; ``kept`` = score >= min), ``error`` (no score:
a reply without a valid score, or a failed call that is permanent or out of attempts; the
reason says why; never kept) or ``retry`` (a transient failure: timeout, OOM, dead engine, HTTP
429/5xx, :mod:`finelake.faults`; the next run scores it again, up to ``judge.max_attempts``
runs), and ``attempts`` (runs that tried it). Rows written before statuses existed have a null
status and are final.

Work is committed ``judge.chunk_rows`` pairs at a time (:func:`finelake.jobs.common.commit_in_chunks`),
so a killed run loses at most one chunk; a rerun judges only pairs without a final row. ``error``
rows are copied to ``quarantine`` (target ``judgments``, source ``judge``). The summary counts
kept pairs as output, scored pairs under the minimum as ``judge_score<min``, errors as
``error:judge_error``, rows left to retry as ``retry:judge_error`` (and ``retry=``).

    spark-submit jobs/judge.py --conf conf/local.yaml
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import pandas as pd

from finelake.jobs.common import (RETRY_MERGE, call_meter, commit_in_chunks, job_main, map_rows,
                                  quarantine_failures, record_meter, require, unfinished)
from finelake.resources import MODEL_STAGE, chunk_size, plan_stage
from finelake.runtime import StageContext, StageStats
from finelake.tables import INSTANTIATIONS, JUDGMENTS

STAGE = "judge"
RESOURCES = MODEL_STAGE
"""One GPU per task where the cluster has GPUs (the judge; see :mod:`finelake.resources`)."""
log = logging.getLogger(__name__)


def judge_rows(pdf: pd.DataFrame, spec: dict, min_score: int, prompt_version: str,
               max_attempts: int = 3, quality_rules: Optional[dict] = None) -> list[dict]:
    """Executor side: (pair_key, doc_id, template_id, instruction, answer, optional
    prior_attempts) in, ``judgments`` rows out (status, attempts = prior_attempts + 1; see the
    module docstring). A pair whose score could not be obtained is not kept and its reason says
    why; it is ``retry`` when the failure is transient and attempts are left
    (:func:`finelake.faults.settle`). ``quality_rules`` (``instantiate.quality``) go to the
    embedded relevance judge's quality part unless its spec sets ``options.quality_rules``;
    its parts land in ``judge_parts``."""
    from finelake.faults import settle
    from finelake.udfs.judge import judge_frame

    opts = spec.get("options") or {}
    if spec.get("backend") == "relevance" and quality_rules is not None and "quality_rules" not in opts:
        spec = {**spec, "options": {**opts, "quality_rules": quality_rules}}

    j = judge_frame(spec, pdf)
    prior = (pdf["prior_attempts"].fillna(0).astype(int).tolist() if "prior_attempts" in pdf
             else [0] * len(pdf))
    rows = []
    for i in range(len(pdf)):
        s = j["judge_score"].iloc[i]
        score = None if s is None or pd.isna(s) else int(s)
        reason = j["judge_reason"].iloc[i]
        attempts = prior[i] + 1
        status = "ok"
        if score is None:
            status, reason = settle(reason or "judge_error: no score", attempts, max_attempts)
        rows.append({"pair_key": pdf["pair_key"].iloc[i], "doc_id": pdf["doc_id"].iloc[i],
                     "template_id": pdf["template_id"].iloc[i], "judge_score": score,
                     "judge_reason": reason, "kept": score is not None and score >= min_score,
                     "judge_model": j["judge_model"].iloc[i], "prompt_version": prompt_version,
                     "status": status, "attempts": attempts,
                     "judge_parts": j["judge_parts"].iloc[i] if "judge_parts" in j else None})
    return rows


def run_judge(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Judge every ok instantiation without a final judgment yet (none, or ``retry``), in
    committed chunks of ``judge.chunk_rows`` pairs.

    Returns:
        Stats: rows_in = ok instantiations, rows_out = kept, dropped ``judge_score<min`` /
        ``error:judge_error`` / ``retry:judge_error``, quarantined = ``error`` rows,
        ``extra["retry"]`` = rows left to retry, ``scores`` = the score distribution.

    Raises:
        FinelakeError: ``instantiations`` missing (run ``finelake instantiate``).
    """
    from pyspark.sql import functions as F

    cfg, lake = ctx.cfg, ctx.lake
    stats = StageStats(STAGE)
    ok = (require(ctx, INSTANTIATIONS, "instantiate").where("status = 'ok'")
          .select("pair_key", "doc_id", "template_id", "instruction", "answer")).cache()
    stats.rows_in = ok.count()
    pending = unfinished(lake, ok, JUDGMENTS, "pair_key").cache()
    n_pending = pending.count()
    stats.skipped = stats.rows_in - n_pending
    if n_pending:
        spec = cfg.models.judge.model_dump()
        fn = functools.partial(judge_rows, spec=spec, min_score=cfg.judge.min_score,
                               prompt_version=cfg.judge.prompt_version,
                               max_attempts=cfg.judge.max_attempts,
                               quality_rules=cfg.instantiate.quality.model_dump())
        # One GPU per task on GPU clusters, each task's rows in judge calls of batch_size.
        plan = plan_stage(ctx.spark, RESOURCES)
        meter = call_meter(ctx.spark)
        size = chunk_size(cfg.judge.chunk_rows, spec["batch_size"], plan.tasks)
        log.info("%s: %s; %d pairs per chunk", STAGE, plan.note, size)
        # Chunks are drawn over every ok pair, not the pending ones (see commit_in_chunks).
        commit_in_chunks(ctx, STAGE, JUDGMENTS, pending, "pair_key", stats.rows_in, size,
                         lambda part: map_rows(part, fn, JUDGMENTS, min_rows=spec["batch_size"],
                                               meter=meter, profile=plan.profile),
                         plan=plan, **RETRY_MERGE)
        record_meter(stats, meter)
    pending.unpersist()
    lake.create(JUDGMENTS)  # empty when nothing was instantiated: budget still reads it
    lake.add_missing_columns(JUDGMENTS)
    j = lake.read(JUDGMENTS).join(ok.select("pair_key"), "pair_key", "left_semi")
    # Rows from before statuses: a score is ok, none an error.
    outcome = F.coalesce("status", F.when(F.col("judge_score").isNull(), "error").otherwise("ok"))
    for r in j.groupBy(outcome.alias("outcome"), "kept").count().collect():
        if r["outcome"] == "ok" and r["kept"]:
            stats.rows_out += r["count"]
        elif r["outcome"] == "ok":
            stats.drop(f"judge_score<{cfg.judge.min_score}", r["count"])
        else:
            stats.drop(f"{r['outcome']}:judge_error", r["count"])
            if r["outcome"] == "retry":
                stats.extra["retry"] = stats.extra.get("retry", 0) + r["count"]
    stats.extra.setdefault("retry", 0)
    stats.quarantined = quarantine_failures(ctx, STAGE, JUDGMENTS, "pair_key", ok)
    dist = {int(r["judge_score"]) if r["judge_score"] is not None else None: r["count"]
            for r in j.groupBy("judge_score").count().collect()}
    stats.extra["scores"] = "{" + ", ".join(f"{k}:{v}" for k, v in sorted(dist.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))) + "}"
    ok.unpersist()
    lake.register(JUDGMENTS)
    return stats.finish()


def main(argv=None):
    job_main(STAGE, argv)


if __name__ == "__main__":
    main()
