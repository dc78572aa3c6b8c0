"""Delta tables through one interface, with or without the Delta jars.

Two engines write the same Delta protocol:

* ``delta-spark``: on clusters (Databricks, EMR) or wherever ``io.delta`` classes are on the
  classpath; merges run as Spark ``MERGE`` and scale with the cluster.
* ``deltalake``: delta-rs from the driver, for local mode where no jars can be downloaded. Spark
  reads the table through a Python data source (:class:`DeltaSnapshotDataSource`) that lists only
  the files of the snapshot (a plain Parquet read would also see files a merge removed).

Either way the result is a real Delta table that both delta-spark and delta-rs read; there is no
plain-Parquet fallback. Writes are merges on the table's key (reruns never duplicate rows) and every
commit carries the run id in its commit metadata (``finelake.run_id``).

Merges at scale. Every table keyed on a string column carries a stored ``key_bucket`` column
(:func:`key_bucket_sql`: a function of its first key column only, identical on both engines) and
every merge restricts its target to the buckets its source touches (``t.key_bucket IN (...)``),
so Delta's file skipping reads only the files of those buckets. Stages commit chunks of one
bucket range each (:func:`chunk_count`), so a chunk's merge costs about the same at any table
size. ``key_bucket`` is internal: :meth:`Lake.read` and :meth:`Lake.read_arrow` leave it out.

Concurrent writers. Merges retry Delta's commit conflicts (:func:`is_commit_conflict`) with
exponential backoff and jitter; see :meth:`Lake.merge`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TypeVar, Union

import pyarrow as pa

from finelake import storage
from finelake.errors import FinelakeError
from finelake.tables import TableDef

log = logging.getLogger(__name__)

# A Delta commit, checkpoint or checksum in _delta_log (or _last_checkpoint): while none exists,
# the directory holds no table.
_COMMIT_FILE = re.compile(r"^(\d{20}\.|_last_checkpoint$)")

RUN_ID_KEY = "finelake.run_id"
DATA_SOURCE_NAME = "finelake_delta"

KEY_BUCKET = "key_bucket"
KEY_BUCKET_BITS = 8
KEY_BUCKETS = 1 << KEY_BUCKET_BITS  # fixed: stored values depend on it (changing it = rewriting)
_REV = [int(f"{i:0{KEY_BUCKET_BITS}b}"[::-1], 2) for i in range(KEY_BUCKETS)]

T = TypeVar("T")


class LakeError(FinelakeError):
    """A table cannot be read or written (missing, unreadable, wrong schema), or a commit kept
    conflicting with another writer."""


# ----------------------------------------------------------------------------- key buckets


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


def _bucket_filter(buckets, complete: bool, alias: str = "t") -> Optional[str]:
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


# ----------------------------------------------------------------------------- commit conflicts

_CONFLICT_MARKERS = (
    "ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
    "ConcurrentTransactionException", "ConcurrentWriteException", "ProtocolChangedException",
    "MetadataChangedException", "DELTA_CONCURRENT_", "DELTA_PROTOCOL_CHANGED",
    "DELTA_METADATA_CHANGED", "CommitFailedError",
)


def is_commit_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a Delta commit conflict with another writer:
    delta-spark's ``Concurrent*Exception`` / ``ProtocolChangedException`` /
    ``MetadataChangedException`` (also when surfaced as Py4J or ``AnalysisException`` text with a
    ``DELTA_CONCURRENT_*`` error class) or delta-rs ``CommitFailedError``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {c.__name__ for c in type(exc).__mro__}
        text = str(exc)[:4000]
        if any(m in names or m in text for m in _CONFLICT_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass
class MergeResult:
    """Rows a merge inserted and updated, and the table version it produced (None: no commit)."""

    table: str
    inserted: int
    updated: int
    source_rows: int
    version: Optional[int]


# ----------------------------------------------------------------------------- arrow helpers


def conform(tdef: TableDef, data: pa.Table, run_id: Optional[str] = None) -> pa.Table:
    """Return ``data`` with exactly the table's columns, in order, cast to its schema.

    Missing nullable columns are filled with nulls; ``run_id`` is filled when absent.

    Raises:
        LakeError: a key column is missing, or a column cannot be cast.
    """
    n = data.num_rows
    cols = []
    for f in tdef.schema:
        if f.name in data.column_names:
            col = data.column(f.name)
        elif f.name == "run_id" and run_id is not None:
            col = pa.array([run_id] * n, type=pa.string())
        elif f.name in tdef.key:
            raise LakeError(f"{tdef.name}: key column {f.name!r} missing from rows")
        else:
            col = pa.nulls(n, type=f.type)
        try:
            cols.append(col.cast(f.type) if col.type != f.type else col)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise LakeError(f"{tdef.name}.{f.name}: cannot store {col.type} as {f.type}: {exc}") from None
    return pa.Table.from_arrays(cols, schema=tdef.schema)


def dedupe_on_key(tdef: TableDef, data: pa.Table) -> pa.Table:
    """Keep the first row of each key (a MERGE source must not repeat a key)."""
    if data.num_rows == 0:
        return data
    idx = pa.array(range(data.num_rows), type=pa.int64())
    firsts = (data.select(list(tdef.key)).append_column("__i", idx)
              .group_by(list(tdef.key), use_threads=False).aggregate([("__i", "min")]))
    take = firsts.column("__i_min").to_pylist()
    take.sort()
    return data.take(pa.array(take, type=pa.int64()))


def _conform_frame(tdef: TableDef, df, run_id: Optional[str] = None):
    """:func:`conform` for a Spark DataFrame: the table's columns in order, cast to its schema,
    missing nullable columns as nulls, ``run_id`` filled when absent.

    Raises:
        LakeError: a key column is missing.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    cols = []
    for f in from_arrow_schema(tdef.schema).fields:
        if f.name in df.columns:
            cols.append(F.col(f"`{f.name}`").cast(f.dataType).alias(f.name))
        elif f.name == "run_id" and run_id is not None:
            cols.append(F.lit(run_id).cast(f.dataType).alias(f.name))
        elif f.name in tdef.key:
            raise LakeError(f"{tdef.name}: key column {f.name!r} missing from rows")
        else:
            cols.append(F.lit(None).cast(f.dataType).alias(f.name))
    return df.select(*cols)


