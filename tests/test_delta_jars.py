"""finelake.delta_jars and the session settings that put them on the classpath."""

from __future__ import annotations

import json

import pytest

from finelake import delta_jars
from finelake.config import load_config
from finelake.spark import delta_conf


def _fake_fetch(folder, names=("io.delta_delta-spark_2.13-4.4.0.jar", "io.delta_delta-storage-4.4.0.jar")):
    folder.mkdir(parents=True)
    jars = []
    for n in names:
        (folder / n).write_bytes(b"PK" + n.encode())
        jars.append({"file": n, "size": len(n) + 2, "sha256": "-"})
    (folder / delta_jars.MANIFEST).write_text(json.dumps({"coordinates": delta_jars.COORDINATES, "jars": jars}))
    return folder


def test_installed_jars_needs_a_complete_matching_fetch(tmp_path):
    folder = _fake_fetch(tmp_path / "jars")
    got = delta_jars.installed_jars(folder)
    assert [p.rsplit("/", 1)[1] for p in got] == ["io.delta_delta-spark_2.13-4.4.0.jar",
                                                  "io.delta_delta-storage-4.4.0.jar"]
    (folder / "io.delta_delta-storage-4.4.0.jar").write_bytes(b"truncated")
    assert delta_jars.installed_jars(folder) == []  # wrong size: a broken copy is no fetch
    other = _fake_fetch(tmp_path / "other")
    m = json.loads((other / delta_jars.MANIFEST).read_text())
    (other / delta_jars.MANIFEST).write_text(json.dumps({**m, "coordinates": "io.delta:delta-spark_2.13:3.0.0"}))
    assert delta_jars.installed_jars(other) == []  # another Delta version
    assert delta_jars.installed_jars(tmp_path / "missing") == []


@pytest.mark.parametrize("ivy_name, artifact", [
    ("org.apache.parquet_parquet-hadoop-1.16.0.jar", "parquet-hadoop"),
    ("io.delta_delta-spark_2.13-4.4.0.jar", "delta-spark_2.13"),
    ("com.github.luben_zstd-jni-1.5.7-3.jar", "zstd-jni"),
])
def test_artifact_names_match_sparks_jar_names(ivy_name, artifact):
    assert delta_jars._artifact_of(ivy_name) == artifact


def test_delta_conf_adds_jars_only_to_a_local_session_that_wants_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FINELAKE_DELTA_JARS", str(_fake_fetch(tmp_path / "jars")))
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    conf = delta_conf(load_config("local"))
    assert conf["spark.jars"].count(",") == 1 and "delta-spark_2.13-4.4.0.jar" in conf["spark.jars"]
    assert conf["spark.sql.catalog.spark_catalog"].endswith("DeltaCatalog")
    assert delta_conf(load_config("local", ["spark.delta=deltalake"])) == {}
    assert delta_conf(load_config("local", ["spark.master=yarn"])) == {}  # clusters ship Delta
    own = load_config("local")
    own.spark.conf = {**own.spark.conf, "spark.jars.packages": "io.delta:delta-spark_2.13:4.4.0"}
    assert delta_conf(own) == {}  # the profile brings its own
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "40000")  # spark-submit: classpath already fixed
    assert delta_conf(load_config("local")) == {}
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT")
    monkeypatch.setenv("FINELAKE_DELTA_JARS", str(tmp_path / "empty"))
    assert delta_conf(load_config("local")) == {}


def test_the_fetched_jars_are_what_the_test_session_runs_on(spark):
    from conftest import ENGINE

    if ENGINE != "delta-spark":
        pytest.skip("no Delta jars in this environment")
    listed = {j.rsplit("/", 1)[1] for j in spark.sparkContext.getConf().get("spark.jars").split(",")}
    assert {p.rsplit("/", 1)[1] for p in delta_jars.installed_jars()} == listed
    assert any(n.startswith("io.delta_delta-spark_2.13-" + delta_jars.DELTA_VERSION) for n in listed)
