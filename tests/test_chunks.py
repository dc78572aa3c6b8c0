"""jobs.chunks: keys staged by chunk, each chunk's inputs read by key, commits overlapping the next
chunk's model job. A resumed stage rebuilds unfinished chunks exactly as an uninterrupted run built
them (same rows, same partition, same order), so batched generation gives the same outputs;
nothing is duplicated or lost."""

from __future__ import annotations

import os
import threading

import pandas as pd
import pyarrow as pa
import pytest

from finelake.config import load_config
from finelake.jobs import chunks
from finelake.lake import chunk_bucket_range, chunk_count, key_buckets
from finelake.runtime import StageContext
from finelake.tables import TableDef

SEEN = TableDef("chunk_probe", pa.schema([("k", pa.string()), ("partition", pa.int32()),
                                          ("position", pa.int32()), ("batch", pa.string()),
                                          ("text", pa.string()), ("run_id", pa.string())]),
                key=("k",), description="test: where each row was processed")
SOURCE = TableDef("chunk_source", pa.schema([("k", pa.string()), ("text", pa.string()),
                                             ("run_id", pa.string())]),
                  key=("k",), description="test: the text a chunk reads by key")
KEYS = [f"key{i:03d}" for i in range(60)]


def _run(spark, lake_dir, fail_after=None, commits=None):
    # Nested, so that Spark's workers receive the function itself (tests/ is not importable there).
    def where(batches):
        """Tag every row with its task's partition, its position there and the partition's keys."""
        from pyspark import TaskContext

        rows = pd.concat(list(batches), ignore_index=True)
        if len(rows):
            yield pd.DataFrame({"k": rows["k"], "partition": TaskContext.get().partitionId(),
                                "position": range(len(rows)), "batch": ",".join(rows["k"]),
                                "text": rows["text"]})

    ctx = StageContext(load_config("local", lake=lake_dir), spark=spark)
    if not ctx.lake.exists(SOURCE):
        ctx.lake.merge(SOURCE, pa.table({"k": KEYS, "text": [f"text of {k}" for k in KEYS]}), "setup")
    scope = spark.createDataFrame(pd.DataFrame({"k": KEYS}))
    pending = scope
    if ctx.lake.exists(SEEN):
        pending = scope.join(ctx.lake.read(SEEN).select("k"), "k", "left_anti")
    n_chunks = chunk_count(len(KEYS), 16)
    path, sizes = chunks.stage_keys(ctx, "probe", pending, "k", n_chunks)
    schema = "k string, partition int, position int, batch string, text string"

    def build(chunk):
        keys = chunks.read_staged(ctx, path, chunk)
        part = keys.join(ctx.lake.read_chunk(SOURCE, "k", n_chunks, chunk), "k")
        part = chunks.spread(part, "k", 2).sortWithinPartitions("k")
        return part.mapInPandas(where, schema)

    def commit(out):
        ctx.lake.merge(SEEN, out, ctx.run_id)
        if commits is not None:
            commits.append(threading.current_thread().name)

    def on_commit(done):
        if fail_after and done >= fail_after:
            raise RuntimeError("simulated failure")

    return chunks.run_chunks(ctx, "probe", path, sizes, build, commit, on_commit=on_commit)


def _table(lake_dir):
    from deltalake import DeltaTable

    df = DeltaTable(os.path.join(lake_dir, SEEN.name)).to_pandas()
    return df.drop(columns=[c for c in ("run_id", "key_bucket") if c in df]).sort_values("k").reset_index(drop=True)


def test_resumed_chunks_match_an_uninterrupted_run(spark, tmp_path):
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    threads = []
    run = _run(spark, whole, commits=threads)
    assert run.chunks == 4 and run.rows == len(KEYS)  # ceil(60 / 16) -> 4 chunks
    assert len(run.model_s) == 4 and len(run.overhead_s) == 4
    assert all(t.startswith("probe-commit") for t in threads)  # commits ran off the model loop
    with pytest.raises(RuntimeError, match="simulated failure"):
        _run(spark, resumed, fail_after=1)
    partial = _table(resumed)
    assert 0 < len(partial) < len(KEYS)
    assert _run(spark, resumed).chunks == 3  # the three unfinished chunks, drawn as before
    a, b = _table(whole), _table(resumed)
    assert list(a["k"]) == sorted(KEYS)  # every row once
    assert list(a["text"]) == [f"text of {k}" for k in sorted(KEYS)]  # inputs read by key
    pd.testing.assert_frame_equal(a, b)  # same partition, position and batch companions
    assert _run(spark, resumed).chunks == 0  # nothing pending: no commit
    pd.testing.assert_frame_equal(_table(resumed), b)


def test_partitions_are_ordered_by_key(spark, tmp_path):
    _run(spark, str(tmp_path / "lake"))
    t = _table(str(tmp_path / "lake"))
    for batch in t["batch"].unique():
        keys = batch.split(",")
        assert keys == sorted(keys)


def test_a_failed_commit_stops_the_loop_before_the_next_commit(spark, tmp_path):
    lake = str(tmp_path / "lake")
    with pytest.raises(RuntimeError):
        _run(spark, lake, fail_after=2)
    # two commits happened (the second one raised after committing); no third one started
    assert len(_table(lake)["batch"].unique()) <= 2 * 2


def test_chunk_bucket_range_holds_every_key_of_the_chunk():
    """Independent check: Spark's own hash (through key_buckets, checked against Spark in
    tests/test_lake.py) and xxhash's, not chunk_bucket_range's arithmetic."""
    import xxhash

    keys = [f"doc-{i}" for i in range(3000)]
    buckets = key_buckets(pa.array(keys)).to_pylist()

    def h(k):
        v = xxhash.xxh64_intdigest(k.encode("utf-8"), seed=42)
        return abs(v - (1 << 64) if v >= 1 << 63 else v)

    for n in (1, 2, 8, 64, 256, 512):
        for c in range(n):
            lo, hi = chunk_bucket_range(n, c)
            inside = [b for k, b in zip(keys, buckets) if h(k) % n == c]
            assert all(lo <= b <= hi for b in inside)
            if n <= 256:
                assert hi - lo + 1 == 256 // n  # the chunk's share of the buckets, no more
    with pytest.raises(ValueError):
        chunk_bucket_range(3, 0)
