"""Text reader: a ``.txt``/``.md``/``.text`` file, or a folder of text files (any other extension).

One document per top-level visible file, read whole with ``wholeTextFiles``; its location is
``file`` and its file name goes into the metadata.
"""

from __future__ import annotations

from finelake.jobs.ingestion.inputs import InputSpec, display
from finelake.jobs.ingestion.readers.schema import prepared_schema
from finelake.method.records import RowOptions, prepare_file


def read(spark, lake, spec: InputSpec, o: RowOptions):
    """Prepared rows, one per file (a single file, or the folder's top-level visible files)."""
    rdd = spark.sparkContext.wholeTextFiles(spec.uri).map(
        lambda kv: prepare_file(o, display(kv[0]), kv[1]))
    return spark.createDataFrame(rdd, prepared_schema())
