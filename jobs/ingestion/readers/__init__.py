"""A reader per input format, as datatrove's ``pipeline/readers/``: each turns an
:class:`~finelake.jobs.ingestion.inputs.InputSpec` into a DataFrame of prepared rows
(:data:`finelake.method.records.PREPARED_COLUMNS`), one row per input record, with its source file
and 1-based location. Parsing, normalization and validation of each record are the same for every
format (:mod:`finelake.method.records`); what differs is only how records and their locations are
read:

===========  ==============================================================================
``jsonl``    :mod:`.jsonl`: lines split on ``\\n`` only, 1-based line numbers
``parquet``  :mod:`.parquet`: 1-based ``row`` from ``_metadata.row_index``
``csv``      :mod:`.csv`: header line, RFC 4180 quoting, multi-line fields, 1-based data row
``text``     :mod:`.text`: one document per file
``delta``    :mod:`.delta`: 1-based row in the snapshot's read order
===========  ==============================================================================
"""

from __future__ import annotations

from finelake.errors import FinelakeError
from finelake.jobs.ingestion.inputs import InputSpec
from finelake.jobs.ingestion.readers import csv, delta, jsonl, parquet, text
from finelake.method.records import RowOptions

#: Reader of each :attr:`InputSpec.fmt`: ``read(spark, lake, spec, options) -> DataFrame``.
READERS = {"jsonl": jsonl.read, "parquet": parquet.read, "csv": csv.read, "text": text.read,
           "delta": delta.read}


def read_prepared(spark, lake, spec: InputSpec, o: RowOptions):
    """Read an input into a DataFrame of prepared rows (:data:`PREPARED_COLUMNS`), lazily.

    Args:
        spark: the session; ``lake``: the lake (its engine decides how a Delta input is read).
        spec: the resolved input (:func:`~finelake.jobs.ingestion.inputs.resolve_input`).
        o: field mapping and limits.

    Raises:
        FinelakeError: the format is unknown, or the text field is not a column of a tabular
            input (a missing id or source column only logs a warning: ids fall back to the
            content hash).
    """
    reader = READERS.get(spec.fmt)
    if reader is None:  # resolve_input returns only the formats above
        raise FinelakeError(f"unsupported input format {spec.fmt}")
    return reader(spark, lake, spec, o)
