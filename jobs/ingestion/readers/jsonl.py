"""JSONL reader: ``.jsonl``/``.ndjson``/``.json`` files (optionally ``.gz``/``.bz2``) or a folder.

One JSON object per line; lines are split on ``\\n`` only (a U+2028 inside a string stays in its
row), read with ``newAPIHadoopFile`` + ``zipWithIndex`` so each row keeps its 1-based line number.
Bytes that are not UTF-8 decode to U+FFFD and the line is quarantined as ``wrong_encoding``; blank
lines are not rows (as in Spark's own JSON reader): their reason is ``blank_line``.
"""

from __future__ import annotations

from finelake.jobs.ingestion.inputs import InputSpec, display
from finelake.jobs.ingestion.readers.schema import prepared_schema
from finelake.method.records import RowOptions, prepare_line


def read(spark, lake, spec: InputSpec, o: RowOptions):
    """Prepared rows of every line of ``spec.files`` (files in sorted order, lines in order)."""
    sc = spark.sparkContext
    rdds = []
    for f in spec.files:
        src = display(f)
        lines = sc.newAPIHadoopFile(
            f, "org.apache.hadoop.mapreduce.lib.input.TextInputFormat",
            "org.apache.hadoop.io.LongWritable", "org.apache.hadoop.io.Text",
            conf={"textinputformat.record.delimiter": "\n"}).values()
        rdds.append(lines.zipWithIndex().map(lambda li, src=src: prepare_line(o, src, li[1], li[0])))
    rdd = rdds[0] if len(rdds) == 1 else sc.union(rdds)
    return spark.createDataFrame(rdd, prepared_schema())
