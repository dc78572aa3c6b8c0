"""Parquet reader: a ``.parquet``/``.pq`` file or a folder of them.

Each row's location is its 1-based position in its file (``_metadata.row_index``), so it does not
depend on how Spark splits the files.
"""

from __future__ import annotations

from urllib.parse import unquote

from finelake.jobs.ingestion.inputs import InputSpec, display
from finelake.jobs.ingestion.readers.schema import check_fields, prepared_schema
from finelake.method.records import RowOptions, prepare_tabular


def read(spark, lake, spec: InputSpec, o: RowOptions):
    """Prepared rows of every row of every file (row numbers from the file's own row index)."""
    from pyspark.sql import functions as F

    df = spark.read.parquet(spec.uri)
    df = df.select("*", F.col("_metadata.file_path").alias("__file"),
                   (F.col("_metadata.row_index") + 1).alias("__row"))
    return with_file_rows(spark, spec, o, df)


def with_file_rows(spark, spec: InputSpec, o: RowOptions, df):
    """Prepared rows of a tabular DataFrame that carries ``__file`` (Spark's URL-encoded
    ``_metadata.file_path``) and ``__row`` (1-based row in that file) beside its data columns."""
    check_fields(spec, o, [c for c in df.columns if c not in ("__file", "__row")])

    def to_row(r):
        d = r.asDict(recursive=False)
        f, row = d.pop("__file"), d.pop("__row")
        return prepare_tabular(o, display(unquote(f)), int(row), d)

    return spark.createDataFrame(df.rdd.map(to_row), prepared_schema())
