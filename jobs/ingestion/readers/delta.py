"""Delta reader: a Delta table (a folder with ``_delta_log``) as input, read at its latest version.

Read through the lake's engine: Spark's Delta source where the jars are (delta-spark), else the
project's delta-rs data source. A row's location is its 1-based position in the snapshot's read
order (one partition per data file, in snapshot order); ``src`` is the table's path.
"""

from __future__ import annotations

from finelake.jobs.ingestion.inputs import InputSpec
from finelake.jobs.ingestion.readers.schema import check_fields, prepared_schema
from finelake.lake import DATA_SOURCE_NAME
from finelake.method.records import RowOptions, prepare_tabular


def read(spark, lake, spec: InputSpec, o: RowOptions):
    """Prepared rows of every row of the table's current snapshot."""
    if lake.engine == "delta-spark":
        df = spark.read.format("delta").load(spec.uri)
    else:
        df = spark.read.format(DATA_SOURCE_NAME).option("delta_path", spec.uri).load()
    check_fields(spec, o, list(df.columns))
    src = spec.path
    rdd = df.rdd.zipWithIndex().map(
        lambda ri: prepare_tabular(o, src, ri[1] + 1, ri[0].asDict(recursive=False)))
    return spark.createDataFrame(rdd, prepared_schema())
