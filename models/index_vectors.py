"""Where the template index's vectors come from: :class:`VectorSource` and its two kinds.

The builder (:mod:`finelake.models.index_build`) and the recall measurement
(:mod:`finelake.models.index_recall`) read n unit vectors of width d a batch at a time, never all
at once: from an in-memory array (:class:`ArrayVectors`) or from Parquet files written by Spark
executors (:class:`ParquetVectors`, read zero-copy batch by batch). Overview of the index:
:mod:`finelake.models.index`.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

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
