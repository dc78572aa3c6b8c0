"""The template index: FAISS inner-product search over unit-norm template embeddings (§3.2).

The paper embeds each template's compatible-document description and "build[s] a FAISS retrieval
index on the resulting embeddings"; every document embedding (global and each Gaussian chunk) is a
query, and a template is a candidate for a document when its cosine similarity with one of the
document's K+1 embeddings reaches the threshold (0.865 for the paper's fine-tuned BGE-M3). Vectors
are unit-norm, so the inner product is that cosine.

Index kinds (chosen by the number of templates n):

=====================  ==========================  =============================================
kind                   when                        bytes per vector in RAM (d = width)
=====================  ==========================  =============================================
``flat_ip``            n < ``exact_below``         4d (exact)
``ivf_flat_ip``        exact_below <= n            4d + 8 (list id); approximate by probing
                       < ``compress_above``        ``nprobe`` of ``nlist`` lists, exact scores
``ivf_sq8_ip``         n >= compress_above,        d + 8; scores within ~1e-3 of the cosine
                       ``compression="sq8"``
``ivf_pq_ip``          compression ``"pq"``        ``pq_m`` + 8; scores approximate (PQ)
``opq_ivf_pq_ip``      compression ``"opq"``       ``pq_m`` + 8, plus a d x d rotation
=====================  ==========================  =============================================

Plus the coarse centroids (``nlist`` x d x 4 bytes) for every IVF kind. The total is
``meta["memory_bytes"]``: what each executor holds for the index (mapped read-only from the file
when loaded with ``mmap=True``, so the Python workers of one executor share one copy through the
page cache). At the paper's 18M templates x 1024 dims: IVF-flat 74 GB, IVF-SQ8 18.6 GB, IVF-PQ64
1.3 GB.

Building streams: the vectors come from a :class:`VectorSource` (an in-memory array, or Parquet
files written by Spark executors, read zero-copy batch by batch), the IVF kinds are trained on a
sample of ``train_size`` vectors and filled ``add_batch`` vectors at a time, so the driver holds
one batch plus the training sample, never all n vectors (n x d x 4 bytes: 74 GB at 18M x 1024).

Two recalls are measured at build time against exact (brute-force, streamed) search and
recorded in ``meta.json``:

* ``recall_at_k``: mean |index top-k ∩ exact top-k| / k (1.0 for the flat index).
* ``recall_at_threshold``: of the (query, template) pairs whose exact cosine is >= ``threshold``,
  the share the index returns when searched as the match stage searches it (range search at the
  threshold, :func:`threshold_search`). ``None`` when no pair reaches the threshold. The queries
  should be real document embeddings (``recall_queries``, the K+1 pooled vectors of sampled
  documents; ``meta["recall_queries_source"] == "given"``); without them a seeded sample of the
  indexed vectors is used (``"indexed_sample"``), which finds its own cell easily and so gives an
  upper estimate. ``precision_at_threshold`` is the share of returned pairs whose exact cosine
  reaches the threshold (below 1 only for the kinds whose scores are approximate), and
  ``score_error_max`` the largest |index score - exact cosine| over returned true pairs.

On disk (``TemplateIndex.save(dir)``)::

    dir/index.faiss   faiss.write_index
    dir/ids.json      template ids in FAISS label order (label i -> ids[i])
    dir/meta.json     format_version, kind, embedding_model, dim, size, metric, nlist, nprobe,
                      recall_k, recall_at_k, recall_queries, created (UTC ISO-8601), version;
                      since format 2 also: pq_m, train_size, bytes_per_vector, memory_bytes,
                      threshold, recall_at_threshold, precision_at_threshold, pairs_at_threshold,
                      score_error_max, recall_queries_source

Format 1 indexes (flat and IVF-flat, before compression) are still read.

``version`` is a content hash: SHA-256 over the sorted per-row digests of (template id, float32
vector), the embedding model and the index parameters, first 16 hex digits. It does not depend on
the row order, so the same templates embedded by the same model give the same version whatever
order Spark wrote them in, and a match stage can record which index answered it. The training
sample is likewise chosen by a hash of the template ids and sorted by id, so the trained centroids
do not depend on the row order either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

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
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this many training points per list
DEFAULT_TRAIN_SIZE = 131072  # the training sample's floor with train_size="auto" (512 MB at d=1024)
RECALL_SAMPLE = 1000
NORM_TOLERANCE = 1e-3
EXACT_BATCH = 32768  # template rows per brute-force block when measuring recall
# Rows per Parquet read. A list<float> column decodes a row group at a time with two int16 levels
# per value besides the values, so the reader's working set is set by the writer's row group size
# (Spark's 128 MB: ~750 MB of Arrow memory at d = 1024), not by the number of vectors; small
# reads keep the batches themselves out of that figure.
READ_BATCH = 8192
# Bytes per buffered read of a Parquet file, with pyarrow's pre-buffering off. With its defaults
# (pre_buffer=True in pyarrow 25) the reader keeps what it has read of a file until the file is
# closed: the driver's RSS grew by the file's size, +0.8 GB over a 1 GB Spark-written file of
# 240k x 1024 vectors and a 2 GB sawtooth while the index job measured recall at 1M templates.
# Streamed, it stays flat (~200 MB for the same file).
READ_BUFFER = 1 << 20

log = logging.getLogger(__name__)

__all__ = ["TemplateIndex", "build_index", "build_index_from", "IndexFormatError", "FORMAT_VERSION",
           "KIND_FLAT", "KIND_IVF", "KIND_IVF_SQ8", "KIND_IVF_PQ", "KIND_OPQ_IVF_PQ", "VectorSource",
           "ArrayVectors", "ParquetVectors", "threshold_search", "auto_nlist"]


class IndexFormatError(FinelakeError, ValueError):
    """A saved index is missing a file, has another format version, or its parts disagree."""


# ----------------------------------------------------------------------------- vector sources


class VectorSource:
    """n unit vectors of width d, read in order a batch at a time (the builder never needs them
    all at once).

    Subclasses set ``n``, ``d`` and ``ids`` (n strings, label order) and implement
    :meth:`batches`.
    """

    n: int
    d: int
    ids: list[str]

    def batches(self, rows: int) -> Iterator[np.ndarray]:
        """float32 C-contiguous ``[b, d]`` blocks of at most ``rows`` rows, in label order."""
        raise NotImplementedError

    def take(self, positions: np.ndarray, dest: Optional[np.ndarray] = None) -> np.ndarray:
        """float32 ``[len(positions), d]``: the rows at ``positions`` (sorted ascending), row
        ``positions[i]`` going to output row ``dest[i]`` (a permutation of ``range(len(positions))``;
        default ``i``). One streamed pass over :meth:`batches`; the output is the only copy."""
        positions = np.asarray(positions, dtype=np.int64)
        dest = np.arange(len(positions)) if dest is None else np.asarray(dest, dtype=np.int64)
        out = np.empty((len(positions), self.d), dtype=np.float32)
        start, j = 0, 0
        for b in self.batches(65536):
            end = start + len(b)
            k = np.searchsorted(positions, end)
            if k > j:
                out[dest[j:k]] = b[positions[j:k] - start]
                j = k
            start = end
            if j == len(positions):
                break
        return out


class ArrayVectors(VectorSource):
    """An in-memory ``[n, d]`` array (tests, small indexes)."""

    def __init__(self, vectors: np.ndarray, ids: Sequence[str]):
        self.x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if self.x.ndim != 2 or self.x.shape[0] == 0:
            raise ValueError(f"vectors must be a non-empty [n, d] array, got shape {self.x.shape}")
        self.n, self.d = self.x.shape
        self.ids = [str(i) for i in ids]

    def batches(self, rows: int) -> Iterator[np.ndarray]:
        for i in range(0, self.n, rows):
            yield self.x[i:i + rows]

    def take(self, positions: np.ndarray, dest: Optional[np.ndarray] = None) -> np.ndarray:
        rows = self.x[np.asarray(positions, dtype=np.int64)]
        if dest is None:
            return rows
        out = np.empty_like(rows)
        out[np.asarray(dest, dtype=np.int64)] = rows
        return out


class ParquetVectors(VectorSource):
    """Vectors in Parquet files (``list<float>`` column, e.g. Spark's ``array<float>``), read
    with pyarrow a record batch of at most :data:`READ_BATCH` rows at a time on the calling thread,
    through a :data:`READ_BUFFER`-byte buffered stream without pre-buffering:
    the list column's values buffer is viewed as float32 ``[b, d]`` (no Python objects; a copy only
    when the file stores doubles), and the Arrow pool's unused memory is returned after each batch,
    so reading holds about one decoded row group whatever the number of vectors.

    Args:
        files: Parquet file paths; rows are taken file by file in this order.
        id_column: the template-id column (read whole: n strings).
        vector_column: the ``list<float>`` column.

    Raises:
        ValueError: no rows, null vectors, or rows of different lengths.
    """

    def __init__(self, files: Sequence[str], id_column: str = "template_id",
                 vector_column: str = "embedding"):
        import pyarrow.parquet as pq

        self.files = [str(f) for f in files]
        self.vector_column = vector_column
        self.ids = []
        for f in self.files:
            self.ids.extend(pq.read_table(f, columns=[id_column]).column(id_column).to_pylist())
        self.n = len(self.ids)
        if self.n == 0:
            raise ValueError("no vectors in the Parquet files")
        self.d = 0
        for b in self.batches(1):
            self.d = b.shape[1]
            break

    def batches(self, rows: int) -> Iterator[np.ndarray]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pool = pa.default_memory_pool()
        for f in self.files:
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=READ_BUFFER)
            reader = pf.iter_batches(batch_size=min(int(rows), READ_BATCH),
                                     columns=[self.vector_column], use_threads=False)
            for rb in reader:
                if rb.num_rows:
                    x = arrow_list_to_numpy(rb.column(0), self.d or None)
                    del rb
                    yield x
                    del x
                pool.release_unused()


def arrow_list_to_numpy(col, d: Optional[int] = None) -> np.ndarray:
    """A pyarrow ``list<float>`` array of equal-length lists -> float32 ``[n, d]`` (zero-copy when
    the values are float32 and unsliced).

    Raises:
        ValueError: nulls, or lists of unequal length (or not ``d`` long).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        raise ValueError(f"{col.null_count} null vectors")
    n = len(col)
    lengths = pc.list_value_length(col)
    lo, hi = pc.min_max(lengths).values()
    if n and (lo.as_py() != hi.as_py() or (d is not None and lo.as_py() != d)):
        raise ValueError(f"vectors of lengths {lo.as_py()}..{hi.as_py()}, expected {d or 'equal'}")
    width = lo.as_py() if n else (d or 0)
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.astype(np.float32, copy=False).reshape(n, width))


