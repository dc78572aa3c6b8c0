"""The template index on executors: loaded once per Python worker (memory-mapped), searched one
FAISS call per batch of documents."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from finelake.udfs.cache import get_or_load


def load_index(path: str, embedding_model: str):
    """The :class:`finelake.models.index.TemplateIndex` saved at ``path`` (cached per worker).

    IVF kinds are read with ``faiss.IO_FLAG_MMAP``: their codes (``meta["bytes_per_vector"]`` x
    n bytes) stay in the file and are shared through the page cache by all the Python workers of
    an executor that open the same local copy; the coarse centroids (nlist x d x 4 bytes) and ids
    are per worker. The flat kind (below ``index.exact_below`` templates) is read whole.

    Raises:
        finelake.models.index.IndexFormatError: missing files or a different embedding model.
    """
    from finelake.models.index import TemplateIndex

    return get_or_load("faiss_index", {"path": path, "model": embedding_model},
                       lambda: TemplateIndex.load(path, embedding_model=embedding_model, mmap=True),
                       exclusive=False)  # data beside the model, not a second model


def load_slots(path: str) -> dict[str, int]:
    """Template id -> number of slots for the index saved at ``path`` (its ``ids.json`` and
    ``slots.json``, written by ``finelake index``), cached per worker.

    Raises:
        FileNotFoundError: the index has no ``slots.json`` (``finelake match`` writes it first).
    """
    def _load():
        import json
        import os

        with open(os.path.join(path, "ids.json"), encoding="utf-8") as f:
            ids = json.load(f)
        with open(os.path.join(path, "slots.json"), encoding="utf-8") as f:
            slots = json.load(f)
        return {t: int(k) for t, k in zip(ids, slots) if k is not None}

    return get_or_load("template_slots", {"path": path}, _load, exclusive=False)


@contextlib.contextmanager
def probing(index, nprobe: Optional[int]) -> Iterator[None]:
    """Search an IVF :class:`finelake.models.index.TemplateIndex` with ``nprobe`` lists (capped at
    its ``nlist``) inside the block, then restore its own; a no-op for the flat kind or None.
    The index may be the worker's cached one: a Python worker runs one task at a time."""
    from finelake.models.index import IVF_KINDS

    if nprobe is None or index.kind not in IVF_KINDS:
        yield
        return
    import faiss  # lazy: only IVF indexes get here, and faiss loads on executors only

    ivf = faiss.extract_index_ivf(index.index)
    saved = ivf.nprobe
    ivf.nprobe = max(1, min(int(nprobe), int(ivf.nlist)))
    try:
        yield
    finally:
        ivf.nprobe = saved


@dataclass
class BatchResult:
    """Candidates of a batch of documents.

    Attributes:
        candidates: per document, ``[{"template_id", "chunk_index", "score"}]`` best first.
        cut: per document, True when its list was shortened: by ``cap`` (range search), or in
            top-k mode when some query's k-th score still reached the threshold (more templates
            may qualify than k).
        queries: vectors searched (documents x (K+1)).
        pairs: (query, template) results FAISS returned before the per-template reduction.
    """

    candidates: list[list[dict]]
    cut: list[bool]
    queries: int = 0
    pairs: int = 0
    extra: dict = field(default_factory=dict)


