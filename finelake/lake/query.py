"""Read-only SQL over a lake without Spark: delta-rs's own engine (DataFusion, ``deltalake.QueryBuilder``).

``finelake sql`` answers a local lake's read-only queries here in about a second, instead of starting
a JVM (~40 s); clusters and every statement that writes stay with Spark (``--engine spark``). Each
existing table of the lake is registered under the same name Spark SQL uses (``finelake.pairs``:
``<database>.<table>``), so a query runs unchanged on either engine as long as it sticks to SQL the
two dialects share (DataFusion's functions are PostgreSQL-like, not Spark's).

The local engine refuses any statement whose plan is not a query (``INSERT``, ``MERGE``, ``UPDATE``,
``DELETE``, ``COPY``, ``CREATE``, ``DROP``, ``SET`` ...): DataFusion's own planner says what the
statement is (``EXPLAIN`` plans without running it), so no SQL is parsed here.
"""

from __future__ import annotations

import datetime as _dt
import decimal
from typing import Iterable, Optional

import pyarrow as pa

from finelake.lake.base import Lake
from finelake.lake.errors import LakeError
from finelake.lake.rs import quote_ident
from finelake.tables import TableDef

# Root nodes of DataFusion logical plans that only read (the first word of ``EXPLAIN``'s
# logical_plan line). Anything else (Dml, CopyTo, Create*, Drop*, SetVariable, Statement nodes) is
# refused: an allow-list, so a node a newer DataFusion adds is refused rather than run.
_QUERY_NODES = frozenset({
    "Projection", "Filter", "Window", "Aggregate", "Sort", "Join", "CrossJoin", "Repartition",
    "Union", "TableScan", "EmptyRelation", "Subquery", "SubqueryAlias", "Limit", "Values",
    "Distinct", "DistinctOn", "Unnest", "RecursiveQuery", "DescribeTable",
})


class WriteRefused(LakeError):
    """A statement that writes (or is not a query) was given to the local, read-only engine."""


class LocalSQL:
    """The existing tables of one lake, registered for read-only SQL in one DataFusion session.

    Args:
        lake: the lake (its table paths and SQL names are used; no Spark session needed).
        tables: the tables to register; those that do not exist yet are skipped.

    Attributes:
        names: SQL name -> Delta version registered, e.g. ``{"finelake.pairs": 4}``.
    """

    def __init__(self, lake: Lake, tables: Iterable[TableDef]):
        from deltalake import DeltaTable, QueryBuilder

        self.lake = lake
        # unquoted names fold to lower case, as Spark SQL's are case-insensitive; SHOW TABLES works
        self._qb = QueryBuilder({"datafusion.sql_parser.enable_ident_normalization": "true",
                                 "datafusion.catalog.information_schema": "true"})
        schema = f"{lake.catalog}.{lake.database}" if lake.catalog else lake.database
        if lake.catalog:
            self._run(f"CREATE DATABASE IF NOT EXISTS {_qualified(lake.catalog)}")
        self._run(f"CREATE SCHEMA IF NOT EXISTS {_qualified(schema)}")
        self.names: dict[str, int] = {}
        for t in tables:
            path = lake.path(t)
            if not DeltaTable.is_deltatable(path):
                continue
            dt = DeltaTable(path)
            self._qb.register(_qualified(lake.sql_name(t)), dt)
            self.names[lake.sql_name(t)] = dt.version()

    def _run(self, statement: str) -> pa.Table:
        return pa.RecordBatchReader.from_stream(self._qb.execute(statement)).read_all()

    def check_read_only(self, statement: str) -> None:
        """Plan ``statement`` without running it and refuse anything that is not a query.

        Raises:
            WriteRefused: the statement writes, or is a DDL/session statement.
            LakeError: DataFusion cannot plan it (syntax or a function it does not have); the
                message names ``--engine spark``.
        """
        body = statement.strip().rstrip(";").strip()
        first_word = (body.split(None, 1) or [""])[0]
        if first_word.upper() == "EXPLAIN":  # EXPLAIN [ANALYZE] [VERBOSE] stmt: check stmt
            rest = body[len(first_word):].lstrip()
            for w in ("ANALYZE", "VERBOSE"):
                if rest[:len(w)].upper() == w and rest[len(w):len(w) + 1] in (" ", "\n", "\t", "\r"):
                    rest = rest[len(w):].lstrip()
            return self.check_read_only(rest)
        try:
            plan = self._run(f"EXPLAIN {body}")
        except Exception as exc:  # DataFusion's planning errors carry its message
            raise LakeError(f"the local SQL engine (DataFusion) cannot run this statement: "
                            f"{_first_line(exc)}; run it with --engine spark") from None
        rows = plan.to_pylist()
        logical = next((r["plan"] for r in rows if r["plan_type"] == "logical_plan"), "")
        first = logical.strip().splitlines()[0] if logical.strip() else ""
        if first.split(":", 1)[0].split(" ", 1)[0] not in _QUERY_NODES:
            raise WriteRefused(f"the local SQL engine only reads, and this statement is not a query "
                               f"({first[:120] or 'no plan'}); run it with --engine spark")

    def sql(self, statement: str, limit: Optional[int] = None) -> tuple[pa.Table, bool]:
        """Run a read-only ``statement``.

        Args:
            statement: one SQL statement over the registered names.
            limit: read at most this many rows of the result (None: all of them).

        Returns:
            ``(rows, more)``: the first ``limit`` rows, and whether the result had more.

        Raises:
            WriteRefused, LakeError: see :meth:`check_read_only`; LakeError also for a query
                that fails while running.
        """
        self.check_read_only(statement)
        body = statement.strip().rstrip(";")
        try:
            reader = pa.RecordBatchReader.from_stream(self._qb.execute(body))
            batches, n = [], 0
            for b in reader:
                batches.append(b)
                n += b.num_rows
                if limit is not None and n > limit:
                    break
            schema = reader.schema
            del reader  # stop the scan now (a LIMIT-less SELECT * need not be read to the end)
        except Exception as exc:
            raise LakeError(f"the local SQL engine (DataFusion) failed: {_first_line(exc)}; "
                            f"run it with --engine spark") from None
        rows = pa.Table.from_batches(batches, schema=schema)
        if limit is not None and rows.num_rows > limit:
            return rows.slice(0, limit), True
        return rows, False

    def count(self, name: str) -> int:
        """Rows of the registered table ``name``. DataFusion answers ``count(*)`` from the row
        counts in the Delta log (its physical plan is a constant), so no data file is read."""
        return int(self._run(f"SELECT count(*) AS n FROM {_qualified(name)}").column("n")[0].as_py())


