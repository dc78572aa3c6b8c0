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

    spark-submit bin/finelake_job.py index --conf conf/local.yaml
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

from finelake import storage
from finelake.jobs.chunks import spread
from finelake.jobs.common import limit_ordered, require
from finelake.resources import MODEL_STAGE, model_worker_pool, plan_stage
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.stage import Gate, Stage
from finelake.tables import GENERICIZATIONS, TEMPLATES

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
SLOTS_FILE = "slots.json"


def candidate_pool(index, pooled: list, threshold: float, cap, slots: dict) -> dict[int, int]:
    """The complexity distribution of the *candidates* retrieval returns (§3.2): for each
    calibration document, every template whose cosine with one of its K+1 embeddings reaches
    ``threshold`` (at most ``cap``, the best, as match keeps), counted by ``num_slots``.

    Args:
        index: the built :class:`finelake.models.index.TemplateIndex`.
        pooled: per calibration document its ``[K+1, d]`` Gaussian-pooled embeddings.
        threshold: match's cosine threshold.
        cap: ``match.max_candidates`` (None: no cap).
        slots: template id -> number of slots.

    Returns:
        ``{num_slots: candidates}`` (empty without documents or candidates).
    """
    from finelake.udfs.index import search_documents

    pool: dict[int, int] = {}
    for i in range(0, len(pooled), 256):
        res = search_documents(index, pooled[i:i + 256], threshold, cap)
        for found in res.candidates:
            for c in found:
                k = slots.get(c["template_id"])
                if k is not None:
                    pool[int(k)] = pool.get(int(k), 0) + 1
    return pool


def template_slots(ctx: StageContext) -> dict[str, int]:
    """Template id -> number of ``<fi>`` slots, for every template (driver memory: ~50 bytes per
    template)."""
    rows = require(ctx, TEMPLATES, "genericize").select("template_id", "num_slots").toArrow()
    return {t: int(k) for t, k in zip(rows.column("template_id").to_pylist(),
                                      rows.column("num_slots").to_pylist()) if k is not None}


def index_slots(ctx: StageContext, idx: dict) -> None:
    """Make sure ``<index>/<version>/slots.json`` exists: the slot count of each indexed template,
    in the order of ``ids.json``, which match's executors read to sample by complexity (an index
    published before the file existed gets it here, once)."""
    path = storage.join(idx["path"], SLOTS_FILE)
    if storage.exists(ctx.spark, path):
        return
    ids = json.loads(storage.read_text(ctx.spark, storage.join(idx["path"], "ids.json")))
    slots = template_slots(ctx)
    storage.write_text(ctx.spark, path, json.dumps([slots.get(t) for t in ids]))


def index_weights(ctx: StageContext, idx: dict, pool: Optional[dict[int, int]] = None) -> dict[int, float]:
    """The complexity weights (§3.2) of an index version: computed once, stored at
    ``<index root>/<version>/weights.json`` and used by every match run against that version, so
    resumed and incremental runs sample exactly as a one-shot run.

    ``weights = complexity_weights(target, pool)``
    (:func:`finelake.method.sampling.complexity_weights`): §3.2's weights correct what *retrieval*
    returns (complex templates are harder to match), so

    * pool = the complexity distribution of the candidates (every template above the threshold)
      of a fixed calibration sample of documents (``index.recall_documents``, the first by id:
      ids are content hashes), measured by ``finelake index`` on the index it builds
      (:func:`candidate_pool`);
    * target = ``match.complexity_target`` when the profile sets it, else the lake's ``ok``
      genericizations per ``num_slots`` (one per real query).

    A version published before candidate pools were measured (or with no document to calibrate
    on) falls back to the index's templates per ``num_slots`` as the pool; the file records which
    (``pool_source``).

    Args:
        idx: the index's ``LATEST`` record (``path``, ``version``).
        pool: the candidate pool measured by ``finelake index`` (None: read the stored file, or
            fall back as above).

    Returns:
        ``{num_slots: weight}``; empty when nothing has a known complexity.
    """
    from finelake.method.sampling import complexity_weights
    from finelake.tables import GENERICIZATIONS

    path = storage.join(idx["path"], WEIGHTS_FILE)
    try:
        return {int(k): float(v) for k, v in json.loads(storage.read_text(ctx.spark, path))["weights"].items()}
    except FileNotFoundError:
        pass
    source = "candidates of the calibration documents"
    if not pool:
        source = "templates of the index (no calibration candidates)"
        ids = json.loads(storage.read_text(ctx.spark, storage.join(idx["path"], "ids.json")))
        slots = template_slots(ctx)
        pool = {}
        for t in ids:
            if slots.get(t) is not None:
                pool[slots[t]] = pool.get(slots[t], 0) + 1
    configured = ctx.cfg.match.complexity_target
    if configured:
        target, target_source = {int(k): int(v) for k, v in configured.items()}, "match.complexity_target"
    else:
        target_source = "ok genericizations (real queries)"
        target = {int(r["num_slots"]): int(r["count"]) for r in
                  ctx.lake.read(GENERICIZATIONS).where("status = 'ok' AND num_slots IS NOT NULL")
                  .groupBy("num_slots").count().collect()} if ctx.lake.exists(GENERICIZATIONS) else {}
    weights = complexity_weights(target, pool) if pool else {}
    storage.write_text(ctx.spark, path, json.dumps(
        {"version": idx["version"], "target": {str(k): v for k, v in sorted(target.items())},
         "target_source": target_source,
         "pool": {str(k): v for k, v in sorted(pool.items())}, "pool_source": source,
         "weights": {str(k): v for k, v in sorted(weights.items())}, "run_id": ctx.run_id},
        indent=1))
    return weights


