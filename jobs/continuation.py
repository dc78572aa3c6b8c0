"""continue: ``documents`` -> ``continuations`` (non-instructional data, arXiv 2409.00096 §3).

"Halving and completion": documents are sampled uniformly with a seed (the first N by
:func:`finelake.method.continuation.sample_key`), each is split at a seeded uniform point between
``continue.split_min`` and ``continue.split_max`` of its length snapped to a sentence boundary
(token boundary when none is in range), and a teacher model (``continue.model``, default
``models.generator``; ``backend: openai`` serves GPT-3.5/4-class teachers as in the paper)
writes the continuation of the first half. Every sampled document gets one row: status ``ok``,
``dropped`` with the reason (empty, repetitive, echo, truncated, too_short, unsplittable),
``retry`` (the backend failed transiently: the next run tries it again, up to
``continue.max_attempts`` runs) or ``error`` (failed for good; copied to ``quarantine``). Rows also carry the instructional-content
scores of :mod:`finelake.method.instructional` for the whole document, the prompt half and the kept
continuation, their maximum (``instructional_score``, ``instructional`` when at or above
``continue.instructional_threshold``) and the contributing features as ``document:<feature>`` /
``prompt:<feature>`` / ``continuation:<feature>`` flags next to the quality flags, so training can
use ``status = 'ok' AND NOT instructional`` as the paper's filtered set (§5).

continue is a model stage like genericize or instantiate (:data:`CONTINUE`,
:func:`finelake.jobs.runner.run_model_stage`): one GPU per task on GPU clusters, work committed in
chunks of ``continue.chunk_documents``, a rerun skips documents whose row is final (any status but
``retry``), so it adds nothing when the previous run finished.

    spark-submit bin/finelake_job.py continue --conf conf/local.yaml [--max-documents N]
"""

from __future__ import annotations

import json
import math
from typing import Optional

import pandas as pd

from finelake.jobs.common import model_label, read_for_keys, require
from finelake.method import continuation as cont
from finelake.method import instructional
from finelake.runtime import StageContext, StageStats
from finelake.stage import ChunkSettings, Limits, ModelStage
from finelake.tables import CONTINUATIONS, DOCUMENTS

STAGE = "continue"


def _quality_rules(ccfg) -> cont.QualityRules:
    return cont.QualityRules(min_words=ccfg.min_words, ngram=ccfg.repeat_ngram,
                             max_repeat_share=ccfg.max_repeat_share,
                             max_prompt_overlap=ccfg.max_prompt_overlap, truncation=ccfg.truncation)


def continue_rows(pdf: pd.DataFrame, spec: dict, seed: int, split_min: float, split_max: float,
                  rules: cont.QualityRules, threshold: float, prompt_version: str,
                  max_tokens: int, max_attempts: int = 3) -> list[dict]:
    """Executor side: documents (doc_id, text, optional prior_attempts) in, ``continuations`` rows
    (without run_id) out, each with ``attempts`` = prior_attempts + 1.

    The teacher is reached through :func:`finelake.udfs.generation.generate_frame` (loaded once
    per Python worker); a failed request affects that row only: ``retry`` when the failure is
    transient and attempts are left, else ``error`` (:func:`finelake.faults.settle`).
    """
    from finelake.udfs.generation import generate_frame

    label = model_label(spec)
    prior = (pdf["prior_attempts"].fillna(0).astype(int).tolist() if "prior_attempts" in pdf
             else [0] * len(pdf))
    rows, todo = [], []
    for i, (doc_id, text) in enumerate(zip(pdf["doc_id"], pdf["text"])):
        text = text or ""
        row = {"doc_id": doc_id, "doc_chars": len(text), "model_id": label,
               "prompt_version": prompt_version, "seed": int(seed), "flags": [],
               "attempts": prior[i] + 1}
        try:
            split = cont.choose_split(text, doc_id, seed, split_min, split_max)
        except ValueError as exc:
            row.update(status="dropped", reason=f"unsplittable: {exc}")
            rows.append(row)
            continue
        prompt, rest = cont.halve(text, split)
        ds = instructional.score_text(text, threshold)
        ps = instructional.score_text(prompt, threshold)
        score = max(ds.score, ps.score)
        row.update(prompt=prompt, original_second_half=rest, split_char=split.char,
                   split_fraction=split.fraction, split_unit=split.unit,
                   document_instructional_score=ds.score, prompt_instructional_score=ps.score,
                   instructional_score=score, instructional=score >= threshold,
                   flags=[f"document:{f}" for f in ds.flags] + [f"prompt:{f}" for f in ps.flags])
        rows.append(row)
        todo.append(len(rows) - 1)
    if todo:
        gen = generate_frame(spec, pd.DataFrame({
            "messages": [json.dumps(cont.continuation_messages(rows[i]["prompt"]),
                                    ensure_ascii=False) for i in todo],
            "json_schema": [None] * len(todo),
            "max_tokens": [max_tokens] * len(todo),
        }))
        for j, i in enumerate(todo):
            _finish_row(rows[i], gen.iloc[j], rules, threshold, max_attempts)
    return rows


