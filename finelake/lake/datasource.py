"""Spark reads of delta-rs tables: a PySpark Python data source over one Delta snapshot.

Used by the ``deltalake`` engine when it has a Spark session (local mode without the Delta jars):
``spark.read.format("finelake_delta").option("delta_path", p)[.option("versionAsOf", v)]``. It
lists the snapshot's files with delta-rs and reads each as one Spark partition, so files a merge
removed are never seen (a plain Parquet read of the folder would see them).

This module imports PySpark; :mod:`finelake.lake.rs` imports it only when a session is given.
Spark pickles the classes by reference, so executors import this module.
"""

from __future__ import annotations

from typing import Iterator, Optional

import pyarrow as pa

from finelake.lake.base import DATA_SOURCE_NAME
from finelake.lake.errors import LakeError
from finelake.lake.spark import local_path

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
            t = pq.read_table(local_path(partition.uri))
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