def stored_weights(cfg, spark=None) -> Optional[dict]:
    """The current index version's ``weights.json`` (target, pool, weights and their sources), or
    None when there is no index or no stored weights (the report reads it)."""
    try:
        idx = latest_index(cfg, spark)
        return json.loads(storage.read_text(spark, storage.join(idx["path"], WEIGHTS_FILE)))
    except (FinelakeError, FileNotFoundError):
        return None


STAGING = "_staging"


def _staging_files(spark, staging: str, tmp: str) -> list[str]:
    """Local paths of the Parquet part files Spark wrote under ``staging``, sorted by name (the
    order of Spark's partitions). A URI is copied into ``tmp`` first (Hadoop FileSystem, one file
    at a time: disk = the staged vectors, n x d x 4 bytes)."""
    if not storage.is_uri(staging):
        return [os.path.join(staging, f) for f in sorted(os.listdir(staging))
                if f.endswith(".parquet") and not f.startswith((".", "_"))]
    jvm, fs, _ = storage.hadoop_fs(spark, staging)
    out = []
    for name in storage.listdir(spark, staging):
        if name.endswith(".parquet") and not name.startswith((".", "_")):
            local = os.path.join(tmp, name)
            fs.copyToLocalFile(False, jvm.org.apache.hadoop.fs.Path(storage.join(staging, name)),
                               jvm.org.apache.hadoop.fs.Path(local), True)
            out.append(local)
    return out


def calibration_embeddings(ctx: StageContext, n: int) -> Optional[list]:
    """Per document, the ``[K+1, d]`` float32 Gaussian-pooled embeddings (match's chunks, sigma,
    alpha) of the first ``n`` documents by id (ids are content hashes: a fixed pseudo-random
    sample), embedded with the configured embedder as match embeds them. The index measures its
    recall at the threshold on them and the candidates' complexity distribution
    (:func:`candidate_pool`). None when ``n`` is 0 or there are no documents."""
    import numpy as np

    from finelake.tables import DOCUMENTS
    from finelake.udfs.embedding import map_embeddings

    if not n or not ctx.lake.exists(DOCUMENTS):
        return None
    mc = ctx.cfg.match
    docs = limit_ordered(ctx.lake.read(DOCUMENTS).select("doc_id", "text"), "doc_id", n)
    with model_worker_pool(ctx.spark):
        emb = map_embeddings(docs, ctx.cfg.models.embedder, "text", pooled=True, chunks=mc.chunks,
                             sigma=mc.sigma, alpha=mc.alpha)
    rows = emb.select("doc_id", "embedding").toArrow().sort_by("doc_id")
    out = [np.asarray(v, dtype=np.float32) for v in rows.column("embedding").to_pylist() if v]
    return out or None


