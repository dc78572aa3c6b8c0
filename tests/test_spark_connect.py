"""A Spark Connect session (Databricks serverless / shared access) is named as such, not reported
as Delta jars missing from the classpath."""

from __future__ import annotations

import pytest

from finelake.config import load_config
from finelake.spark import delta_engine, is_spark_connect


def test_spark_connect_session_is_named(spark):
    # The class pyspark.sql.connect.session.SparkSession, as far as the check looks (its module);
    # a real Connect session needs a server this test does not start.
    connect_like = type("SparkSession", (), {"__module__": "pyspark.sql.connect.session"})()
    assert is_spark_connect(connect_like) and not is_spark_connect(spark)
    for profile in ("databricks", "local"):
        with pytest.raises(RuntimeError, match="Spark Connect session.*dedicated"):
            delta_engine(load_config(profile), connect_like)
