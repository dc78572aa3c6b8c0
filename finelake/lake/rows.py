"""Rows on their way into a table, as Arrow: conformed to the table's schema, one per key.

Both engines apply exactly these rules (the delta-spark engine has Spark equivalents of both, in
:mod:`finelake.lake.spark`), so the two leave identical tables behind.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from finelake.lake.errors import LakeError
from finelake.tables import TableDef


def conform(tdef: TableDef, data: pa.Table, run_id: Optional[str] = None) -> pa.Table:
    """Return ``data`` with exactly the table's columns, in order, cast to its schema.

    Missing nullable columns are filled with nulls; ``run_id`` is filled when absent.

    Raises:
        LakeError: a key column is missing, or a column cannot be cast.
    """
    n = data.num_rows
    cols = []
    for f in tdef.schema:
        if f.name in data.column_names:
            col = data.column(f.name)
        elif f.name == "run_id" and run_id is not None:
            col = pa.array([run_id] * n, type=pa.string())
        elif f.name in tdef.key:
            raise LakeError(f"{tdef.name}: key column {f.name!r} missing from rows")
        else:
            col = pa.nulls(n, type=f.type)
        try:
            cols.append(col.cast(f.type) if col.type != f.type else col)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise LakeError(f"{tdef.name}.{f.name}: cannot store {col.type} as {f.type}: {exc}") from None
    return pa.Table.from_arrays(cols, schema=tdef.schema)


def dedupe_on_key(tdef: TableDef, data: pa.Table) -> pa.Table:
    """Keep the first row of each key (a MERGE source must not repeat a key)."""
    if data.num_rows == 0:
        return data
    idx = pa.array(range(data.num_rows), type=pa.int64())
    firsts = (data.select(list(tdef.key)).append_column("__i", idx)
              .group_by(list(tdef.key), use_threads=False).aggregate([("__i", "min")]))
    take = firsts.column("__i_min").to_pylist()
    take.sort()
    return data.take(pa.array(take, type=pa.int64()))