def _qualified(name: str) -> str:
    """``a.b.c`` -> ``"a"."b"."c"``, each part in lower case (what unquoted names fold to)."""
    return ".".join(quote_ident(p.lower()) for p in name.split("."))


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return text if len(text) < 600 else text[:600] + "..."


# ----------------------------------------------------------------------------- output


def _cell(v) -> str:
    """A value as Spark's ``show`` prints it."""
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time, decimal.Decimal)):
        return str(v).replace("+00:00", "")
    if isinstance(v, bytes):
        return "[" + " ".join(f"{b:02X}" for b in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(_cell(x) for x in v.values()) + "}"
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(x, tuple) and len(x) == 2 for x in v):  # an Arrow map
            return "{" + ", ".join(f"{_cell(k)} -> {_cell(x)}" for k, x in v) + "}"
        return "[" + ", ".join(_cell(x) for x in v) + "]"
    return str(v)


def show_string(rows: pa.Table, more: bool = False, truncate: int = 80) -> str:
    """``rows`` as Spark's ``DataFrame.show(n, truncate)`` prints them: a ``+---+`` grid, cells
    right-aligned, cells longer than ``truncate`` characters cut to ``truncate - 3`` plus ``...``,
    and ``only showing top N rows`` when ``more``: the same string as Spark's ``_show_string``
    (tests/test_local_sql.py compares the two)."""
    def cut(s: str) -> str:
        if truncate <= 0 or len(s) <= truncate:
            return s
        return s[:truncate] if truncate < 4 else s[:truncate - 3] + "..."

    header = [cut(n) for n in rows.column_names]
    data = rows.to_pylist()
    cells = [[cut(_cell(r[c])) for c in rows.column_names] for r in data] if rows.num_columns else []
    widths = [max([3, len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    sep = "+" + "+".join("-" * w for w in widths) + "+"
    lines = [sep, "|" + "|".join(h.rjust(w) for h, w in zip(header, widths)) + "|", sep]
    lines += ["|" + "|".join(c.rjust(w) for c, w in zip(r, widths)) + "|" for r in cells]
    text = "\n".join(lines + [sep]) + "\n"
    if more:  # Spark's own string ends without a newline here
        text += f"only showing top {len(data)} row{'s' if len(data) != 1 else ''}"
    return text
