"""The Delta layer: real Delta tables, idempotent merges, run ids, version pins, SQL names.

Every behaviour is checked on both engines, delta-spark (Spark MERGE with the fetched jars, the
cluster code path) and delta-rs, and the two must leave identical tables behind.
"""

import os

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from conftest import ENGINE, delta_snapshot, session_for
from finelake.lake import Lake, LakeError, conform
from finelake.tables import DOCUMENTS, TEMPLATES

ENGINES = ["deltalake", pytest.param("delta-spark", marks=pytest.mark.skipif(
    ENGINE != "delta-spark", reason="no Delta jars in this environment (make setup fetches them)"))]


def _docs(ids, texts):
    return pa.table({"doc_id": ids, "text": texts, "source": ["t"] * len(ids),
                     "num_tokens": [len(t) for t in texts]})


def _lake(tmp_path, spark, engine, name="lake"):
    return Lake(str(tmp_path / name), session_for(spark, engine), engine=engine,
                database=f"lake_test_{engine.replace('-', '_')}")


def _rows(lake, tdef, version=None):
    """The table's rows as delta-rs reads them (engine-neutral), sorted by key."""
    rows = delta_snapshot(lake.path(tdef), version).to_pylist()
    return sorted(rows, key=lambda r: tuple(r[k] for k in tdef.key))


@pytest.mark.parametrize("engine", ENGINES)
def test_merge_is_idempotent_and_records_run_id(spark, tmp_path, engine):
    lake = _lake(tmp_path, spark, engine)
    r1 = lake.merge(DOCUMENTS, _docs(["a", "b", "a"], ["x", "y", "x again"]), "run-1")
    assert (r1.inserted, r1.source_rows) == (2, 2)  # duplicate key in the source kept once
    r2 = lake.merge(DOCUMENTS, _docs(["a", "b", "c"], ["x", "y", "z"]), "run-2")
    assert (r2.inserted, r2.updated) == (1, 0)
    v = lake.version(DOCUMENTS)
    r3 = lake.merge(DOCUMENTS, _docs(["a", "b", "c"], ["x", "y", "z"]), "run-3")
    assert r3.inserted == 0 and r3.version is None and lake.version(DOCUMENTS) == v  # no commit
    rows = _rows(lake, DOCUMENTS)  # a real Delta table, read by delta-rs whichever engine wrote it
    assert [(r["doc_id"], r["text"]) for r in rows] == [("a", "x"), ("b", "y"), ("c", "z")]
    assert {r["doc_id"]: r["run_id"] for r in rows} == {"a": "run-1", "b": "run-1", "c": "run-2"}
    assert [h["run_id"] for h in lake.history(DOCUMENTS) if h["operation"] == "MERGE"] == ["run-2", "run-1"]


@pytest.mark.parametrize("engine", ENGINES)
def test_update_when_limits_rewrites(spark, tmp_path, engine):
    lake = _lake(tmp_path, spark, engine)
    t = pa.table({"template_id": ["t1"], "template": ["what is <fi>x</fi>"], "source_count": [1]})
    lake.merge(TEMPLATES, t, "r1", update=True, update_when="t.source_count <> s.source_count")
    v = lake.version(TEMPLATES)
    same = lake.merge(TEMPLATES, t, "r2", update=True, update_when="t.source_count <> s.source_count")
    assert same.version is None and lake.version(TEMPLATES) == v
    t2 = t.set_column(2, "source_count", pa.array([2]))
    changed = lake.merge(TEMPLATES, t2, "r3", update=True, update_when="t.source_count <> s.source_count")
    assert changed.updated == 1 and changed.version == v + 1
    assert lake.read_arrow(TEMPLATES).column("source_count").to_pylist() == [2]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("left", [[], [".00000000000000000000.json.0f3a.tmp"]])
