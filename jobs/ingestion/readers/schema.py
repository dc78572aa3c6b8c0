"""What every reader returns: the prepared-row schema, and the tail shared by tabular formats."""

from __future__ import annotations

import logging

from finelake.errors import FinelakeError
from finelake.jobs.ingestion.inputs import InputSpec
from finelake.method.records import PREPARED_COLUMNS, RowOptions

log = logging.getLogger(__name__)


def prepared_schema():
    """Spark schema of :data:`PREPARED_COLUMNS` (``row`` a long, every other column a string)."""
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    return StructType([StructField(c, LongType() if c == "row" else StringType(), True)
                       for c in PREPARED_COLUMNS])


def check_fields(spec: InputSpec, o: RowOptions, columns: list[str]) -> None:
    """Check the field mapping against a tabular input's columns (on the driver, before any job).

    Raises:
        FinelakeError: the text field is not a column (the id and source fields only warn: ids
            fall back to the content hash, sources to the file name).
    """
    if o.text_field not in columns:
        raise FinelakeError(f"{spec.path}: text field {o.text_field!r} is not a column of the input "
                            f"(columns: {', '.join(columns)})")
    for what, name in (("id", o.id_field), ("source", o.source_field)):
        if name is not None and name not in columns and (what == "id" or name != "source"):
            log.warning("%s: %s field %r is not a column; using the %s", spec.path, what, name,
                        "content hash" if what == "id" else f"file name ({o.default_source})")
