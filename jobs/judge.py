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

    spark-submit bin/finelake_job.py judge --conf conf/local.yaml
"""

from __future__ import annotations

import logging
from typing import Optional

import pandas as pd

from finelake.jobs.common import read_for_keys, require
from finelake.runtime import StageContext, StageStats
from finelake.stage import ChunkSettings, Limits, ModelStage
from finelake.tables import INSTANTIATIONS, JUDGMENTS, TEMPLATES

STAGE = "judge"
log = logging.getLogger(__name__)


def with_quality_rules(spec: dict, quality_rules: Optional[dict]) -> dict:
    """The judge's model spec with ``instantiate.quality`` applied to the embedded relevance judge.

    The rules' thresholds become its ``options.quality_rules`` and ``enabled: false`` turns its
    quality part off (``options.quality: false``), so one switch runs the whole pipeline with or
    without the quality rules (issue 26's before/after); an option the spec sets itself wins.
    Other backends' specs (an LLM judge) are returned unchanged.

    Args:
        spec: the judge's model spec (dict form of :class:`finelake.models.spec.ModelSpec`).
        quality_rules: ``instantiate.quality`` as a dict, or None (spec unchanged).

    Returns:
        A new spec dict (``spec`` is not modified).
    """
    if spec.get("backend") != "relevance" or quality_rules is None:
        return spec
    opts = dict(spec.get("options") or {})
    opts.setdefault("quality_rules", quality_rules)
    if quality_rules.get("enabled") is False:
        opts.setdefault("quality", False)
    return {**spec, "options": opts}


def judge_rows(pdf: pd.DataFrame, spec: dict, min_score: int, prompt_version: str,
               max_attempts: int = 3, quality_rules: Optional[dict] = None) -> list[dict]:
    """Executor side: (pair_key, doc_id, template_id, instruction, answer, optional template,
    optional prior_attempts) in, ``judgments`` rows out (status, attempts = prior_attempts + 1; see the
    module docstring). A pair whose score could not be obtained is not kept and its reason says
    why; it is ``retry`` when the failure is transient and attempts are left
    (:func:`finelake.faults.settle`). ``quality_rules`` (``instantiate.quality``) go to the
    embedded relevance judge's quality part unless its spec sets ``options.quality_rules``;
    its parts land in ``judge_parts``."""
    from finelake.faults import settle
    from finelake.udfs.judge import judge_frame

    spec = with_quality_rules(spec, quality_rules)
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


def _settings(cfg) -> ChunkSettings:
    return ChunkSettings(model=cfg.models.judge, chunk_size=cfg.judge.chunk_rows,
                         max_attempts=cfg.judge.max_attempts, kind="judge")


def _scope(ctx: StageContext, limits: Limits):
    """Every ``ok`` instantiation, keys only (``pair_key``, ``doc_id``, ``template_id``)."""
    return (require(ctx, INSTANTIATIONS, "instantiate").where("status = 'ok'")
            .select("pair_key", "doc_id", "template_id"))


def _inputs(ctx: StageContext, keys, n_chunks: int, chunk):
    """A chunk's pairs with their instruction and answer, read by key from ``instantiations``;
    for the embedded ``relevance`` judge also their template's text (``templates``: its
    instruction rules look at the slot fills, as instantiate's do). An LLM judge reads the pair
    alone, so its chunks do not join the templates table."""
    text = read_for_keys(ctx, INSTANTIATIONS, keys, "pair_key", n_chunks, chunk,
                         ["instruction", "answer"])
    pairs = keys.join(text, "pair_key")
    if ctx.cfg.models.judge.backend != "relevance" or not ctx.lake.exists(TEMPLATES):
        return pairs
    return pairs.join(ctx.lake.read(TEMPLATES).select("template_id", "template"), "template_id",
                      "left")


def _row_args(ctx: StageContext, spec: dict) -> dict:
    jc = ctx.cfg.judge
    return dict(spec=spec, min_score=jc.min_score, prompt_version=jc.prompt_version,
                max_attempts=jc.max_attempts,
                quality_rules=ctx.cfg.instantiate.quality.model_dump())


def _summarize(ctx: StageContext, stats: StageStats, scope) -> None:
    """Kept pairs as output, scored pairs under the minimum as ``judge_score<min``, errors as
    ``error:judge_error``, rows left to retry as ``retry:judge_error``; ``scores`` = the score
    distribution."""
    from pyspark.sql import functions as F

    min_score = ctx.cfg.judge.min_score
    j = ctx.lake.read(JUDGMENTS).join(scope.select("pair_key"), "pair_key", "left_semi")
    # Rows from before statuses: a score is ok, none an error.
    outcome = F.coalesce("status", F.when(F.col("judge_score").isNull(), "error").otherwise("ok"))
    for r in j.groupBy(outcome.alias("outcome"), "kept").count().collect():
        if r["outcome"] == "ok" and r["kept"]:
            stats.rows_out += r["count"]
        elif r["outcome"] == "ok":
            stats.drop(f"judge_score<{min_score}", r["count"])
        else:
            stats.drop(f"{r['outcome']}:judge_error", r["count"])
    dist = {int(r["judge_score"]) if r["judge_score"] is not None else None: r["count"]
            for r in j.groupBy("judge_score").count().collect()}
    stats.extra["scores"] = "{" + ", ".join(
        f"{k}:{v}" for k, v in sorted(dist.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))) + "}"


JUDGE = ModelStage(
    name=STAGE,
    help="Score instantiated pairs 1-5 and keep those >= judge.min_score (instantiations -> judgments).",
    table=JUDGMENTS, key="pair_key", chunk_key="pair_key",
    reads=(INSTANTIATIONS, TEMPLATES),
    settings=_settings, scope=_scope, inputs=_inputs, rows=judge_rows, row_args=_row_args,
    summarize=_summarize, options=())
"""judge as a model stage (:mod:`finelake.stage`): one row per ``ok`` instantiation."""


def run_judge(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Judge every ok instantiation without a final judgment yet (none, or ``retry``), in
    committed chunks of ``judge.chunk_rows`` pairs.

    Returns:
        Stats: rows_in = ok instantiations, rows_out = kept, dropped ``judge_score<min`` /
        ``error:judge_error`` / ``retry:judge_error``, quarantined = ``error`` rows,
        ``retry`` = rows left to retry, ``scores`` = the score distribution.

    Raises:
        FinelakeError: ``instantiations`` missing (run ``finelake instantiate``).
    """
    from finelake.jobs.runner import run_model_stage

    return run_model_stage(ctx, JUDGE, Limits())
