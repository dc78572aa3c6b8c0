"""genericize: ``queries`` -> ``genericizations`` (one row per query) -> ``templates`` (§3.1).

Each query is turned into an instruction template with ``<fi>description</fi>`` slots and a
compatible document description by the configured generator, under constrained JSON decoding
(see :mod:`finelake.method.prompts` for the ``direct`` and ``decomposed`` modes). Every query gets a
row in ``genericizations``: status ``ok`` with its template, or ``invalid`` / ``no_candidate_span`` /
``error`` with the reason, or ``retry`` (see Faults below), and ``attempts``, the runs that tried
it. Valid templates are merged by content id into ``templates``, keeping the
ids and the count of the queries that gave them.

Work is committed in chunks of ``genericize.chunk_rows`` queries; a rerun skips queries that
already have a final row, so a killed run resumes where it stopped.

Faults (:mod:`finelake.faults`): a generation that failed transiently (timeout, OOM, dead engine,
HTTP 429/5xx) leaves the row ``retry``; the next run tries it again (its row is overwritten) up to
``genericize.max_attempts`` runs, after which it is ``error`` ("gave up after N attempts: ...").
``error`` rows are copied to ``quarantine`` (target ``genericizations``, source ``genericize``).
The summary counts them (``quarantined=``) and the rows left to retry (``retry=``); ``finelake
run`` stops before the index while any are left, so templates come from a settled table.

    spark-submit jobs/genericize.py --conf conf/local.yaml [--max-queries N]
"""

from __future__ import annotations

import functools
import json
import logging

import pandas as pd

from finelake.jobs.common import (RETRY_MERGE, call_meter, commit_in_chunks, count_outcomes,
                                  job_main, limit_ordered, map_rows, model_label, model_spec,
                                  quarantine_failures, record_meter, require, unfinished)
from finelake.method import prompts, templates
from finelake.resources import chunk_size, model_resources, plan_stage
from finelake.runtime import StageContext, StageStats
from finelake.tables import GENERICIZATIONS, QUERIES, TEMPLATES

STAGE = "genericize"
log = logging.getLogger(__name__)


def genericize_rows(pdf: pd.DataFrame, spec: dict, mode: str, max_slots: int,
                    prompt_version: str, max_attempts: int = 3) -> list[dict]:
    """Executor side: a batch of queries (query_id, query, optional prior_attempts) in,
    ``genericizations`` rows out, each with ``attempts`` = prior_attempts + 1.

    The model is reached through :func:`finelake.udfs.generation.generate_frame` (loaded once per
    Python worker). A failed generation affects that row only: status ``retry`` when the error is
    transient and attempts are left, else ``error`` (:func:`finelake.faults.settle`).
    """
    from finelake.faults import settle
    from finelake.udfs.generation import generate_frame

    label = model_label(spec)
    reqs = [prompts.genericize_request(q, mode, max_slots) for q in pdf["query"]]
    todo = [i for i, r in enumerate(reqs) if r is not None]
    gen = generate_frame(spec, pd.DataFrame({
        "messages": [json.dumps(reqs[i].messages, ensure_ascii=False) for i in todo],
        "json_schema": [json.dumps(reqs[i].json_schema) for i in todo],
        "max_tokens": [spec.get("max_tokens")] * len(todo),
    })) if todo else None
    out = {i: None for i in range(len(pdf))}
    for j, i in enumerate(todo):
        out[i] = gen.iloc[j]
    rows = []
    prior = (pdf["prior_attempts"].fillna(0).astype(int).tolist() if "prior_attempts" in pdf
             else [0] * len(pdf))
    for i, (qid, q) in enumerate(zip(pdf["query_id"], pdf["query"])):
        base = {"query_id": qid, "model_id": label, "prompt_version": prompt_version,
                "attempts": prior[i] + 1}
        g = out[i]
        if reqs[i] is None:
            rows.append({**base, "status": "invalid", "reason": "no_candidate_span"})
            continue
        if g is None or (isinstance(g["error"], str) and g["error"]):
            status, reason = settle(
                f"generation_error: {g['error'] if g is not None else 'missing'}",
                base["attempts"], max_attempts)
            rows.append({**base, "status": status, "reason": reason})
            continue
        text = g["text"] if isinstance(g["text"], str) else None
        res = prompts.parse_genericize(q, reqs[i], text, mode)
        row = {**base, "raw_output": text, "template": res.template,
               "compatible_document_description": res.compatible_document_description}
        if res.ok:
            row.update(status="ok", template_id=templates.template_id(res.template),
                       num_slots=templates.num_slots(res.template))
        else:
            row.update(status="invalid", reason=res.reason)
        rows.append(row)
    return rows