def test_a_create_killed_before_its_commit_does_not_block_the_table(spark, tmp_path, engine, left):
    """SIGKILL during a table's create can leave ``_delta_log`` without a commit (seen in
    fault-test: every later run then failed with DELTA_TABLE_NOT_FOUND); the next merge creates
    the table and writes its rows. A log that holds a commit is never touched."""
    lake = _lake(tmp_path, spark, engine)
    log_dir = os.path.join(lake.path(DOCUMENTS), "_delta_log")
    os.makedirs(log_dir)
    for name in left:
        with open(os.path.join(log_dir, name), "w") as f:
            f.write('{"commitInfo":')  # a commit cut short
    for name in [*left, ""]:  # left by an earlier run, not a create in progress
        os.utime(os.path.join(log_dir, name), (0, 1_000_000))
    assert lake.merge(DOCUMENTS, _docs(["a", "b"], ["x", "y"]), "r1").inserted == 2
    assert [r["doc_id"] for r in _rows(lake, DOCUMENTS)] == ["a", "b"]
    lake.create(DOCUMENTS)  # an existing table: nothing removed
    assert lake.merge(DOCUMENTS, _docs(["c"], ["z"]), "r2").inserted == 1
    assert [r["doc_id"] for r in _rows(lake, DOCUMENTS)] == ["a", "b", "c"]


def test_conform_rejects_missing_key_and_bad_types():
    with pytest.raises(LakeError, match="key column 'doc_id'"):
        conform(DOCUMENTS, pa.table({"text": ["x"]}))
    with pytest.raises(LakeError, match="num_tokens"):
        conform(DOCUMENTS, pa.table({"doc_id": ["a"], "num_tokens": ["many"]}))


@pytest.mark.parametrize("engine", ENGINES)
def test_spark_reads_snapshot_pins_versions_and_sql(spark, tmp_path, engine):
    lake = _lake(tmp_path, spark, engine)
    lake.merge(DOCUMENTS, _docs(["a"], ["one"]), "r1")
    v1 = lake.version(DOCUMENTS)
    lake.merge(DOCUMENTS, _docs(["a", "b"], ["changed", "two"]), "r2", update=True)
    assert sorted(r["text"] for r in lake.read(DOCUMENTS).collect()) == ["changed", "two"]
    # the merge rewrote a's file: a plain Parquet read would see both versions of "a"
    assert [r["text"] for r in lake.read(DOCUMENTS, version=v1).collect()] == ["one"]
    assert lake.read_arrow(DOCUMENTS, version=v1).column("text").to_pylist() == ["one"]
    name = lake.register(DOCUMENTS)
    assert name == f"{lake.database}.documents"
    got = lake.spark.sql(f"SELECT doc_id, text FROM {name} ORDER BY doc_id").collect()
    assert [(r["doc_id"], r["text"]) for r in got] == [("a", "changed"), ("b", "two")]
    if engine == "delta-spark":  # the SQL a cluster user types
        assert spark.sql(f"SELECT text FROM {name} VERSION AS OF {v1}").collect()[0]["text"] == "one"
        assert spark.sql(f"DESCRIBE DETAIL {name}").collect()[0]["format"] == "delta"


@pytest.mark.parametrize("engine", ENGINES)
def test_register_follows_the_lake(spark, tmp_path, engine):
    """One SQL name, two lakes in one session (tests, a second local lake): the name follows the
    lake last registered instead of silently reading the first one."""
    a, b = _lake(tmp_path, spark, engine, "a"), _lake(tmp_path, spark, engine, "b")
    a.merge(DOCUMENTS, _docs(["a"], ["in a"]), "r")
    b.merge(DOCUMENTS, _docs(["b"], ["in b"]), "r")
    name = a.register(DOCUMENTS)
    assert b.register(DOCUMENTS) == name
    assert [r["text"] for r in a.spark.sql(f"SELECT text FROM {name}").collect()] == ["in b"]


