"""Building the template index (§3.2 "build a FAISS retrieval index"), streaming the vectors.

:func:`build_index_from` chooses the kind from the number of templates, trains the IVF kinds on a
sample chosen by the template ids, adds the vectors a batch at a time, measures the recalls
(:mod:`finelake.models.index_recall`) and computes the content-hash version. The kinds, memory
figures and metadata are described in :mod:`finelake.models.index`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

import numpy as np

from finelake.models.index_recall import measure_recalls
from finelake.models.index_search import (COMPRESSED_KINDS, FORMAT_VERSION, IVF_KINDS, KIND_FLAT,
                                          KIND_IVF, KIND_IVF_PQ, KIND_IVF_SQ8, KIND_OPQ_IVF_PQ,
                                          TemplateIndex)
from finelake.models.index_vectors import ArrayVectors, VectorSource

MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this many training points per list
DEFAULT_TRAIN_SIZE = 131072  # the training sample's floor with train_size="auto" (512 MB at d=1024)
RECALL_SAMPLE = 1000
NORM_TOLERANCE = 1e-3

log = logging.getLogger(__name__)


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