def run_genericize(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Genericize the (first ``max_queries``, by id) queries that have no final row yet (none, or ``retry``), then rebuild
    ``templates`` from all ``ok`` rows.

    Returns:
        Stats: rows_in = queries considered, rows_out = valid templates this run, dropped by
        ``status:reason``, skipped = queries already genericized, quarantined = ``error`` rows,
        ``extra["retry"]`` = rows left with status ``retry``.

    Raises:
        FinelakeError: ``queries`` does not exist (run ``finelake ingest``).
    """
    from pyspark.sql import functions as F

    cfg, lake = ctx.cfg, ctx.lake
    gcfg = cfg.genericize
    stats = StageStats(STAGE)
    n = max_queries or cfg.run.max_queries
    queries = limit_ordered(require(ctx, QUERIES, "ingest").select("query_id", "query"), "query_id", n)
    queries = queries.cache()
    stats.rows_in = queries.count()
    # New queries and those whose last try failed transiently (status retry).
    pending = unfinished(lake, queries, GENERICIZATIONS, "query_id").cache()
    n_pending = pending.count()
    stats.skipped = stats.rows_in - n_pending
    spec = model_spec(gcfg.model or cfg.models.generator)
    fn = functools.partial(genericize_rows, spec=spec, mode=gcfg.mode, max_slots=gcfg.max_slots,
                           prompt_version=gcfg.prompt_version, max_attempts=gcfg.max_attempts)
    # One GPU per task on GPU clusters; chunks big enough for a whole batch per GPU task.
    plan = plan_stage(ctx.spark, model_resources(spec))
    meter = call_meter(ctx.spark)
    size = chunk_size(gcfg.chunk_rows, spec["batch_size"], plan.tasks)
    log.info("%s: %s; %d queries per chunk", STAGE, plan.note, size)
    # Chunks are drawn over every query of the run, not the pending ones (see commit_in_chunks).
    commit_in_chunks(ctx, STAGE, GENERICIZATIONS, pending, "query_id",
                     stats.rows_in if n_pending else 0, size,
                     lambda part: map_rows(part, fn, GENERICIZATIONS, min_rows=spec["batch_size"],
                                           meter=meter, profile=plan.profile), plan=plan,
                     **RETRY_MERGE)
    record_meter(stats, meter)
    queries.unpersist()
    pending.unpersist()

    # Account for every query of this run, then rebuild the merged templates.
    gen = lake.read(GENERICIZATIONS).join(queries.select("query_id"), "query_id", "left_semi")
    count_outcomes(stats, gen)
    stats.quarantined = quarantine_failures(ctx, STAGE, GENERICIZATIONS, "query_id", queries)
    stats.extra["retry"] = gen.where("status = 'retry'").count()
    ok = lake.read(GENERICIZATIONS).where("status = 'ok'")
    merged = (ok.groupBy("template_id").agg(
        F.first("template").alias("template"),
        F.first("compatible_document_description").alias("compatible_document_description"),
        F.first("num_slots").alias("num_slots"),
        F.sort_array(F.collect_list("query_id")).alias("source_query_ids"),
        F.count("*").alias("source_count"),
        F.first("model_id").alias("model_id"),
        F.first("prompt_version").alias("prompt_version"),
    ))
    lake.merge(TEMPLATES, merged, ctx.run_id, update=True,
               update_when="t.source_count <> s.source_count")
    stats.extra["templates"] = lake.read(TEMPLATES).count()
    stats.extra["valid_share"] = f"{stats.rows_out / stats.rows_in:.3f}" if stats.rows_in else "n/a"
    lake.register(GENERICIZATIONS)
    lake.register(TEMPLATES)
    return stats.finish()


def main(argv=None):
    job_main(STAGE, argv)


if __name__ == "__main__":
    main()
