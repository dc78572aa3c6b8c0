"""The template index: FAISS inner-product search over unit-norm template embeddings (§3.2).

The paper embeds each template's compatible-document description and "build[s] a FAISS retrieval
index on the resulting embeddings"; every document embedding (global and each Gaussian chunk) is a
query. Vectors are unit-norm, so the inner product is the cosine similarity the match thresholds
are expressed in.

Index kind: below ``exact_below`` vectors an exact ``IndexFlatIP`` (100k x 384 answers ~1.5k
queries/s on 2 cores, see the environment notes), at or above it an ``IndexIVFFlat`` with inner
product. IVF is approximate, so its recall@k against exact search is measured when it is built, on
a seeded sample of the indexed vectors used as queries, and recorded in ``meta.json``. (A sample of
the indexed vectors finds its own cell easily, so this recall is an upper estimate for foreign
queries; pass ``recall_queries=`` with real document embeddings for a figure on those.)

On disk (``TemplateIndex.save(dir)``)::

    dir/index.faiss   faiss.write_index
    dir/ids.json      template ids in FAISS label order (label i -> ids[i])
    dir/meta.json     format_version, kind, embedding_model, dim, size, metric, nlist, nprobe,
                      recall_k, recall_at_k, recall_queries, created (UTC ISO-8601), version

``version`` is a content hash (SHA-256 of the vectors, the ids, the embedding model and the index
parameters, first 16 hex digits): the same templates embedded by the same model give the same
version, so a match stage can record which index answered it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

FORMAT_VERSION = 1
KIND_FLAT = "flat_ip"
KIND_IVF = "ivf_flat_ip"
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this many training points per list
RECALL_SAMPLE = 1000
NORM_TOLERANCE = 1e-3

__all__ = ["TemplateIndex", "build_index", "IndexFormatError", "FORMAT_VERSION", "KIND_FLAT",
           "KIND_IVF"]


class IndexFormatError(ValueError):
    """A saved index is missing a file, has another format version, or its parts disagree."""


@dataclass
class TemplateIndex:
    """A FAISS index over template embeddings plus the template ids and metadata.

    Attributes:
        index: the ``faiss.Index`` (labels are positions 0..size-1 into ``ids``).
        ids: template ids, ``ids[label]``.
        meta: the ``meta.json`` content (see module docstring).
    """

    index: Any
    ids: list[str]
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Vector width d."""
        return int(self.index.d)

    @property
    def kind(self) -> str:
        """``"flat_ip"`` (exact) or ``"ivf_flat_ip"`` (approximate)."""
        return self.meta["kind"]

    @property
    def version(self) -> str:
        """Content hash of vectors, ids, model and parameters (16 hex digits)."""
        return self.meta["version"]

    @property
    def recall_at_k(self) -> float:
        """Recall@``recall_k`` measured at build time (1.0 for the exact index)."""
        return float(self.meta["recall_at_k"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k templates by inner product (= cosine for unit vectors) for each query.

        Args:
            queries: ``[m, d]`` (or one ``[d]`` vector), any float dtype; expected unit-norm.
            k: neighbours wanted per query (≥ 1).

        Returns:
            ``(scores, ids)``: ``scores`` float32 ``[m, k]``, best first; ``ids[i]`` the template ids of
            query i, best first. Neighbours FAISS could not fill (k > size, or an IVF probe that
            reached fewer than k vectors) are dropped from ``ids[i]``, so ``len(ids[i]) <= k`` and
            ``scores[i, len(ids[i]):]`` is ``-inf``.

        Raises:
            ValueError: ``k < 1`` or the query width is not ``dim``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [m, {self.dim}], got {np.asarray(queries).shape}")
        q = np.ascontiguousarray(q)
        if q.shape[0] == 0:
            return np.zeros((0, k), dtype=np.float32), []
        scores, labels = self.index.search(q, k)
        scores = scores.astype(np.float32, copy=False)
        missing = labels < 0
        scores[missing] = -np.inf
        ids = [[self.ids[j] for j in row if j >= 0] for row in labels]
        return scores, ids

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``ids.json`` and ``meta.json`` into ``directory`` (created).

        Files are written under temporary names and renamed, ``meta.json`` last, so a reader never
        sees a meta.json describing files that are not all there.

        Returns:
            The directory as a ``Path``.
        """
        import faiss

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)

        def atomic(name: str, write) -> None:
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.")
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, d / name)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

        atomic("index.faiss", lambda p: faiss.write_index(self.index, p))
        atomic("ids.json", lambda p: Path(p).write_text(json.dumps(self.ids), encoding="utf-8"))
        atomic("meta.json", lambda p: Path(p).write_text(json.dumps(self.meta, indent=2, sort_keys=True),
                                                         encoding="utf-8"))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, embedding_model: Optional[str] = None) -> "TemplateIndex":
        """Read an index written by :meth:`save`.

        Args:
            directory: the folder holding ``index.faiss``, ``ids.json``, ``meta.json``.
            embedding_model: when given, the model id the caller embeds queries with; it must be
                the one the index was built with.

        Raises:
            IndexFormatError: a file is missing, the format version is not ``FORMAT_VERSION``, the
                parts disagree (dim, size, id count), or the embedding model differs.
        """
        import faiss

        d = Path(directory)
        for name in ("index.faiss", "ids.json", "meta.json"):
            if not (d / name).is_file():
                raise IndexFormatError(f"{d}: missing {name}")
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(f"{d}: format_version {meta.get('format_version')!r}, this code "
                                   f"reads {FORMAT_VERSION}")
        if embedding_model is not None and meta.get("embedding_model") != embedding_model:
            raise IndexFormatError(f"{d}: built with {meta.get('embedding_model')!r}, queries come "
                                   f"from {embedding_model!r}")
        ids = json.loads((d / "ids.json").read_text(encoding="utf-8"))
        index = faiss.read_index(str(d / "index.faiss"))
        if index.d != meta["dim"] or index.ntotal != meta["size"] or len(ids) != index.ntotal:
            raise IndexFormatError(f"{d}: index has d={index.d}, ntotal={index.ntotal}, ids={len(ids)}"
                                   f"; meta.json says dim={meta['dim']}, size={meta['size']}")
        if meta["kind"] == KIND_IVF:
            faiss.extract_index_ivf(index).nprobe = int(meta["nprobe"])
        return cls(index=index, ids=ids, meta=meta)


# ----------------------------------------------------------------------------- building


def content_hash(vectors: np.ndarray, ids: Sequence[str], embedding_model: str, params: dict) -> str:
    """SHA-256 (16 hex digits) of the float32 vectors, the ids, the model id and the parameters."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    h.update(b"\0".join(s.encode("utf-8") for s in ids))
    h.update(json.dumps({"model": embedding_model, **params}, sort_keys=True).encode("utf-8"))
    return h.hexdigest()[:16]


def build_index(vectors: np.ndarray, ids: Sequence[str], *, exact_below: int = 200000,
                nlist: int = 1024, nprobe: int = 32, recall_k: int = 10, embedding_model: str,
                recall_queries: Optional[np.ndarray] = None, recall_sample: int = RECALL_SAMPLE,
                seed: int = 0) -> TemplateIndex:
    """Build the template index (§3.2 "build a FAISS retrieval index").

    Args:
        vectors: float32 ``[n, d]``, unit L2 norm (e.g. ``EmbeddingBackend.embed`` output).
        ids: n template ids (strings, unique), in the same order.
        exact_below: n below this → exact ``IndexFlatIP``; otherwise ``IndexIVFFlat`` (inner product).
        nlist: IVF lists. Capped at ``n // 39`` (FAISS's minimum of 39 training points per list);
            the value used is recorded as ``meta["nlist"]``.
        nprobe: lists visited per query (capped at nlist).
        recall_k: k of the recall@k measured for IVF (recorded for both kinds).
        embedding_model: id of the model that produced ``vectors`` (checked by ``load``).
        recall_queries: optional ``[q, d]`` unit-norm queries for the recall measurement; default a
            seeded sample of ``recall_sample`` indexed vectors.
        recall_sample: how many indexed vectors to sample as queries (default 1000).
        seed: sampling and k-means seed.

    Returns:
        A :class:`TemplateIndex`; ``meta["recall_at_k"]`` is 1.0 for the exact index and the
        measured mean |IVF top-k ∩ exact top-k| / k for IVF.

    Raises:
        ValueError: empty input, shape or id-count mismatch, duplicate ids, non-finite values, or
            rows whose norm is not 1 (± 1e-3).
    """
    import faiss

    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    ids = [str(i) for i in ids]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty [n, d] array, got shape {x.shape}")
    n, d = x.shape
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} vectors")
    if len(set(ids)) != n:
        raise ValueError("template ids must be unique")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or inf")
    norms = np.linalg.norm(x, axis=1)
    if np.abs(norms - 1.0).max() > NORM_TOLERANCE:
        bad = int(np.argmax(np.abs(norms - 1.0)))
        raise ValueError(f"vectors must be unit-norm (inner product = cosine); row {bad} has norm "
                         f"{norms[bad]:.4f}")
    if min(exact_below, nlist, nprobe, recall_k) < 1:
        raise ValueError("exact_below, nlist, nprobe and recall_k must be >= 1")

    if n < exact_below:
        kind = KIND_FLAT
        index = faiss.IndexFlatIP(d)
        index.add(x)
        params = {"kind": kind}
        nlist_used = nprobe_used = None
    else:
        kind = KIND_IVF
        nlist_used = max(1, min(int(nlist), n // MIN_POINTS_PER_CENTROID))
        nprobe_used = min(int(nprobe), nlist_used)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist_used, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # nlist is already capped; silence the warning
        index.train(x)
        index.add(x)
        index.nprobe = nprobe_used
        params = {"kind": kind, "nlist": nlist_used}

    k_eval = min(int(recall_k), n)
    if kind == KIND_FLAT:
        recall, n_q = 1.0, 0
    else:
        if recall_queries is not None:
            q = np.ascontiguousarray(np.asarray(recall_queries, dtype=np.float32))
            if q.ndim != 2 or q.shape[1] != d or q.shape[0] == 0:
                raise ValueError(f"recall_queries must be a non-empty [q, {d}] array, got {q.shape}")
        else:
            rng = np.random.default_rng(seed)
            q = x[rng.choice(n, size=min(recall_sample, n), replace=False)]
        recall, n_q = measure_recall(index, x, q, k_eval), len(q)

    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "embedding_model": embedding_model,
        "dim": d,
        "size": n,
        "metric": "inner_product",
        "exact_below": int(exact_below),
        "nlist": nlist_used,
        "nprobe": nprobe_used,
        "recall_k": k_eval,
        "recall_at_k": float(recall),
        "recall_queries": n_q,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": content_hash(x, ids, embedding_model, params),
    }
    return TemplateIndex(index=index, ids=ids, meta=meta)


def measure_recall(index: Any, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Recall@k of ``index`` against exact inner-product search over ``vectors``.

    Args:
        index: a FAISS index over ``vectors`` (labels = row numbers).
        vectors: float32 ``[n, d]``, the indexed vectors.
        queries: float32 ``[q, d]``.
        k: neighbours compared (≤ n).

    Returns:
        mean over queries of |approximate top-k ∩ exact top-k| / k, in [0, 1].
    """
    import faiss

    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    _, got = index.search(queries, k)
    hits = sum(len(set(t.tolist()) & set(g[g >= 0].tolist())) for t, g in zip(truth, got))
    return hits / (k * len(queries))
