"""The one Spark session finelake uses, and how it reaches Delta.

``local[*]`` (or the profile's master) on a laptop; on clusters ``spark-submit`` / Databricks
supply the session and :func:`get_spark` only adds settings. Which Delta engine is used is decided
once per session by :func:`delta_engine` and logged.
"""

from __future__ import annotations

import logging
import os
import sys

from finelake.config import FinelakeConfig

log = logging.getLogger(__name__)

_DELTA_SQL_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


def get_spark(cfg: FinelakeConfig):
    """Create (or join) the Spark session for ``cfg``.

    Executors use this interpreter (``PYSPARK_PYTHON``) unless the environment says otherwise.
    With ``spark.delta: delta-spark`` the Delta SQL extension and catalog are configured.
    """
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    b = SparkSession.builder.appName(cfg.spark.app_name)
    if cfg.spark.master:
        b = b.master(cfg.spark.master)
    conf = dict(cfg.spark.conf)
    if cfg.spark.delta == "delta-spark":
        for k, v in _DELTA_SQL_CONF.items():
            conf.setdefault(k, v)
    for k, v in conf.items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("FINELAKE_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def _delta_classes_present(spark) -> bool:
    try:
        spark._jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")  # noqa: SLF001
        import delta  # noqa: F401  (python API of delta-spark)

        return True
    except Exception:  # Py4J error, Spark Connect without _jvm, or no python package
        return False


def delta_engine(cfg: FinelakeConfig, spark) -> str:
    """``"delta-spark"`` or ``"deltalake"`` for this session.

    Raises:
        RuntimeError: the profile demands delta-spark and its classes are not on the classpath
            (there is no silent fallback to another format).
    """
    want = cfg.spark.delta
    if want == "deltalake":
        return "deltalake"
    present = _delta_classes_present(spark)
    if want == "delta-spark" and not present:
        raise RuntimeError(
            "spark.delta is 'delta-spark' but io.delta classes are not on the classpath: add the "
            "Delta jars (Databricks and EMR ship them) or set spark.delta: deltalake")
    engine = "delta-spark" if present else "deltalake"
    log.info("Delta engine: %s", engine)
    return engine