def test_spark_merge_of_a_frame_runs_its_source_once_and_conforms_it(spark, tmp_path):
    """A Spark DataFrame source (a model UDF upstream) is evaluated once per merge, its missing
    nullable columns become nulls, and a repeated key keeps its first row on both engines."""
    from pyspark.sql import functions as F

    if ENGINE != "delta-spark":
        pytest.skip("no Delta jars in this environment")
    calls = spark.sparkContext.accumulator(0)

    def count_rows(batches):
        for b in batches:
            calls.add(len(b))
            yield b

    df = (spark.createDataFrame([("k1", "first", 1), ("k2", "two", 2), ("k1", "second", 3)],
                                "doc_id string, text string, pos int")
          .coalesce(1).mapInPandas(count_rows, "doc_id string, text string, pos int")
          .withColumn("num_tokens", F.col("pos").cast("long")).drop("pos"))
    spark_lake, rs_lake = _lake(tmp_path, spark, "delta-spark", "s"), _lake(tmp_path, spark, "deltalake", "r")
    res = spark_lake.merge(DOCUMENTS, df, "run-x")
    assert calls.value == 3  # one evaluation of the three source rows
    assert (res.inserted, res.source_rows) == (2, 2)
    rs_lake.merge(DOCUMENTS, df, "run-x")
    assert _rows(spark_lake, DOCUMENTS) == _rows(rs_lake, DOCUMENTS)
    assert [(r["doc_id"], r["text"], r["source"]) for r in _rows(spark_lake, DOCUMENTS)] == [
        ("k1", "first", None), ("k2", "two", None)]


def test_delta_rs_sql_names_under_the_delta_catalog_are_a_clear_error(spark, tmp_path):
    if "DeltaCatalog" not in spark.conf.get("spark.sql.catalog.spark_catalog", ""):
        pytest.skip("the test session has no Delta catalog")
    lake = Lake(str(tmp_path / "lake"), spark, engine="deltalake", database="lake_test_mixed")
    lake.merge(DOCUMENTS, _docs(["a"], ["one"]), "r")
    with pytest.raises(LakeError, match="spark.delta: delta-spark"):
        lake.register(DOCUMENTS)


def test_read_missing_table_is_a_clear_error(spark, tmp_path):
    lake = Lake(str(tmp_path / "lake"), spark, engine=ENGINE)
    with pytest.raises(LakeError, match="does not exist"):
        lake.read(DOCUMENTS)
    assert lake.read_arrow(DOCUMENTS).num_rows == 0


# ----------------------------------------------------------------------------- key buckets


