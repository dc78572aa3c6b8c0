"""judge: ``instantiations`` (status ok) -> ``judgments`` (§3.4).

Each instantiated pair is scored 1-5 with the rubric of :mod:`finelake.method.judging`; pairs under
``judge.min_score`` (4) are marked ``kept = false``. Scores and reasons stay in ``judgments`` so a
user can ask in SQL why pairs were dropped::

    finelake sql "SELECT judge_score, count(*) FROM finelake.judgments GROUP BY 1 ORDER BY 1"

    spark-submit jobs/judge.py --conf conf/local.yaml
"""

from __future__ import annotations

import functools
import logging

import pandas as pd

from finelake.jobs.common import call_meter, job_main, map_rows, record_meter, require, spread
from finelake.resources import MODEL_STAGE, model_worker_pool, plan_stage
from finelake.runtime import StageContext, StageStats
from finelake.tables import INSTANTIATIONS, JUDGMENTS

STAGE = "judge"
RESOURCES = MODEL_STAGE
"""One GPU per task where the cluster has GPUs (the judge; see :mod:`finelake.resources`)."""
log = logging.getLogger(__name__)


def judge_rows(pdf: pd.DataFrame, spec: dict, min_score: int, prompt_version: str) -> list[dict]:
    """Executor side: (pair_key, doc_id, template_id, instruction, answer) in, ``judgments`` rows
    out; a pair whose score could not be obtained is not kept and its reason says why."""
    from finelake.udfs.judge import judge_frame

    j = judge_frame(spec, pdf)
    rows = []
    for i in range(len(pdf)):
        s = j["judge_score"].iloc[i]
        score = None if s is None or pd.isna(s) else int(s)
        rows.append({"pair_key": pdf["pair_key"].iloc[i], "doc_id": pdf["doc_id"].iloc[i],
                     "template_id": pdf["template_id"].iloc[i], "judge_score": score,
                     "judge_reason": j["judge_reason"].iloc[i],
                     "kept": score is not None and score >= min_score,
                     "judge_model": j["judge_model"].iloc[i], "prompt_version": prompt_version})
    return rows


def run_judge(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Judge every ok instantiation without a judgment yet.

    Raises:
        FinelakeError: ``instantiations`` missing (run ``finelake instantiate``).
    """
    cfg, lake = ctx.cfg, ctx.lake
    stats = StageStats(STAGE)
    ok = (require(ctx, INSTANTIATIONS, "instantiate").where("status = 'ok'")
          .select("pair_key", "doc_id", "template_id", "instruction", "answer")).cache()
    stats.rows_in = ok.count()
    pending = ok
    if lake.exists(JUDGMENTS):
        pending = ok.join(lake.read(JUDGMENTS).select("pair_key"), "pair_key", "left_anti")
    n_pending = pending.count()
    stats.skipped = stats.rows_in - n_pending
    if n_pending:
        spec = cfg.models.judge.model_dump()
        fn = functools.partial(judge_rows, spec=spec, min_score=cfg.judge.min_score,
                               prompt_version=cfg.judge.prompt_version)
        # One GPU per task on GPU clusters, each task's rows in one judge call (batch_size).
        plan = plan_stage(ctx.spark, RESOURCES)
        meter = call_meter(ctx.spark)
        log.info("%s: %s", STAGE, plan.note)
        with model_worker_pool(ctx.spark):
            judged = map_rows(spread(pending, "pair_key", plan.tasks), fn, JUDGMENTS,
                              min_rows=spec["batch_size"], meter=meter, profile=plan.profile)
        lake.merge(JUDGMENTS, judged, ctx.run_id)
        record_meter(stats, meter)
    lake.create(JUDGMENTS)  # empty when nothing was instantiated: budget still reads it
    j = lake.read(JUDGMENTS).join(ok.select("pair_key"), "pair_key", "left_semi")
    for r in j.groupBy("kept").count().collect():
        if r["kept"]:
            stats.rows_out += r["count"]
        else:
            stats.drop(f"judge_score<{cfg.judge.min_score}", r["count"])
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
