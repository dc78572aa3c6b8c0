"""Seconds per insert-only chunk merge as a Delta table grows, before and after key buckets.

Grows one table per mode to each size in ``--sizes`` with bulk appends (not timed), then times
``--merges`` insert-only merges of ``--chunk`` new rows each through :meth:`finelake.lake.Lake.merge`
(delta-spark, ``local[2]``), as a stage's ``commit_in_chunks`` makes them:

* ``plain``: today's layout and merge (no ``key_bucket``; the merge reads every target key).
* ``bucketed``: ``key_bucket`` stored, files laid out by bucket range (what aligned chunk merges
  or ``finelake optimize`` leave), each chunk one bucket (a run of 256+ chunks, see
  :func:`finelake.lake.chunk_count`), the merge restricted to it.

Prints one line per (mode, size) and, with ``--json PATH``, writes
``{"params": {...}, "results": [{"mode", "table_rows", "seconds": [..], "median_s", "files"}]}``.

    .venv/bin/python benchmarks/bench_merge.py --sizes 250000,1000000,2000000 --json /tmp/m.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def get_spark(memory: str):
    from pyspark.sql import SparkSession

    from finelake.config import load_config
    from finelake.spark import delta_conf

    conf = delta_conf(load_config("local"))
    if not conf:
        raise SystemExit("no Delta jars: run `make setup` (or `.venv/bin/finelake delta-jars`)")
    b = SparkSession.builder
    for k, v in conf.items():
        b = b.config(k, v)
    b = (b.master("local[2]").appName("bench_merge")
         .config("spark.sql.shuffle.partitions", "4")
         .config("spark.default.parallelism", "2")
         .config("spark.databricks.delta.snapshotPartitions", "2")
         .config("spark.driver.memory", memory)
         .config("spark.ui.enabled", "false")
         .config("spark.ui.showConsoleProgress", "false"))
    s = b.getOrCreate()
    s.sparkContext.setLogLevel("ERROR")
    return s


def rows_frame(spark, start: int, n: int, bucketed: bool):
    """``n`` documents with ids ``start..start+n`` (keys ``d<id>``), 80-character texts."""
    from pyspark.sql import functions as F

    from finelake.lake import KEY_BUCKET, key_bucket_sql

    df = (spark.range(start, start + n)
          .select(F.concat(F.lit("d"), F.col("id").cast("string")).alias("doc_id"),
                  F.concat(F.lit("text of document "), F.col("id").cast("string"),
                           F.lit(" " + "x" * 60)).alias("text"),
                  F.lit("bench").alias("source"), F.lit(20).cast("long").alias("num_tokens"),
                  F.lit(None).cast("string").alias("metadata"), F.lit("bulk").alias("run_id")))
    if bucketed:
        df = df.withColumn(KEY_BUCKET, F.expr(key_bucket_sql("doc_id")))
    return df


def chunk_source(spark, start: int, chunk: int, bucket_mod: int, c: int):
    """``chunk`` new rows (ids from ``start``) in one aligned chunk (``abs(xxhash64) % 256 == c``),
    as Arrow (materialized, so generating it is not timed)."""
    from pyspark.sql import functions as F

    need = int(chunk * bucket_mod * 1.1)
    df = rows_frame(spark, start, need, False).drop("run_id")
    return (df.where((F.abs(F.xxhash64("doc_id")) % bucket_mod) == c).limit(chunk).toArrow(), need)


def run_mode(spark, mode: str, sizes: list[int], chunk: int, merges: int, root: str) -> list[dict]:
    import finelake.lake as lk
    from finelake.tables import DOCUMENTS

    if mode == "plain":  # the Lake's modules look bucketed up in finelake.lake.buckets
        lk_bucketed, lk.buckets.bucketed = lk.buckets.bucketed, (lambda t: False)
    try:
        lake = lk.Lake(os.path.join(root, mode), spark, engine="delta-spark")
        lake.create(DOCUMENTS)
        path = lake.path(DOCUMENTS)
        have, next_id, out = 0, 10**9, []
        for size in sizes:
            add = size - have
            if add > 0:
                df = rows_frame(spark, have, add, mode == "bucketed")
                files = max(2, add // 100_000)
                df = (df.repartitionByRange(files, "key_bucket").sortWithinPartitions("key_bucket")
                      if mode == "bucketed" else df.repartition(files))
                df.write.format("delta").mode("append").save(path)
                have = size
            secs = []
            for i in range(merges):
                src, used = chunk_source(spark, next_id, chunk, lk.KEY_BUCKETS, (i * 37) % lk.KEY_BUCKETS)
                next_id += used
                t0 = time.perf_counter()
                res = lake.merge(DOCUMENTS, src, f"bench-{mode}-{size}-{i}")
                secs.append(time.perf_counter() - t0)
                assert res.inserted == src.num_rows, (res, src.num_rows)
                have += res.inserted
            nfiles = spark.sql(f"DESCRIBE DETAIL delta.`{path}`").collect()[0]["numFiles"]
            r = {"mode": mode, "table_rows": size, "seconds": [round(s, 3) for s in secs],
                 "median_s": round(statistics.median(secs), 3), "files": nfiles}
            print(f"{mode:9} table={size:>9,} rows  merge of {chunk:,} rows: median "
                  f"{r['median_s']:.2f} s  ({', '.join(f'{s:.2f}' for s in secs)})  files={nfiles}",
                  flush=True)
            out.append(r)
        return out
    finally:
        if mode == "plain":
            lk.buckets.bucketed = lk_bucketed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="250000,1000000,2000000",
                    help="comma-separated table sizes (rows) at which merges are timed")
    ap.add_argument("--chunk", type=int, default=20_000, help="rows per merge")
    ap.add_argument("--merges", type=int, default=3, help="timed merges per size")
    ap.add_argument("--modes", default="plain,bucketed")
    ap.add_argument("--memory", default="3g", help="Spark driver memory")
    ap.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args(argv)
    sizes = sorted(int(s) for s in a.sizes.split(","))
    root = a.dir or tempfile.mkdtemp(prefix="bench_merge_")
    spark = get_spark(a.memory)
    t0 = time.perf_counter()
    results = []
    try:
        for mode in a.modes.split(","):
            results += run_mode(spark, mode, sizes, a.chunk, a.merges, root)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    doc = {"params": {"sizes": sizes, "chunk": a.chunk, "merges": a.merges, "engine": "delta-spark",
                      "master": "local[2]", "wall_s": round(time.perf_counter() - t0, 1)},
           "results": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(f"total {doc['params']['wall_s']} s")


if __name__ == "__main__":
    main()
