"""instantiate: ``matches`` -> ``instantiations`` (§3.3).

For each (document, template) match the generator fills the template's slots from the document
and answers mostly by excerpt: ``<excerpt>start<...>end</excerpt>`` pointers are expanded in code
only where they match exactly one span of the document, the excerpted share of the answer is
computed, and pairs under ``instantiate.min_excerpt_ratio`` (0.8) are kept as ``excerpt_rejected``
with that reason. An incompatible pair is recorded as ``null``, not forced. A pair that parses
but fails a quality rule (:mod:`finelake.method.quality`: the answer is navigation, markup,
headings, repeated lines or too short; a slot holds a section number or a path) is ``filtered``
with ``quality:<rule>: ...`` as its reason and never reaches the judge (``instantiate.quality``).
Every match gets one row: ``ok``, ``null``, ``excerpt_rejected``, ``filtered``, ``invalid``,
``error`` or ``retry``, with ``attempts`` (the runs that tried it) and ``answer_position``
(where the answer starts in its document, §3.2).

Faults (:mod:`finelake.faults`): a generation that failed transiently (timeout, OOM, dead engine,
HTTP 429/5xx) leaves the row ``retry``; the next run tries it again (the row is overwritten) up
to ``instantiate.max_attempts`` runs, then it is ``error`` ("gave up after N attempts: ...").
``error`` rows are copied to ``quarantine`` (target ``instantiations``, source ``instantiate``);
the summary counts them (``quarantined=``) and the rows left to retry (``retry=``). A document
with a ``retry`` row is not ready for budget.

Requests are grouped by document. In direct mode the prompt is the released contract,
``{"instruction_template": …, "document": …}``, the template first, so a document's requests
share no prefix beyond the chat template's; decomposed mode puts the numbered document in the
system message, so there they share it (vLLM prefix caching; llama.cpp KV-cache reuse;
``benchmarks/bench_prefix_cache.py`` measures the hit rate). Each row records its reply's
``flags`` (:mod:`finelake.method.replies`); the summary shows ``parse_rate=`` and ``flags=``.
Work is committed ``instantiate.chunk_documents`` documents at a time; a rerun skips finished
pairs (any status but ``retry``), so a killed run resumes and ends with the same rows as an
uninterrupted one (greedy decoding).

    spark-submit bin/finelake_job.py instantiate --conf conf/local.yaml
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import pandas as pd

from finelake.jobs.common import (count_outcomes, limit_ordered, model_label,
                                  read_for_keys, require, stable_hash)
from finelake.jobs.signals import reply_signals
from finelake.method import prompts, quality
from finelake.runtime import StageContext, StageStats
from finelake.stage import ChunkSettings, Limits, ModelStage
from finelake.tables import DOCUMENTS, INSTANTIATIONS, MATCHES, TEMPLATES

STAGE = "instantiate"
log = logging.getLogger(__name__)


def pair_key(doc_id: str, template_id: str) -> str:
    """The id of a (document, template) pair across instantiations, judgments and pairs."""
    return stable_hash(doc_id, template_id, n=20)


def instantiate_rows(pdf: pd.DataFrame, spec: dict, mode: str, max_document_chars: int,
                     min_excerpt_ratio: float, max_answer_sentences: int,
                     prompt_version: str, min_sentence_chars: int = 40,
                     grounding_min_run_chars: int = 20, max_document_tokens: Optional[int] = None,
                     tokenizer: Optional[str] = None, max_attempts: int = 3,
                     quality_rules: Optional[dict] = None) -> list[dict]:
    """Executor side: (doc_id, template_id, text, template, optional prior_attempts) rows, grouped
    by document, in; ``instantiations`` rows out, each with ``attempts`` = prior_attempts + 1. The
    model is reached through the UDF layer (once per worker). A failed generation is ``retry``
    when transient with attempts left, else ``error`` (:func:`finelake.faults.settle`). Every row
    with a reply gets the reply's ``flags`` (:func:`finelake.method.prompts.parse_instantiate`).

    ``quality_rules`` (``instantiate.quality`` as a dict; None: its defaults): a pair that parses
    ``ok`` but fails a rule of :mod:`finelake.method.quality` is ``filtered`` with the rule as its
    reason, so the judge never sees it; with ``prefer_body`` the decomposed prompt numbers only
    the document's body. Every row with an expanded excerpt gets ``answer_position``.

    With ``max_document_tokens`` each document is cut to that many ``tokenizer`` tokens (on a
    token boundary, and never past ``max_document_chars``) before its prompt is built."""
    from finelake.config import InstantiateQualityConfig
    from finelake.faults import settle
    from finelake.udfs.generation import generate_frame

    qc = InstantiateQualityConfig(**(quality_rules or {}))
    rules = quality.QualityRules.from_dict(qc.model_dump())
    label = model_label(spec)
    prior = (pdf["prior_attempts"].fillna(0).astype(int).tolist() if "prior_attempts" in pdf
             else [0] * len(pdf))
    limits = [max_document_chars] * len(pdf)
    if max_document_tokens:
        from finelake.models.tokenizer import prefix_chars

        limits = [min(max_document_chars, max(100, c)) for c in
                  prefix_chars(tokenizer, [d[:max_document_chars] for d in pdf["text"]],
                               max_document_tokens)]
    reqs = [prompts.instantiate_request(d, t, mode, lim, max_answer_sentences, min_sentence_chars,
                                        prefer_body=qc.prefer_body)
            for d, t, lim in zip(pdf["text"], pdf["template"], limits)]
    gen = generate_frame(spec, pd.DataFrame({
        "messages": [json.dumps(r.messages, ensure_ascii=False) for r in reqs],
        "json_schema": [json.dumps(r.json_schema) if r.json_schema else None for r in reqs],
        "max_tokens": [spec.get("max_tokens")] * len(reqs),
    }))
    rows = []
    for i, r in enumerate(reqs):
        doc_id, tid, doc, tpl = (pdf["doc_id"].iloc[i], pdf["template_id"].iloc[i],
                                 pdf["text"].iloc[i], pdf["template"].iloc[i])
        base = {"pair_key": pair_key(doc_id, tid), "doc_id": doc_id, "template_id": tid,
                "model_id": label, "prompt_version": prompt_version, "attempts": prior[i] + 1}
        g = gen.iloc[i]
        if isinstance(g["error"], str) and g["error"]:
            status, reason = settle(f"generation_error: {g['error']}", base["attempts"],
                                    max_attempts)
            rows.append({**base, "status": status, "reason": reason})
            continue
        text = g["text"] if isinstance(g["text"], str) else None
        o = prompts.parse_instantiate(doc, tpl, r, text, mode, min_excerpt_ratio,
                                      max_answer_sentences, grounding_min_run_chars)
        start = quality.answer_start(o.raw_answer, doc)
        status, reason = o.status, o.reason
        if status == "ok" and qc.enabled:
            reason = quality.check_pair(doc, tpl, o.instruction, o.answer, start, rules,
                                        min_sentence_chars)
            status = "filtered" if reason else "ok"
        rows.append({**base, "status": status, "instruction": o.instruction, "answer": o.answer,
                     "excerpt_ratio": o.excerpt_ratio, "reason": reason,
                     "raw_output": text, "flags": o.flags,
                     "answer_position": quality.answer_position(start, doc)})
    return rows


def _settings(cfg) -> ChunkSettings:
    ic = cfg.instantiate
    return ChunkSettings(model=ic.model or cfg.models.generator, chunk_size=ic.chunk_documents,
                         max_attempts=ic.max_attempts)


def _scope(ctx: StageContext, limits: Limits):
    """Every match of the first ``max_documents`` documents by id (all when unset), keys only:
    ``pair_key``, ``doc_id``, ``template_id``, ``sample_rank``."""
    from pyspark.sql import functions as F

    matches = require(ctx, MATCHES, "match").select("doc_id", "template_id", "sample_rank")
    n = limits.max_documents or ctx.cfg.run.max_documents
    if n:
        keep = limit_ordered(require(ctx, DOCUMENTS, "ingest").select("doc_id"), "doc_id", n)
        matches = matches.join(keep, "doc_id", "left_semi")
    key = F.substring(F.sha1(F.concat_ws("\u0000", "doc_id", "template_id")), 1, 20)
    return matches.withColumn("pair_key", key)


def _inputs(ctx: StageContext, keys, n_chunks: int, chunk):
    """A chunk's pairs with their document's text and template, read by key."""
    docs = read_for_keys(ctx, DOCUMENTS, keys, "doc_id", n_chunks, chunk, ["text"])
    tpls = ctx.lake.read(TEMPLATES).select("template_id", "template")
    return keys.drop("pair_key").join(docs, "doc_id").join(tpls, "template_id")


def _prompts_per_document(ctx: StageContext, scope, n_docs: int) -> float:
    """Matches per document in scope: a chunk of documents gives this many prompts each."""
    return scope.count() / n_docs if n_docs else 1.0


def _row_args(ctx: StageContext, spec: dict) -> dict:
    ic = ctx.cfg.instantiate
    return dict(spec=spec, mode=ic.mode, max_document_chars=ic.max_document_chars,
                min_excerpt_ratio=ic.min_excerpt_ratio,
                max_answer_sentences=ic.max_answer_sentences, prompt_version=ic.prompt_version,
                min_sentence_chars=ic.min_sentence_chars,
                grounding_min_run_chars=ic.grounding_min_run_chars,
                max_document_tokens=ic.max_document_tokens, tokenizer=ctx.cfg.tokenizer.model,
                max_attempts=ic.max_attempts, quality_rules=ic.quality.model_dump())


def _summarize(ctx: StageContext, stats: StageStats, scope) -> None:
    """Outcomes by ``status:reason`` and the replies' parse rate and flags."""
    rows = ctx.lake.read(INSTANTIATIONS).join(scope.select("pair_key"), "pair_key", "left_semi")
    count_outcomes(stats, rows)
    stats.extra.update(reply_signals(rows).summary())


INSTANTIATE = ModelStage(
    name=STAGE,
    help="Instantiate matched templates against their documents (matches -> instantiations).",
    table=INSTANTIATIONS, key="pair_key", chunk_key="doc_id", order=("sample_rank",),
    reads=(MATCHES, DOCUMENTS, TEMPLATES),
    settings=_settings, scope=_scope, inputs=_inputs, rows=instantiate_rows, row_args=_row_args,
    prompts_per_key=_prompts_per_document, summarize=_summarize, options=("max_documents",))
"""instantiate as a model stage (:mod:`finelake.stage`): one row per match, chunks of documents
(a document's templates are generated together, in sample order)."""


def run_instantiate(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Instantiate every match that has no final ``instantiations`` row yet (none, or ``retry``;
    documents limited as in ``match``).

    Raises:
        FinelakeError: matches, documents or templates missing.
    """
    from finelake.jobs.runner import run_model_stage

    return run_model_stage(ctx, INSTANTIATE, Limits(max_documents=max_documents))
