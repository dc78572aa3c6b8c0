"""match: ``documents`` -> ``matches`` and ``match_log`` (§3.2, Appendix B).

Per document: K+1 Gaussian-pooled embeddings (global + K chunks), a FAISS search for each, the
templates whose cosine reaches the embedding model's threshold become candidates (best score and
the chunk index that found it kept per template). Then, per document, a seeded, deterministic
weighted sample without replacement of up to ``match.templates_per_doc`` templates, the weight of
a template depending on its complexity (number of slots) so that the kept templates' complexity
follows that of the templates derived from the real queries (§3.2).

The complexity weights are those of the index version (computed once, stored beside it:
:func:`finelake.jobs.index.index_weights`), so every run of one index version samples alike.

Every processed document gets a ``match_log`` row (also with zero candidates), so a rerun skips
it and the funnel accounts for it. ``matches`` is written first, then ``match_log``; a document
with ``matches`` rows but no ``match_log`` row (a run killed in between) is not sampled again on
the rerun, which writes only its ``match_log`` row.

    spark-submit jobs/match.py --conf conf/local.yaml [--max-documents N]

``finelake calibrate`` (:mod:`finelake.jobs.calibrate`) measures retrieval on a lake's documents.
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional

import pandas as pd

from finelake.jobs.common import job_main, limit_ordered, require, spread
from finelake.jobs.index import latest_index
from finelake.resources import MODEL_STAGE, model_worker_pool, plan_stage
from finelake.storage import distribute
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.tables import DOCUMENTS, MATCH_LOG, MATCHES, TEMPLATES

STAGE = "match"


def threshold_for(cfg) -> float:
    """The cosine threshold configured for the embedding model (``match.thresholds``), else the
    default (0.865, the paper's value for its fine-tuned BGE-M3)."""
    return float(cfg.match.thresholds.get(cfg.models.embedder.model, cfg.match.default_threshold))


CANDIDATE_COLUMNS = ["doc_id", "template_id", "chunk_index", "score", "cut"]


def candidate_schema():
    """Spark schema of :func:`candidates_partition`'s rows."""
    from pyspark.sql import types as T

    return T.StructType([T.StructField("doc_id", T.StringType()),
                         T.StructField("template_id", T.StringType()),
                         T.StructField("chunk_index", T.IntegerType()),
                         T.StructField("score", T.DoubleType()),
                         T.StructField("cut", T.BooleanType())])


def candidates_partition(batches: Iterator[pd.DataFrame], embedder: dict, index_path: str,
                         chunks: int, sigma: float, alpha: float, threshold: Optional[float],
                         top_k: Optional[int] = None, max_candidates: Optional[int] = None,
                         search_batch: int = 1024, distributed: bool = False) -> Iterator[pd.DataFrame]:
    """Executor side: documents (doc_id, text) in, candidate rows out (doc_id, template_id,
    chunk_index, score, cut). A document with no candidate yields a row with null template_id.

    Each Arrow batch is embedded (K+1 Gaussian-pooled vectors per document, Appendix B) and its
    vectors searched in one FAISS call (split every ``search_batch`` documents): a range search
    at ``threshold`` (§3.2: every template whose cosine reaches it), at most ``max_candidates``
    templates kept per document, best first; ``cut`` is true on every row of a document whose
    list was capped. With ``top_k`` (calibration) the k nearest templates per vector instead,
    dropped below ``threshold`` when one is given. The index is loaded once per worker,
    memory-mapped (:func:`finelake.udfs.index.load_index`). ``index_path``/``distributed`` as
    returned by :func:`finelake.storage.distribute`.
    """
    from finelake.storage import local_copy
    from finelake.udfs.embedding import embed_frame
    from finelake.udfs.index import load_index, search_documents

    index_path = local_copy(index_path, distributed)
    index = load_index(index_path, embedder["model"])
    for pdf in batches:
        emb = embed_frame(embedder, pdf[["doc_id", "text"]], "text", pooled=True, chunks=chunks,
                          sigma=sigma, alpha=alpha)
        doc_ids = emb["doc_id"].tolist()
        pooled = emb["embedding"].tolist()
        rows = []
        for i in range(0, len(doc_ids), search_batch):
            res = search_documents(index, pooled[i:i + search_batch], threshold, max_candidates, top_k)
            for doc_id, found, cut in zip(doc_ids[i:i + search_batch], res.candidates, res.cut):
                if not found:
                    rows.append({"doc_id": doc_id, "template_id": None, "chunk_index": None,
                                 "score": None, "cut": cut})
                rows.extend({"doc_id": doc_id, **c, "cut": cut} for c in found)
        yield pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)


