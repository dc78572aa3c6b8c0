"""Helpers the stage jobs share: model specs, limits, pending work, chunked commits.

Nothing here calls a model: models are reached only through :mod:`finelake.udfs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterable, Optional

import pyarrow as pa

from finelake.config import ModelConfig
from finelake.runtime import FinelakeError, StageContext
from finelake.tables import TableDef

log = logging.getLogger(__name__)


def model_spec(m: ModelConfig, **override) -> dict:
    """The plain-dict form of a model config that travels to executors (and keys the model cache)."""
    spec = m.model_dump()
    spec.update({k: v for k, v in override.items() if v is not None})
    return spec


def model_label(m: ModelConfig | dict) -> str:
    """``backend:model[@revision]`` for lineage columns."""
    d = m if isinstance(m, dict) else m.model_dump()
    rev = f"@{d['revision']}" if d.get("revision") else ""
    return f"{d['backend']}:{d['model']}{rev}"


def stable_hash(*parts: str, n: int = 16) -> str:
    """Hex digest of the parts joined by NUL (a deterministic id, unlike Python's hash())."""
    return hashlib.sha1("\0".join(parts).encode("utf-8")).hexdigest()[:n]


def require(ctx: StageContext, tdef: TableDef, stage_hint: str):
    """The table as a Spark DataFrame; a clear error naming the stage to run when it is missing."""
    if not ctx.lake.exists(tdef):
        raise FinelakeError(f"table {tdef.name} not found under {ctx.cfg.lake}: run "
                            f"'finelake {stage_hint}' first")
    return ctx.lake.read(tdef)


def limit_ordered(df, key: str, n: Optional[int]):
    """The first ``n`` rows by ``key`` (ids are content hashes, so this is a fixed pseudo-random
    subset that does not change between runs); all rows when ``n`` is None."""
    df = df.orderBy(key)
    return df.limit(n) if n else df


def chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def fail_point(name: str, count: int) -> None:
    """Test hook: raise after ``count`` chunks of stage ``name`` were committed when
    ``FINELAKE_FAIL_AFTER=<name>:<count>`` is set (simulates a killed job)."""
    spec = os.environ.get("FINELAKE_FAIL_AFTER", "")
    if spec and spec.split(":")[0] == name and count >= int(spec.split(":")[1]):
        raise RuntimeError(f"FINELAKE_FAIL_AFTER={spec}: simulated failure in {name}")


def to_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def arrow_from_rows(rows: list[dict], tdef: TableDef) -> pa.Table:
    """Rows (dicts) to an Arrow table with the table's schema (missing columns become null)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in tdef.schema}
    return pa.Table.from_pydict(cols, schema=tdef.schema)


def _rows_to_batches(batches, fn, schema):
    for batch in batches:
        if batch.num_rows == 0:
            continue
        rows = fn(batch.to_pandas())
        if rows:
            yield pa.RecordBatch.from_pylist(rows, schema=schema)


def map_rows(df, fn, tdef: TableDef, drop=("run_id",)):
    """Apply ``fn(pandas.DataFrame) -> list[dict]`` to every Arrow batch of ``df`` on the
    executors and return the rows as a DataFrame with ``tdef``'s columns (less ``drop``).

    Rows are built into Arrow record batches with the table's own schema (``mapInArrow``), so
    a missing value is simply ``None`` and no pandas dtype inference happens on the way back.
    """
    import functools

    from pyspark.sql.pandas.types import from_arrow_schema

    schema = pa.schema([f for f in tdef.schema if f.name not in drop])
    return df.mapInArrow(functools.partial(_rows_to_batches, fn=fn, schema=schema),
                         from_arrow_schema(schema))


def count_outcomes(stats, df, ok_status: str = "ok") -> None:
    """Add a stage table's rows to ``stats``: ``status == ok_status`` counts as output, every other
    (status, reason prefix) as a drop reason. ``df`` has ``status`` and ``reason`` columns."""
    for r in df.groupBy("status", "reason").count().collect():
        if r["status"] == ok_status:
            stats.rows_out += r["count"]
        else:
            stats.drop(f"{r['status']}:{(r['reason'] or '').split(':')[0]}", r["count"])


def job_main(command: str, argv=None) -> None:
    """``spark-submit jobs/<job>.py ARGS`` entry point: the same as ``finelake <command> ARGS``."""
    import sys

    from finelake.cli import main as cli_main

    cli_main([command, *(sys.argv[1:] if argv is None else argv)])
