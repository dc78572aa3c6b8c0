"""index: embed every template's compatible document description and build the FAISS index (§3.2).

The index is published at ``<index root>/<version>/`` (``version`` is a content hash of the
vectors, ids, embedding model and parameters) and ``<index root>/LATEST`` names the current one.
The root is ``index.path``, by default ``<lake>/_index``; it may be a local or mounted path or a
URI the cluster's Hadoop file system writes (``s3://``, ``dbfs:/``, ``abfss://``): the index is
built on the driver in a temporary folder and copied there (:mod:`finelake.storage`), and
``match`` ships it to executors with ``SparkContext.addFile``. Exact inner-product search below
``index.exact_below`` templates, IVF above, with its recall@k against exact search measured at
build time and recorded in ``meta.json``. The complexity weights match samples with are computed
once per version and stored beside it (``weights.json``, :func:`index_weights`).

    spark-submit jobs/index.py --conf conf/local.yaml
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from finelake import storage
from finelake.jobs.common import job_main, require, spread
from finelake.resources import MODEL_STAGE, model_worker_pool, plan_stage
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.tables import TEMPLATES

STAGE = "index"
RESOURCES = MODEL_STAGE
"""One GPU per task where the cluster has GPUs (the embedder; see :mod:`finelake.resources`)."""


def index_root(cfg) -> str:
    """Where indexes are published: ``index.path``, else ``<lake>/_index`` (local paths absolute)."""
    root = cfg.index.path or storage.join(cfg.lake, "_index")
    return root if storage.is_uri(root) else os.path.abspath(root)


def latest_index(cfg, spark=None) -> dict:
    """``{"version", "path", "embedding_model", ...}`` of the current index.

    Args:
        cfg: the profile (``index.path``, ``lake``).
        spark: needed only when the index root is a URI.

    Raises:
        FinelakeError: no index has been built (run ``finelake index``).
    """
    p = storage.join(index_root(cfg), "LATEST")
    try:
        return json.loads(storage.read_text(spark, p))
    except FileNotFoundError:
        raise FinelakeError(f"no template index under {index_root(cfg)}: run 'finelake index' "
                            "first") from None


WEIGHTS_FILE = "weights.json"


def index_weights(ctx: StageContext, idx: dict) -> dict[int, float]:
    """The complexity weights (§3.2) of an index version: computed once, stored at
    ``<index root>/<version>/weights.json`` and used by every match run against that version, so
    resumed and incremental runs sample exactly as a one-shot run.

    ``weights = complexity_weights(target, pool)``
    (:func:`finelake.method.sampling.complexity_weights`) with target = the number of ``ok``
    genericizations per ``num_slots`` (one per real query) and pool = the index's templates per
    ``num_slots`` (the templates whose ids are in ``ids.json``), both read when the file is
    first written: by ``finelake index`` when it publishes a version, or by the first match run
    of a version published before weights were stored. Never rewritten.

    Args:
        idx: the index's ``LATEST`` record (``path``, ``version``).

    Returns:
        ``{num_slots: weight}``; empty when the index's templates have no known complexity.
    """
    from pyspark.sql import functions as F

    from finelake.method.sampling import complexity_weights
    from finelake.tables import GENERICIZATIONS

    path = storage.join(idx["path"], WEIGHTS_FILE)
    try:
        return {int(k): float(v) for k, v in json.loads(storage.read_text(ctx.spark, path))["weights"].items()}
    except FileNotFoundError:
        pass
    ids = json.loads(storage.read_text(ctx.spark, storage.join(idx["path"], "ids.json")))
    import pyarrow as pa

    id_df = ctx.spark.createDataFrame(pa.table({"template_id": pa.array(ids, pa.string())}))
    pool = {int(r["num_slots"]): int(r["count"]) for r in
            require(ctx, TEMPLATES, "genericize").join(id_df, "template_id", "left_semi")
            .where(F.col("num_slots").isNotNull()).groupBy("num_slots").count().collect()}
    target = {int(r["num_slots"]): int(r["count"]) for r in
              ctx.lake.read(GENERICIZATIONS).where("status = 'ok' AND num_slots IS NOT NULL")
              .groupBy("num_slots").count().collect()} if ctx.lake.exists(GENERICIZATIONS) else {}
    weights = complexity_weights(target, pool) if pool else {}
    storage.write_text(ctx.spark, path, json.dumps(
        {"version": idx["version"], "target": {str(k): v for k, v in sorted(target.items())},
         "pool": {str(k): v for k, v in sorted(pool.items())},
         "weights": {str(k): v for k, v in sorted(weights.items())}, "run_id": ctx.run_id},
        indent=1))
    return weights


def run_index(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Build (or confirm) the template index for the current ``templates`` table."""
    from finelake.models.index import build_index
    from finelake.udfs.embedding import map_embeddings

    cfg = ctx.cfg
    stats = StageStats(STAGE)
    tpl = require(ctx, TEMPLATES, "genericize").select("template_id", "compatible_document_description")
    # One GPU per task on GPU clusters (the embedder), in the model workers; elsewhere over the
    # cluster's cores. Spread: the table's files need not be balanced.
    plan = plan_stage(ctx.spark, RESOURCES)
    tpl = spread(tpl, "template_id", plan.tasks)
    with model_worker_pool(ctx.spark):
        emb = map_embeddings(tpl, cfg.models.embedder, "compatible_document_description",
                             pooled=False, profile=plan.profile)
    rows = emb.select("template_id", "embedding").orderBy("template_id").toArrow()
    stats.rows_in = rows.num_rows
    if rows.num_rows == 0:
        raise FinelakeError("templates is empty: genericize produced no valid template")
    ids = rows.column("template_id").to_pylist()
    vecs = np.asarray(rows.column("embedding").to_pylist(), dtype=np.float32)
    ic = cfg.index
    index = build_index(vecs, ids, exact_below=ic.exact_below, nlist=ic.nlist, nprobe=ic.nprobe,
                        recall_k=ic.recall_k, embedding_model=cfg.models.embedder.model)
    root = index_root(cfg)
    path = storage.join(root, index.version)
    if not storage.exists(ctx.spark, storage.join(path, "meta.json")):
        with tempfile.TemporaryDirectory() as tmp:
            index.save(tmp)
            storage.put_dir(ctx.spark, tmp, path, last="meta.json")  # meta.json = complete
    else:
        stats.skipped = rows.num_rows  # same content: the saved index is reused
    latest = {"version": index.version, "path": path, "embedding_model": cfg.models.embedder.model,
              "kind": index.kind, "size": len(index), "recall_at_k": index.recall_at_k,
              "recall_k": ic.recall_k, "run_id": ctx.run_id}
    index_weights(ctx, latest)  # before LATEST names the version: match finds them stored
    storage.write_text(ctx.spark, storage.join(root, "LATEST"), json.dumps(latest, indent=1))
    stats.rows_out = len(index)
    stats.extra.update(kind=index.kind, version=index.version, recall_at_k=f"{index.recall_at_k:.3f}")
    return stats.finish()


def main(argv=None):
    job_main(STAGE, argv)


if __name__ == "__main__":
    main()
