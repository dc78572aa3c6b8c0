"""What every stage gets (config, Spark, lake, run id) and what it reports.

A stage is a function ``run_<stage>(ctx, ...) -> StageStats``. :class:`StageContext` builds the
Spark session and the :class:`~finelake.lake.Lake` lazily, so commands that need neither (``tables``)
start instantly. :class:`StageStats` is the one summary line each stage ends with.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from finelake.config import FinelakeConfig
from finelake.errors import FinelakeError  # noqa: F401 - re-exported: finelake.runtime.FinelakeError

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp plus 8 hex digits."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


@dataclass
class StageStats:
    """Counts a stage reports: rows in, rows out, rows dropped by reason, rows quarantined, and
    (model stages) rows left with status ``retry`` for the next run (:attr:`retry`, what the gates
    and ``finelake run`` read)."""

    stage: str
    rows_in: int = 0
    rows_out: int = 0
    quarantined: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    retry: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    seconds: Optional[float] = None
    chunk_run: Optional[Any] = field(default=None, repr=False)
    """A model stage's :class:`finelake.jobs.chunks.ChunkRun` (chunk timings), when it ran chunks."""

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def finish(self) -> "StageStats":
        self.seconds = time.monotonic() - self.started
        return self

    @property
    def rows_per_s(self) -> float:
        secs = self.seconds if self.seconds is not None else time.monotonic() - self.started
        return self.rows_in / secs if secs > 0 else 0.0

    def summary(self) -> str:
        """One line: ``[stage] in=.. out=.. dropped=.. (reason=n, ...) quarantined=.. skipped=.. 1.2s``."""
        secs = self.seconds if self.seconds is not None else time.monotonic() - self.started
        parts = [f"[{self.stage}] in={self.rows_in}", f"out={self.rows_out}"]
        nd = sum(self.dropped.values())
        if nd:
            parts.append(f"dropped={nd} (" + ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) + ")")
        parts.append(f"quarantined={self.quarantined}")
        if self.retry:
            parts.append(f"retry={self.retry}")
        if self.skipped:
            parts.append(f"skipped(already done)={self.skipped}")
        for k, v in self.extra.items():
            parts.append(f"{k}={v}")
        parts.append(f"{secs:.1f}s ({self.rows_in / secs if secs > 0 else 0:.1f} rows/s)")
        return " ".join(parts)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "rows_in": self.rows_in, "rows_out": self.rows_out,
                "quarantined": self.quarantined, "dropped": dict(self.dropped),
                "skipped": self.skipped, "retry": self.retry, "seconds": self.seconds, **self.extra}


class StageContext:
    """Configuration, run id, and lazily created Spark session and lake for one command."""

    def __init__(self, cfg: FinelakeConfig, run_id: Optional[str] = None, spark=None):
        self.cfg = cfg
        self.run_id = run_id or new_run_id()
        self._spark = spark
        self._lake = None

    @property
    def spark(self):
        if self._spark is None:
            from finelake.spark import get_spark

            self._spark = get_spark(self.cfg)
        return self._spark

    @property
    def lake(self):
        if self._lake is None:
            from finelake.lake import Lake
            from finelake.spark import delta_engine

            self._lake = Lake(self.cfg.lake, self.spark, engine=delta_engine(self.cfg, self.spark),
                              database=self.cfg.catalog.database, catalog=self.cfg.catalog.catalog,
                              commit_attempts=self.cfg.maintenance.commit_attempts,
                              commit_backoff_s=self.cfg.maintenance.commit_backoff_s,
                              commit_backoff_max_s=self.cfg.maintenance.commit_backoff_max_s)
        return self._lake
