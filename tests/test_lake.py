"""The Delta layer: real Delta tables, idempotent merges, run ids, version pins, SQL names.

Every behaviour is checked on both engines, delta-spark (Spark MERGE with the fetched jars, the
cluster code path) and delta-rs, and the two must leave identical tables behind.
"""

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from conftest import ENGINE, session_for
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
    rows = DeltaTable(lake.path(tdef), version=version).to_pyarrow_table().to_pylist()
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