# ----------------------------------------------------------------------------- the index


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


# ----------------------------------------------------------------------------- building


def content_hash(vectors: np.ndarray, ids: Sequence[str], embedding_model: str, params: dict) -> str:
    """SHA-256 (16 hex digits) of the rows (id, float32 vector) in any order, the model id and the
    parameters. See :class:`_RowHasher`."""
    h = _RowHasher()
    h.update(list(ids), np.ascontiguousarray(vectors, dtype=np.float32))
    return h.hexdigest(embedding_model, params)


class _RowHasher:
    """Order-independent content hash: a 16-byte BLAKE2b digest per row (id + vector bytes); the
    digests are sorted and hashed with the model and parameters (SHA-256). Holds 16 bytes per row
    (288 MB at 18M templates)."""

    def __init__(self):
        self.parts: list[np.ndarray] = []

    def update(self, ids: Sequence[str], x: np.ndarray) -> None:
        out = np.empty((len(ids), 16), dtype=np.uint8)
        for i, (t, row) in enumerate(zip(ids, x)):
            h = hashlib.blake2b(t.encode("utf-8"), digest_size=16)
            h.update(b"\0")
            h.update(row.tobytes())
            out[i] = np.frombuffer(h.digest(), dtype=np.uint8)
        self.parts.append(out)

    def hexdigest(self, embedding_model: str, params: dict) -> str:
        rows = np.concatenate(self.parts) if self.parts else np.zeros((0, 16), np.uint8)
        rows = rows.view("V16").ravel()
        rows.sort()
        h = hashlib.sha256(rows.tobytes())
        h.update(json.dumps({"model": embedding_model, **params}, sort_keys=True).encode("utf-8"))
        return h.hexdigest()[:16]


