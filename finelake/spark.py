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


def delta_conf(cfg: FinelakeConfig) -> dict[str, str]:
    """The settings that put Delta on a session this process starts: the fetched jars
    (:mod:`finelake.delta_jars`) on ``spark.jars`` plus the Delta SQL extension and catalog.

    Empty when the profile says ``deltalake``, when the profile brings its own jars
    (``spark.jars`` / ``spark.jars.packages`` in ``spark.conf``), when the master is not local
    (clusters ship Delta), under ``spark-submit`` (its driver JVM is already running: pass
    ``--jars "$(finelake delta-jars --list)"``), or when no jars were fetched.
    """
    from finelake import delta_jars

    own = {"spark.jars", "spark.jars.packages"} & set(cfg.spark.conf)
    local = (cfg.spark.master or "").startswith("local")
    if cfg.spark.delta == "deltalake" or own or not local:
        return {}
    if _under_spark_submit():
        return {}  # the driver JVM is running: its classpath is spark-submit's (see delta_engine)
    jars = delta_jars.installed_jars()
    if not jars:
        if cfg.spark.delta == "delta-spark":
            log.warning("no Delta jars in %s: run `finelake delta-jars` (make setup does)",
                        delta_jars.jars_dir())
        return {}
    return {"spark.jars": ",".join(jars), **_DELTA_SQL_CONF}


def _under_spark_submit() -> bool:
    """A Python app started by spark-submit: the driver JVM (and its classpath) already exists."""
    return bool(os.environ.get("PYSPARK_GATEWAY_PORT"))


def get_spark(cfg: FinelakeConfig):
    """Create (or join) the Spark session for ``cfg``.

    Executors use this interpreter (``PYSPARK_PYTHON``) unless the environment says otherwise.
    A local session gets the fetched Delta jars (:func:`delta_conf`); with ``spark.delta:
    delta-spark`` the Delta SQL extension and catalog are configured in any case.
    """
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    b = SparkSession.builder.appName(cfg.spark.app_name)
    if cfg.spark.master:
        b = b.master(cfg.spark.master)
    conf = {**delta_conf(cfg), **cfg.spark.conf}
    if cfg.spark.delta == "delta-spark":
        for k, v in _DELTA_SQL_CONF.items():
            conf.setdefault(k, v)
    for k, v in conf.items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("FINELAKE_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def is_spark_connect(spark) -> bool:
    """True for a Spark Connect session (no JVM in this process: ``pyspark.sql.connect``)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def _delta_classes_present(spark) -> bool:
    try:
        # spark.jars live in Spark's own class loader, not the JVM's system one: ask the thread's.
        jvm = spark._jvm  # noqa: SLF001
        jvm.java.lang.Thread.currentThread().getContextClassLoader().loadClass(
            "io.delta.tables.DeltaTable")
        import delta  # noqa: F401  (python API of delta-spark)

        return True
    except Exception:  # Py4J error, Spark Connect without _jvm, or no python package
        return False


def delta_engine(cfg: FinelakeConfig, spark) -> str:
    """``"delta-spark"`` or ``"deltalake"`` for this session.

    Raises:
        RuntimeError: a Spark Connect session (said as such, not as a missing classpath), or the
            profile demands delta-spark and its classes are not on the classpath (there is no
            silent fallback to another format).
    """
    want = cfg.spark.delta
    if is_spark_connect(spark):
        raise RuntimeError(
            "this is a Spark Connect session (Databricks serverless or standard/shared access "
            "mode, or SPARK_REMOTE): finelake's stages need a classic Spark session (SparkContext "
            "accumulators, addFile, Python-worker environment, GPU resources); run on a cluster in "
            "dedicated (single-user) access mode, or unset SPARK_REMOTE")
    if want == "deltalake":
        return "deltalake"
    present = _delta_classes_present(spark)
    if want == "delta-spark" and not present:
        raise RuntimeError(
            "spark.delta is 'delta-spark' but io.delta classes are not on the classpath: add the "
            "Delta jars (Databricks and EMR ship them; locally `finelake delta-jars` fetches them "
            "from Maven Central) or set spark.delta: deltalake")
    if not present and _under_spark_submit():
        from finelake import delta_jars

        if delta_jars.installed_jars():
            log.warning("spark-submit without the Delta jars: writing Delta through delta-rs. For "
                        "Spark MERGE pass spark-submit --jars \"$(finelake delta-jars --list)\" "
                        "--conf spark.sql.extensions=%s --conf spark.sql.catalog.spark_catalog=%s",
                        _DELTA_SQL_CONF["spark.sql.extensions"],
                        _DELTA_SQL_CONF["spark.sql.catalog.spark_catalog"])
    engine = "delta-spark" if present else "deltalake"
    log.info("Delta engine: %s", engine)
    return engine
