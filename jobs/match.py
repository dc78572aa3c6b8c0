"""match: ``documents`` -> ``matches`` and ``match_log`` (§3.2, Appendix B).

Per document: K+1 Gaussian-pooled embeddings (global + K chunks), a FAISS search for each, the
templates whose cosine reaches the embedding model's threshold become candidates (best score and
the chunk index that found it kept per template). Then, per document, a seeded, deterministic
weighted sample without replacement of up to ``match.templates_per_doc`` templates, the weight of
a template depending on its complexity (number of slots) so that the kept templates' complexity
follows the target (the genericized real queries'), correcting what retrieval returns (§3.2).

The complexity weights are those of the index version (computed once from the candidates of a
fixed calibration sample, stored beside it: :func:`finelake.jobs.index.index_weights`), so the
sample happens per document on the executors, and every run of one index version samples alike.

match is a model stage (:data:`MATCH`, :func:`finelake.jobs.runner.run_model_stage`): chunks of
``match.chunk_documents`` documents, each committed (``matches``, then ``match_log``) while the
next one embeds. Every processed document gets a ``match_log`` row (also with zero candidates),
so a rerun skips it and the funnel accounts for it. A chunk killed between its two merges is
rebuilt with the same documents, partitions and order, so it samples the same templates and the
insert-only ``matches`` merge adds nothing.

    spark-submit bin/finelake_job.py match --conf conf/local.yaml [--max-documents N]

``finelake calibrate`` (:mod:`finelake.jobs.calibrate`) measures retrieval on a lake's documents.
"""

from __future__ import annotations

from typing import Optional

import pandas as pd

from finelake.jobs.common import fail_point, limit_ordered, read_for_keys, require
from finelake.jobs.index import index_slots, index_weights, latest_index, stored_weights
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.stage import ChunkSettings, Limits, ModelStage
from finelake.storage import distribute
from finelake.tables import DOCUMENTS, MATCH_LOG, MATCH_OUTPUT, MATCHES, TEMPLATES

STAGE = "match"


def sample_candidates(doc_id: str, found: list[dict], slots: dict, weights: dict, n: int,
                      seed: int) -> list[dict]:
    """One document's candidates -> its sampled templates (§3.2), each
    ``{"template_id", "chunk_index", "score", "num_slots", "sample_rank"}`` (0 = first drawn).
    Candidates whose complexity is unknown (a template missing from ``slots``) are not drawn."""
    from finelake.method.sampling import Candidate, sample_templates

    cands = [Candidate(c["template_id"], int(slots[c["template_id"]]), float(c["score"]),
                       int(c["chunk_index"])) for c in found if slots.get(c["template_id"]) is not None]
    picked = sample_templates(cands, weights, n=n, seed=seed, key=doc_id)
    return [{"template_id": c.template_id, "chunk_index": c.chunk_index, "score": c.score,
             "num_slots": c.num_slots, "sample_rank": r} for r, c in enumerate(picked)]


def match_rows(pdf: pd.DataFrame, embedder: dict, index_path: str, distributed: bool, chunks: int,
               sigma: float, alpha: float, threshold: float, max_candidates: Optional[int],
               search_batch: int, weights: dict, templates_per_doc: int, seed: int,
               index_version: str) -> list[dict]:
    """Executor side: documents (doc_id, text) in, one :data:`~finelake.tables.MATCH_OUTPUT` row
    per document out: its ``match_log`` row (candidates, sampled, cut, threshold) with the
    templates it sampled (``picked``).

    Each batch is embedded (K+1 Gaussian-pooled vectors per document, Appendix B), its vectors
    range-searched at ``threshold`` in one FAISS call per ``search_batch`` documents (at most
    ``max_candidates`` templates kept per document, best first), and up to
    ``templates_per_doc`` templates sampled per document with the index version's complexity
    ``weights`` (fixed per version, so the sample happens here, per document, with no global
    step). The index and the templates' slot counts load once per worker, memory-mapped.
    """
    from finelake.storage import local_copy
    from finelake.udfs.embedding import embed_frame
    from finelake.udfs.index import load_index, load_slots, search_documents

    path = local_copy(index_path, distributed)
    index = load_index(path, embedder["model"])
    slots = load_slots(path)
    emb = embed_frame(embedder, pdf[["doc_id", "text"]], "text", pooled=True, chunks=chunks,
                      sigma=sigma, alpha=alpha)
    doc_ids, pooled = emb["doc_id"].tolist(), emb["embedding"].tolist()
    rows = []
    for i in range(0, len(doc_ids), search_batch):
        res = search_documents(index, pooled[i:i + search_batch], threshold, max_candidates)
        for doc_id, found, cut in zip(doc_ids[i:i + search_batch], res.candidates, res.cut):
            picked = sample_candidates(doc_id, found, slots, weights, templates_per_doc, seed)
            rows.append({"doc_id": doc_id, "candidates": len(found), "sampled": len(picked),
                         "threshold": threshold, "embedding_model": embedder["model"],
                         "index_version": index_version, "cut": bool(cut), "status": "ok",
                         "attempts": 1, "picked": picked})
    return rows


def current_index(cfg, spark) -> dict:
    """The latest index's metadata (:func:`latest_index`), checked against the profile's embedder.

    Raises:
        FinelakeError: no index, or it was built with another embedding model (its vectors would
            not be comparable with the documents').
    """
    idx = latest_index(cfg, spark)
    if idx["embedding_model"] != cfg.models.embedder.model:
        raise FinelakeError(f"the index was built with {idx['embedding_model']}, the profile embeds "
                            f"with {cfg.models.embedder.model}: run 'finelake index' again")
    return idx


