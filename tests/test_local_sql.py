"""Reads without Spark: delta-rs's own reader (read_delta) and SQL engine (finelake sql --engine local).

The lakes here are written by delta-rs (no Spark needed) and checked against what an independent
reader sees: the snapshot's Parquet files read with pyarrow, in the log's order.
"""

import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import delta_snapshot
from deltalake import DeltaTable

from finelake.lake import Lake, LakeError, read_delta
from finelake.lake.query import LocalSQL, WriteRefused, show_string
from finelake.tables import ALL_TABLES, DOCUMENTS, PAIRS, TEMPLATES


def _docs(ids, texts, tokens=None):
    return pa.table({"doc_id": ids, "text": texts, "source": ["t"] * len(ids),
                     "num_tokens": tokens if tokens is not None else [len(t or "") for t in texts]})


@pytest.fixture
def lake(tmp_path):
    lk = Lake(str(tmp_path / "lake"), None)
    lk.merge(DOCUMENTS, _docs(["a", "b"], ["one", "two"]), "r1")
    lk.merge(DOCUMENTS, _docs(["c", "d"], ["three", None]), "r2")
    lk.merge(DOCUMENTS, _docs(["a", "e"], ["ONE", "five"]), "r3", update=True)  # rewrites a's file
    return lk


def test_read_delta_is_the_snapshot_in_file_order_with_declared_types(lake):
    path = lake.path(DOCUMENTS)
    got = read_delta(path)
    want = delta_snapshot(path)
    assert got.schema == want.schema and got.schema.field("text").type == pa.string()  # not string_view
    assert got.equals(want)  # same rows, same order: a removed file's old "a" is not there
    assert sorted(got.column("doc_id").to_pylist()) == ["a", "b", "c", "d", "e"]
    assert read_delta(path, 1).equals(delta_snapshot(path, 1))
    assert read_delta(path, 1, ["text", "doc_id"]).column_names == ["text", "doc_id"]
    assert read_delta(DeltaTable(path, version=2), columns=["doc_id"]).num_rows == 4
    assert read_delta(path, columns=["doc_id"], limit=2).equals(want.select(["doc_id"]).slice(0, 2))
    assert lake.read_arrow(DOCUMENTS).column_names == DOCUMENTS.columns  # key_bucket left out
    empty = Lake(str(lake.root), None)
    empty.create(TEMPLATES)
    assert read_delta(empty.path(TEMPLATES)).schema.names[:2] == ["template_id", "template"]
    assert read_delta(empty.path(TEMPLATES)).num_rows == 0


def test_local_sql_answers_under_spark_names_and_refuses_writes(lake):
    q = LocalSQL(lake, ALL_TABLES.values())
    assert q.names == {"finelake.documents": lake.version(DOCUMENTS)}  # only tables that exist
    rows, more = q.sql("SELECT doc_id, text FROM finelake.documents ORDER BY doc_id")
    assert not more and rows.to_pylist() == [
        {"doc_id": "a", "text": "ONE"}, {"doc_id": "b", "text": "two"}, {"doc_id": "c", "text": "three"},
        {"doc_id": "d", "text": None}, {"doc_id": "e", "text": "five"}]
    assert q.sql("select COUNT(*) AS n from FineLake.Documents")[0].column("n").to_pylist() == [5]
    rows, more = q.sql("SELECT doc_id FROM finelake.documents", limit=2)
    assert rows.num_rows == 2 and more
    assert q.count("finelake.documents") == 5
    assert q.sql("EXPLAIN SELECT * FROM finelake.documents")[0].num_rows >= 1
    shown = q.sql("SHOW TABLES")[0].to_pylist()
    assert {"table_schema": "finelake", "table_name": "documents"}.items() <= next(
        r for r in shown if r["table_name"] == "documents").items()
    for stmt in ("DELETE FROM finelake.documents", "UPDATE finelake.documents SET text = 'x'",
                 "INSERT INTO finelake.documents (doc_id) VALUES ('z')",
                 "COPY (SELECT 1) TO '/tmp/finelake-local-sql-copy.csv'",
                 "CREATE TABLE x AS SELECT 1", "DROP TABLE finelake.documents",
                 "EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/finelake-local-sql-copy.csv'",
                 "SET datafusion.execution.batch_size = 10"):
        with pytest.raises(WriteRefused, match="--engine spark"):
            q.sql(stmt)
    import os
    assert not os.path.exists("/tmp/finelake-local-sql-copy.csv")
    with pytest.raises(LakeError, match="--engine spark"):
        q.sql("SELECT size(array(1, 2))")  # Spark's function, not DataFusion's
    assert q.sql("SELECT count(*) AS n FROM finelake.documents")[0].column("n").to_pylist() == [5]
    assert len(read_delta(lake.path(DOCUMENTS))) == 5  # nothing was written