def _dedupe_frame(tdef: TableDef, df):
    """:func:`dedupe_on_key` for a Spark DataFrame: the first row of each key in the frame's
    own order (what ``toArrow()`` would list first), not an arbitrary one as ``dropDuplicates``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy(*[F.col(f"`{k}`") for k in tdef.key]).orderBy("__finelake_pos")
    return (df.withColumn("__finelake_pos", F.monotonically_increasing_id())
            .withColumn("__finelake_rank", F.row_number().over(w))
            .where("__finelake_rank = 1").drop("__finelake_pos", "__finelake_rank"))


# ----------------------------------------------------------------------------- Spark reader


def _local_path(uri: str) -> str:
    """``file:///x`` and ``file:/x`` (Hadoop's spelling) -> ``/x``; anything else unchanged."""
    for prefix in ("file://", "file:"):
        if uri.startswith(prefix):
            return uri[len(prefix):]
    return uri


try:  # PySpark >= 4.0
    from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition

    class _FilePartition(InputPartition):
        def __init__(self, uri: Optional[str]):
            super().__init__(uri)
            self.uri = uri

    class DeltaSnapshotReader(DataSourceReader):
        """Reads the Parquet files of one Delta snapshot, one Spark partition per file."""

        def __init__(self, path: str, version: Optional[int], schema):
            from deltalake import DeltaTable

            dt = DeltaTable(path, version=version)
            if dt.metadata().partition_columns:
                raise LakeError(f"{path}: partitioned tables are read with delta-spark")
            self.files = dt.file_uris()
            self.arrow_schema = pa.schema(dt.schema().to_arrow())

        def partitions(self):
            return [_FilePartition(u) for u in self.files] or [_FilePartition(None)]

        def read(self, partition) -> Iterator[pa.RecordBatch]:
            import pyarrow.parquet as pq

            if partition.uri is None:
                return
            t = pq.read_table(_local_path(partition.uri))
            cols = [t.column(f.name).cast(f.type) if f.name in t.column_names
                    else pa.nulls(t.num_rows, f.type) for f in self.arrow_schema]
            yield from pa.Table.from_arrays(cols, schema=self.arrow_schema).to_batches()

    class DeltaSnapshotDataSource(DataSource):
        """``spark.read.format("finelake_delta").option("delta_path", p)[.option("versionAsOf", v)]``.

        Spark 4.2 does not hand a catalog table's OPTIONS to a Python data source, so SQL
        registration uses :func:`table_data_source`, a subclass with the path built in.
        """

        @classmethod
        def name(cls) -> str:
            return DATA_SOURCE_NAME

        fixed_path: Optional[str] = None  # set by table_data_source() for SQL-registered tables

        def _path(self) -> str:
            p = self.fixed_path or self.options.get("delta_path") or self.options.get("path")
            if not p:
                raise LakeError(f"{DATA_SOURCE_NAME}: option delta_path is required")
            return p

        def _version(self) -> Optional[int]:
            v = self.options.get("versionAsOf") or self.options.get("versionasof")
            return int(v) if v not in (None, "") else None

        def schema(self):
            from deltalake import DeltaTable
            from pyspark.sql.pandas.types import from_arrow_schema

            dt = DeltaTable(self._path(), version=self._version())
            return from_arrow_schema(pa.schema(dt.schema().to_arrow()))

        def reader(self, schema):
            return DeltaSnapshotReader(self._path(), self._version(), schema)

    def table_data_source(table: str, path: str):
        """A data source class bound to one Delta table path, for ``CREATE TABLE ... USING``."""
        import hashlib

        short = f"{DATA_SOURCE_NAME}_{table}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        return type(f"DeltaSnapshot_{table}", (DeltaSnapshotDataSource,),
                    {"fixed_path": path, "name": classmethod(lambda cls: short)})

except ImportError:  # pragma: no cover - pyspark < 4 or absent
    DeltaSnapshotDataSource = None  # type: ignore[assignment]
    table_data_source = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------- the lake


