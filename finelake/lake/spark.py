"""The ``delta-spark`` engine: Delta through Spark SQL with the Delta jars (clusters, local Spark
with ``make setup``'s jars). Merges run as Spark ``MERGE`` and scale with the cluster.

PySpark and ``delta`` are imported inside the methods: importing :mod:`finelake.lake` must not
import Spark (``finelake tables``, ``report`` and ``sql`` run without it).
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from finelake.lake import buckets
from finelake.lake.base import Lake, MergeResult
from finelake.lake.buckets import KEY_BUCKET, bucket_filter, key_bucket_sql
from finelake.lake.errors import LakeError
from finelake.lake.rows import conform, dedupe_on_key
from finelake.tables import TableDef


def local_path(uri: str) -> str:
    """``file:///x`` and ``file:/x`` (Hadoop's spelling) -> ``/x``; anything else unchanged."""
    for prefix in ("file://", "file:"):
        if uri.startswith(prefix):
            return uri[len(prefix):]
    return uri


def _conform_frame(tdef: TableDef, df, run_id: Optional[str] = None):
    """:func:`~finelake.lake.rows.conform` for a Spark DataFrame: the table's columns in order,
    cast to its schema, missing nullable columns as nulls, ``run_id`` filled when absent.

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
    """:func:`~finelake.lake.rows.dedupe_on_key` for a Spark DataFrame: the first row of each key
    in the frame's own order (what ``toArrow()`` would list first), not an arbitrary one as
    ``dropDuplicates``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy(*[F.col(f"`{k}`") for k in tdef.key]).orderBy("__finelake_pos")
    return (df.withColumn("__finelake_pos", F.monotonically_increasing_id())
            .withColumn("__finelake_rank", F.row_number().over(w))
            .where("__finelake_rank = 1").drop("__finelake_pos", "__finelake_rank"))


