"""genericize: ``queries`` -> ``genericizations`` (one row per query) -> ``templates`` (§3.1).

Each query is turned into an instruction template with ``<fi>description</fi>`` slots and a
compatible document description by the configured generator, under constrained JSON decoding
unless ``genericize.constrained`` is false (then the first JSON object of the reply is read; see
:mod:`finelake.method.prompts` for the ``direct`` and ``decomposed`` modes). Each row records its
reply's ``flags`` (:mod:`finelake.method.replies`); the summary shows ``parse_rate=`` and
``flags=``. Every query gets a
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

    spark-submit bin/finelake_job.py genericize --conf conf/local.yaml [--max-queries N]
"""

from __future__ import annotations

import json
import logging

import pandas as pd

from finelake.jobs.common import (count_outcomes, limit_ordered, model_label,
                                  read_for_keys, require)
from finelake.jobs.signals import reply_signals
from finelake.method import prompts, templates
from finelake.runtime import StageContext, StageStats
from finelake.stage import ChunkSettings, Limits, ModelStage
from finelake.tables import GENERICIZATIONS, QUERIES, TEMPLATES

STAGE = "genericize"
log = logging.getLogger(__name__)


def genericize_rows(pdf: pd.DataFrame, spec: dict, mode: str, max_slots: int,
                    prompt_version: str, max_attempts: int = 3,
                    constrained: bool = True) -> list[dict]:
    """Executor side: a batch of queries (query_id, query, optional prior_attempts) in,
    ``genericizations`` rows out, each with ``attempts`` = prior_attempts + 1.

    The model is reached through :func:`finelake.udfs.generation.generate_frame` (loaded once per
    Python worker). A failed generation affects that row only: status ``retry`` when the error is
    transient and attempts are left, else ``error`` (:func:`finelake.faults.settle`). With
    ``constrained`` False no JSON schema is sent and replies are read leniently
    (:func:`finelake.method.prompts.parse_genericize`); every row with a reply gets its ``flags``.
    """
    from finelake.faults import settle
    from finelake.udfs.generation import generate_frame

    label = model_label(spec)
    reqs = [prompts.genericize_request(q, mode, max_slots, constrained) for q in pdf["query"]]
    todo = [i for i, r in enumerate(reqs) if r is not None]
    gen = generate_frame(spec, pd.DataFrame({
        "messages": [json.dumps(reqs[i].messages, ensure_ascii=False) for i in todo],
        "json_schema": [json.dumps(reqs[i].json_schema) if reqs[i].json_schema else None
                        for i in todo],
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
               "compatible_document_description": res.compatible_document_description,
               "flags": res.flags}
        if res.ok:
            row.update(status="ok", template_id=templates.template_id(res.template),
                       num_slots=templates.num_slots(res.template))
        else:
            row.update(status="invalid", reason=res.reason)
        rows.append(row)
    return rows


def _settings(cfg) -> ChunkSettings:
    g = cfg.genericize
    return ChunkSettings(model=g.model or cfg.models.generator, chunk_size=g.chunk_rows,
                         max_attempts=g.max_attempts)


def _scope(ctx: StageContext, limits: Limits):
    """The first ``max_queries`` queries by id (``run.max_queries``; all when unset), ids only."""
    n = limits.max_queries or ctx.cfg.run.max_queries
    return limit_ordered(require(ctx, QUERIES, "ingest").select("query_id"), "query_id", n)


def _inputs(ctx: StageContext, keys, n_chunks: int, chunk):
    """A chunk's query ids with their text, read by key from ``queries``."""
    return keys.join(read_for_keys(ctx, QUERIES, keys, "query_id", n_chunks, chunk, ["query"]),
                     "query_id")


def _row_args(ctx: StageContext, spec: dict) -> dict:
    g = ctx.cfg.genericize
    return dict(spec=spec, mode=g.mode, max_slots=g.max_slots, prompt_version=g.prompt_version,
                max_attempts=g.max_attempts, constrained=g.constrained)


def _summarize(ctx: StageContext, stats: StageStats, scope) -> None:
    """Count every query in scope, then rebuild ``templates`` from all ``ok`` rows (merged by
    template id, keeping the ids and the count of the queries that gave them)."""
    from pyspark.sql import functions as F

    lake = ctx.lake
    rows = lake.read(GENERICIZATIONS).join(scope, "query_id", "left_semi")
    count_outcomes(stats, rows)
    stats.extra.update(reply_signals(rows).summary())
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


GENERICIZE = ModelStage(
    name=STAGE,
    help="Genericize queries into <fi> templates (queries -> genericizations, templates).",
    table=GENERICIZATIONS, key="query_id", chunk_key="query_id",
    reads=(QUERIES,), also_writes=(TEMPLATES,),
    settings=_settings, scope=_scope, inputs=_inputs, rows=genericize_rows, row_args=_row_args,
    summarize=_summarize, options=("max_queries",))
"""genericize as a model stage (:mod:`finelake.stage`): one row per query, chunks of queries."""


def run_genericize(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Genericize the (first ``max_queries``, by id) queries that have no final row yet (none, or
    ``retry``), then rebuild ``templates`` from all ``ok`` rows.

    Returns:
        Stats: rows_in = queries considered, rows_out = valid templates, dropped by
        ``status:reason``, skipped = queries already genericized, quarantined = ``error`` rows,
        ``retry`` = rows left with status ``retry``.

    Raises:
        FinelakeError: ``queries`` does not exist (run ``finelake ingest``).
    """
    from finelake.jobs.runner import run_model_stage

    return run_model_stage(ctx, GENERICIZE, Limits(max_queries=max_queries))
