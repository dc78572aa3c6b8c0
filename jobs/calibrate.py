"""calibrate: ``documents`` + the current index -> how retrieval behaves on this lake (§3.2).

``finelake calibrate [--sample N]`` embeds the first N documents (by id) as match does and
searches the index several ways, so a profile's retrieval settings can be chosen on the lake's
own documents rather than taken on faith (issue 25 item 4):

* **K** (``match.chunks``): K=5, the paper's value, and K=10, the released helper's default
  (``instruction_template_retriever.py``; ``conf/_cluster.yaml``), and the profile's K if it is
  another: for each, documents with a candidate and candidates per document at the threshold,
  and the recall of K=5's (document, template) candidates against K=10's (and back);
* **nprobe** (IVF indexes): the index's own ``nprobe`` (what match uses), the profile's
  ``index.nprobe`` if it differs (what a rebuilt index would use), against every list probed: the
  recall at the threshold of probing fewer lists. A flat index is exact (one row per K);
* **scores**: quantiles of each document's best template cosine and of all top-``match.top_k``
  cosines (profile's K), and documents with a candidate at several thresholds, to choose
  ``match.thresholds[<embedding model>]`` for a model other than the paper's.

The embedding runs like the model stages': under :func:`finelake.resources.plan_stage` (one GPU
per task on GPU clusters) and in the model worker pool (:func:`finelake.resources.model_worker_pool`),
the index loaded once per worker (memory-mapped) and searched there; only candidate ids and
scores come back to the driver, where :mod:`finelake.method.calibration` computes the figures.

    finelake calibrate --sample 200
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pandas as pd

from finelake import storage
from finelake.jobs.chunks import spread
from finelake.jobs.common import limit_ordered, require
from finelake.method.calibration import (CountSummary, count_summary, pair_recall,
                                         score_quantiles)
from finelake.resources import MODEL_STAGE, model_worker_pool, plan_stage
from finelake.runtime import StageContext
from finelake.tables import DOCUMENTS

STAGE = "calibrate"
RESOURCES = MODEL_STAGE
"""One GPU per task where the cluster has GPUs (the embedder; see :mod:`finelake.resources`)."""
COMPARED_CHUNKS = (5, 10)
"""K of the paper (§3.2) and of the authors' released retriever helper."""
TOP_K = "top_k"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
log = logging.getLogger(__name__)

COLUMNS = ["doc_id", "chunks", "probe", "template_ids", "scores"]


def _schema():
    from pyspark.sql import types as T

    return T.StructType([T.StructField("doc_id", T.StringType()),
                         T.StructField("chunks", T.IntegerType()),
                         T.StructField("probe", T.StringType()),
                         T.StructField("template_ids", T.ArrayType(T.StringType())),
                         T.StructField("scores", T.ArrayType(T.DoubleType()))])


def calibrate_partition(batches: Iterator[pd.DataFrame], embedder: dict, index_path: str,
                        distributed: bool, chunk_counts: tuple[int, ...], sigma: float,
                        alpha: float, threshold: float, probes: tuple[tuple[str, Optional[int]], ...],
                        top_k: int, quantile_chunks: int) -> Iterator[pd.DataFrame]:
    """Executor side: documents (doc_id, text) in; per document, K and probing one row of its
    candidates at ``threshold`` (``template_ids``, ``scores``), plus for K = ``quantile_chunks``
    a ``probe == "top_k"`` row with its top-``top_k`` templates (no threshold).

    Each batch is embedded once per K (:func:`finelake.udfs.embedding.embed_frame`, Gaussian
    pooling with ``sigma``/``alpha``) and searched in one FAISS call per (K, probing)
    (:func:`finelake.udfs.index.search_documents` inside :func:`finelake.udfs.index.probing`;
    ``probes``: ``(label, nprobe)``, None = the index's own). No candidate cap: calibration
    counts them all.
    """
    from finelake.udfs.embedding import embed_frame
    from finelake.udfs.index import load_index, probing, search_documents

    index = load_index(storage.local_copy(index_path, distributed), embedder["model"])
    for pdf in batches:
        rows = []
        for k in chunk_counts:
            emb = embed_frame(embedder, pdf[["doc_id", "text"]], "text", pooled=True, chunks=k,
                              sigma=sigma, alpha=alpha)
            ids, pooled = emb["doc_id"].tolist(), emb["embedding"].tolist()
            searches = [(label, n, threshold, None) for label, n in probes]
            if k == quantile_chunks:
                searches.append((TOP_K, None, None, top_k))
            for label, nprobe, thr, kk in searches:
                with probing(index, nprobe):
                    res = search_documents(index, pooled, thr, None, kk)
                for doc_id, found in zip(ids, res.candidates):
                    rows.append({"doc_id": doc_id, "chunks": k, "probe": label,
                                 "template_ids": [c["template_id"] for c in found],
                                 "scores": [float(c["score"]) for c in found]})
        yield pd.DataFrame(rows, columns=COLUMNS)


