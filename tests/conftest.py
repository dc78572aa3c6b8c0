"""Shared fixtures: one local Spark session for the whole run, a fresh lake folder per test.

The session carries the Delta jars that ``make setup`` fetched (:mod:`finelake.delta_jars`), so
every stage test runs the cluster code path (Spark MERGE, ``USING DELTA``, ``VERSION AS OF``);
the delta-rs engine is tested beside it where a test asks for both (``tests/test_lake.py``).
``FINELAKE_TEST_DELTA=deltalake`` runs the whole suite on delta-rs instead; with
``FINELAKE_TEST_DELTA=delta-spark`` missing jars are an error rather than a fallback.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _engine() -> str:
    from finelake.delta_jars import installed_jars, jars_dir

    want = os.environ.get("FINELAKE_TEST_DELTA")
    if want == "delta-spark" and not installed_jars():
        raise RuntimeError(f"FINELAKE_TEST_DELTA=delta-spark but no Delta jars in {jars_dir()}: "
                           "run `make setup` (or `.venv/bin/finelake delta-jars`)")
    if want:
        return want
    return "delta-spark" if installed_jars() else "deltalake"


ENGINE = _engine()
"""The Delta engine of the test session's stages: ``delta-spark`` wherever the jars are."""


def pytest_report_header(config):
    return f"finelake Delta engine: {ENGINE}"


@pytest.fixture(scope="session")
def spark():
    """Small local Spark: 2 cores, UI off, few shuffle partitions, Arrow on."""
    from pyspark.sql import SparkSession

    from finelake.config import load_config
    from finelake.spark import delta_conf

    b = SparkSession.builder
    if ENGINE == "delta-spark":
        for k, v in delta_conf(load_config("local")).items():
            b = b.config(k, v)
    s = (b.master("local[2]").appName("finelake-tests")
         .config("spark.databricks.delta.snapshotPartitions", "2")
         .config("spark.ui.enabled", "false")
         .config("spark.ui.showConsoleProgress", "false")
         .config("spark.sql.shuffle.partitions", "2")
         .config("spark.default.parallelism", "2")
         .config("spark.sql.execution.arrow.pyspark.enabled", "true")
         .config("spark.python.worker.reuse", "true")
         # One session serves the whole suite: 2g filled its old generation after ~300 tests
         # and the JVM spent its time in full GCs (1,745 of them, 811 s, in one CI run).
         .config("spark.driver.memory", "4g")
         # The status store keeps every job's tasks and SQL metrics for the UI even with the UI
         # off (a heap histogram after ~250 tests: 1.8 GB of long[], 618k BitSets, 67k TaskDataWrapper);
         # a test session needs few of them.
         .config("spark.ui.retainedJobs", "50")
         .config("spark.ui.retainedStages", "50")
         .config("spark.ui.retainedTasks", "2000")
         .config("spark.sql.ui.retainedExecutions", "20")
         .getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


def sample_slice(tmp, name: str, n: int) -> str:
    """The first ``n`` lines of a shipped sample file (``finelake.sample/<name>``) written under
    ``tmp``; returns the new file's path."""
    from importlib import resources

    rows = resources.files("finelake.sample").joinpath(name).read_text(encoding="utf-8").split("\n")
    path = tmp / name
    path.write_text("\n".join(rows[:n]) + "\n", encoding="utf-8")
    return str(path)


def delta_snapshot(path: str, version=None):
    """A Delta table's rows read without finelake: the snapshot's Parquet files (delta-rs lists
    them) read with pyarrow's own file system, in the log's order, cast to the table's schema
    (columns a file predates are null). Not ``DeltaTable.to_pyarrow_table()``: its scan can abort
    the test process at exit (see :func:`finelake.lake.rs.read_delta`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    dt = DeltaTable(path, version=version)
    schema = pa.schema(dt.schema().to_arrow())
    parts = []
    for uri in dt.file_uris():
        t = pq.read_table(uri[len("file://"):] if uri.startswith("file://") else uri)
        parts.append(pa.Table.from_arrays(
            [t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
             for f in schema], schema=schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


_SESSIONS: dict = {}


def session_for(spark, engine: str):
    """The session a Lake of ``engine`` should use. delta-rs tables are registered for SQL
    through a Python data source, which Delta's catalog refuses, so that engine gets a session of
    its own (same SparkContext) on the plain session catalog: what a machine without the jars has."""
    if engine == "delta-spark" or "DeltaCatalog" not in spark.conf.get("spark.sql.catalog.spark_catalog", ""):
        return spark
    if engine not in _SESSIONS:
        s = spark.newSession()
        s.conf.unset("spark.sql.catalog.spark_catalog")
        _SESSIONS[engine] = s
    return _SESSIONS[engine]


@pytest.fixture
def lake_dir(tmp_path):
    d = tmp_path / "lake"
    d.mkdir()
    return str(d)


@pytest.fixture
def cfg(lake_dir):
    """The local profile pointed at a fresh lake."""
    from finelake.config import load_config

    return load_config("local", lake=lake_dir)


@pytest.fixture
def lake(spark, cfg):
    from finelake.lake import Lake

    return Lake(cfg.lake, spark, engine=ENGINE, database="finelake_test")