class DeltaSparkLake(Lake):
    """:class:`~finelake.lake.base.Lake` through delta-spark (``io.delta`` on the classpath)."""

    engine = "delta-spark"

    def __init__(self, root: str, spark=None, *args, **kwargs):
        if spark is None:
            raise ValueError("the delta-spark engine needs a Spark session")
        super().__init__(root, spark, *args, **kwargs)

    def _table(self, tdef: TableDef):
        from delta.tables import DeltaTable as SparkDeltaTable

        return SparkDeltaTable.forPath(self.spark, self.path(tdef))

    def _loc(self, tdef: TableDef) -> str:
        """The table's path quoted for ``delta.`...```."""
        return self.path(tdef).replace("`", "``")

    # -- metadata
    def exists(self, tdef: TableDef) -> bool:
        from delta.tables import DeltaTable as SparkDeltaTable

        return SparkDeltaTable.isDeltaTable(self.spark, self.path(tdef))

    def _version(self, tdef: TableDef) -> int:
        return self._table(tdef).history(1).collect()[0]["version"]

    def _history(self, tdef: TableDef, limit: int) -> list[dict]:
        rows = self._table(tdef).history(limit).collect()
        return [{"version": r["version"], "operation": r["operation"],
                 "run_id": r["userMetadata"], "timestamp": str(r["timestamp"])} for r in rows]

    def _create(self, tdef: TableDef) -> None:
        from delta.tables import DeltaTable as SparkDeltaTable
        from pyspark.sql.pandas.types import from_arrow_schema

        b = SparkDeltaTable.createIfNotExists(self.spark).location(self.path(tdef))
        b = b.addColumns(from_arrow_schema(self.storage_schema(tdef))).comment(tdef.description)
        if tdef.partition_by:
            b = b.partitionedBy(*tdef.partition_by)
        b.execute()

    def _stored_columns(self, tdef: TableDef) -> list[str]:
        return self._read_stored(tdef).columns

    def _has_null_buckets(self, tdef: TableDef) -> bool:
        """A query that Delta's data skipping answers from the per-file null counts."""
        return bool(self._read_stored(tdef).where(f"`{KEY_BUCKET}` IS NULL").limit(1).count())

    def _add_bucket_column(self, tdef: TableDef) -> None:
        self.spark.sql(f"ALTER TABLE delta.`{self._loc(tdef)}` ADD COLUMNS (`{KEY_BUCKET}` int)")

    def _add_columns(self, tdef: TableDef, fields: list[pa.Field]) -> None:
        from pyspark.sql.pandas.types import from_arrow_schema

        cols = ", ".join(f"`{f.name}` {f.dataType.simpleString()}"
                         for f in from_arrow_schema(pa.schema(fields)).fields)
        self.spark.sql(f"ALTER TABLE delta.`{self._loc(tdef)}` ADD COLUMNS ({cols})")

    # -- writes
    def _merge(self, tdef: TableDef, rows, run_id: str, update: bool,
               update_when: Optional[str]) -> MergeResult:
        """Spark ``MERGE`` with the same rows, rules and result as the delta-rs engine.

        The source is conformed to the table schema and deduplicated on the key exactly as
        :func:`~finelake.lake.rows.conform` / :func:`~finelake.lake.rows.dedupe_on_key` do (first
        row in source order), then persisted, so a source computed by a model UDF runs once, not
        once per scan of the MERGE (nor per retry). Delta commits nothing when no row changes;
        that is reported as ``version=None`` like delta-rs.
        """
        from pyspark import StorageLevel
        from pyspark.sql import functions as F

        if isinstance(rows, pa.Table):
            df = self.spark.createDataFrame(dedupe_on_key(tdef, conform(tdef, rows, run_id)))
        else:
            df = _dedupe_frame(tdef, _conform_frame(tdef, rows, run_id))
        if buckets.bucketed(tdef):
            df = df.withColumn(KEY_BUCKET, F.expr(key_bucket_sql(tdef.key[0])))
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            if buckets.bucketed(tdef):  # rows and buckets in one job
                counts = df.groupBy(KEY_BUCKET).count().collect()
                n, touched = sum(r["count"] for r in counts), [r[0] for r in counts]
            else:
                n, touched = df.count(), []
            if n == 0:
                return MergeResult(tdef.name, 0, 0, 0, None)
            return self._with_retry(tdef, "merge", lambda: self._merge_once(
                tdef, df, n, touched, run_id, update, update_when))
        finally:
            df.unpersist()

    def _merge_once(self, tdef: TableDef, df, n: int, touched: list, run_id: str,
                    update: bool, update_when: Optional[str]) -> MergeResult:
        """One merge try of a persisted, conformed source with ``key_bucket``."""
        has_bucket, complete = self.bucket_layout(tdef)
        source = df if has_bucket or not buckets.bucketed(tdef) else df.drop(KEY_BUCKET)
        flt = bucket_filter(touched, complete) if has_bucket else None
        dt = self._table(tdef)
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
    def _backfill_buckets(self, tdef: TableDef) -> int:
        n = self._read_stored(tdef).where(f"`{KEY_BUCKET}` IS NULL").count()
        self._with_retry(tdef, "backfill", lambda: self.spark.sql(
            f"UPDATE delta.`{self._loc(tdef)}` SET `{KEY_BUCKET}` = {key_bucket_sql(tdef.key[0])} "
            f"WHERE `{KEY_BUCKET}` IS NULL"))
        return n

    def _optimize(self, tdef: TableDef, has_bucket: bool) -> dict:
        sql = f"OPTIMIZE delta.`{self._loc(tdef)}`" + (f" ZORDER BY (`{KEY_BUCKET}`)" if has_bucket else "")
        m = self._with_retry(tdef, "optimize", lambda: self.spark.sql(sql).collect()[0]["metrics"])
        return {"files_added": int(m["numFilesAdded"]), "files_removed": int(m["numFilesRemoved"])}

    def version_timestamp(self, tdef: TableDef, version: int):
        import datetime as _dt

        rows = (self.spark.sql(f"DESCRIBE HISTORY delta.`{self._loc(tdef)}`")
                .where(f"version = {int(version)}").select("timestamp").collect())
        if not rows:
            return None
        ts = rows[0]["timestamp"]
        return ts.astimezone(_dt.timezone.utc) if ts.tzinfo else ts.replace(tzinfo=_dt.timezone.utc)

    def _vacuum(self, tdef: TableDef, retention_hours: int, dry_run: bool) -> list[str]:
        loc, h = self._loc(tdef), retention_hours
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

    # -- reads
    def _read_stored(self, tdef: TableDef, version: Optional[int] = None):
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", str(version))
        return reader.load(self.path(tdef))

    def _read_arrow(self, tdef: TableDef, version: Optional[int],
                    columns: Optional[list[str]]) -> pa.Table:
        df = self.read(tdef, version)
        return (df.select(*columns) if columns else df).toArrow()

    # -- SQL
    def _register(self, tdef: TableDef, name: str) -> None:
        """``CREATE TABLE name USING DELTA LOCATION loc``. A name of the in-memory session catalog
        that points at another lake (tests, a second local lake) is re-pointed; in a persistent
        catalog (Unity Catalog, Glue, a Hive metastore) that is an error, not a silent re-point
        of someone's table."""
        loc = self.path(tdef).replace("'", "\\'")
        if self.spark.catalog.tableExists(name):
            try:
                have = self.spark.sql(f"DESCRIBE DETAIL {name}").collect()[0]["location"]
            except Exception:  # not a Delta table under that name
                have = None
            if have is not None and local_path(have).rstrip("/") == local_path(loc).rstrip("/"):
                return
            in_memory = self.spark.conf.get("spark.sql.catalogImplementation", "in-memory") == "in-memory"
            if self.catalog or not in_memory:
                raise LakeError(f"{name} is registered at {have}, not at {loc}: drop it or choose "
                                f"another catalog.database")
            self.spark.sql(f"DROP TABLE {name}")  # external table: the files stay
        self.spark.sql(f"CREATE TABLE {name} USING DELTA LOCATION '{loc}'")