def _finish_row(row: dict, g, rules: cont.QualityRules, threshold: float,
                max_attempts: int = 3) -> None:
    """Fill one row from its generation result (status, continuation, scores, flags)."""
    from finelake.faults import settle

    err = g["error"]
    if isinstance(err, str) and err:
        status, reason = settle(f"generation_error: {err}", row["attempts"], max_attempts)
        row.update(status=status, reason=reason)
        return
    raw = g["text"] if isinstance(g["text"], str) else None
    row.update(raw_output=raw, finish_reason=g["finish_reason"],
               prompt_tokens=_int(g["prompt_tokens"]), completion_tokens=_int(g["completion_tokens"]))
    verdict = cont.assess_continuation(raw, g["finish_reason"], row["prompt"], rules)
    row.update(status=verdict.status, reason=verdict.reason, continuation=verdict.text)
    row["flags"] = list(verdict.flags) + row["flags"]
    if verdict.ok:
        cs = instructional.score_text(verdict.text, threshold)
        row["continuation_instructional_score"] = cs.score
        row["instructional_score"] = max(row["instructional_score"], cs.score)
        row["instructional"] = row["instructional_score"] >= threshold
        row["flags"] += [f"continuation:{f}" for f in cs.flags]


def _int(v) -> Optional[int]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)


def sample_documents(df, n: Optional[int], seed: int):
    """The first ``n`` documents (all when None) in the seeded uniform order of
    :func:`finelake.method.continuation.sample_key`, computed by Spark (``sha1``).

    Args:
        df: a DataFrame with a string ``doc_id`` column.
        n: sample size, or None for every document (in sampling order).
        seed: sampling seed.
    """
    from pyspark.sql import functions as F

    key = F.sha1(F.concat(F.lit(cont.sample_key_prefix(seed)), F.col("doc_id")))
    df = df.withColumn("_sample_key", key).orderBy("_sample_key")
    return (df.limit(n) if n else df).drop("_sample_key")


def with_instructional(df, text_col: str = "text",
                       threshold: float = instructional.DEFAULT_THRESHOLD):
    """Add instructional-content columns to any DataFrame of texts (e.g. ``documents``).

    Args:
        df: a DataFrame with a string column ``text_col``.
        text_col: the column to score.
        threshold: score at or above which ``instructional`` is True.

    Returns:
        ``df`` plus ``instructional_score`` (double in [0, 1)), ``instructional`` (boolean) and
        ``instructional_flags`` (array<string>, the features that contributed), as computed by
        :func:`finelake.method.instructional.score_text`.
    """
    from pyspark.sql.types import ArrayType, BooleanType, DoubleType, StringType, StructField, StructType

    schema = StructType(list(df.schema.fields) + [
        StructField("instructional_score", DoubleType()),
        StructField("instructional", BooleanType()),
        StructField("instructional_flags", ArrayType(StringType()))])

    def fn(batches):
        for pdf in batches:
            sc = [instructional.score_text(t if isinstance(t, str) else "", threshold)
                  for t in pdf[text_col]]
            yield pdf.assign(instructional_score=[s.score for s in sc],
                             instructional=[s.instructional for s in sc],
                             instructional_flags=[list(s.flags) for s in sc])

    return df.mapInPandas(fn, schema)


def _settings(cfg) -> ChunkSettings:
    cc = cfg.continue_
    return ChunkSettings(model=cc.model or cfg.models.generator, chunk_size=cc.chunk_documents,
                         max_attempts=cc.max_attempts)