def _id_order_key(ids: Sequence[str]) -> np.ndarray:
    """A seeded-free, order-independent uint64 hash per id (training-sample choice)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little")
                        for t in ids), dtype=np.uint64, count=len(ids))


def _check_batch(x: np.ndarray, start: int) -> None:
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or inf")
    norms = np.linalg.norm(x, axis=1)
    dev = np.abs(norms - 1.0)
    if len(dev) and dev.max() > NORM_TOLERANCE:
        bad = int(np.argmax(dev))
        raise ValueError(f"vectors must be unit-norm (inner product = cosine); row {start + bad} "
                         f"has norm {norms[bad]:.4f}")


def _new_index(kind: str, d: int, nlist: int, pq_m: int, seed: int):
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if kind == KIND_FLAT:
        return faiss.IndexFlatIP(d)
    quantizer = faiss.IndexFlatIP(d)
    if kind == KIND_IVF:
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
    elif kind == KIND_IVF_SQ8:
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
    elif kind in (KIND_IVF_PQ, KIND_OPQ_IVF_PQ):
        ivf = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, ip)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    ivf.own_fields = True
    quantizer.this.disown()
    ivf.cp.seed = seed
    ivf.cp.min_points_per_centroid = 1  # nlist is already capped; silence the warning
    if kind == KIND_OPQ_IVF_PQ:
        opq = faiss.OPQMatrix(d, pq_m)
        index = faiss.IndexPreTransform(opq, ivf)
        index.own_fields = True
        opq.this.disown()
        ivf.this.disown()
        return index
    return ivf


def memory_bytes(index: Any, kind: str) -> tuple[int, int]:
    """``(bytes per vector, total bytes)`` the index occupies in RAM: codes + 8-byte list ids per
    vector for IVF, plus coarse centroids (nlist x d x 4), PQ codebooks and the OPQ rotation."""
    import faiss

    n, d = int(index.ntotal), int(index.d)
    if kind == KIND_FLAT:
        return 4 * d, 4 * d * n
    ivf = faiss.extract_index_ivf(index)
    per = int(ivf.code_size) + 8
    fixed = ivf.nlist * d * 4
    if kind in (KIND_IVF_PQ, KIND_OPQ_IVF_PQ):
        fixed += d * 256 * 4  # PQ codebooks: M x 256 x (d / M) floats
    if kind == KIND_OPQ_IVF_PQ:
        fixed += d * d * 4
    if kind == KIND_IVF_SQ8:
        fixed += 2 * d * 4  # per-dimension min and range
    return per, per * n + fixed


def auto_nlist(n: int) -> int:
    """IVF lists for n vectors: 4·√n rounded to the nearest power of two (FAISS's guidance is
    4-16·√n; the low end keeps k-means training cheap). 1M -> 4,096, 18M -> 16,384, at least 1.

    With ``nprobe`` lists probed a query scans about ``nprobe * n / nlist = nprobe·√n/4`` codes,
    so match's cost per document grows as √n rather than n (measured on the scale benchmark's
    vectors, one thread, nprobe 32: 1M vectors in 1,024 lists 22.7 ms per document of 6 queries,
    in 4,096 lists 5.7 ms, recall at the threshold 0.974 and 0.975)."""
    if n < 1:
        return 1
    return int(2 ** round(math.log2(4 * math.sqrt(n))))


def build_index(vectors: np.ndarray, ids: Sequence[str], **kwargs) -> TemplateIndex:
    """:func:`build_index_from` an in-memory float32 ``[n, d]`` array and its n ids."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty [n, d] array, got shape {x.shape}")
    if len(ids) != x.shape[0]:
        raise ValueError(f"{len(ids)} ids for {x.shape[0]} vectors")
    return build_index_from(ArrayVectors(x, ids), **kwargs)


