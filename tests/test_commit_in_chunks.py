"""jobs.common.commit_in_chunks: a resumed stage rebuilds unfinished chunks exactly as an
uninterrupted run built them (same rows, same partition, same order), so batched generation gives
the same outputs; nothing is duplicated or lost."""

from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
import pytest

from finelake.config import load_config
from finelake.jobs.common import commit_in_chunks
from finelake.runtime import StageContext
from finelake.tables import TableDef

SEEN = TableDef("chunk_probe", pa.schema([("k", pa.string()), ("partition", pa.int32()),
                                          ("position", pa.int32()), ("batch", pa.string()),
                                          ("run_id", pa.string())]),
                key=("k",), description="test: where each row was processed")
KEYS = [f"key{i:03d}" for i in range(60)]


def _run(spark, lake_dir, fail_after=None):
    # Nested, so that Spark's workers receive the function itself (tests/ is not importable there).
    def where(batches):
        """Tag every row with its task's partition, its position there and the partition's keys."""
        from pyspark import TaskContext

        rows = pd.concat(list(batches), ignore_index=True)
        if len(rows):
            yield pd.DataFrame({"k": rows["k"], "partition": TaskContext.get().partitionId(),
                                "position": range(len(rows)), "batch": ",".join(rows["k"])})

    ctx = StageContext(load_config("local", lake=lake_dir), spark=spark)
    src = spark.createDataFrame(pd.DataFrame({"k": KEYS}))
    pending = src
    if ctx.lake.exists(SEEN):
        pending = src.join(ctx.lake.read(SEEN).select("k"), "k", "left_anti")
    schema = "k string, partition int, position int, batch string"
    if fail_after:
        os.environ["FINELAKE_FAIL_AFTER"] = f"probe:{fail_after}"
    try:
        return commit_in_chunks(ctx, "probe", SEEN, pending, "k", len(KEYS), 16,
                                lambda part: part.mapInPandas(where, schema))
    finally:
        os.environ.pop("FINELAKE_FAIL_AFTER", None)


def _table(lake_dir):
    from deltalake import DeltaTable

    df = DeltaTable(os.path.join(lake_dir, SEEN.name)).to_pandas()
    return df.drop(columns="run_id").sort_values("k").reset_index(drop=True)


def test_resumed_chunks_match_an_uninterrupted_run(spark, tmp_path):
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    assert _run(spark, whole) == 4  # ceil(60 / 16) chunks
    with pytest.raises(RuntimeError, match="simulated failure"):
        _run(spark, resumed, fail_after=1)
    partial = _table(resumed)
    assert 0 < len(partial) < len(KEYS)
    assert _run(spark, resumed) == 3  # the three unfinished chunks, drawn as before
    a, b = _table(whole), _table(resumed)
    assert list(a["k"]) == sorted(KEYS)  # every row once
    pd.testing.assert_frame_equal(a, b)  # same partition, position and batch companions
    assert _run(spark, resumed) == 0  # nothing pending: no commit
    pd.testing.assert_frame_equal(_table(resumed), b)


def test_partitions_are_ordered_by_key(spark, tmp_path):
    _run(spark, str(tmp_path / "lake"))
    t = _table(str(tmp_path / "lake"))
    for batch in t["batch"].unique():
        keys = batch.split(",")
        assert keys == sorted(keys)