def test_show_string_prints_like_spark():
    t = pa.table({"id": ["a", "bb"], "n": [1, None], "ok": [True, False], "x": [0.25, 2.0],
                  "long": ["y" * 100, "z"], "tags": [["p", "q"], []]})
    assert show_string(t, more=True) == (
        "+---+----+-----+----+" + "-" * 80 + "+------+\n"
        "| id|   n|   ok|   x|" + " " * 76 + "long|  tags|\n"
        "+---+----+-----+----+" + "-" * 80 + "+------+\n"
        "|  a|   1| true|0.25|" + "y" * 77 + "...|[p, q]|\n"
        "| bb|NULL|false| 2.0|" + " " * 79 + "z|    []|\n"
        "+---+----+-----+----+" + "-" * 80 + "+------+\n"
        "only showing top 2 rows")


def test_sql_command_picks_the_engine(lake, monkeypatch):
    """auto is local for a local lake and profile (no Spark started: a session would fail here)."""
    import finelake.spark
    from finelake.cli import _local_sql_fits, cli
    from finelake.config import load_config

    monkeypatch.setattr(finelake.spark, "get_spark", lambda *a, **k: pytest.fail("Spark started"))
    r = CliRunner().invoke(cli, ["sql", "--lake", lake.root, "--limit", "1",
                                 "SELECT doc_id, num_tokens FROM finelake.documents ORDER BY doc_id"])
    assert r.exit_code == 0, r.output
    assert r.output == ("+------+----------+\n|doc_id|num_tokens|\n+------+----------+\n"
                        "|     a|         3|\n+------+----------+\nonly showing top 1 row\n")
    r = CliRunner().invoke(cli, ["sql", "--lake", lake.root, "DELETE FROM finelake.documents"])
    assert r.exit_code == 1 and "--engine spark" in r.output
    r = CliRunner().invoke(cli, ["tables", "--lake", lake.root])
    assert r.exit_code == 0 and f"documents        v{lake.version(DOCUMENTS):<4} rows=5 " in r.output
    assert f"{PAIRS.name:16} v-    rows=-" in r.output
    assert _local_sql_fits(load_config("local", lake=lake.root))
    assert _local_sql_fits(load_config("local", ["spark.master=null"], lake=f"file://{lake.root}"))
    assert not _local_sql_fits(load_config("local", ["spark.master=spark://host:7077"], lake=lake.root))
    assert not _local_sql_fits(load_config("emr"))  # an s3:// lake
    assert not _local_sql_fits(load_config("databricks", lake="abfss://c@a.dfs.core.windows.net/l"))


def test_local_sql_matches_spark_sql(spark, tmp_path):
    """The same query over the same lake gives the same rows and the same printed table through
    DataFusion as through Spark SQL (the delta-rs lake registered for Spark)."""
    from conftest import session_for

    s = session_for(spark, "deltalake")
    lk = Lake(str(tmp_path / "lake"), s, database="local_sql_parity")
    lk.merge(DOCUMENTS, _docs(["a", "b", "c"], ["one", None, "three"], [4, 5, 6]), "r1")
    query = ("SELECT doc_id, text, num_tokens, CAST(num_tokens AS DOUBLE) / 4 AS quarter, text IS NULL AS missing "
             "FROM local_sql_parity.documents ORDER BY doc_id")
    lk.register(DOCUMENTS)
    want = s.sql(query)
    got, more = LocalSQL(lk, [DOCUMENTS]).sql(query, limit=2)
    assert [tuple(r.values()) for r in got.to_pylist()] == [tuple(r) for r in want.collect()[:2]]
    assert show_string(got, more) == want._show_string(2, 80, False)


def test_the_lake_and_its_sql_import_no_spark():
    """finelake tables / sql / report start in about a second because importing the lake does
    not import PySpark (the delta-spark engine imports it in its methods)."""
    import subprocess
    import sys

    code = ("import sys, finelake.lake, finelake.lake.query, finelake.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyspark', 'delta', 'py4j')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
