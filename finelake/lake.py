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
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import pyarrow as pa

from finelake import storage
from finelake.tables import TableDef

log = logging.getLogger(__name__)

RUN_ID_KEY = "finelake.run_id"
DATA_SOURCE_NAME = "finelake_delta"


class LakeError(RuntimeError):
    """A table cannot be read or written (missing, unreadable, wrong schema)."""


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
    """

    def __init__(self, root: str, spark=None, engine: str = "deltalake", database: str = "finelake",
                 catalog: Optional[str] = None):
        if engine not in ("delta-spark", "deltalake"):
            raise ValueError(f"engine must be 'delta-spark' or 'deltalake', not {engine!r}")
        self.root = root.rstrip("/")
        self.spark = spark
        self.engine = engine
        self.database = database
        self.catalog = catalog
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

    def create(self, tdef: TableDef) -> None:
        """Create the table (empty) when it does not exist yet; a no-op otherwise."""
        if self.engine == "delta-spark":
            from delta.tables import DeltaTable as SparkDeltaTable
            from pyspark.sql.pandas.types import from_arrow_schema

            b = SparkDeltaTable.createIfNotExists(self.spark).location(self.path(tdef))
            b = b.addColumns(from_arrow_schema(tdef.schema)).comment(tdef.description)
            if tdef.partition_by:
                b = b.partitionedBy(*tdef.partition_by)
            b.execute()
            return
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(self.path(tdef)):
            os.makedirs(self.path(tdef), exist_ok=True) if "://" not in self.root else None
            DeltaTable.create(self.path(tdef), schema=tdef.schema, mode="ignore", name=tdef.name,
                              description=tdef.description,
                              partition_by=list(tdef.partition_by) or None)

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

        Returns:
            :class:`MergeResult`; ``version`` is None when nothing was committed.

        Raises:
            LakeError: rows lack a key column or a column has an incompatible type.
        """
        self.create(tdef)
        if self.engine == "delta-spark":
            return self._merge_spark(tdef, rows, run_id, update, update_when)
        if not isinstance(rows, pa.Table):
            rows = rows.toArrow()
        data = dedupe_on_key(tdef, conform(tdef, rows, run_id))
        if data.num_rows == 0:
            return MergeResult(tdef.name, 0, 0, 0, None)
        from deltalake import CommitProperties, DeltaTable

        dt = DeltaTable(self.path(tdef))
        pred = " AND ".join(f"t.`{k}` = s.`{k}`" for k in tdef.key)
        m = dt.merge(source=data, predicate=pred, source_alias="s", target_alias="t",
                     commit_properties=CommitProperties(custom_metadata={RUN_ID_KEY: run_id}))
        if update:
            m = m.when_matched_update_all(predicate=update_when)
        metrics = m.when_not_matched_insert_all().execute()
        log.debug("merge %s: %s", tdef.name, metrics)
        ins = int(metrics.get("num_target_rows_inserted", 0))
        upd = int(metrics.get("num_target_rows_updated", 0))
        committed = ins or upd or int(metrics.get("num_target_rows_deleted", 0))
        return MergeResult(tdef.name, ins, upd, data.num_rows,
                           DeltaTable(self.path(tdef)).version() if committed else None)

    def _merge_spark(self, tdef: TableDef, rows, run_id: str, update: bool,
                     update_when: Optional[str]) -> MergeResult:
        """Spark ``MERGE`` with the same rows, rules and result as the delta-rs path.

        The source is conformed to the table schema and deduplicated on the key exactly as
        :func:`conform` / :func:`dedupe_on_key` do (first row in source order), then persisted,
        so a source computed by a model UDF runs once, not once per scan of the MERGE. Delta
        commits nothing when no row changes; that is reported as ``version=None`` like delta-rs.
        """
        from delta.tables import DeltaTable as SparkDeltaTable
        from pyspark import StorageLevel

        if isinstance(rows, pa.Table):
            df = self.spark.createDataFrame(dedupe_on_key(tdef, conform(tdef, rows, run_id)))
        else:
            df = _dedupe_frame(tdef, _conform_frame(tdef, rows, run_id))
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            n = df.count()
            if n == 0:
                return MergeResult(tdef.name, 0, 0, 0, None)
            dt = SparkDeltaTable.forPath(self.spark, self.path(tdef))
            before = dt.history(1).collect()[0]["version"]
            if update and not self._merge_changes_rows(tdef, df, update_when):
                # Delta commits a MERGE with a matched clause even when it changes no row.
                return MergeResult(tdef.name, 0, 0, n, None)
            self.spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", run_id)
            try:
                cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in tdef.key)
                m = dt.alias("t").merge(df.alias("s"), cond)
                if update:
                    m = m.whenMatchedUpdateAll(condition=update_when)
                m.whenNotMatchedInsertAll().execute()
            finally:
                self.spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
            last = dt.history(1).collect()[0]
        finally:
            df.unpersist()
        if last["version"] == before:
            return MergeResult(tdef.name, 0, 0, n, None)
        om = last["operationMetrics"] or {}
        return MergeResult(tdef.name, int(om.get("numTargetRowsInserted", 0)),
                           int(om.get("numTargetRowsUpdated", 0)), n, last["version"])

    def _merge_changes_rows(self, tdef: TableDef, source, update_when: Optional[str]) -> bool:
        """Whether an insert-or-update merge of ``source`` would insert or update any row."""
        from pyspark.sql import functions as F

        target = self.read(tdef).alias("t")
        s = source.alias("s")
        if s.join(target, list(tdef.key), "left_anti").limit(1).count():
            return True
        cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in tdef.key)
        matched = s.join(target, F.expr(cond))
        return bool((matched.where(update_when) if update_when else matched).limit(1).count())

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
        fmt = "delta" if self.engine == "delta-spark" else DATA_SOURCE_NAME
        reader = self.spark.read.format(fmt)
        if version is not None:
            reader = reader.option("versionAsOf", str(version))
        if self.engine == "delta-spark":
            return reader.load(self.path(tdef))
        return reader.option("delta_path", self.path(tdef)).load()

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
        return DeltaTable(self.path(tdef), version=version).to_pyarrow_table(columns=columns)

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
