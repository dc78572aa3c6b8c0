"""The template index published at a URI (through Hadoop's FileSystem) and shipped to executors
with SparkContext.addFile: ``file://`` exercises the same code path as ``s3://`` or ``dbfs:/``."""

from __future__ import annotations

import json
import os
from importlib import resources

import pytest

from finelake import storage
from finelake.config import load_config
from finelake.jobs import index, match
from finelake.jobs.common import arrow_from_rows
from finelake.runtime import FinelakeError, StageContext
from finelake.tables import DOCUMENTS, GENERICIZATIONS, TEMPLATES

DESCRIPTIONS = ["a recipe or cooking guide", "a news article about business or finance",
                "a biography of a historical person", "a scientific explanation of a natural process",
                "a product review or buying guide"]


def test_is_uri_and_join():
    assert storage.is_uri("s3://bucket/lake") and storage.is_uri("dbfs:/Volumes/x")
    assert storage.is_uri("file:///tmp/x")
    assert not storage.is_uri("/Volumes/main/x") and not storage.is_uri("lake/_index")
    assert not storage.is_uri("C:/data")  # a Windows drive letter is not a scheme
    assert storage.join("s3://b/lake/", "_index", "LATEST") == "s3://b/lake/_index/LATEST"
    assert storage.join("lake", "_index") == os.path.join("lake", "_index")
    # lake roots: URIs as given (one slash after the scheme too), local paths absolute
    assert storage.root("dbfs:/Volumes/main/lake") == "dbfs:/Volumes/main/lake"
    assert storage.root("lake") == os.path.abspath("lake")
    from finelake.lake import Lake

    # the databricks profile's lake: its tables must not become a local "dbfs:" folder
    assert Lake("dbfs:/Volumes/main/finelake/lake", None).path("pairs") == \
        "dbfs:/Volumes/main/finelake/lake/pairs"


@pytest.mark.parametrize("uri", [True, False])
def test_text_and_directory_round_trip(spark, tmp_path, uri):
    root = f"file://{tmp_path}/store" if uri else str(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"\x00\x01")
    (src / "meta.json").write_text("{}")
    dest = storage.join(root, "v1")
    assert not storage.exists(spark, dest)
    storage.put_dir(spark, str(src), dest, last="meta.json")
    assert storage.exists(spark, storage.join(dest, "meta.json"))
    assert (tmp_path / "store" / "v1" / "a.bin").read_bytes() == b"\x00\x01"
    storage.write_text(spark, storage.join(root, "LATEST"), "first")
    storage.write_text(spark, storage.join(root, "LATEST"), "second ü")
    assert storage.read_text(spark, storage.join(root, "LATEST")) == "second ü"
    assert storage.listdir(spark, root) == ["LATEST"]  # files only, not the v1 directory
    assert [n for n in storage.listdir(spark, dest) if not n.endswith(".crc")] == ["a.bin", "meta.json"]
    assert storage.listdir(spark, storage.join(root, "nothing")) == []
    with pytest.raises(FileNotFoundError):
        storage.read_text(spark, storage.join(root, "missing"))


def test_a_uri_needs_a_classic_spark_session():
    with pytest.raises(RuntimeError, match="classic Spark session"):
        storage.read_text(None, "s3://bucket/lake/_index/LATEST")


def _lake(spark, lake_dir, index_path=None):
    overrides = ["match.thresholds.embedded:all-minilm-l6-v2=0.0", "run.max_documents=6"]
    if index_path:
        overrides.append(f"index.path={index_path}")
    ctx = StageContext(load_config("local", overrides, lake=lake_dir), spark=spark)
    lines = resources.files("finelake.sample").joinpath("documents.jsonl").read_text(
        encoding="utf-8").splitlines()[:6]
    docs = [{"doc_id": f"d{i}", "text": json.loads(line)["text"], "source": "sample",
             "num_tokens": 100} for i, line in enumerate(lines)]
    tpls = [{"template_id": f"t{i}", "template": f"Tell me about <fi>topic {i}</fi>.",
             "compatible_document_description": d, "num_slots": 1, "source_query_ids": [f"q{i}"],
             "source_count": 1} for i, d in enumerate(DESCRIPTIONS)]
    gens = [{"query_id": f"q{i}", "status": "ok", "template_id": f"t{i}", "num_slots": 1}
            for i in range(len(DESCRIPTIONS))]
    for tdef, rows in ((DOCUMENTS, docs), (TEMPLATES, tpls), (GENERICIZATIONS, gens)):
        ctx.lake.merge(tdef, arrow_from_rows(rows, tdef), ctx.run_id)
    return ctx


def _matches(ctx):
    return sorted((r["doc_id"], r["template_id"], round(r["score"], 5))
                  for r in ctx.lake.read(match.MATCHES).collect())


def test_index_at_a_uri_is_published_there_and_shipped_to_executors(spark, tmp_path):
    remote = _lake(spark, str(tmp_path / "lake_r"), index_path=f"file://{tmp_path}/published")
    with pytest.raises(FinelakeError, match="run 'finelake index' first"):
        index.latest_index(remote.cfg, spark)
    index.run_index(remote)
    latest = index.latest_index(remote.cfg, spark)
    assert latest["path"].startswith("file://")
    assert {"ids.json", "index.faiss", "meta.json"} <= set(
        os.listdir(tmp_path / "published" / latest["version"]))
    assert not os.path.exists(tmp_path / "lake_r" / "_index")  # nothing written beside the lake
    index.run_index(remote)  # same templates: the published index is reused
    assert index.latest_index(remote.cfg, spark)["version"] == latest["version"]
    match.run_match(remote)

    local = _lake(spark, str(tmp_path / "lake_l"))
    index.run_index(local)
    match.run_match(local)
    got = _matches(remote)
    assert got and got == _matches(local)  # same candidates whichever way the index travelled


def test_run_statistics_of_a_lake_at_a_uri(spark, tmp_path):
    from finelake.jobs.common import save_run_stats
    from finelake.jobs.report import _latest_run
    from finelake.runtime import StageStats

    lake = f"file://{tmp_path}/lake"
    stats = []
    for name, rows in (("genericize", 3), ("match", 5)):
        st = StageStats(name)
        st.rows_in = rows
        stats.append(st.finish())
    for run_id in ("20260101T000000Z-a", "20260102T000000Z-b"):
        ctx = StageContext(load_config("local", lake=lake), run_id=run_id, spark=spark)
        path = save_run_stats(ctx, stats)
        assert path == f"{lake}/_runs/{run_id}.json"
    latest = _latest_run(lake, spark)
    assert latest["run_id"] == "20260102T000000Z-b"
    assert [(s["stage"], s["rows_in"]) for s in latest["stages"]] == [("genericize", 3), ("match", 5)]
    assert os.path.isfile(tmp_path / "lake" / "_runs" / "20260101T000000Z-a.json")
