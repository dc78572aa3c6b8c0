"""CSV / TSV reader: a ``.csv``/``.tsv`` file or a folder of them.

A header line names the columns; RFC 4180 quoting (``"`` doubled inside a field) and fields that
span lines are read as one record. A row's location is its 1-based data row in its file.
"""

from __future__ import annotations

from finelake.jobs.ingestion.inputs import InputSpec
from finelake.jobs.ingestion.readers.parquet import with_file_rows
from finelake.method.records import RowOptions


def read(spark, lake, spec: InputSpec, o: RowOptions):
    """Prepared rows of every data row (header excluded) of every file."""
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    df = (spark.read.option("header", True).option("multiLine", True).option("escape", '"')
          .option("sep", spec.sep).option("mode", "PERMISSIVE").csv(spec.uri))
    # multi-line CSV files are not split: one file is one partition, read in order
    df = df.select("*", F.col("_metadata.file_path").alias("__file"),
                   F.monotonically_increasing_id().alias("__mono"))
    w = Window.partitionBy("__file").orderBy("__mono")
    df = df.withColumn("__row", F.row_number().over(w).cast("long")).drop("__mono")
    return with_file_rows(spark, spec, o, df)
