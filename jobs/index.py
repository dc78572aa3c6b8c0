"""index: embed every template's compatible document description and build the FAISS index (§3.2).

The index is saved beside the lake at ``<lake>/_index/<version>/`` (``version`` is a content hash
of the vectors, ids, embedding model and parameters) and ``<lake>/_index/LATEST`` names the current
one. Exact inner-product search below ``index.exact_below`` templates, IVF above, with its
recall@k against exact search measured at build time and recorded in ``meta.json``.

    spark-submit jobs/index.py --conf conf/local.yaml
"""

from __future__ import annotations

import json
import os

import numpy as np

from finelake.jobs.common import job_main, require, spread
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.tables import TEMPLATES

STAGE = "index"


def index_root(lake_root: str) -> str:
    root = lake_root if "://" in lake_root else os.path.abspath(lake_root)
    return f"{root.rstrip('/')}/_index"


def latest_index(lake_root: str) -> dict:
    """``{"version", "path", "embedding_model", ...}`` of the current index.

    Raises:
        FinelakeError: no index has been built (run ``finelake index``).
    """
    p = os.path.join(index_root(lake_root), "LATEST")
    if not os.path.isfile(p):
        raise FinelakeError(f"no template index under {index_root(lake_root)}: run 'finelake index' first")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def run_index(ctx: StageContext, max_queries=None, max_documents=None) -> StageStats:
    """Build (or confirm) the template index for the current ``templates`` table."""
    from finelake.models.index import build_index
    from finelake.udfs.embedding import map_embeddings

    cfg = ctx.cfg
    stats = StageStats(STAGE)
    tpl = require(ctx, TEMPLATES, "genericize").select("template_id", "compatible_document_description")
    # Spread over the cluster's cores: the table's files need not be balanced.
    tpl = spread(tpl, "template_id", ctx.spark.sparkContext.defaultParallelism)
    emb = map_embeddings(tpl, cfg.models.embedder, "compatible_document_description", pooled=False)
    rows = emb.select("template_id", "embedding").orderBy("template_id").toArrow()
    stats.rows_in = rows.num_rows
    if rows.num_rows == 0:
        raise FinelakeError("templates is empty: genericize produced no valid template")
    ids = rows.column("template_id").to_pylist()
    vecs = np.asarray(rows.column("embedding").to_pylist(), dtype=np.float32)
    ic = cfg.index
    index = build_index(vecs, ids, exact_below=ic.exact_below, nlist=ic.nlist, nprobe=ic.nprobe,
                        recall_k=ic.recall_k, embedding_model=cfg.models.embedder.model)
    path = os.path.join(index_root(cfg.lake), index.version)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        index.save(path)
    else:
        stats.skipped = rows.num_rows  # same content: the saved index is reused
    latest = {"version": index.version, "path": path, "embedding_model": cfg.models.embedder.model,
              "kind": index.kind, "size": len(index), "recall_at_k": index.recall_at_k,
              "recall_k": ic.recall_k, "run_id": ctx.run_id}
    tmp = os.path.join(index_root(cfg.lake), "LATEST.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(latest, f, indent=1)
    os.replace(tmp, os.path.join(index_root(cfg.lake), "LATEST"))
    stats.rows_out = len(index)
    stats.extra.update(kind=index.kind, version=index.version, recall_at_k=f"{index.recall_at_k:.3f}")
    return stats.finish()


def main(argv=None):
    job_main(STAGE, argv)


if __name__ == "__main__":
    main()
