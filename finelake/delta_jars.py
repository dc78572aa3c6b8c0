"""The Delta Lake jars for local Spark: resolved once from Maven Central, kept in the virtualenv.

Clusters ship Delta (Databricks Runtime; EMR's ``/usr/share/aws/delta/lib``) and never use this.
On a laptop or CI machine ``make setup`` runs ``finelake delta-jars fetch``, which resolves
``io.delta:delta-spark_2.13:<DELTA_VERSION>`` and its runtime dependencies with Spark's own resolver
(Ivy, as ``spark.jars.packages`` does) from Maven Central, leaves out the jars Spark already
ships (Spark's own, newer copies come first on the classpath anyway), and copies the rest with a
``manifest.json`` into ``<virtualenv>/share/finelake/delta-jars/<version>/``.
:func:`finelake.spark.get_spark` then puts those files on ``spark.jars``: a session start never
touches the network, and the same jars serve every run and test.

``FINELAKE_DELTA_JARS`` points at another folder (a shared cache, a folder filled by hand from
``~/.m2``); ``FINELAKE_MAVEN_REPOSITORIES`` (comma-separated URLs) adds mirrors for the resolve.
Without the jars, local Spark writes Delta through delta-rs (:mod:`finelake.lake`), the same
table contents by another engine; a profile that says ``spark.delta: delta-spark`` fails instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from finelake.errors import FinelakeError

DELTA_VERSION = "4.0.0"
"""The delta-spark release for Spark 4.0 (``pyspark==4.0.2``): the Delta that EMR emr-spark-8.0.0
ships with Spark 4.0.2, so local runs and tests use the clusters' versions. The Python package
``delta-spark`` is pinned to the same version in ``setup.py``."""
SCALA_VERSION = "2.13"
COORDINATES = f"io.delta:delta-spark_{SCALA_VERSION}:{DELTA_VERSION}"
MANIFEST = "manifest.json"
_VERSIONED_JAR = re.compile(r"^(?P<artifact>.+?)-(?P<version>\d[^/]*)\.jar$")

__all__ = ["DELTA_VERSION", "COORDINATES", "jars_dir", "installed_jars", "fetch", "DeltaJarsError"]


class DeltaJarsError(FinelakeError):
    """The Delta jars could not be resolved or copied (no route to Maven Central, bad folder)."""


def jars_dir() -> Path:
    """Where the jars live: ``$FINELAKE_DELTA_JARS``, else
    ``<sys.prefix>/share/finelake/delta-jars/<DELTA_VERSION>`` (inside the virtualenv)."""
    env = os.environ.get("FINELAKE_DELTA_JARS")
    if env:
        return Path(env)
    return Path(sys.prefix) / "share" / "finelake" / "delta-jars" / DELTA_VERSION


def installed_jars(folder: Optional[Path] = None) -> list[str]:
    """Absolute paths of the fetched jars, or ``[]`` when the folder has no complete fetch (no
    manifest, another Delta version, or a listed jar missing or of the wrong size)."""
    folder = Path(folder) if folder else jars_dir()
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if manifest.get("coordinates") != COORDINATES:
        return []
    out = []
    for j in manifest.get("jars", []):
        p = folder / j["file"]
        if not p.is_file() or p.stat().st_size != j["size"]:
            return []
        out.append(str(p.resolve()))
    return out


def _spark_jar_artifacts() -> set[str]:
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    out = set()
    for p in jars.glob("*.jar"):
        m = _VERSIONED_JAR.match(p.name)
        out.add(m.group("artifact") if m else p.stem)
    return out


def _artifact_of(ivy_name: str) -> str:
    """``org.apache.parquet_parquet-hadoop-1.16.0.jar`` -> ``parquet-hadoop`` (Ivy's retrieve
    pattern is ``[organisation]_[artifact]-[revision].jar``)."""
    rest = ivy_name.split("_", 1)[1] if "_" in ivy_name else ivy_name
    m = _VERSIONED_JAR.match(rest)
    return m.group("artifact") if m else rest[:-4]


_RESOLVE = """
import sys
from pyspark.sql import SparkSession
b = (SparkSession.builder.master("local[1]").appName("finelake-delta-jars")
     .config("spark.jars.packages", sys.argv[1]).config("spark.jars.ivy", sys.argv[2])
     .config("spark.ui.enabled", "false"))
if sys.argv[3]:
    b = b.config("spark.jars.repositories", sys.argv[3])
s = b.getOrCreate()
s.stop()
"""


def fetch(dest: Optional[Path] = None, force: bool = False, timeout_s: int = 900) -> list[str]:
    """Resolve the Delta jars from Maven Central and install them into ``dest`` (default
    :func:`jars_dir`). A folder that already holds a complete fetch is kept unless ``force``.

    Returns:
        The installed jar paths (what :func:`installed_jars` returns afterwards).

    Raises:
        DeltaJarsError: the resolve failed (the message carries the resolver's last lines) or
            produced no delta-spark jar.
    """
    dest = Path(dest) if dest else jars_dir()
    if not force and installed_jars(dest):
        return installed_jars(dest)
    with tempfile.TemporaryDirectory(prefix="finelake-ivy-") as ivy:
        repos = os.environ.get("FINELAKE_MAVEN_REPOSITORIES", "")
        env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
        try:
            proc = subprocess.run([sys.executable, "-c", _RESOLVE, COORDINATES, ivy, repos],
                                  capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired as exc:
            raise DeltaJarsError(f"resolving {COORDINATES} took over {timeout_s}s") from exc
        resolved = sorted(Path(ivy, "jars").glob("*.jar"))
        if proc.returncode != 0 or not any(p.name.startswith("io.delta_delta-spark_") for p in resolved):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise DeltaJarsError(f"could not resolve {COORDINATES} from Maven Central "
                                 f"(exit {proc.returncode}); set FINELAKE_MAVEN_REPOSITORIES to a "
                                 f"mirror, or run with spark.delta: deltalake.\n{tail}")
        spark_has = _spark_jar_artifacts()
        keep = [p for p in resolved if _artifact_of(p.name) not in spark_has]
        skipped = [p.name for p in resolved if p not in keep]
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        jars = []
        for p in keep:
            shutil.copyfile(p, staging / p.name)
            jars.append({"file": p.name, "size": p.stat().st_size,
                         "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
        manifest = {"coordinates": COORDINATES, "source": "Maven Central via Spark's Ivy resolver",
                    "repositories": repos or None, "jars": jars,
                    "not_copied_spark_ships_them": skipped,
                    "licence": "Delta Lake: Apache-2.0; dependencies: see each jar's META-INF"}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return installed_jars(dest)