def search_documents(index, pooled: Sequence, threshold: Optional[float], cap: Optional[int] = None,
                     top_k: Optional[int] = None) -> BatchResult:
    """Candidates of many documents with one FAISS call (§3.2): every template whose cosine with
    any of a document's K+1 pooled embeddings reaches ``threshold``; per document and template the
    best score and the chunk index that gave it (0 = global embedding, 1..K = Gaussian chunks;
    ties: the lower chunk index), sorted by score, best first, then by template id.

    Args:
        index: a :class:`finelake.models.index.TemplateIndex`.
        pooled: per document an array-like ``[K_i + 1, d]`` (unit vectors; documents may have
            different K_i) or None/empty for a document without embedding (no candidates).
        threshold: cosine threshold; with ``top_k`` None the search is a range search at it
            (:func:`finelake.models.index.threshold_search`). None: no threshold (needs top_k).
        cap: keep at most this many templates per document (the best); None = all.
        top_k: search the k nearest templates per vector instead of a range search (calibration,
            or where a range search is not wanted); results below ``threshold`` are dropped and a
            document whose vector's k-th score still reached the threshold is marked ``cut``.

    Returns:
        A :class:`BatchResult`.

    Raises:
        ValueError: neither a threshold nor top_k, or a vector width other than the index's.
    """
    if threshold is None and top_k is None:
        raise ValueError("give a threshold (range search) or top_k")
    blocks = [np.zeros((0, index.dim), np.float32) if p is None or len(p) == 0
              else np.asarray(np.stack([np.asarray(v, dtype=np.float32) for v in p])
                              if not isinstance(p, np.ndarray) else p, dtype=np.float32)
              for p in pooled]
    counts = np.array([len(b) for b in blocks], dtype=np.int64)
    n_docs = len(blocks)
    q = np.concatenate(blocks) if n_docs else np.zeros((0, index.dim), np.float32)
    doc_of = np.repeat(np.arange(n_docs, dtype=np.int64), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n_docs else np.zeros(0, np.int64)
    cut = np.zeros(n_docs, dtype=bool)
    if len(q) == 0:
        return BatchResult([[] for _ in range(n_docs)], cut.tolist())
    if top_k is None:
        lims, scores, labels = index.range_search(q, threshold)
        qi = np.repeat(np.arange(len(q), dtype=np.int64), np.diff(lims))
    else:
        s, lab = index.index.search(np.ascontiguousarray(q), int(top_k))
        ok = lab >= 0
        if threshold is not None:
            full = ok.all(axis=1) & (s[:, -1] >= np.float32(threshold))
            np.logical_or.at(cut, doc_of, full)
            ok &= s >= np.float32(threshold)
        qi = np.nonzero(ok)[0].astype(np.int64)
        scores, labels = s[ok].astype(np.float32), lab[ok].astype(np.int64)
    pairs = len(labels)
    doc = doc_of[qi]
    chunk = qi - first[doc]
    # best (score, then lowest chunk) per (document, template): sort and keep the first of each
    order = np.lexsort((chunk, -scores, labels, doc))
    doc, labels, scores, chunk = doc[order], labels[order], scores[order], chunk[order]
    first_of = np.ones(len(doc), dtype=bool)
    first_of[1:] = (doc[1:] != doc[:-1]) | (labels[1:] != labels[:-1])
    doc, labels, scores, chunk = doc[first_of], labels[first_of], scores[first_of], chunk[first_of]
    ids = index.ids
    out: list[list[dict]] = [[] for _ in range(n_docs)]
    bounds = np.searchsorted(doc, np.arange(n_docs + 1))
    for i in range(n_docs):
        a, b = bounds[i], bounds[i + 1]
        if a == b:
            continue
        rows = sorted(zip((-scores[a:b]).tolist(), (ids[j] for j in labels[a:b]), chunk[a:b].tolist()))
        if cap is not None and len(rows) > cap:
            rows = rows[:cap]
            cut[i] = True
        out[i] = [{"template_id": t, "chunk_index": int(k), "score": -s} for s, t, k in rows]
    return BatchResult(out, cut.tolist(), queries=int(len(q)), pairs=int(pairs))


def search_pooled(path: str, embedding_model: str, pooled: list, threshold: float,
                  cap: Optional[int] = None) -> list[dict]:
    """Candidates of one document (:func:`search_documents` for a batch of one), with the index at
    ``path`` loaded once per worker.

    Args:
        pooled: K+1 unit vectors of length d (the document's Gaussian-pooled embeddings).

    Returns:
        ``[{"template_id", "chunk_index", "score"}]`` sorted by score, best first.
    """
    return search_documents(load_index(path, embedding_model), [pooled], threshold, cap).candidates[0]
