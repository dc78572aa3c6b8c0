"""``finelake optimize``: compaction by key bucket and VACUUM that keeps pinned versions readable.

Training runs record the Delta version they read (MLflow tags ``finelake.table_path`` and
``finelake.table_version``, written by ``jobs/train.py``); ``maintenance.pinned_versions`` in the
profile adds versions pinned by hand. VACUUM of a table then keeps every file committed or removed
since the *oldest pinned version's* commit (retention = its age, rounded up to the hour, plus one
hour), and never less than ``maintenance.min_retention_hours`` (default 168 h, Delta's own
default). A pinned version the log no longer has, or pins that cannot be read (MLflow
unreachable), make VACUUM refuse for that table, with the reason; compaction still runs.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from finelake.runtime import FinelakeError

log = logging.getLogger(__name__)


@dataclass
class TableMaintenance:
    """What ``finelake optimize`` did (or, dry run, would do) to one table."""

    table: str
    backfilled_rows: int = 0
    files_added: int = 0
    files_removed: int = 0
    pinned: list[int] = field(default_factory=list)
    retention_hours: Optional[int] = None
    vacuumed: list[str] = field(default_factory=list)
    refused: Optional[str] = None  # why VACUUM did not run

    def summary(self, dry_run: bool) -> str:
        verb = "would delete" if dry_run else "deleted"
        pins = f"pinned versions {self.pinned}" if self.pinned else "no pinned versions"
        vac = (f"VACUUM refused: {self.refused}" if self.refused else
               f"VACUUM retain {self.retention_hours} h ({pins}): {verb} {len(self.vacuumed)} files")
        comp = ("" if dry_run else
                f"backfilled {self.backfilled_rows} rows, OPTIMIZE +{self.files_added}/-{self.files_removed} files; ")
        return f"{self.table:16} {comp}{vac}"


def mlflow_pins(cfg, lake) -> dict[str, list[int]]:
    """Table name -> Delta versions recorded by training runs on this lake (MLflow tags).

    Returns {} when the lake's default tracking store does not exist yet (no run ever trained).

    Raises:
        FinelakeError: the tracking store is configured but cannot be searched.
    """
    from finelake.tables import ALL_TABLES
    from finelake.tracking import tracking_settings

    s = tracking_settings(cfg)
    uri = s["tracking_uri"]
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        return {}
    by_path = {lake.path(t).rstrip("/"): name for name, t in ALL_TABLES.items()}
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, filter_string="tags.`finelake.table_version` != ''",
                                  max_results=50000) if exps else []
    except Exception as exc:  # an unreachable server, a broken store
        raise FinelakeError(f"cannot read pinned versions from MLflow at {uri}: {exc}") from None
    pins: dict[str, list[int]] = {}
    for r in runs:
        tags = r.data.tags
        name = by_path.get((tags.get("finelake.table_path") or "").rstrip("/"))
        v = tags.get("finelake.table_version")
        if name and v not in (None, "", "None"):
            pins.setdefault(name, []).append(int(v))
    return {k: sorted(set(v)) for k, v in pins.items()}


def retention_hours(oldest_pin: Optional[dt.datetime], min_hours: float,
                    now: Optional[dt.datetime] = None) -> int:
    """VACUUM retention (whole hours) keeping the snapshot committed at ``oldest_pin`` readable:
    its age rounded up plus one hour, at least ``min_hours``."""
    need = 0.0
    if oldest_pin is not None:
        now = now or dt.datetime.now(dt.timezone.utc)
        need = math.ceil(max(0.0, (now - oldest_pin).total_seconds()) / 3600) + 1
    return int(math.ceil(max(need, min_hours)))


def optimize_lake(cfg, lake, tables=None, dry_run: bool = False, vacuum: bool = True,
                  compact: bool = True) -> list[TableMaintenance]:
    """Run maintenance on each existing table of ``tables`` (default: every declared table).

    Per table: fill ``key_bucket`` in old rows, ``OPTIMIZE`` (``ZORDER BY key_bucket``), then
    ``VACUUM`` with :func:`retention_hours` of the oldest pinned version. ``dry_run`` changes
    nothing and lists the files VACUUM would delete.
    """
    from finelake.tables import ALL_TABLES

    m = cfg.maintenance
    tables = [ALL_TABLES[t] if isinstance(t, str) else t for t in (tables or ALL_TABLES.values())]
    pin_error = None
    pins: dict[str, list[int]] = {k: list(v) for k, v in (m.pinned_versions or {}).items()}
    if vacuum and m.mlflow_pins:
        try:
            for k, v in mlflow_pins(cfg, lake).items():
                pins[k] = sorted(set(pins.get(k, []) + v))
        except FinelakeError as exc:
            pin_error = str(exc)
    out = []
    for t in tables:
        if not lake.exists(t):
            continue
        r = TableMaintenance(t.name, pinned=sorted(pins.get(t.name, [])))
        if compact and not dry_run:
            r.backfilled_rows = lake.backfill_buckets(t)
            res = lake.optimize(t)
            r.files_added, r.files_removed = res["files_added"], res["files_removed"]
        if vacuum:
            if pin_error:
                r.refused = pin_error
            else:
                oldest = None
                if r.pinned:
                    oldest = lake.version_timestamp(t, r.pinned[0])
                    if oldest is None:
                        r.refused = (f"pinned version {r.pinned[0]} is no longer in the Delta log "
                                     "(log retention), so its files cannot be told apart")
                if not r.refused:
                    r.retention_hours = retention_hours(oldest, m.min_retention_hours)
                    r.vacuumed = lake.vacuum(t, r.retention_hours, dry_run=dry_run)
        log.info("%s", r.summary(dry_run))
        out.append(r)
    return out
