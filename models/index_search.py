"""The template index itself: :class:`TemplateIndex` (search, range search, save and load) and
:func:`threshold_search`, the match stage's search at the threshold (§3.2).

The index kinds and the on-disk format are described in :mod:`finelake.models.index`; building is
in :mod:`finelake.models.index_build`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from finelake.errors import FinelakeError

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
KIND_FLAT = "flat_ip"
KIND_IVF = "ivf_flat_ip"
KIND_IVF_SQ8 = "ivf_sq8_ip"
KIND_IVF_PQ = "ivf_pq_ip"
KIND_OPQ_IVF_PQ = "opq_ivf_pq_ip"
COMPRESSED_KINDS = {"sq8": KIND_IVF_SQ8, "pq": KIND_IVF_PQ, "opq": KIND_OPQ_IVF_PQ}
IVF_KINDS = (KIND_IVF, KIND_IVF_SQ8, KIND_IVF_PQ, KIND_OPQ_IVF_PQ)


class IndexFormatError(FinelakeError, ValueError):
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
        """One of ``flat_ip`` (exact), ``ivf_flat_ip``, ``ivf_sq8_ip``, ``ivf_pq_ip``,
        ``opq_ivf_pq_ip`` (approximate)."""
        return self.meta["kind"]

    @property
    def version(self) -> str:
        """Content hash of vectors, ids, model and parameters (16 hex digits)."""
        return self.meta["version"]

    @property
    def recall_at_k(self) -> float:
        """Recall@``recall_k`` measured at build time (1.0 for the exact index)."""
        return float(self.meta["recall_at_k"])

    @property
    def recall_at_threshold(self) -> Optional[float]:
        """Share of exact pairs >= threshold that :func:`threshold_search` returns (None when
        unmeasured or no pair reached the threshold)."""
        r = self.meta.get("recall_at_threshold")
        return None if r is None else float(r)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [m, {self.dim}], got {np.asarray(queries).shape}")
        return np.ascontiguousarray(q)

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
        q = self._queries(queries)
        if q.shape[0] == 0:
            return np.zeros((0, k), dtype=np.float32), []
        scores, labels = self.index.search(q, k)
        scores = scores.astype(np.float32, copy=False)
        missing = labels < 0
        scores[missing] = -np.inf
        ids = [[self.ids[j] for j in row if j >= 0] for row in labels]
        return scores, ids

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every indexed template with score >= ``threshold`` for each query (see
        :func:`threshold_search`).

        Returns:
            ``(lims, scores, labels)``: query i's results are ``scores[lims[i]:lims[i+1]]``
            (float32) and ``labels[...]`` (int64 positions into ``ids``), in no particular order.
        """
        return threshold_search(self.index, self._queries(queries), threshold)

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
    def load(cls, directory: str | os.PathLike, embedding_model: Optional[str] = None,
             mmap: bool = False) -> "TemplateIndex":
        """Read an index written by :meth:`save` (format 1 or 2).

        Args:
            directory: the folder holding ``index.faiss``, ``ids.json``, ``meta.json``.
            embedding_model: when given, the model id the caller embeds queries with; it must be
                the one the index was built with.
            mmap: read with ``faiss.IO_FLAG_MMAP``: the IVF kinds' inverted lists (the codes,
                ``bytes_per_vector`` x n) stay in the file and are paged in on demand, shared by
                every process of the machine that maps the same file; only the coarse quantizer
                (and the OPQ matrix) is read into memory. FAISS 1.15 does not map the flat kind's
                storage with this flag (it reads it into memory; ``IO_FLAG_MMAP_IFC`` would, but
                needs the file to outlive the process), so ``flat_ip`` is always read whole
                (it is used only below ``exact_below`` vectors).

        Raises:
            IndexFormatError: a file is missing, the format version is not one this code reads,
                the parts disagree (dim, size, id count), or the embedding model differs.
        """
        import faiss

        d = Path(directory)
        for name in ("index.faiss", "ids.json", "meta.json"):
            if not (d / name).is_file():
                raise IndexFormatError(f"{d}: missing {name}")
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format_version") not in READABLE_FORMATS:
            raise IndexFormatError(f"{d}: format_version {meta.get('format_version')!r}, this code "
                                   f"reads {list(READABLE_FORMATS)}: rebuild it with 'finelake index'")
        if embedding_model is not None and meta.get("embedding_model") != embedding_model:
            raise IndexFormatError(f"{d}: built with {meta.get('embedding_model')!r}, queries come "
                                   f"from {embedding_model!r}")
        ids = json.loads((d / "ids.json").read_text(encoding="utf-8"))
        flags = faiss.IO_FLAG_MMAP if (mmap and meta["kind"] in IVF_KINDS) else 0
        index = faiss.read_index(str(d / "index.faiss"), flags)
        if index.d != meta["dim"] or index.ntotal != meta["size"] or len(ids) != index.ntotal:
            raise IndexFormatError(f"{d}: index has d={index.d}, ntotal={index.ntotal}, ids={len(ids)}"
                                   f"; meta.json says dim={meta['dim']}, size={meta['size']}")
        if meta["kind"] in IVF_KINDS:
            faiss.extract_index_ivf(index).nprobe = int(meta["nprobe"])
        return cls(index=index, ids=ids, meta=meta)


def threshold_search(index: Any, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Range search at ``threshold``: for each query every vector whose index score is >=
    ``threshold`` (§3.2: a template is a candidate when its cosine with a document embedding
    reaches the threshold). One FAISS call for all queries.

    FAISS 1.15 range-searches every kind used here with inner product (flat, IVF-flat, IVF-SQ8,
    IVF-PQ, OPQ + IVF-PQ); for IVF only the ``nprobe`` probed lists are scanned, and for SQ8/PQ
    the compared score is the quantized one (see ``score_error_max`` in the metadata).
    FAISS's range search keeps scores strictly greater than its radius, so the radius is the
    largest float32 below ``threshold`` and a score equal to the threshold is kept.

    Args:
        index: a ``faiss.Index`` (inner product).
        queries: float32 ``[m, d]``.
        threshold: cosine threshold.

    Returns:
        ``(lims, scores, labels)``: ``lims`` int64 ``[m + 1]``; query i's results are
        ``scores[lims[i]:lims[i+1]]`` (float32) and ``labels[...]`` (int64).
    """
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.shape[0] == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    lims, scores, labels = index.range_search(q, radius)
    keep = scores >= np.float32(threshold)
    if not keep.all():  # defensive: drop anything below the threshold, fix the offsets
        counts = np.add.reduceat(keep.astype(np.int64), lims[:-1]) if len(keep) else np.zeros(len(q), np.int64)
        counts[np.diff(lims) == 0] = 0
        lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        scores, labels = scores[keep], labels[keep]
    return lims.astype(np.int64), scores.astype(np.float32, copy=False), labels.astype(np.int64)