@dataclass
class Calibration:
    """What ``finelake calibrate`` found (see the module docstring); :meth:`text` prints it.

    Attributes:
        documents: documents embedded.
        threshold: the cosine threshold of the profile's embedding model.
        index: ``{"kind", "size", "nlist", "nprobe"}`` of the index searched.
        counts: ``(K, probe label)`` -> :class:`CountSummary` at the threshold.
        probe_recall: ``(K, probe label)`` -> recall at the threshold against every list probed
            (IVF only; None when the reference found no pair).
        k_recall: ``(a, b)`` -> recall of K=a's candidate pairs against K=b's, at the index's
            nprobe.
        best, top_k: quantiles (``QUANTILES``) of each document's best cosine and of all top-k
            cosines, at the profile's K.
        thresholds: ``(threshold, share of documents with a candidate, mean candidates)`` among
            the top-k results.
    """

    embedding_model: str
    documents: int
    threshold: float
    chunks: int
    index: dict
    counts: dict = field(default_factory=dict)
    probe_recall: dict = field(default_factory=dict)
    k_recall: dict = field(default_factory=dict)
    best: list = field(default_factory=list)
    top_k: list = field(default_factory=list)
    top_k_n: int = 0
    thresholds: list = field(default_factory=list)

    def text(self) -> str:
        """The printable report."""
        ix = self.index
        lines = [f"embedding model: {self.embedding_model}   documents: {self.documents}   "
                 f"current threshold: {self.threshold}   profile K: {self.chunks}",
                 f"index: {ix['kind']}, {ix['size']:,} templates"
                 + (f", nlist {ix['nlist']}, built with nprobe {ix['nprobe']}" if ix.get("nlist") else ""),
                 "   K  probing              docs>=1   mean  median    p95  recall at threshold"]
        for (k, probe), c in sorted(self.counts.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            r = self.probe_recall.get((k, probe))
            rec = ("exact" if not ix.get("nlist") else "reference" if probe.startswith("all ")
                   else "n/a (no pair)" if r is None else f"{r:.3f} vs all lists")
            lines.append(f"  {k:>2}  {probe:<18} {c.share_with_candidate:>7.1%} {c.mean:>6.2f} "
                         f"{c.median:>7.1f} {c.p95:>6.1f}  {rec}")
        for (a, b), r in sorted(self.k_recall.items()):
            lines.append(f"K={a} finds {'n/a' if r is None else f'{r:.1%}'} of the (document, "
                         f"template) candidates K={b} finds")
        lines.append(f"quantile   best-per-doc   all top-{self.top_k_n} scores   (K={self.chunks})")
        for q, b, a in zip(QUANTILES, self.best, self.top_k):
            if b is not None and a is not None:
                lines.append(f"  {q:>5.2f}   {b:>12.3f}   {a:>16.3f}")
        lines.append("threshold  docs with >=1 candidate  mean candidates/doc")
        for t, share, mean_c in self.thresholds:
            lines.append(f"  {t:>7.3f}  {share:>22.2%}  {mean_c:>19.2f}")
        return "\n".join(lines)


def _probes(meta: dict, profile_nprobe: int) -> tuple[tuple[str, Optional[int]], ...]:
    """``(label, nprobe)`` searches for an index: its own nprobe, the profile's if different,
    every list; one exact search for the flat kind."""
    nlist = meta.get("nlist")
    if not nlist:
        return (("exact (flat)", None),)
    own = int(meta["nprobe"])
    out = [(f"nprobe {own} (index)", own)]
    if profile_nprobe != own and profile_nprobe < nlist:
        out.append((f"nprobe {profile_nprobe} (profile)", profile_nprobe))
    if own < nlist:
        out.append((f"all {nlist} lists", nlist))
    return tuple(out)


def run_calibrate(ctx: StageContext, n: int = 200) -> Calibration:
    """Calibrate retrieval on the first ``n`` documents (by id) of the lake (module docstring).

    Returns:
        :class:`Calibration`.

    Raises:
        FinelakeError: no documents, no index, or an index built with another embedding model.
    """
    from finelake.jobs.match import current_index

    cfg, spark = ctx.cfg, ctx.spark
    mc = cfg.match
    idx = current_index(cfg, spark)
    meta = json.loads(storage.read_text(spark, storage.join(idx["path"], "meta.json")))
    threshold = cfg.match.threshold_for(cfg.models.embedder.model)
    ks = tuple(sorted({*COMPARED_CHUNKS, mc.chunks}))
    probes = _probes(meta, cfg.index.nprobe)
    docs = limit_ordered(require(ctx, DOCUMENTS, "ingest").select("doc_id", "text"), "doc_id", n)
    index_path, distributed = storage.distribute(spark, idx["path"])
    fn = functools.partial(calibrate_partition, embedder=cfg.models.embedder.model_dump(),
                           index_path=index_path, distributed=distributed, chunk_counts=ks,
                           sigma=mc.sigma, alpha=mc.alpha, threshold=threshold, probes=probes,
                           top_k=mc.top_k, quantile_chunks=mc.chunks)
    plan = plan_stage(spark, RESOURCES)
    log.info("%s: %s; K in %s, probing %s", STAGE, plan.note, ks, [p for p, _ in probes])
    with model_worker_pool(spark):
        out = spread(docs, "doc_id", plan.tasks).mapInPandas(
            fn, _schema(), **({"profile": plan.profile} if plan.profile is not None else {}))
    pdf = out.toPandas().sort_values("doc_id", kind="stable")
    return summarize(pdf, cfg.models.embedder.model, threshold, mc.chunks, mc.top_k, probes,
                     {"kind": meta["kind"], "size": meta["size"], "nlist": meta.get("nlist"),
                      "nprobe": meta.get("nprobe")})


def summarize(pdf: pd.DataFrame, embedding_model: str, threshold: float, chunks: int, top_k: int,
              probes: tuple[tuple[str, Optional[int]], ...], index: dict) -> Calibration:
    """The :class:`Calibration` of :func:`calibrate_partition`'s rows (driver side)."""
    def sets(k: int, probe: str) -> list[set]:
        sel = pdf[(pdf["chunks"] == k) & (pdf["probe"] == probe)]
        return [set(t) for t in sel["template_ids"]]

    ks = sorted(set(pdf["chunks"]))
    labels = [label for label, _ in probes]
    docs = int(pdf["doc_id"].nunique())
    cal = Calibration(embedding_model, docs, threshold, chunks, index)
    for k in ks:
        ref = sets(k, labels[-1])
        for label in labels:
            found = sets(k, label)
            cal.counts[(k, label)] = count_summary(found)
            if index.get("nlist"):
                cal.probe_recall[(k, label)] = pair_recall(ref, found)
    a, b = COMPARED_CHUNKS
    if a in ks and b in ks:
        cal.k_recall[(a, b)] = pair_recall(sets(b, labels[0]), sets(a, labels[0]))
        cal.k_recall[(b, a)] = pair_recall(sets(a, labels[0]), sets(b, labels[0]))
    top = pdf[(pdf["chunks"] == chunks) & (pdf["probe"] == TOP_K)]
    per_doc = [list(s) for s in top["scores"]]
    best = [max(s) for s in per_doc if len(s)]
    every = [x for s in per_doc for x in s]
    cal.best = score_quantiles(best, QUANTILES)
    cal.top_k = score_quantiles(every, QUANTILES)
    cal.top_k_n = top_k
    if every:
        for t in (round(v, 3) for v in score_quantiles(every, (0.5, 0.75, 0.9, 0.95, 0.99))):
            share = sum(1 for s in per_doc if len(s) and max(s) >= t) / max(1, len(per_doc))
            mean_c = sum(sum(1 for x in s if x >= t) for s in per_doc) / max(1, len(per_doc))
            cal.thresholds.append((t, share, mean_c))
    return cal
