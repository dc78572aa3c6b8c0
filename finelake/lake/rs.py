"""The ``deltalake`` engine: Delta through delta-rs (the ``deltalake`` package) from the driver.

For local mode where no jars can be downloaded, and for Spark-free reads (``finelake tables``,
``report``, training on a laptop). With a Spark session, Spark reads the tables through a Python
data source (:mod:`finelake.lake.datasource`) that lists only the files of the snapshot (a plain
Parquet read would also see files a merge removed).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Callable, Optional, Union

import pyarrow as pa

from finelake import storage
from finelake.lake.base import DATA_SOURCE_NAME, RUN_ID_KEY, Lake, MergeResult
from finelake.lake.buckets import KEY_BUCKET, bucket_filter, key_buckets
from finelake.lake.errors import LakeError
from finelake.lake.rows import conform, dedupe_on_key
from finelake.tables import TableDef

if TYPE_CHECKING:
    from deltalake import DeltaTable

log = logging.getLogger("finelake.lake")


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (DataFusion: double quotes, case kept)."""
    return '"' + name.replace('"', '""') + '"'


def read_delta(table: Union[str, "DeltaTable"], version: Optional[int] = None,
               columns: Optional[list[str]] = None, limit: Optional[int] = None) -> pa.Table:
    """A Delta table's rows (or ``columns`` of them), read by delta-rs's own Rust reader.

    Args:
        table: the table's path/URI, or a loaded ``deltalake.DeltaTable`` (its version is read).
        version: the version to read when ``table`` is a path (None: latest).
        columns: the columns, in this order (None: all, in the table's order).
        limit: at most this many rows, the first in file order (None: all).

    Returns:
        A ``pyarrow.Table`` with the table's Arrow types (``to_pyarrow_table``'s schema), rows in
        the snapshot's file order (one scan partition, so the order is the same on every read).

    Raises:
        deltalake's ``TableNotFoundError``: no Delta table at ``table``.

    Why not ``DeltaTable.to_pyarrow_table()``: that scans through a pyarrow dataset over a Python
    file system (delta-rs's ``DeltaStorageHandler``). Arrow's worker threads release the scan's
    Parquet readers, and with them the Python file objects, asynchronously; when that release
    runs while the interpreter shuts down, the thread's ``PyGILState_Ensure`` exits it inside a
    C++ destructor and the process dies with ``terminate called without an active exception``
    (SIGABRT, exit 134) after its work is done (measured here: ``finelake tables`` 4 times in 50;
    gdb showed ``~PyReadableFile`` -> ``take_gil`` -> ``pthread_exit`` -> ``std::terminate`` on an
    Arrow thread; apache/arrow#34314, delta-rs#2184). DataFusion reads Parquet in Rust and hands
    back a finished Arrow stream: no Python object is left for another thread to free.
    """
    from deltalake import DeltaTable, QueryBuilder

    dt = table if isinstance(table, DeltaTable) else DeltaTable(table, version=version)
    schema = pa.schema(dt.schema().to_arrow())
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    sql = f"SELECT {', '.join(quote_ident(c) for c in schema.names)} FROM {quote_ident('t')}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    stream = (QueryBuilder({"datafusion.execution.target_partitions": "1"})
              .register("t", dt).execute(sql))
    out = pa.RecordBatchReader.from_stream(stream).read_all()
    del stream  # the Rust stream is exhausted: free it now, not at interpreter exit
    # DataFusion hands strings back as string_view; give callers the table's declared types
    return out.cast(schema) if out.schema != schema else out