def test_key_buckets_match_spark_and_align_with_chunks(spark):
    """The driver's key_bucket (delta-rs path) is Spark's to the bit, and a stage's chunk
    (abs(xxhash64(key)) % chunk_count) fills one contiguous range of buckets."""
    import xxhash
    from pyspark.sql import functions as F

    from finelake.lake import KEY_BUCKETS, chunk_count, key_bucket_sql, key_buckets

    keys = ["a", "doc-123", "", "héllo wörld ✓", "x" * 300, None] + [f"k{i}" for i in range(500)]
    got = key_buckets(pa.array(keys, pa.string())).to_pylist()
    df = spark.createDataFrame([(k,) for k in keys], "doc_id string")
    want = [r[0] for r in df.select(F.expr(key_bucket_sql("doc_id"))).collect()]
    assert got == want and all(0 <= b < KEY_BUCKETS for b in got)

    assert [chunk_count(n, 10) for n in (0, 1, 10, 11, 30, 2560, 2561)] == [1, 1, 1, 2, 4, 256, 512]
    for n in (1, 2, 8, 256, 512):
        by_chunk: dict = {}
        for k, b in zip(keys[6:], got[6:]):
            h = xxhash.xxh64_intdigest(k.encode(), seed=42)
            h = h - (1 << 64) if h >= 1 << 63 else h
            by_chunk.setdefault(abs(h) % n, set()).add(b)
        for bs in by_chunk.values():  # contiguous, and at most B/n wide
            assert max(bs) - min(bs) < max(1, KEY_BUCKETS // n)


def _stats(lake, tdef):
    return delta_snapshot(lake.path(tdef))


@pytest.mark.parametrize("engine", ENGINES)
def test_tables_written_before_key_bucket_keep_merging_on_key(spark, tmp_path, engine):
    """A table without key_bucket gets the column on the first merge; its old rows (null bucket)
    still block duplicates, and optimize's backfill fills them in."""
    from finelake.lake import KEY_BUCKET, conform

    lake = _lake(tmp_path, spark, engine)
    DeltaTable.create(lake.path(DOCUMENTS), schema=DOCUMENTS.schema)  # the old layout
    from deltalake import write_deltalake
    write_deltalake(lake.path(DOCUMENTS), conform(DOCUMENTS, _docs(["a", "b"], ["x", "y"]), "old"),
                    mode="append")
    r = lake.merge(DOCUMENTS, _docs(["a", "b", "c"], ["x2", "y2", "z"]), "new")
    assert (r.inserted, r.updated) == (1, 0)
    t = _stats(lake, DOCUMENTS)
    assert KEY_BUCKET in t.column_names and t.num_rows == 3
    assert sorted(t.column("doc_id").to_pylist()) == ["a", "b", "c"]
    assert KEY_BUCKET not in lake.read_arrow(DOCUMENTS).column_names
    if lake.spark is not None:
        assert KEY_BUCKET not in lake.read(DOCUMENTS).columns
    fresh = _lake(tmp_path, spark, engine)  # a new process: layout read from the table
    assert fresh.bucket_layout(DOCUMENTS) == (True, False)
    assert fresh.backfill_buckets(DOCUMENTS) == 2
    assert None not in _stats(lake, DOCUMENTS).column(KEY_BUCKET).to_pylist()
    assert _lake(tmp_path, spark, engine).bucket_layout(DOCUMENTS) == (True, True)
    r = fresh.merge(DOCUMENTS, _docs(["a", "d"], ["x3", "w"]), "new2")
    assert r.inserted == 1 and _stats(lake, DOCUMENTS).num_rows == 4


@pytest.mark.parametrize("engine", ENGINES)
def test_merge_skips_files_of_other_buckets(spark, tmp_path, engine):
    """A chunk of one bucket range reads only the files of that range: with another chunk's data
    files deleted behind Delta's back, every other chunk still merges."""
    import xxhash

    from finelake.lake import chunk_count

    lake = _lake(tmp_path, spark, engine)
    keys = [f"d{i}" for i in range(4000)]
    n = chunk_count(len(keys), 500)  # 8 chunks of 32 buckets each

    def chunk_of(k):
        h = xxhash.xxh64_intdigest(k.encode(), seed=42)
        return abs(h - (1 << 64) if h >= 1 << 63 else h) % n

    versions = {}
    for c in range(n):  # one commit (file) per chunk, as commit_in_chunks makes them
        ks = [k for k in keys if chunk_of(k) == c]
        versions[c] = lake.merge(DOCUMENTS, _docs(ks[: len(ks) // 2], ks[: len(ks) // 2]), f"r{c}").version
    # Remove chunk 0's data file behind Delta's back: a merge that read it would fail.
    for uri in DeltaTable(lake.path(DOCUMENTS), version=versions[0]).file_uris():
        os.remove(uri.replace("file://", ""))
    for c in range(1, n):  # the rest of each chunk: reads only its own file
        ks = [k for k in keys if chunk_of(k) == c]
        r = lake.merge(DOCUMENTS, _docs(ks, ks), f"again{c}")
        assert r.inserted == len(ks) - len(ks) // 2
    with pytest.raises(Exception):  # chunk 0's own merge does read the missing file
        ks = [k for k in keys if chunk_of(k) == 0]
        lake.merge(DOCUMENTS, _docs(ks, ks), "again0")


# ----------------------------------------------------------------------------- concurrent commits


def test_commit_conflicts_are_recognised():
    from finelake.lake import is_commit_conflict

    class ConcurrentAppendException(Exception):
        pass

    assert is_commit_conflict(ConcurrentAppendException("x"))
    assert is_commit_conflict(RuntimeError("An error occurred while calling o77.execute.\n: "
                                           "io.delta.exceptions.ConcurrentAppendException: "
                                           "[DELTA_CONCURRENT_APPEND.WITHOUT_HINT] Files were added"))
    wrapped = LakeError("outer")
    wrapped.__cause__ = ConcurrentAppendException("inner")
    assert is_commit_conflict(wrapped)
    assert not is_commit_conflict(ValueError("[DELTA_TABLE_NOT_FOUND] no table"))


@pytest.mark.parametrize("engine", ENGINES)
def test_concurrent_merges_into_one_table_both_succeed(spark, tmp_path, engine, caplog):
    """Two writers merging overlapping key ranges at once: Delta makes one of them conflict
    (a real ConcurrentAppendException / CommitFailedError); the retry lands both."""
    import logging
    import threading

    lake = _lake(tmp_path, spark, engine)
    lake.commit_backoff_s, lake.commit_backoff_max_s = 0.05, 0.5
    lake.merge(DOCUMENTS, _docs(["seed"], ["s"]), "seed")
    caplog.set_level(logging.WARNING, logger="finelake.lake")
    rounds, errors = 3, []
    barrier = threading.Barrier(2)

    def writer(w):
        try:
            for r in range(rounds):
                ks = [f"w{w}-r{r}-{i}" for i in range(200)] + [f"shared-r{r}-{i}" for i in range(20)]
                barrier.wait()
                lake.merge(DOCUMENTS, _docs(ks, ks), f"writer-{w}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ids = _stats(lake, DOCUMENTS).column("doc_id").to_pylist()
    assert len(ids) == len(set(ids)) == 1 + rounds * (2 * 200 + 20)  # all in, none twice
    assert any("conflicted with another writer" in m for m in caplog.messages), \
        "no commit conflicted: the test did not exercise the retry"


def test_merge_gives_up_after_repeated_real_conflicts(spark, tmp_path, caplog):
    """Another writer commits between every try's snapshot and its commit (a real delta-rs
    conflict each time): after commit_attempts the merge fails with a LakeError saying so and
    that a rerun is safe, and the rerun then lands."""
    lake = Lake(str(tmp_path / "lake"), None, engine="deltalake", commit_attempts=3,
                commit_backoff_s=0.01, commit_backoff_max_s=0.02)
    other = Lake(str(tmp_path / "lake"), None, engine="deltalake")
    lake.merge(DOCUMENTS, _docs(["seed"], ["s"]), "seed")
    n = {"i": 0}

    from finelake.lake import key_buckets

    target = set(key_buckets(pa.array(["mine", "seed"])).to_pylist())
    same = [k for k in (f"other-{i}" for i in range(20000))
            if key_buckets(pa.array([k])).to_pylist()[0] in target]  # rows the merge reads

    def interfere(tdef):
        n["i"] += 1
        other.merge(tdef, _docs([same[n["i"]]], ["o"]), "other")

    lake._before_commit = interfere
    with pytest.raises(LakeError, match=r"conflicted with another writer's commit 3 times.*rerunning is safe"):
        lake.merge(DOCUMENTS, _docs(["mine", "seed"], ["m", "s"]), "mine")
    assert n["i"] == 3 and "mine" not in _stats(lake, DOCUMENTS).column("doc_id").to_pylist()
    lake._before_commit = None
    assert lake.merge(DOCUMENTS, _docs(["mine", "seed"], ["m", "s"]), "mine").inserted == 1
