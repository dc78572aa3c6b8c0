"""Shared fixtures: one local Spark session for the whole run, a fresh lake folder per test."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def spark():
    """Small local Spark: 2 cores, UI off, few shuffle partitions, Arrow on."""
    from pyspark.sql import SparkSession

    s = (SparkSession.builder.master("local[2]").appName("finelake-tests")
         .config("spark.ui.enabled", "false")
         .config("spark.sql.shuffle.partitions", "2")
         .config("spark.default.parallelism", "2")
         .config("spark.sql.execution.arrow.pyspark.enabled", "true")
         .config("spark.python.worker.reuse", "true")
         .config("spark.driver.memory", "2g")
         .getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


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

    return Lake(cfg.lake, spark, engine="deltalake", database="finelake_test")