def sample_group(pdf: pd.DataFrame, weights: dict, n: int, seed: int) -> pd.DataFrame:
    """One document's candidates -> its sampled matches with ``sample_rank`` (0 = first drawn)."""
    from finelake.method.sampling import Candidate, sample_templates

    cands = [Candidate(t, int(k), float(s), int(c)) for t, k, s, c in
             zip(pdf["template_id"], pdf["num_slots"], pdf["score"], pdf["chunk_index"])]
    doc_id = pdf["doc_id"].iloc[0]
    picked = sample_templates(cands, weights, n=n, seed=seed, key=doc_id)
    return pd.DataFrame({"doc_id": [doc_id] * len(picked),
                         "template_id": [c.template_id for c in picked],
                         "chunk_index": [c.chunk_index for c in picked],
                         "score": [c.score for c in picked],
                         "num_slots": [c.num_slots for c in picked],
                         "sample_rank": list(range(len(picked)))})


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


def run_match(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Match the (first ``max_documents``, by id) documents without a ``match_log`` row.

    Sampling uses the index version's stored complexity weights (:func:`finelake.jobs.index.index_weights`),
    never weights of this run's candidates, and a document that already has ``matches`` rows (a
    run killed between the ``matches`` and ``match_log`` writes) is not sampled again: its
    ``match_log`` row is written from its candidates and its existing matches. So a kill at any
    point followed by a rerun gives the tables of an uninterrupted run.

    Without a document limit nothing is sorted or cached: the documents without a ``match_log``
    row stream into the embedder. With one, only the ids are sorted (the first ``n`` by id).

    Raises:
        FinelakeError: documents or templates missing, or no index built.
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from finelake.jobs.common import fail_point
    from finelake.jobs.index import index_weights

    cfg, lake = ctx.cfg, ctx.lake
    mc = cfg.match
    stats = StageStats(STAGE)
    idx = current_index(cfg, ctx.spark)
    threshold = threshold_for(cfg)
    n = max_documents or cfg.run.max_documents
    documents = require(ctx, DOCUMENTS, "ingest")
    scope = None  # None: every document
    docs = documents.select("doc_id", "text")
    if n:
        scope = limit_ordered(documents.select("doc_id"), "doc_id", n).cache()
        docs = docs.join(scope, "doc_id", "left_semi")
    stats.rows_in = (scope if scope is not None else documents.select("doc_id")).count()
    pending = docs
    if lake.exists(MATCH_LOG):
        pending = docs.join(lake.read(MATCH_LOG).select("doc_id"), "doc_id", "left_anti")
    n_pending = pending.select("doc_id").count()
    stats.skipped = stats.rows_in - n_pending

    templates = require(ctx, TEMPLATES, "genericize").select("template_id", "num_slots")
    if n_pending:
        emb_spec = cfg.models.embedder.model_dump()
        index_path, distributed = distribute(ctx.spark, idx["path"])
        fn = functools.partial(candidates_partition, embedder=emb_spec, index_path=index_path,
                               distributed=distributed,
                               chunks=mc.chunks, sigma=mc.sigma, alpha=mc.alpha,
                               threshold=threshold, max_candidates=mc.max_candidates,
                               search_batch=mc.search_batch)
        schema = candidate_schema()
        # One GPU per task on GPU clusters (the embedder), in the model workers (resources).
        plan = plan_stage(ctx.spark, MODEL_STAGE)
        with model_worker_pool(ctx.spark):
            cands = spread(pending, "doc_id", plan.tasks).mapInPandas(
                fn, schema, **({"profile": plan.profile} if plan.profile is not None else {}))
        cands = cands.cache()
        # Range search at the threshold; documents whose list max_candidates cut (§3.2 candidates)
        stats.extra["docs_cut_by_cap"] = cands.where("cut").select("doc_id").distinct().count()
        stats.extra["max_candidates"] = mc.max_candidates
        found = cands.where("template_id IS NOT NULL").join(templates, "template_id")

        # Complexity weights (§3.2): once per index version, whatever documents this run has.
        weights = index_weights(ctx, idx)
        stats.extra["weights"] = "{" + ", ".join(f"{k}:{v:.2f}" for k, v in sorted(weights.items())) + "}"
        # Documents a killed run already sampled keep their matches: never a second sample.
        # (The snapshot is pinned: the merge below must not change what this plan excludes.)
        if lake.exists(MATCHES):
            before = lake.read(MATCHES, version=lake.version(MATCHES)).select("doc_id")
            found = found.join(before, "doc_id", "left_anti")

        out_schema = T.StructType([T.StructField("doc_id", T.StringType()),
                                   T.StructField("template_id", T.StringType()),
                                   T.StructField("chunk_index", T.IntegerType()),
                                   T.StructField("score", T.DoubleType()),
                                   T.StructField("num_slots", T.IntegerType()),
                                   T.StructField("sample_rank", T.IntegerType())])
        n_per_doc, seed = mc.templates_per_doc, mc.seed

        def sample(pdf: pd.DataFrame) -> pd.DataFrame:  # a function, so Spark reads its type hints
            return sample_group(pdf, weights=weights, n=n_per_doc, seed=seed)

        sampled = found.groupBy("doc_id").applyInPandas(sample, out_schema)
        sampled = (sampled.withColumn("embedding_model", F.lit(cfg.models.embedder.model))
                   .withColumn("index_version", F.lit(idx["version"])))
        lake.merge(MATCHES, sampled, ctx.run_id)
        fail_point(STAGE, 1)
        # sampled = the document's rows in matches now: this run's sample or a killed run's.
        n_sampled = (lake.read(MATCHES).select("doc_id").join(cands.select("doc_id").distinct(),
                                                              "doc_id", "left_semi")
                     .groupBy("doc_id").agg(F.count("*").cast("int").alias("sampled")))
        counts = (cands.groupBy("doc_id").agg(F.count("template_id").cast("int").alias("candidates"))
                  .join(n_sampled, "doc_id", "left")
                  .fillna(0, ["sampled"])
                  .withColumn("threshold", F.lit(threshold))
                  .withColumn("embedding_model", F.lit(cfg.models.embedder.model))
                  .withColumn("index_version", F.lit(idx["version"])))
        lake.merge(MATCH_LOG, counts, ctx.run_id)
        cands.unpersist()
    log_rows = lake.read(MATCH_LOG)
    if scope is not None:
        log_rows = log_rows.join(scope, "doc_id", "left_semi")
    agg = log_rows.agg(F.sum("candidates").alias("c"), F.sum("sampled").alias("s"),
                       F.sum(F.when(F.col("candidates") == 0, 1).otherwise(0)).alias("z")).collect()[0]
    stats.rows_out = int(agg["s"] or 0)
    stats.drop("no_candidate_above_threshold", int(agg["z"] or 0))
    stats.extra.update(candidates=int(agg["c"] or 0), threshold=threshold)
    if scope is not None:
        scope.unpersist()
    lake.register(MATCHES)
    lake.register(MATCH_LOG)
    return stats.finish()


def main(argv=None):
    job_main(STAGE, argv)


if __name__ == "__main__":
    main()
