"""The Delta layer: real Delta tables, idempotent merges, run ids, version pins, SQL names."""

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from finelake.lake import Lake, LakeError, conform
from finelake.tables import DOCUMENTS, TEMPLATES


def _docs(ids, texts):
    return pa.table({"doc_id": ids, "text": texts, "source": ["t"] * len(ids),
                     "num_tokens": [len(t) for t in texts]})


def test_merge_is_idempotent_and_records_run_id(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    r1 = lake.merge(DOCUMENTS, _docs(["a", "b", "a"], ["x", "y", "x again"]), "run-1")
    assert (r1.inserted, r1.source_rows) == (2, 2)  # duplicate key in the source kept once
    r2 = lake.merge(DOCUMENTS, _docs(["a", "b", "c"], ["x", "y", "z"]), "run-2")
    assert (r2.inserted, r2.updated) == (1, 0)
    r3 = lake.merge(DOCUMENTS, _docs(["a", "b", "c"], ["x", "y", "z"]), "run-3")
    assert r3.inserted == 0 and r3.version is None  # nothing committed
    dt = DeltaTable(lake.path(DOCUMENTS))  # a real Delta table, read by delta-rs
    rows = dt.to_pyarrow_table().to_pylist()
    assert sorted(r["doc_id"] for r in rows) == ["a", "b", "c"]
    assert {r["doc_id"]: r["run_id"] for r in rows} == {"a": "run-1", "b": "run-1", "c": "run-2"}
    assert [h["run_id"] for h in lake.history(DOCUMENTS) if h["operation"] == "MERGE"] == ["run-2", "run-1"]


def test_update_when_limits_rewrites(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    t = pa.table({"template_id": ["t1"], "template": ["what is <fi>x</fi>"], "source_count": [1]})
    lake.merge(TEMPLATES, t, "r1", update=True, update_when="t.source_count <> s.source_count")
    v = lake.version(TEMPLATES)
    same = lake.merge(TEMPLATES, t, "r2", update=True, update_when="t.source_count <> s.source_count")
    assert same.version is None and lake.version(TEMPLATES) == v
    t2 = t.set_column(2, "source_count", pa.array([2]))
    changed = lake.merge(TEMPLATES, t2, "r3", update=True, update_when="t.source_count <> s.source_count")
    assert changed.updated == 1
    assert lake.read_arrow(TEMPLATES).column("source_count").to_pylist() == [2]


def test_conform_rejects_missing_key_and_bad_types():
    with pytest.raises(LakeError, match="key column 'doc_id'"):
        conform(DOCUMENTS, pa.table({"text": ["x"]}))
    with pytest.raises(LakeError, match="num_tokens"):
        conform(DOCUMENTS, pa.table({"doc_id": ["a"], "num_tokens": ["many"]}))


def test_spark_reads_snapshot_pins_versions_and_sql(spark, tmp_path):
    lake = Lake(str(tmp_path / "lake"), spark, engine="deltalake", database="lake_test")
    lake.merge(DOCUMENTS, _docs(["a"], ["one"]), "r1")
    v1 = lake.version(DOCUMENTS)
    lake.merge(DOCUMENTS, _docs(["a", "b"], ["changed", "two"]), "r2", update=True)
    assert sorted(r["text"] for r in lake.read(DOCUMENTS).collect()) == ["changed", "two"]
    # the merge rewrote a's file: a plain Parquet read would see both versions of "a"
    assert [r["text"] for r in lake.read(DOCUMENTS, version=v1).collect()] == ["one"]
    name = lake.register(DOCUMENTS)
    assert name == "lake_test.documents"
    got = spark.sql(f"SELECT doc_id, text FROM {name} ORDER BY doc_id").collect()
    assert [(r["doc_id"], r["text"]) for r in got] == [("a", "changed"), ("b", "two")]


def test_read_missing_table_is_a_clear_error(spark, tmp_path):
    lake = Lake(str(tmp_path / "lake"), spark)
    with pytest.raises(LakeError, match="does not exist"):
        lake.read(DOCUMENTS)