def _settings(cfg) -> ChunkSettings:
    return ChunkSettings(model=cfg.models.embedder, chunk_size=cfg.match.chunk_documents,
                         max_attempts=1, kind="embedder")


def _scope(ctx: StageContext, limits: Limits):
    """The first ``max_documents`` documents by id (all when unset), ids only."""
    n = limits.max_documents or ctx.cfg.run.max_documents
    docs = require(ctx, DOCUMENTS, "ingest").select("doc_id")
    return limit_ordered(docs, "doc_id", n) if n else docs


def _inputs(ctx: StageContext, keys, n_chunks: int, chunk):
    """A chunk's documents with their text, read by key."""
    return keys.join(read_for_keys(ctx, DOCUMENTS, keys, "doc_id", n_chunks, chunk, ["text"]),
                     "doc_id")


def _row_args(ctx: StageContext, spec: dict) -> dict:
    """The index (shipped to executors), its slot counts and complexity weights (computed once
    per index version), and match's settings."""
    cfg = ctx.cfg
    require(ctx, TEMPLATES, "genericize")
    idx = current_index(cfg, ctx.spark)
    index_slots(ctx, idx)
    weights = index_weights(ctx, idx)
    index_path, distributed = distribute(ctx.spark, idx["path"])
    mc = cfg.match
    return dict(embedder=spec, index_path=index_path, distributed=distributed, chunks=mc.chunks,
                sigma=mc.sigma, alpha=mc.alpha,
                threshold=mc.threshold_for(cfg.models.embedder.model),
                max_candidates=mc.max_candidates, search_batch=mc.search_batch, weights=weights,
                templates_per_doc=mc.templates_per_doc, seed=mc.seed, index_version=idx["version"])


def _commit(ctx: StageContext, out) -> None:
    """One chunk's output: its sampled templates into ``matches``, then its ``match_log`` rows.
    A run killed between the two merges leaves the chunk's documents without ``match_log`` rows:
    the rerun rebuilds the chunk with the same documents, partitions and order, so it embeds,
    searches and samples them alike, and the insert-only ``matches`` merge adds nothing."""
    from pyspark.sql import functions as F

    picked = (out.select("doc_id", "embedding_model", "index_version",
                         F.explode("picked").alias("p"))
              .select("doc_id", "p.template_id", "p.chunk_index", "p.score", "p.num_slots",
                      "p.sample_rank", "embedding_model", "index_version"))
    ctx.lake.merge(MATCHES, picked, ctx.run_id)
    fail_point("match_log", 1)  # test hook: a kill between the two merges
    ctx.lake.merge(MATCH_LOG, out.drop("picked"), ctx.run_id)


def _summarize(ctx: StageContext, stats: StageStats, scope) -> None:
    """Templates sampled as output, documents without a candidate as dropped, candidates, the
    documents whose list ``max_candidates`` cut, the threshold and the index's weights."""
    from pyspark.sql import functions as F

    cfg = ctx.cfg
    rows = ctx.lake.read(MATCH_LOG).join(scope, "doc_id", "left_semi")
    agg = rows.agg(F.sum("candidates").alias("c"), F.sum("sampled").alias("s"),
                   F.sum(F.when(F.col("candidates") == 0, 1).otherwise(0)).alias("z"),
                   F.sum(F.when(F.col("cut"), 1).otherwise(0)).alias("cut")).collect()[0]
    stats.rows_out = int(agg["s"] or 0)
    stats.drop("no_candidate_above_threshold", int(agg["z"] or 0))
    stats.extra.update(candidates=int(agg["c"] or 0),
                       threshold=cfg.match.threshold_for(cfg.models.embedder.model),
                       docs_cut_by_cap=int(agg["cut"] or 0), max_candidates=cfg.match.max_candidates)
    weights = stored_weights(cfg, ctx.spark)
    if weights:
        stats.extra["weights"] = "{" + ", ".join(
            f"{k}:{float(v):.2f}" for k, v in sorted(weights["weights"].items(), key=lambda kv: int(kv[0]))) + "}"


MATCH = ModelStage(
    name=STAGE,
    help="Match documents to templates (Gaussian-pooled embeddings, threshold, weighted sample) "
         "(documents -> matches, match_log).",
    table=MATCH_LOG, key="doc_id", chunk_key="doc_id", reads=(DOCUMENTS, TEMPLATES),
    also_writes=(MATCHES,), output=MATCH_OUTPUT,
    settings=_settings, scope=_scope, inputs=_inputs, rows=match_rows, row_args=_row_args,
    commit=_commit, summarize=_summarize, options=("max_documents",))
"""match as a model stage (:mod:`finelake.stage`): one ``match_log`` row per document, chunks of
documents, each chunk's matches and log committed together."""


def run_match(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Match the (first ``max_documents``, by id) documents without a ``match_log`` row, in
    committed chunks of documents (:data:`MATCH`).

    Sampling uses the index version's stored complexity weights (:func:`index_weights`), never
    weights of this run's candidates, so resumed and incremental runs sample alike.

    Raises:
        FinelakeError: documents or templates missing, or no index built.
    """
    from finelake.jobs.runner import run_model_stage

    return run_model_stage(ctx, MATCH, Limits(max_documents=max_documents))