def _scope(ctx: StageContext, limits: Limits):
    """The first ``max_documents`` documents (all when unset) in the seeded uniform order of
    :func:`finelake.method.continuation.sample_key`, ids only."""
    n = limits.max_documents or ctx.cfg.run.max_documents
    return sample_documents(require(ctx, DOCUMENTS, "ingest").select("doc_id"), n,
                            ctx.cfg.continue_.seed)


def _inputs(ctx: StageContext, keys, n_chunks: int, chunk):
    """A chunk's documents with their text, read by key."""
    return keys.join(read_for_keys(ctx, DOCUMENTS, keys, "doc_id", n_chunks, chunk, ["text"]),
                     "doc_id")


def _row_args(ctx: StageContext, spec: dict) -> dict:
    cc = ctx.cfg.continue_
    return dict(spec=spec, seed=cc.seed, split_min=cc.split_min, split_max=cc.split_max,
                rules=_quality_rules(cc), threshold=cc.instructional_threshold,
                prompt_version=cc.prompt_version,
                max_tokens=cc.max_tokens or spec["max_tokens"], max_attempts=cc.max_attempts)


def _summarize(ctx: StageContext, stats: StageStats, scope) -> None:
    """Outcomes by ``status:reason-code``; ``instructional`` (ok rows flagged instructional),
    ``mean_split`` and ``generated_tokens`` (this run's)."""
    from pyspark.sql import functions as F

    rows = ctx.lake.read(CONTINUATIONS).join(scope.select("doc_id"), "doc_id", "left_semi")
    code = F.split(F.coalesce(F.col("reason"), F.lit("")), ":").getItem(0)
    groups = rows.groupBy("status", code.alias("code")).agg(
        F.count("*").alias("n"),
        F.sum(F.when(F.col("instructional"), 1).otherwise(0)).alias("instr"),
        F.sum("split_fraction").alias("split_sum"),
        F.count("split_fraction").alias("split_n"),
        F.sum(F.when(F.col("run_id") == ctx.run_id, F.col("completion_tokens"))).alias("tokens"),
    ).collect()
    for r in groups:
        if r["status"] == "ok":
            stats.rows_out += r["n"]
        else:
            stats.drop(f"{r['status']}:{r['code']}", r["n"])
    split_n = sum(r["split_n"] for r in groups)
    mean_split = sum(r["split_sum"] or 0.0 for r in groups) / split_n if split_n else None
    stats.extra["instructional"] = int(sum(r["instr"] or 0 for r in groups if r["status"] == "ok"))
    stats.extra["mean_split"] = f"{mean_split:.3f}" if mean_split is not None else "n/a"
    stats.extra["generated_tokens"] = int(sum(r["tokens"] or 0 for r in groups))


CONTINUE = ModelStage(
    name=STAGE,
    help="Non-instructional data: halve sampled documents, a teacher continues them "
         "(documents -> continuations).",
    table=CONTINUATIONS, key="doc_id", chunk_key="doc_id", reads=(DOCUMENTS,),
    settings=_settings, scope=_scope, inputs=_inputs, rows=continue_rows, row_args=_row_args,
    summarize=_summarize, options=("max_documents",), in_run=False)
"""continue as a model stage (:mod:`finelake.stage`): one row per sampled document, with
resources, attempts, retry and quarantine like the other model stages; not part of ``finelake
run``."""


def run_continue(ctx: StageContext, max_documents: Optional[int] = None,
                 max_queries: Optional[int] = None) -> StageStats:
    """Write teacher continuations of the first halves of a seeded uniform document sample.

    Args:
        ctx: stage context (config section ``continue``; ``run.max_documents`` when
            ``max_documents`` is None).
        max_documents: sample size; None: ``run.max_documents``, or every document.
        max_queries: ignored (the shared stage signature).

    Returns:
        Stats: rows_in = documents sampled, rows_out = rows with status ok, dropped by
        ``status:reason-code``, skipped = documents already final (any status but ``retry``),
        quarantined = ``error`` rows, ``retry`` = rows left to retry; extra: ``instructional``
        (ok rows flagged instructional), ``mean_split`` and ``generated_tokens``.

    Raises:
        FinelakeError: ``documents`` does not exist (run ``finelake ingest``).
    """
    from finelake.jobs.runner import run_model_stage

    return run_model_stage(ctx, CONTINUE, Limits(max_documents=max_documents))
