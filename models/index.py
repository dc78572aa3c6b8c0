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

Modules: :mod:`~finelake.models.index_vectors` (where the vectors come from),
:mod:`~finelake.models.index_search` (:class:`TemplateIndex`: search, save, load),
:mod:`~finelake.models.index_build` (building) and :mod:`~finelake.models.index_recall` (the recall
measurement). This module names them all, as it did before they were split.
"""

from __future__ import annotations

# Every name below was importable from this module before the split, and still is; __all__ is the
# list it had then.
from finelake.models.index_build import (DEFAULT_TRAIN_SIZE, MIN_POINTS_PER_CENTROID,
                                         NORM_TOLERANCE, RECALL_SAMPLE, auto_nlist, build_index,
                                         build_index_from, content_hash, memory_bytes)
from finelake.models.index_recall import EXACT_BATCH, exact_scan, measure_recall, measure_recalls
from finelake.models.index_search import (COMPRESSED_KINDS, FORMAT_VERSION, IVF_KINDS, KIND_FLAT,
                                          KIND_IVF, KIND_IVF_PQ, KIND_IVF_SQ8, KIND_OPQ_IVF_PQ,
                                          READABLE_FORMATS, IndexFormatError, TemplateIndex,
                                          threshold_search)
from finelake.models.index_vectors import (READ_BATCH, READ_BUFFER, ArrayVectors, ParquetVectors,
                                           VectorSource, arrow_list_to_numpy)

__all__ = ["TemplateIndex", "build_index", "build_index_from", "IndexFormatError", "FORMAT_VERSION",
           "KIND_FLAT", "KIND_IVF", "KIND_IVF_SQ8", "KIND_IVF_PQ", "KIND_OPQ_IVF_PQ", "VectorSource",
           "ArrayVectors", "ParquetVectors", "threshold_search", "auto_nlist"]