def run_index(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Build (or confirm) the template index for the current ``templates`` table.

    Executors embed the templates and write ``(template_id, embedding)`` as Parquet under
    ``<index root>/_staging/<run id>``; the driver reads those files a record batch at a time
    (:class:`finelake.models.index.ParquetVectors`: Arrow buffers viewed as float32 ``[b, d]``, no
    Python lists), trains on a sample and adds in batches (:func:`build_index_from`), so its
    memory is bounded by ``index.train_size`` and ``index.add_batch`` vectors plus the index
    (``memory_bytes`` in the summary and meta.json: what each executor holds). The recall at the
    match threshold is measured on ``index.recall_documents`` real documents embedded as match
    embeds them, and recorded in meta.json and ``LATEST``. The staging folder is removed after.
    """
    import numpy as np

    from finelake.models.index import ParquetVectors, build_index_from
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
    root = index_root(cfg)
    staging = storage.join(root, STAGING, ctx.run_id)
    # No sort: the version is an order-independent content hash and the training sample is chosen
    # by id hash, so the row order Spark writes does not change the index's answers.
    emb.select("template_id", "embedding").write.mode("overwrite").parquet(staging)
    ic = cfg.index
    threshold = cfg.match.threshold_for(cfg.models.embedder.model)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = _staging_files(ctx.spark, staging, tmp)
            try:
                source = ParquetVectors(files)
            except ValueError:
                raise FinelakeError("templates is empty: genericize produced no valid template") from None
            stats.rows_in = source.n
            calibration = calibration_embeddings(ctx, ic.recall_documents)
            queries = np.concatenate(calibration) if calibration else None
            index = build_index_from(
                source, exact_below=ic.exact_below, compress_above=ic.compress_above,
                compression=ic.compression, nlist=ic.nlist, nprobe=ic.nprobe, pq_m=ic.pq_m,
                train_size=ic.train_size, add_batch=ic.add_batch, recall_k=ic.recall_k,
                embedding_model=cfg.models.embedder.model, threshold=threshold,
                recall_queries=queries)
            del source
    finally:
        storage.remove_tree(ctx.spark, staging)
    path = storage.join(root, index.version)
    slots = template_slots(ctx)
    if not storage.exists(ctx.spark, storage.join(path, "meta.json")):
        with tempfile.TemporaryDirectory() as tmp:
            index.save(tmp)
            with open(os.path.join(tmp, SLOTS_FILE), "w", encoding="utf-8") as f:
                json.dump([slots.get(t) for t in index.ids], f)
            storage.put_dir(ctx.spark, tmp, path, last="meta.json")  # meta.json = complete
    else:
        stats.skipped = len(index)  # same content: the saved index is reused
    m = index.meta
    latest = {"version": index.version, "path": path, "embedding_model": cfg.models.embedder.model,
              "kind": index.kind, "size": len(index), "recall_at_k": index.recall_at_k,
              "recall_k": m["recall_k"], "threshold": m["threshold"],
              "recall_at_threshold": m["recall_at_threshold"],
              "precision_at_threshold": m["precision_at_threshold"],
              "pairs_at_threshold": m["pairs_at_threshold"],
              "recall_queries": m["recall_queries"], "recall_queries_source": m["recall_queries_source"],
              "bytes_per_vector": m["bytes_per_vector"], "memory_bytes": m["memory_bytes"],
              "run_id": ctx.run_id}
    # Complexity weights (§3.2) from the candidates of the calibration documents, before LATEST
    # names the version: match finds them stored.
    pool = (candidate_pool(index, calibration, threshold, cfg.match.max_candidates, slots)
            if calibration else None)
    weights = index_weights(ctx, latest, pool)
    stats.extra["weights"] = "{" + ", ".join(f"{k}:{v:.2f}" for k, v in sorted(weights.items())) + "}"
    storage.write_text(ctx.spark, storage.join(root, "LATEST"), json.dumps(latest, indent=1))
    stats.rows_out = len(index)
    rt = index.recall_at_threshold
    stats.extra.update(kind=index.kind, version=index.version, recall_at_k=f"{index.recall_at_k:.3f}",
                       recall_at_threshold="n/a" if rt is None else f"{rt:.3f}",
                       memory_per_executor_mb=round(m["memory_bytes"] / 2**20, 1))
    return stats.finish()


INDEX = Stage(
    name=STAGE, help="Embed compatible document descriptions and build the FAISS template index "
                     "(templates -> <index.path>/<version>).",
    reads=(TEMPLATES,), writes=(), resources=RESOURCES,
    run=lambda ctx, limits: run_index(ctx),
    gates=(Gate("genericize", GENERICIZATIONS),))
"""index as a stage (:mod:`finelake.stage`): waits while genericize has rows to retry."""