def build_index_from(source: VectorSource, *, exact_below: int = 200000,
                     compress_above: Optional[int] = None, compression: str = "sq8",
                     nlist: int | str = "auto", nprobe: int = 32, pq_m: int = 64,
                     train_size: int | str = "auto", add_batch: int = 65536, recall_k: int = 10,
                     embedding_model: str, threshold: Optional[float] = None,
                     recall_queries: Optional[np.ndarray] = None,
                     recall_sample: int = RECALL_SAMPLE, seed: int = 0) -> TemplateIndex:
    """Build the template index (§3.2 "build a FAISS retrieval index"), streaming the vectors.

    Memory on the driver: one ``add_batch`` x d float32 block, the training sample
    (``train_size`` x d x 4 bytes: 512 MB at 131072 x 1024), the index itself
    (``meta["memory_bytes"]``), the ids, 16 bytes per row for the content hash, the source's read
    buffers (:class:`ParquetVectors`: about one decoded row group) and the recall's exact scan
    (queries x ``EXACT_BATCH`` x 12 bytes). Measured at 1M x 1024 (IVF-SQ8, 1 GB): see the
    README's scale benchmark. Passes over
    the source: one to validate, hash and add, one to take the training sample (IVF kinds), one
    for the exact search of the recall measurement (IVF kinds).

    Args:
        source: the vectors (float32, unit L2 norm) and their unique string ids.
        exact_below: n below this → exact ``IndexFlatIP``.
        compress_above: n at or above this → the ``compression`` kind; None: never.
        compression: ``"sq8"`` (IVF + 8-bit scalar quantizer, d bytes per vector), ``"pq"``
            (IVF-PQ, ``pq_m`` bytes per vector) or ``"opq"`` (OPQ rotation + IVF-PQ).
        nlist: IVF lists, or ``"auto"``: :func:`auto_nlist` (4·√n as a power of two, so a query
            scans about ``nprobe·√n/4`` vectors: the search cost per query grows as √n, not n).
            Capped at ``min(n, train_size) // 39`` (FAISS's minimum of 39 training points per
            list); the value used is recorded as ``meta["nlist"]``.
        nprobe: lists visited per query (capped at nlist).
        pq_m: PQ sub-quantizers (bytes per code); must divide d.
        train_size: vectors the IVF kinds are trained on (the rows with the smallest id hashes,
            sorted by id), all when n is smaller; ``"auto"``: ``max(131072, 39 * nlist)``.
        add_batch: rows per ``index.add`` call (and per validation/hash block).
        recall_k: k of the recall@k (recorded for every kind; 1.0 for the exact index).
        embedding_model: id of the model that produced the vectors (checked by ``load``).
        threshold: the match threshold; when given, ``recall_at_threshold`` is measured.
        recall_queries: ``[q, d]`` unit-norm queries for both recalls: real document embeddings
            (the K+1 pooled vectors of sampled documents); default a seeded sample of
            ``recall_sample`` indexed vectors (an optimistic estimate).
        seed: sampling and k-means seed.

    Returns:
        A :class:`TemplateIndex` with the metadata of the module docstring. The memory figure is
        also logged.

    Raises:
        ValueError: empty input, duplicate ids, non-finite values, rows whose norm is not 1
            (± 1e-3), an unknown compression, or ``pq_m`` not dividing d.
    """
    import faiss

    n, d = int(source.n), int(source.d)
    ids = [str(i) for i in source.ids]
    if n == 0:
        raise ValueError("no vectors")
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} vectors")
    if len(set(ids)) != n:
        raise ValueError("template ids must be unique")
    if not all(v == "auto" or isinstance(v, (int, np.integer)) for v in (nlist, train_size)):
        raise ValueError(f"nlist and train_size must be integers or 'auto', got {nlist!r}, {train_size!r}")
    if nlist == "auto":
        nlist = auto_nlist(n)
    if train_size == "auto":
        train_size = max(DEFAULT_TRAIN_SIZE, MIN_POINTS_PER_CENTROID * int(nlist))
    if min(exact_below, nlist, nprobe, recall_k, train_size, add_batch) < 1:
        raise ValueError("exact_below, nlist, nprobe, recall_k, train_size and add_batch must be >= 1")
    if compression not in COMPRESSED_KINDS:
        raise ValueError(f"compression must be one of {sorted(COMPRESSED_KINDS)}, got {compression!r}")

    if n < exact_below:
        kind = KIND_FLAT
    elif compress_above is not None and n >= compress_above:
        kind = COMPRESSED_KINDS[compression]
    else:
        kind = KIND_IVF
    if kind in (KIND_IVF_PQ, KIND_OPQ_IVF_PQ) and d % pq_m:
        raise ValueError(f"pq_m={pq_m} must divide the vector width {d}")

    nlist_used = nprobe_used = None
    n_train = min(int(train_size), n)
    if kind == KIND_FLAT:
        params: dict = {"kind": kind}
    else:
        nlist_used = max(1, min(int(nlist), n_train // MIN_POINTS_PER_CENTROID))
        nprobe_used = min(int(nprobe), nlist_used)
        params = {"kind": kind, "nlist": nlist_used}
        if n_train < n:
            params["train_size"] = n_train
        if kind in (KIND_IVF_PQ, KIND_OPQ_IVF_PQ):
            params["pq_m"] = int(pq_m)
    index = _new_index(kind, d, nlist_used or 1, int(pq_m), seed)

    if kind != KIND_FLAT:  # train on a sample chosen and ordered by the ids, not the row order
        key = _id_order_key(ids)
        pick = np.sort(np.argsort(key, kind="stable")[:n_train]) if n_train < n else np.arange(n)
        by_id = np.argsort(np.asarray([ids[i] for i in pick], dtype=object), kind="stable")
        dest = np.empty(len(pick), dtype=np.int64)
        dest[by_id] = np.arange(len(pick))  # row pick[i] goes to its rank by id
        sample = source.take(pick, dest)
        _check_batch(sample, 0)
        index.train(sample)
        del sample
    hasher = _RowHasher()
    start = 0
    for b in source.batches(int(add_batch)):
        b = np.ascontiguousarray(b, dtype=np.float32)
        if b.shape[1] != d:
            raise ValueError(f"a batch has width {b.shape[1]}, expected {d}")
        _check_batch(b, start)
        hasher.update(ids[start:start + len(b)], b)
        index.add(b)
        start += len(b)
    if start != n:
        raise ValueError(f"the source yielded {start} vectors, expected {n}")
    if kind in IVF_KINDS:
        faiss.extract_index_ivf(index).nprobe = nprobe_used

    # ---- recall against exact search (streamed over the source)
    k_eval = min(int(recall_k), n)
    if recall_queries is not None:
        q = np.ascontiguousarray(np.asarray(recall_queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != d or q.shape[0] == 0:
            raise ValueError(f"recall_queries must be a non-empty [q, {d}] array, got {q.shape}")
        q_source = "given"
    else:
        rng = np.random.default_rng(seed)
        q = source.take(np.sort(rng.choice(n, size=min(recall_sample, n), replace=False)))
        q_source = "indexed_sample"
    rec: dict = {"recall_at_k": 1.0, "recall_queries": 0, "recall_queries_source": None,
                 "recall_at_threshold": None, "precision_at_threshold": None,
                 "pairs_at_threshold": None, "score_error_max": None}
    if kind == KIND_FLAT:
        if threshold is not None:
            rec.update(recall_at_threshold=1.0, precision_at_threshold=1.0, score_error_max=0.0)
    else:
        rec.update(measure_recalls(index, source, q, k_eval, threshold))
        rec.update(recall_queries=int(len(q)), recall_queries_source=q_source)

    per_vec, total = memory_bytes(index, kind)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "embedding_model": embedding_model,
        "dim": d,
        "size": n,
        "metric": "inner_product",
        "exact_below": int(exact_below),
        "compress_above": None if compress_above is None else int(compress_above),
        "nlist": nlist_used,
        "nprobe": nprobe_used,
        "pq_m": int(pq_m) if kind in (KIND_IVF_PQ, KIND_OPQ_IVF_PQ) else None,
        "train_size": n_train if kind != KIND_FLAT else None,
        "bytes_per_vector": per_vec,
        "memory_bytes": total,
        "threshold": None if threshold is None else float(threshold),
        "recall_k": k_eval,
        **rec,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": hasher.hexdigest(embedding_model, params),
    }
    log.info("template index %s: %d x %d, %d bytes/vector, %.1f MB per executor, recall@%d %.3f, "
             "recall at threshold %s", kind, n, d, per_vec, total / 2**20, k_eval, rec["recall_at_k"],
             rec["recall_at_threshold"])
    return TemplateIndex(index=index, ids=ids, meta=meta)


def exact_scan(source: VectorSource, queries: np.ndarray, k: int, threshold: Optional[float],
               block: int = EXACT_BATCH) -> tuple[np.ndarray, Optional[tuple[np.ndarray, np.ndarray]]]:
    """Brute-force inner products of ``queries`` with every vector of ``source``, streamed
    ``block`` rows at a time (memory: q x block x 12 bytes: the scores and their partition,
    plus 12 bytes per pair kept; linear in n: a partition per block, not a sort).

    Returns:
        ``(top_labels, pairs)``: int64 ``[q, k]`` exact top-k labels, and when ``threshold`` is
        given ``(keys, scores)`` of every pair with score >= threshold, ``key = query * n + label``
        (int64, ascending) and its float32 exact score.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = int(source.n)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_l = np.zeros((len(q), 0), dtype=np.int64)
    keys, vals = [], []
    start = 0
    for b in source.batches(block):
        s = q @ np.ascontiguousarray(b, dtype=np.float32).T
        if threshold is not None:
            qi, li = np.nonzero(s >= np.float32(threshold))
            keys.append(qi.astype(np.int64) * n + li + start)
            vals.append(s[qi, li])
        # this block's top k by partition (linear), then merged with the running top k
        kb = min(k, s.shape[1])
        part = np.argpartition(s, s.shape[1] - kb, axis=1)[:, s.shape[1] - kb:] if kb < s.shape[1] \
            else np.broadcast_to(np.arange(s.shape[1]), s.shape)
        cs = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        cl = np.concatenate([best_l, part + start], axis=1)
        del s, part
        order = np.lexsort((cl, -cs), axis=1)[:, :min(k, cs.shape[1])]  # score desc, label asc
        best_s = np.take_along_axis(cs, order, axis=1)
        best_l = np.take_along_axis(cl, order, axis=1)
        start += len(b)
    if threshold is None:
        return best_l, None
    keys_a = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    vals_a = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    order = np.argsort(keys_a, kind="stable")
    return best_l, (keys_a[order], vals_a[order])


def measure_recalls(index: Any, source: VectorSource, queries: np.ndarray, k: int,
                    threshold: Optional[float]) -> dict:
    """Recall@k and, with a threshold, recall/precision at the threshold of ``index`` against exact
    inner-product search over ``source`` (see the module docstring for the definitions).

    Returns:
        ``{"recall_at_k", and with a threshold "recall_at_threshold", "precision_at_threshold",
        "pairs_at_threshold", "score_error_max"}``.
    """
    truth, pairs = exact_scan(source, queries, k, threshold)
    _, got = index.search(queries, k)
    hits = sum(len(set(t.tolist()) & set(g[g >= 0].tolist())) for t, g in zip(truth, got))
    out: dict = {"recall_at_k": hits / (k * len(queries))}
    if threshold is None:
        return out
    true_keys, true_scores = pairs
    lims, scores, labels = threshold_search(index, queries, threshold)
    qi = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(lims))
    got_keys = qi * int(source.n) + labels
    pos = np.searchsorted(true_keys, got_keys)
    pos_c = np.minimum(pos, max(len(true_keys) - 1, 0))
    hit = (pos < len(true_keys)) & (true_keys[pos_c] == got_keys) if len(true_keys) else \
        np.zeros(len(got_keys), bool)
    n_hit = int(np.unique(got_keys[hit]).size)
    out["pairs_at_threshold"] = int(len(true_keys))
    out["recall_at_threshold"] = n_hit / len(true_keys) if len(true_keys) else None
    out["precision_at_threshold"] = float(hit.mean()) if len(got_keys) else None
    out["score_error_max"] = (float(np.abs(scores[hit] - true_scores[pos_c[hit]]).max())
                              if hit.any() else None)
    return out


def measure_recall(index: Any, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Recall@k of ``index`` against exact inner-product search over in-memory ``vectors``
    (mean |approximate top-k ∩ exact top-k| / k, in [0, 1])."""
    return measure_recalls(index, ArrayVectors(vectors, [str(i) for i in range(len(vectors))]),
                           np.ascontiguousarray(queries, dtype=np.float32), k, None)["recall_at_k"]
