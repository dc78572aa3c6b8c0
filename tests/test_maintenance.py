"""``finelake optimize``: compaction by key bucket, and VACUUM that keeps pinned versions readable."""

import datetime as dt

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from conftest import ENGINE, session_for
from finelake.lake import KEY_BUCKET, Lake
from finelake.maintenance import mlflow_pins, optimize_lake, retention_hours
from finelake.tables import DOCUMENTS

ENGINES = ["deltalake", pytest.param("delta-spark", marks=pytest.mark.skipif(
    ENGINE != "delta-spark", reason="no Delta jars in this environment (make setup fetches them)"))]


def _docs(ids, text):
    return pa.table({"doc_id": ids, "text": [f"{text} {i}" for i in ids]})


def _history(lake):
    """Three versions whose later merges rewrite the files of the first (removed files)."""
    lake.merge(DOCUMENTS, _docs(["a", "b"], "one"), "r1")
    v1 = lake.version(DOCUMENTS)
    lake.merge(DOCUMENTS, _docs(["c"], "two"), "r2")
    lake.merge(DOCUMENTS, _docs(["a", "b", "c", "d"], "three"), "r3", update=True)
    lake.merge(DOCUMENTS, _docs(["e"], "three"), "r4")  # a second live file for OPTIMIZE
    return v1


def test_retention_keeps_the_oldest_pin():
    now = dt.datetime(2026, 1, 10, 12, tzinfo=dt.timezone.utc)
    assert retention_hours(None, 168, now) == 168
    assert retention_hours(now - dt.timedelta(hours=2, minutes=1), 0, now) == 4  # 3 h + 1
    assert retention_hours(now - dt.timedelta(days=30), 168, now) == 30 * 24 + 1


@pytest.mark.parametrize("engine", ENGINES)
def test_optimize_compacts_and_vacuum_keeps_pinned_versions(spark, cfg, engine):
    lake = Lake(cfg.lake, session_for(spark, engine) if engine == "delta-spark" else None, engine=engine)
    v1 = _history(lake)
    cfg.maintenance.min_retention_hours = 0
    cfg.maintenance.mlflow_pins = False
    cfg.maintenance.pinned_versions = {"documents": [v1]}

    dry = optimize_lake(cfg, lake, ["documents"], dry_run=True)
    assert dry[0].pinned == [v1] and dry[0].retention_hours == 2 and dry[0].vacuumed == []
    (r,) = optimize_lake(cfg, lake, ["documents"])
    assert r.files_removed >= 2 and r.files_added >= 1 and r.vacuumed == []
    pinned = DeltaTable(lake.path(DOCUMENTS), version=v1).to_pyarrow_table()  # time travel reads
    assert sorted(pinned.column("text").to_pylist()) == ["one a", "one b"]
    latest = lake.read_arrow(DOCUMENTS)
    assert sorted(latest.column("text").to_pylist()) == ["three a", "three b", "three c", "three d", "three e"]
    assert KEY_BUCKET not in latest.column_names

    # no pin and no minimum: the files only old versions use go (dry run lists them first)
    cfg.maintenance.pinned_versions = {}
    (dry,) = optimize_lake(cfg, lake, ["documents"], dry_run=True, compact=False)
    assert dry.retention_hours == 0 and len(dry.vacuumed) >= 2
    (done,) = optimize_lake(cfg, lake, ["documents"], compact=False)
    assert sorted(done.vacuumed) == sorted(dry.vacuumed)
    assert sorted(lake.read_arrow(DOCUMENTS).column("text").to_pylist()) == \
        ["three a", "three b", "three c", "three d", "three e"]
    with pytest.raises(Exception):
        DeltaTable(lake.path(DOCUMENTS), version=v1).to_pyarrow_table()


def test_vacuum_refuses_a_pin_the_log_no_longer_has(cfg):
    lake = Lake(cfg.lake, None, engine="deltalake")
    _history(lake)
    cfg.maintenance.mlflow_pins = False
    cfg.maintenance.pinned_versions = {"documents": [99]}
    (r,) = optimize_lake(cfg, lake, ["documents"], dry_run=True)
    assert "pinned version 99 is no longer in the Delta log" in r.refused and r.vacuumed == []


def test_training_runs_pin_versions_through_mlflow(cfg):
    """The tags jobs/train.py logs (finelake.table_path / finelake.table_version) are the pins."""
    import mlflow

    from finelake.jobs.train import setup_mlflow

    lake = Lake(cfg.lake, None, engine="deltalake")
    v1 = _history(lake)
    assert mlflow_pins(cfg, lake) == {}  # no tracking store yet: nothing trained
    setup_mlflow(cfg)
    with mlflow.start_run():
        mlflow.set_tags({"finelake.table": "documents", "finelake.table_path": lake.path(DOCUMENTS),
                         "finelake.table_version": str(v1)})
    with mlflow.start_run():  # another lake's table of the same name is not a pin here
        mlflow.set_tags({"finelake.table": "documents", "finelake.table_path": "/elsewhere/documents",
                         "finelake.table_version": "0"})
    assert mlflow_pins(cfg, lake) == {"documents": [v1]}
    cfg.maintenance.min_retention_hours = 0
    (r,) = optimize_lake(cfg, lake, ["documents"], dry_run=True)
    assert r.pinned == [v1] and r.retention_hours == 2 and r.vacuumed == []