class Lake:
    """The tables of one lake root, read and written through one Spark session.

    Args:
        root: folder or URI holding one sub-folder per table.
        spark: the session (None: arrow-only access through delta-rs, for tools and tests).
        engine: ``"delta-spark"`` or ``"deltalake"`` (see module docstring).
        database: SQL schema the tables are registered under; ``catalog`` prefixes it (Unity Catalog).
        commit_attempts: tries of a merge whose commit conflicts with another writer (>= 1).
        commit_backoff_s: first wait between tries, seconds; doubles each try, with full jitter.
        commit_backoff_max_s: longest wait between tries, seconds.
    """

    def __init__(self, root: str, spark=None, engine: str = "deltalake", database: str = "finelake",
                 catalog: Optional[str] = None, commit_attempts: int = 8,
                 commit_backoff_s: float = 0.5, commit_backoff_max_s: float = 30.0):
        if engine not in ("delta-spark", "deltalake"):
            raise ValueError(f"engine must be 'delta-spark' or 'deltalake', not {engine!r}")
        self.root = root.rstrip("/")
        self.spark = spark
        self.engine = engine
        self.database = database
        self.catalog = catalog
        self.commit_attempts = max(1, int(commit_attempts))
        self.commit_backoff_s = float(commit_backoff_s)
        self.commit_backoff_max_s = float(commit_backoff_max_s)
        self._layouts: dict[str, tuple[bool, bool]] = {}  # path -> (has key_bucket, complete)
        # tests: called with the table after a merge try read its snapshot, before it commits
        self._before_commit: Optional[Callable[[TableDef], None]] = None
        if spark is not None and engine == "deltalake" and DeltaSnapshotDataSource is not None:
            spark.dataSource.register(DeltaSnapshotDataSource)
        self._registered: set[str] = set()

    # -- naming
    def path(self, tdef: Union[TableDef, str]) -> str:
        name = tdef if isinstance(tdef, str) else tdef.name
        return f"{storage.root(self.root)}/{name}"

    def sql_name(self, tdef: Union[TableDef, str]) -> str:
        name = tdef if isinstance(tdef, str) else tdef.name
        db = f"{self.catalog}.{self.database}" if self.catalog else self.database
        return f"{db}.{name}"

    # -- metadata
    def exists(self, tdef: TableDef) -> bool:
        from deltalake import DeltaTable

        if self.engine == "delta-spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            return SparkDeltaTable.isDeltaTable(self.spark, self.path(tdef))
        return DeltaTable.is_deltatable(self.path(tdef))

    def version(self, tdef: TableDef) -> Optional[int]:
        """Latest version of the table, or None when it does not exist."""
        if not self.exists(tdef):
            return None
        if self.engine == "delta-spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            return SparkDeltaTable.forPath(self.spark, self.path(tdef)).history(1).collect()[0]["version"]
        from deltalake import DeltaTable

        return DeltaTable(self.path(tdef)).version()

    def history(self, tdef: TableDef, limit: int = 20) -> list[dict]:
        """Commit history, newest first, each with its ``run_id`` (from commit metadata)."""
        if not self.exists(tdef):
            return []
        if self.engine == "delta-spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            rows = SparkDeltaTable.forPath(self.spark, self.path(tdef)).history(limit).collect()
            return [{"version": r["version"], "operation": r["operation"],
                     "run_id": r["userMetadata"], "timestamp": str(r["timestamp"])} for r in rows]
        from deltalake import DeltaTable

        out = []
        for h in DeltaTable(self.path(tdef)).history(limit):
            out.append({"version": h.get("version"), "operation": h.get("operation"),
                        "run_id": h.get(RUN_ID_KEY), "timestamp": h.get("timestamp")})
        return out

    def storage_schema(self, tdef: TableDef) -> pa.Schema:
        """The columns stored: the declared ones plus ``key_bucket`` (int32) when :func:`bucketed`."""
        if not bucketed(tdef):
            return tdef.schema
        return tdef.schema.append(pa.field(KEY_BUCKET, pa.int32()))

    def _clear_uncommitted_log(self, tdef: TableDef, settle_s: float = 5.0) -> None:
        """Remove a ``_delta_log`` that holds no commit: what a create killed before its first
        commit leaves behind (the directory, perhaps a commit's temp file). Delta takes such a
        path for a table (``isDeltaTable`` says no, but ``CREATE ... IF NOT EXISTS`` fails with
        ``DELTA_TABLE_NOT_FOUND``), so every later run of the stage would fail. Nothing was ever
        committed there, so nothing is lost. A log changed less than ``settle_s`` seconds ago may
        be another writer's create in progress: it is given that long to commit first."""
        log_dir = storage.join(self.path(tdef), "_delta_log")

        def uncommitted() -> bool:
            return (storage.exists(self.spark, log_dir) and not any(
                _COMMIT_FILE.match(n) for n in storage.listdir(self.spark, log_dir)))

        if not uncommitted():
            return
        age = time.time() - storage.newest_mtime(self.spark, log_dir)
        if age < settle_s:
            time.sleep(settle_s - age)
            if not uncommitted():
                return
        log.warning("%s: _delta_log holds no commit (a create that was killed); removing it and "
                    "creating the table again", self.path(tdef))
        storage.remove_tree(self.spark, log_dir)

    def create(self, tdef: TableDef) -> None:
        """Create the table (empty) when it does not exist yet; a no-op otherwise. A new table
        has ``key_bucket`` (:meth:`storage_schema`). A ``_delta_log`` left without a commit by a
        killed create is removed first (:meth:`_clear_uncommitted_log`)."""
        if self.engine == "delta-spark":
            from delta.tables import DeltaTable as SparkDeltaTable
            from pyspark.sql.pandas.types import from_arrow_schema

            if SparkDeltaTable.isDeltaTable(self.spark, self.path(tdef)):
                return
            self._clear_uncommitted_log(tdef)
            b = SparkDeltaTable.createIfNotExists(self.spark).location(self.path(tdef))
            b = b.addColumns(from_arrow_schema(self.storage_schema(tdef))).comment(tdef.description)
            if tdef.partition_by:
                b = b.partitionedBy(*tdef.partition_by)
            b.execute()
            return
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(self.path(tdef)):
            if not storage.is_uri(self.root):  # object stores have no directory to leave behind
                self._clear_uncommitted_log(tdef)
            os.makedirs(self.path(tdef), exist_ok=True) if "://" not in self.root else None
            DeltaTable.create(self.path(tdef), schema=self.storage_schema(tdef), mode="ignore",
                              name=tdef.name, description=tdef.description,
                              partition_by=list(tdef.partition_by) or None)

    def _stored_columns(self, tdef: TableDef) -> list[str]:
        if self.engine == "delta-spark":
            return self._read_stored(tdef).columns
        from deltalake import DeltaTable

        return pa.schema(DeltaTable(self.path(tdef)).schema().to_arrow()).names

    def _has_null_buckets(self, tdef: TableDef) -> bool:
        """Whether a row lacks ``key_bucket`` (written before the column existed). Reads the
        per-file null counts of the log (delta-rs) or runs a query that data skipping answers
        from them (delta-spark), not the rows."""
        if self.engine == "delta-spark":
            return bool(self._read_stored(tdef).where(f"`{KEY_BUCKET}` IS NULL").limit(1).count())
        from deltalake import DeltaTable

        actions = DeltaTable(self.path(tdef)).get_add_actions(flatten=True)
        col = f"null_count.{KEY_BUCKET}"
        if actions.num_rows == 0:
            return False
        if col not in actions.column_names:
            return True
        return any(v is None or v > 0 for v in actions.column(col).to_pylist())

    def bucket_layout(self, tdef: TableDef, migrate: bool = True) -> tuple[bool, bool]:
        """``(has key_bucket, every row has one)`` for an existing table, cached per Lake.

        A table written before ``key_bucket`` existed gets the column (a metadata-only commit, like
        :meth:`add_missing_columns`) when ``migrate``; its old rows stay null, so merges read them
        too, until :meth:`backfill_buckets` (run by ``finelake optimize``) fills them in.
        """
        path = self.path(tdef)
        if not bucketed(tdef):
            return (False, False)
        if path in self._layouts:
            return self._layouts[path]
        if KEY_BUCKET not in self._stored_columns(tdef):
            if not migrate:
                return (False, False)
            self._add_bucket_column(tdef)
        layout = (True, not self._has_null_buckets(tdef))
        self._layouts[path] = layout
        return layout

    def _add_bucket_column(self, tdef: TableDef) -> None:
        log.info("%s: adding column %s (rows written before it are read by every merge until "
                 "`finelake optimize` fills it in)", tdef.name, KEY_BUCKET)
        if self.engine == "delta-spark":
            loc = self.path(tdef).replace("`", "``")
            self.spark.sql(f"ALTER TABLE delta.`{loc}` ADD COLUMNS (`{KEY_BUCKET}` int)")
        else:
            from deltalake import DeltaTable, Field

            DeltaTable(self.path(tdef)).alter.add_columns([Field(KEY_BUCKET, "integer", nullable=True)])

    def add_missing_columns(self, tdef: TableDef) -> list[str]:
        """Add the declared columns an existing table lacks (a lake written before they were
        declared), as nullable columns: old rows read them as null. A metadata-only commit, made
        once; a no-op when the table is missing or complete.

        Returns:
            The names of the columns added.
        """
        if not self.exists(tdef):
            return []
        if self.engine == "delta-spark":
            from pyspark.sql.pandas.types import from_arrow_schema

            have = set(self.read(tdef).columns)
            fields = [f for f in from_arrow_schema(tdef.schema).fields if f.name not in have]
            if fields:
                cols = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in fields)
                loc = self.path(tdef).replace("`", "``")
                self.spark.sql(f"ALTER TABLE delta.`{loc}` ADD COLUMNS ({cols})")
            return [f.name for f in fields]
        from deltalake import DeltaTable, Field, Schema

        dt = DeltaTable(self.path(tdef))
        have = set(pa.schema(dt.schema().to_arrow()).names)
        missing = [f for f in tdef.schema if f.name not in have]
        if missing:
            new = Schema.from_arrow(pa.schema(missing))
            dt.alter.add_columns([Field(f.name, f.type, nullable=True) for f in new.fields])
        return [f.name for f in missing]

    # -- writes
    def _with_retry(self, tdef: TableDef, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried on a commit conflict (:func:`is_commit_conflict`) up to
        ``commit_attempts`` tries with exponential backoff and full jitter (``commit_backoff_s``
        doubling, at most ``commit_backoff_max_s``); each retry is logged at WARNING.

        Raises:
            LakeError: still conflicting after the last try (the message says rerunning is safe).
        """
        from tenacity import (Retrying, retry_if_exception, stop_after_attempt,
                              wait_random_exponential)

        def before_sleep(state) -> None:
            exc = state.outcome.exception()
            log.warning("%s: %s conflicted with another writer (try %d of %d), retrying in "
                        "%.1f s: %s", tdef.name, what, state.attempt_number, self.commit_attempts,
                        state.next_action.sleep if state.next_action else 0.0,
                        str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__)
            self._layouts.pop(self.path(tdef), None)  # a metadata change may be what conflicted

        retrying = Retrying(stop=stop_after_attempt(self.commit_attempts),
                            wait=wait_random_exponential(multiplier=self.commit_backoff_s,
                                                         max=self.commit_backoff_max_s),
                            retry=retry_if_exception(is_commit_conflict),
                            before_sleep=before_sleep, reraise=True)
        try:
            return retrying(fn)
        except Exception as exc:
            if not is_commit_conflict(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise LakeError(
                f"{tdef.name}: {what} conflicted with another writer's commit "
                f"{self.commit_attempts} times and gave up; nothing of this write was committed "
                f"and rerunning is safe (the merge is on the table key). Last conflict: {first}"
            ) from exc

    def merge(self, tdef: TableDef, rows, run_id: str, update: bool = False,
              update_when: Optional[str] = None) -> MergeResult:
        """Merge rows into the table on its key.

        Args:
            tdef: target table.
            rows: a ``pyarrow.Table`` or a Spark DataFrame with the table's columns (missing
                nullable columns become null; ``run_id`` is filled in).
            run_id: recorded on new rows and in the commit metadata.
            update: also overwrite rows whose key exists (default: insert only, so a rerun
                leaves finished rows as they were).
            update_when: SQL predicate over ``t`` (target) and ``s`` (source) limiting which
                matched rows are updated, so an unchanged rerun commits nothing new.

        The target is restricted to the key buckets of the source (see the module docstring), so
        the merge reads about ``table rows x source buckets / KEY_BUCKETS`` target rows.

        Concurrent writers: a commit that conflicts with another writer's (Delta's optimistic
        concurrency: ``ConcurrentAppendException`` and friends, delta-rs ``CommitFailedError``)
        commits nothing, and the whole merge is run again against the new table version, with
        backoff (``commit_attempts``, ``commit_backoff_s``). That is safe for every merge here:
        the source is computed once (persisted), an insert-only merge on the key inserts exactly
        the keys still absent whenever it runs, and an update merge re-applies the same values
        on top of the other writer's (last writer wins per key, as with a later rerun).

        Returns:
            :class:`MergeResult`; ``version`` is None when nothing was committed.

        Raises:
            LakeError: rows lack a key column or a column has an incompatible type, or the commit
                still conflicted after ``commit_attempts`` tries.
        """
        self._with_retry(tdef, "create", lambda: self.create(tdef))
        if self.engine == "delta-spark":
            return self._merge_spark(tdef, rows, run_id, update, update_when)
        if not isinstance(rows, pa.Table):
            rows = rows.toArrow()
        data = dedupe_on_key(tdef, conform(tdef, rows, run_id))
        if data.num_rows == 0:
            return MergeResult(tdef.name, 0, 0, 0, None)
        return self._with_retry(tdef, "merge", lambda: self._merge_rs(tdef, data, run_id, update,
                                                                      update_when))

    def _merge_rs(self, tdef: TableDef, data: pa.Table, run_id: str, update: bool,
                  update_when: Optional[str]) -> MergeResult:
        """One delta-rs merge try of conformed, deduplicated rows."""
        from deltalake import CommitProperties, DeltaTable

        has_bucket, complete = self.bucket_layout(tdef)
        pred = " AND ".join(f"t.`{k}` = s.`{k}`" for k in tdef.key)
        if has_bucket:
            buckets = key_buckets(data.column(tdef.key[0]))
            data = data.append_column(KEY_BUCKET, buckets)
            flt = _bucket_filter(buckets.to_pylist(), complete)
            if flt:
                pred = f"{flt} AND {pred}"
        dt = DeltaTable(self.path(tdef))
        if self._before_commit is not None:
            self._before_commit(tdef)
        m = dt.merge(source=data, predicate=pred, source_alias="s", target_alias="t",
                     commit_properties=CommitProperties(custom_metadata={RUN_ID_KEY: run_id}))
        if update:
            m = m.when_matched_update_all(predicate=update_when)
        metrics = m.when_not_matched_insert_all().execute()
        log.debug("merge %s: %s", tdef.name, metrics)
        ins = int(metrics.get("num_target_rows_inserted", 0))
        upd = int(metrics.get("num_target_rows_updated", 0))
        committed = ins or upd or int(metrics.get("num_target_rows_deleted", 0))
        return MergeResult(tdef.name, ins, upd, data.num_rows, dt.version() if committed else None)

    def _merge_spark(self, tdef: TableDef, rows, run_id: str, update: bool,
                     update_when: Optional[str]) -> MergeResult:
        """Spark ``MERGE`` with the same rows, rules and result as the delta-rs path.

        The source is conformed to the table schema and deduplicated on the key exactly as
        :func:`conform` / :func:`dedupe_on_key` do (first row in source order), then persisted,
        so a source computed by a model UDF runs once, not once per scan of the MERGE (nor per
        retry). Delta commits nothing when no row changes; that is reported as ``version=None``
        like delta-rs.
        """
        from pyspark import StorageLevel
        from pyspark.sql import functions as F

        if isinstance(rows, pa.Table):
            df = self.spark.createDataFrame(dedupe_on_key(tdef, conform(tdef, rows, run_id)))
        else:
            df = _dedupe_frame(tdef, _conform_frame(tdef, rows, run_id))
        if bucketed(tdef):
            df = df.withColumn(KEY_BUCKET, F.expr(key_bucket_sql(tdef.key[0])))
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            if bucketed(tdef):  # rows and buckets in one job
                counts = df.groupBy(KEY_BUCKET).count().collect()
                n, buckets = sum(r["count"] for r in counts), [r[0] for r in counts]
            else:
                n, buckets = df.count(), []
            if n == 0:
                return MergeResult(tdef.name, 0, 0, 0, None)
            return self._with_retry(tdef, "merge", lambda: self._merge_spark_once(
                tdef, df, n, buckets, run_id, update, update_when))
        finally:
            df.unpersist()

    def _merge_spark_once(self, tdef: TableDef, df, n: int, buckets: list, run_id: str,
                          update: bool, update_when: Optional[str]) -> MergeResult:
        """One delta-spark merge try of a persisted, conformed source with ``key_bucket``."""
        from delta.tables import DeltaTable as SparkDeltaTable

        has_bucket, complete = self.bucket_layout(tdef)
        source = df if has_bucket or not bucketed(tdef) else df.drop(KEY_BUCKET)
        flt = _bucket_filter(buckets, complete) if has_bucket else None
        dt = SparkDeltaTable.forPath(self.spark, self.path(tdef))
        before = dt.history(1).collect()[0]["version"]
        if update and not self._merge_changes_rows(tdef, source, update_when, flt):
            # Delta commits a MERGE with a matched clause even when it changes no row.
            return MergeResult(tdef.name, 0, 0, n, None)
        self.spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", run_id)
        try:
            cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in tdef.key)
            if flt:
                cond = f"{flt} AND {cond}"
            m = dt.alias("t").merge(source.alias("s"), cond)
            if update:
                m = m.whenMatchedUpdateAll(condition=update_when)
            m.whenNotMatchedInsertAll().execute()
        finally:
            self.spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
        # our commit: the newest MERGE after `before` (another writer may have committed too)
        for h in dt.history(20).collect():
            if h["version"] > before and h["operation"] == "MERGE" and h["userMetadata"] == run_id:
                om = h["operationMetrics"] or {}
                return MergeResult(tdef.name, int(om.get("numTargetRowsInserted", 0)),
                                   int(om.get("numTargetRowsUpdated", 0)), n, h["version"])
        return MergeResult(tdef.name, 0, 0, n, None)

    def _merge_changes_rows(self, tdef: TableDef, source, update_when: Optional[str],
                            target_filter: Optional[str] = None) -> bool:
        """Whether an insert-or-update merge of ``source`` would insert or update any row
        (reading only the target rows that ``target_filter``, over alias ``t``, keeps)."""
        from pyspark.sql import functions as F

        target = self._read_stored(tdef).alias("t")
        if target_filter:
            target = target.where(target_filter)
        target = target.drop(KEY_BUCKET).alias("t")
        s = source.drop(KEY_BUCKET).alias("s")
        if s.join(target, list(tdef.key), "left_anti").limit(1).count():
            return True
        cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in tdef.key)
        matched = s.join(target, F.expr(cond))
        return bool((matched.where(update_when) if update_when else matched).limit(1).count())

    # -- maintenance
    def backfill_buckets(self, tdef: TableDef) -> int:
        """Fill ``key_bucket`` in rows written before the column existed (one commit), so later
        merges skip their files. Returns the rows filled (0: nothing to do, nothing committed)."""
        if not bucketed(tdef) or not self.exists(tdef):
            return 0
        has, complete = self.bucket_layout(tdef)
        if complete:
            return 0
        if self.engine == "delta-spark":
            loc = self.path(tdef).replace("`", "``")
            n = self._read_stored(tdef).where(f"`{KEY_BUCKET}` IS NULL").count()
            self._with_retry(tdef, "backfill", lambda: self.spark.sql(
                f"UPDATE delta.`{loc}` SET `{KEY_BUCKET}` = {key_bucket_sql(tdef.key[0])} "
                f"WHERE `{KEY_BUCKET}` IS NULL"))
        else:
            import pyarrow.compute as pc
            from deltalake import DeltaTable

            keys = DeltaTable(self.path(tdef)).to_pyarrow_table(columns=[*tdef.key, KEY_BUCKET])
            keys = keys.filter(pc.is_null(keys.column(KEY_BUCKET))).drop_columns([KEY_BUCKET])
            n = keys.num_rows
            if n:
                src = keys.append_column(KEY_BUCKET, key_buckets(keys.column(tdef.key[0])))
                pred = " AND ".join(f"t.`{k}` = s.`{k}`" for k in tdef.key)

                def fill():
                    (DeltaTable(self.path(tdef))
                     .merge(source=src, predicate=pred, source_alias="s", target_alias="t")
                     .when_matched_update(updates={KEY_BUCKET: f"s.`{KEY_BUCKET}`"},
                                          predicate=f"t.`{KEY_BUCKET}` IS NULL").execute())
                self._with_retry(tdef, "backfill", fill)
        self._layouts[self.path(tdef)] = (True, True)
        return n

    def optimize(self, tdef: TableDef) -> dict:
        """Compact the table's small files, ordered by ``key_bucket`` (``OPTIMIZE ... ZORDER BY
        (key_bucket)``; on one column that is a range layout) so each file covers a narrow range
        of buckets and merges keep skipping most files; plain compaction for tables without it.

        Returns:
            ``{"files_added", "files_removed"}`` (0/0: nothing to do).
        """
        if not self.exists(tdef):
            return {"files_added": 0, "files_removed": 0}
        has, _ = self.bucket_layout(tdef)
        if self.engine == "delta-spark":
            loc = self.path(tdef).replace("`", "``")
            sql = f"OPTIMIZE delta.`{loc}`" + (f" ZORDER BY (`{KEY_BUCKET}`)" if has else "")
            m = self._with_retry(tdef, "optimize", lambda: self.spark.sql(sql).collect()[0]["metrics"])
            return {"files_added": int(m["numFilesAdded"]), "files_removed": int(m["numFilesRemoved"])}
        from deltalake import DeltaTable

        def run():
            dt = DeltaTable(self.path(tdef))
            return dt.optimize.z_order([KEY_BUCKET]) if has else dt.optimize.compact()
        m = self._with_retry(tdef, "optimize", run)
        return {"files_added": int(m.get("numFilesAdded", 0)),
                "files_removed": int(m.get("numFilesRemoved", 0))}

    def version_timestamp(self, tdef: TableDef, version: int):
        """Commit time of ``version`` (a UTC ``datetime``), or None when the log no longer has it."""
        import datetime as _dt

        if self.engine == "delta-spark":
            loc = self.path(tdef).replace("`", "``")
            rows = (self.spark.sql(f"DESCRIBE HISTORY delta.`{loc}`")
                    .where(f"version = {int(version)}").select("timestamp").collect())
            if not rows:
                return None
            ts = rows[0]["timestamp"]
            return ts.astimezone(_dt.timezone.utc) if ts.tzinfo else ts.replace(tzinfo=_dt.timezone.utc)
        from deltalake import DeltaTable

        for h in DeltaTable(self.path(tdef)).history():
            if h.get("version") == int(version) and h.get("timestamp") is not None:
                return _dt.datetime.fromtimestamp(h["timestamp"] / 1000, tz=_dt.timezone.utc)
        return None

    def vacuum(self, tdef: TableDef, retention_hours: int, dry_run: bool = True) -> list[str]:
        """Delete files no version younger than ``retention_hours`` needs (Delta ``VACUUM``).

        Time travel to a version stays possible while every file its snapshot lists is kept,
        which holds for every version committed within the retention. The caller picks the
        retention (``finelake optimize`` derives it from the pinned versions); this method does
        not apply Delta's 7-day safety check, so that a configured minimum below it works.

        Returns:
            The files deleted (``dry_run``: that would be deleted), as paths or URIs.
        """
        if not self.exists(tdef):
            return []
        h = max(0, int(math.ceil(retention_hours)))
        if self.engine == "delta-spark":
            loc = self.path(tdef).replace("`", "``")
            key = "spark.databricks.delta.retentionDurationCheck.enabled"
            old = self.spark.conf.get(key, "true")
            self.spark.conf.set(key, "false")
            try:
                files = [r[0] for r in self.spark.sql(
                    f"VACUUM delta.`{loc}` RETAIN {h} HOURS DRY RUN").collect()]
                if not dry_run and files:
                    self.spark.sql(f"VACUUM delta.`{loc}` RETAIN {h} HOURS").collect()
            finally:
                self.spark.conf.set(key, old)
            return files
        from deltalake import DeltaTable

        return list(DeltaTable(self.path(tdef)).vacuum(retention_hours=h, dry_run=dry_run,
                                                      enforce_retention_duration=False))

    # -- reads
    def read(self, tdef: TableDef, version: Optional[int] = None):
        """The table as a Spark DataFrame, optionally pinned to a Delta version.

        Raises:
            LakeError: the table does not exist (run the stage that writes it first).
        """
        if self.spark is None:
            raise LakeError("this Lake has no Spark session; use read_arrow")
        if not self.exists(tdef):
            raise LakeError(f"table {tdef.name} does not exist at {self.path(tdef)}; "
                            f"run the stage that writes it first")
        df = self._read_stored(tdef, version)
        return df if KEY_BUCKET in tdef.columns else df.drop(KEY_BUCKET)

    def _read_stored(self, tdef: TableDef, version: Optional[int] = None):
        """The table as stored, ``key_bucket`` included."""
        fmt = "delta" if self.engine == "delta-spark" else DATA_SOURCE_NAME
        reader = self.spark.read.format(fmt)
        if version is not None:
            reader = reader.option("versionAsOf", str(version))
        if self.engine == "delta-spark":
            return reader.load(self.path(tdef))
        return reader.option("delta_path", self.path(tdef)).load()

    def read_chunk(self, tdef: TableDef, column: str, n_chunks: int, chunk: int):
        """The rows of ``tdef`` whose ``column`` falls in chunk ``chunk`` of ``n_chunks``
        (``abs(xxhash64(column)) % n_chunks == chunk``), as a Spark DataFrame.

        When ``column`` is the table's first key and the table carries ``key_bucket``, the read
        also filters on the chunk's bucket range (:func:`chunk_bucket_range`), which Delta's
        file statistics use to skip every file outside it once the table is clustered by bucket
        (``finelake optimize``): a chunk then reads its share of the table, not all of it.
        """
        from pyspark.sql import functions as F

        df = self._read_stored(tdef)
        if column == tdef.key[0] and bucketed(tdef):
            has, complete = self.bucket_layout(tdef)
            if has:
                lo, hi = chunk_bucket_range(n_chunks, chunk)
                cond = F.col(KEY_BUCKET).between(lo, hi)
                df = df.where(cond if complete else (cond | F.col(KEY_BUCKET).isNull()))
        df = df.where(F.abs(F.xxhash64(column)) % F.lit(n_chunks) == F.lit(chunk))
        return df if KEY_BUCKET in tdef.columns or KEY_BUCKET not in df.columns else df.drop(KEY_BUCKET)

    def read_arrow(self, tdef: TableDef, version: Optional[int] = None,
                   columns: Optional[list[str]] = None) -> pa.Table:
        """The table as an Arrow table (delta-rs; the driver only). Missing table: empty rows."""
        from deltalake import DeltaTable

        if not self.exists(tdef):
            t = tdef.empty()
            return t.select(columns) if columns else t
        if self.engine == "delta-spark":
            df = self.read(tdef, version)
            return (df.select(*columns) if columns else df).toArrow()
        t = DeltaTable(self.path(tdef), version=version).to_pyarrow_table(columns=columns)
        if KEY_BUCKET in t.column_names and KEY_BUCKET not in tdef.columns and not columns:
            t = t.drop_columns([KEY_BUCKET])
        return t

    # -- SQL
    def register(self, tdef: TableDef) -> str:
        """Register the table under ``<catalog.>database.name`` for Spark SQL; returns that name."""
        name = self.sql_name(tdef)
        if self.spark is None or name in self._registered or not self.exists(tdef):
            return name
        db = name.rsplit(".", 1)[0]
        self.spark.sql(f"CREATE DATABASE IF NOT EXISTS {db}")
        loc = self.path(tdef).replace("'", "\\'")
        if self.engine == "delta-spark":
            self._register_delta(name, loc)
        else:
            if "DeltaCatalog" in (self.spark.conf.get("spark.sql.catalog.spark_catalog", "") or ""):
                raise LakeError(f"cannot register {name} for the delta-rs engine: this session's "
                                "catalog is Delta's (spark_catalog = DeltaCatalog), which takes "
                                "only Delta tables; use spark.delta: delta-spark here")
            ds = table_data_source(tdef.name, self.path(tdef))
            self.spark.dataSource.register(ds)
            self.spark.sql(f"DROP TABLE IF EXISTS {name}")
            self.spark.sql(f"CREATE TABLE {name} USING {ds.name()}")
        self._registered.add(name)
        return name

    def _register_delta(self, name: str, loc: str) -> None:
        """``CREATE TABLE name USING DELTA LOCATION loc``. A name of the in-memory session catalog
        that points at another lake (tests, a second local lake) is re-pointed; in a persistent
        catalog (Unity Catalog, Glue, a Hive metastore) that is an error, not a silent re-point
        of someone's table."""
        if self.spark.catalog.tableExists(name):
            try:
                have = self.spark.sql(f"DESCRIBE DETAIL {name}").collect()[0]["location"]
            except Exception:  # not a Delta table under that name
                have = None
            if have is not None and _local_path(have).rstrip("/") == _local_path(loc).rstrip("/"):
                return
            in_memory = self.spark.conf.get("spark.sql.catalogImplementation", "in-memory") == "in-memory"
            if self.catalog or not in_memory:
                raise LakeError(f"{name} is registered at {have}, not at {loc}: drop it or choose "
                                f"another catalog.database")
            self.spark.sql(f"DROP TABLE {name}")  # external table: the files stay
        self.spark.sql(f"CREATE TABLE {name} USING DELTA LOCATION '{loc}'")

    def register_all(self, tables) -> list[str]:
        return [self.register(t) for t in tables if self.exists(t)]