class DeltaRsLake(Lake):
    """:class:`~finelake.lake.base.Lake` through delta-rs; a Spark session is optional."""

    engine = "deltalake"

    def __init__(self, root: str, spark=None, *args, **kwargs):
        super().__init__(root, spark, *args, **kwargs)
        # tests: called with the table after a merge try read its snapshot, before it commits
        self._before_commit: Optional[Callable[[TableDef], None]] = None
        if spark is not None:
            from finelake.lake.datasource import DeltaSnapshotDataSource

            if DeltaSnapshotDataSource is not None:
                spark.dataSource.register(DeltaSnapshotDataSource)

    def _table(self, tdef: TableDef):
        from deltalake import DeltaTable

        return DeltaTable(self.path(tdef))

    # -- metadata
    def exists(self, tdef: TableDef) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.path(tdef))

    def _version(self, tdef: TableDef) -> int:
        return self._table(tdef).version()

    def _history(self, tdef: TableDef, limit: int) -> list[dict]:
        return [{"version": h.get("version"), "operation": h.get("operation"),
                 "run_id": h.get(RUN_ID_KEY), "timestamp": h.get("timestamp")}
                for h in self._table(tdef).history(limit)]

    def _clear_uncommitted_log(self, tdef: TableDef, settle_s: float = 5.0) -> None:
        """As the base class, for local roots only: object stores have no directory to leave behind."""
        if not storage.is_uri(self.root):
            super()._clear_uncommitted_log(tdef, settle_s)

    def _create(self, tdef: TableDef) -> None:
        from deltalake import DeltaTable

        if "://" not in self.root:
            os.makedirs(self.path(tdef), exist_ok=True)
        DeltaTable.create(self.path(tdef), schema=self.storage_schema(tdef), mode="ignore",
                          name=tdef.name, description=tdef.description,
                          partition_by=list(tdef.partition_by) or None)

    def _stored_columns(self, tdef: TableDef) -> list[str]:
        return pa.schema(self._table(tdef).schema().to_arrow()).names

    def _has_null_buckets(self, tdef: TableDef) -> bool:
        """Reads the per-file null counts of the log, not the rows."""
        actions = self._table(tdef).get_add_actions(flatten=True)
        col = f"null_count.{KEY_BUCKET}"
        if actions.num_rows == 0:
            return False
        if col not in actions.column_names:
            return True
        return any(v is None or v > 0 for v in actions.column(col).to_pylist())

    def _add_bucket_column(self, tdef: TableDef) -> None:
        from deltalake import Field

        self._table(tdef).alter.add_columns([Field(KEY_BUCKET, "integer", nullable=True)])

    def _add_columns(self, tdef: TableDef, fields: list[pa.Field]) -> None:
        from deltalake import Field, Schema

        new = Schema.from_arrow(pa.schema(fields))
        self._table(tdef).alter.add_columns([Field(f.name, f.type, nullable=True) for f in new.fields])

    # -- writes
    def _merge(self, tdef: TableDef, rows, run_id: str, update: bool,
               update_when: Optional[str]) -> MergeResult:
        if not isinstance(rows, pa.Table):
            rows = rows.toArrow()
        data = dedupe_on_key(tdef, conform(tdef, rows, run_id))
        if data.num_rows == 0:
            return MergeResult(tdef.name, 0, 0, 0, None)
        return self._with_retry(tdef, "merge", lambda: self._merge_once(tdef, data, run_id, update,
                                                                        update_when))

    def _merge_once(self, tdef: TableDef, data: pa.Table, run_id: str, update: bool,
                    update_when: Optional[str]) -> MergeResult:
        """One merge try of conformed, deduplicated rows."""
        from deltalake import CommitProperties

        has_bucket, complete = self.bucket_layout(tdef)
        pred = " AND ".join(f"t.`{k}` = s.`{k}`" for k in tdef.key)
        if has_bucket:
            touched = key_buckets(data.column(tdef.key[0]))
            data = data.append_column(KEY_BUCKET, touched)
            flt = bucket_filter(touched.to_pylist(), complete)
            if flt:
                pred = f"{flt} AND {pred}"
        dt = self._table(tdef)
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

    # -- maintenance
    def _backfill_buckets(self, tdef: TableDef) -> int:
        import pyarrow.compute as pc

        keys = read_delta(self.path(tdef), columns=[*tdef.key, KEY_BUCKET])
        keys = keys.filter(pc.is_null(keys.column(KEY_BUCKET))).drop_columns([KEY_BUCKET])
        if keys.num_rows:
            src = keys.append_column(KEY_BUCKET, key_buckets(keys.column(tdef.key[0])))
            pred = " AND ".join(f"t.`{k}` = s.`{k}`" for k in tdef.key)

            def fill():
                (self._table(tdef)
                 .merge(source=src, predicate=pred, source_alias="s", target_alias="t")
                 .when_matched_update(updates={KEY_BUCKET: f"s.`{KEY_BUCKET}`"},
                                      predicate=f"t.`{KEY_BUCKET}` IS NULL").execute())
            self._with_retry(tdef, "backfill", fill)
        return keys.num_rows

    def _optimize(self, tdef: TableDef, has_bucket: bool) -> dict:
        def run():
            dt = self._table(tdef)
            return dt.optimize.z_order([KEY_BUCKET]) if has_bucket else dt.optimize.compact()
        m = self._with_retry(tdef, "optimize", run)
        return {"files_added": int(m.get("numFilesAdded", 0)),
                "files_removed": int(m.get("numFilesRemoved", 0))}

    def version_timestamp(self, tdef: TableDef, version: int):
        import datetime as _dt

        for h in self._table(tdef).history():
            if h.get("version") == int(version) and h.get("timestamp") is not None:
                return _dt.datetime.fromtimestamp(h["timestamp"] / 1000, tz=_dt.timezone.utc)
        return None

    def _vacuum(self, tdef: TableDef, retention_hours: int, dry_run: bool) -> list[str]:
        return list(self._table(tdef).vacuum(retention_hours=retention_hours, dry_run=dry_run,
                                             enforce_retention_duration=False))

    # -- reads
    def _read_stored(self, tdef: TableDef, version: Optional[int] = None):
        if self.spark is None:
            raise LakeError("this Lake has no Spark session; use read_arrow")
        reader = self.spark.read.format(DATA_SOURCE_NAME)
        if version is not None:
            reader = reader.option("versionAsOf", str(version))
        return reader.option("delta_path", self.path(tdef)).load()

    def _read_arrow(self, tdef: TableDef, version: Optional[int],
                    columns: Optional[list[str]]) -> pa.Table:
        t = read_delta(self.path(tdef), version, columns)
        if KEY_BUCKET in t.column_names and KEY_BUCKET not in tdef.columns and not columns:
            t = t.drop_columns([KEY_BUCKET])
        return t

    # -- SQL
    def _register(self, tdef: TableDef, name: str) -> None:
        """A catalog table over a data source class bound to the table's path."""
        from finelake.lake.datasource import table_data_source

        if "DeltaCatalog" in (self.spark.conf.get("spark.sql.catalog.spark_catalog", "") or ""):
            raise LakeError(f"cannot register {name} for the delta-rs engine: this session's "
                            "catalog is Delta's (spark_catalog = DeltaCatalog), which takes "
                            "only Delta tables; use spark.delta: delta-spark here")
        ds = table_data_source(tdef.name, self.path(tdef))
        self.spark.dataSource.register(ds)
        self.spark.sql(f"DROP TABLE IF EXISTS {name}")
        self.spark.sql(f"CREATE TABLE {name} USING {ds.name()}")
