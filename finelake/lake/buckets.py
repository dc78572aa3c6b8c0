"""Key buckets: the stored ``key_bucket`` column that lets a merge read only its share of a table.

Every table keyed on a string column carries ``key_bucket`` (:func:`key_bucket_sql`: a function
of its first key column only, identical on both engines), and every merge restricts its target to
the buckets its source touches (:func:`bucket_filter`), so Delta's file skipping reads only the
files of those buckets. Stages commit chunks of one bucket range each (:func:`chunk_count`), so a
chunk's merge costs about the same at any table size.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from finelake.tables import TableDef

KEY_BUCKET = "key_bucket"
KEY_BUCKET_BITS = 8
KEY_BUCKETS = 1 << KEY_BUCKET_BITS  # fixed: stored values depend on it (changing it = rewriting)
_REV = [int(f"{i:0{KEY_BUCKET_BITS}b}"[::-1], 2) for i in range(KEY_BUCKETS)]


def bucketed(tdef: TableDef) -> bool:
    """Whether the table carries ``key_bucket``: its first key column is a string (every table
    finelake declares) and it does not declare a column of that name itself."""
    return pa.types.is_string(tdef.schema.field(tdef.key[0]).type) and KEY_BUCKET not in tdef.columns


def key_bucket_sql(column: str) -> str:
    """Spark SQL for a row's bucket, an int in ``[0, KEY_BUCKETS)``.

    ``b = abs(xxhash64(column)) % KEY_BUCKETS`` is the low bits of the hash that
    ``jobs/common.py::commit_in_chunks`` splits chunks on (``abs(xxhash64(key)) % n_chunks``);
    the stored value is ``b`` bit-reversed, so the rows of one chunk (a residue class modulo a
    power of two, see :func:`chunk_count`) fill one *contiguous* range of stored buckets, which
    per-file min/max statistics can skip. Null keys hash to 42 as in Spark.
    """
    h = f"(abs(xxhash64(`{column}`)) % {KEY_BUCKETS})"
    bits = " + ".join(f"(((({h}) >> {i}) & 1) << {KEY_BUCKET_BITS - 1 - i})"
                      for i in range(KEY_BUCKET_BITS))
    return f"CAST(({bits}) AS INT)"


def key_buckets(values: pa.Array) -> pa.Array:
    """:func:`key_bucket_sql` computed on the driver (delta-rs path): int32, one per value.
    Exactly Spark's result: XXH64 with seed 42 of the UTF-8 bytes (checked in tests/test_lake.py)."""
    import xxhash

    out = []
    for v in values.to_pylist():
        h = 42 if v is None else xxhash.xxh64_intdigest(str(v).encode("utf-8"), seed=42)
        if h >= 1 << 63:
            h -= 1 << 64
        out.append(_REV[abs(h) % KEY_BUCKETS])
    return pa.array(out, type=pa.int32())


def chunk_count(n_scope: int, chunk_size: int) -> int:
    """Chunks for ``n_scope`` rows of ``chunk_size`` (>= 1), rounded so chunks align with key
    buckets: a power of two up to :data:`KEY_BUCKETS`, a multiple of it above. A chunk
    (``abs(xxhash64(key)) % n``) then covers ``KEY_BUCKETS / n`` contiguous buckets (n <= B) or
    exactly one (n >= B), so its merge reads only that share of the target. At most 2x the
    unrounded count (chunks at least half of ``chunk_size``)."""
    n = max(1, -(-max(0, n_scope) // max(1, chunk_size)))
    if n <= KEY_BUCKETS:
        return 1 << (n - 1).bit_length()
    return -(-n // KEY_BUCKETS) * KEY_BUCKETS


def chunk_bucket_range(n_chunks: int, chunk: int) -> tuple[int, int]:
    """The stored ``key_bucket`` values ``(lo, hi)`` (inclusive, contiguous) that hold every row
    of chunk ``chunk`` of ``n_chunks`` (``abs(xxhash64(key)) % n_chunks == chunk``, with
    ``n_chunks`` from :func:`chunk_count`): the bit-reversed low bits of the hash.

    Raises:
        ValueError: ``n_chunks`` is not a power of two up to :data:`KEY_BUCKETS` nor a multiple
            of it, or ``chunk`` is out of range.
    """
    if not 0 <= chunk < n_chunks:
        raise ValueError(f"chunk {chunk} out of range for {n_chunks} chunks")
    if n_chunks >= KEY_BUCKETS:
        if n_chunks % KEY_BUCKETS:
            raise ValueError(f"{n_chunks} chunks: not a multiple of {KEY_BUCKETS}")
        b = _REV[chunk % KEY_BUCKETS]
        return b, b
    if n_chunks & (n_chunks - 1):
        raise ValueError(f"{n_chunks} chunks: not a power of two")
    k = n_chunks.bit_length() - 1  # low k bits of the hash = chunk
    span = KEY_BUCKETS >> k
    lo = _REV[chunk] & ~(span - 1)  # the reversed k bits on top, any low bits
    return lo, lo + span - 1


def bucket_filter(buckets, complete: bool, alias: str = "t") -> Optional[str]:
    """Target-only predicate restricting a merge to ``buckets`` (None: every bucket, no filter).
    Rows of a table migrated in place have a null bucket until ``finelake optimize`` backfills
    them, so they are always read (``OR ... IS NULL``) until then."""
    buckets = sorted({int(b) for b in buckets if b is not None})
    if not buckets or len(buckets) >= KEY_BUCKETS:
        return None
    col = f"{alias}.`{KEY_BUCKET}`"
    if buckets[-1] - buckets[0] + 1 == len(buckets):
        cond = f"{col} BETWEEN {buckets[0]} AND {buckets[-1]}"
    else:
        cond = f"{col} IN ({', '.join(map(str, buckets))})"
    return cond if complete else f"({cond} OR {col} IS NULL)"
