"""The lake's interface, and everything its two engines share.

:class:`Lake` holds what does not depend on the engine: table paths and SQL names, the stored
schema (``key_bucket``), the bucket layout of existing tables, commit-conflict retries, the
cleanup of a ``_delta_log`` left without a commit, and the checks every public method makes
before it touches a table. Each engine (:mod:`finelake.lake.spark`, :mod:`finelake.lake.rs`)
implements the ``_``-prefixed hooks marked abstract below, and nothing else.

``Lake(root, spark, engine=...)`` returns the engine's class (as ``pathlib.Path(...)`` returns a
``PosixPath``), so callers pick the engine once, where they build the lake.
"""

from __future__ import annotations

import logging
import math
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, TypeVar, Union

import pyarrow as pa

from finelake import storage
from finelake.lake import buckets
from finelake.lake.buckets import KEY_BUCKET
from finelake.lake.errors import LakeError, is_commit_conflict
from finelake.tables import TableDef

log = logging.getLogger("finelake.lake")

# A Delta commit, checkpoint or checksum in _delta_log (or _last_checkpoint): while none exists,
# the directory holds no table.
_COMMIT_FILE = re.compile(r"^(\d{20}\.|_last_checkpoint$)")

RUN_ID_KEY = "finelake.run_id"
DATA_SOURCE_NAME = "finelake_delta"

T = TypeVar("T")


@dataclass
class MergeResult:
    """Rows a merge inserted and updated, and the table version it produced (None: no commit)."""

    table: str
    inserted: int
    updated: int
    source_rows: int
    version: Optional[int]


class Lake(ABC):
    """The tables of one lake root, read and written through one Delta engine.

    ``Lake(...)`` returns the implementation of ``engine``: ``"delta-spark"``
    (:class:`~finelake.lake.spark.DeltaSparkLake`, Spark SQL ``MERGE`` with the Delta jars: clusters)
    or ``"deltalake"`` (:class:`~finelake.lake.rs.DeltaRsLake`, delta-rs from the driver: local mode
    without jars, and Spark-free reads).

    Args:
        root: folder or URI holding one sub-folder per table.
        spark: the session (None: arrow-only access through delta-rs, for tools and tests;
            required by ``delta-spark``).
        engine: ``"delta-spark"`` or ``"deltalake"`` (default ``"deltalake"``).
        database: SQL schema the tables are registered under; ``catalog`` prefixes it (Unity Catalog).
        commit_attempts: tries of a merge whose commit conflicts with another writer (>= 1).
        commit_backoff_s: first wait between tries, seconds; doubles each try, with full jitter.
        commit_backoff_max_s: longest wait between tries, seconds.

    Raises:
        ValueError: an unknown engine, an engine that contradicts the class called, or
            ``delta-spark`` without a session.
    """

    engine: ClassVar[str] = ""
    _engines: ClassVar[dict[str, type["Lake"]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.engine:
            Lake._engines[cls.engine] = cls

    def __new__(cls, root: Optional[str] = None, spark=None, engine: Optional[str] = None,
                *args, **kwargs):
        # (root optional: copy and pickle call __new__ on the engine's class with no arguments)
        if cls is Lake:
            want = engine or "deltalake"
            if want not in Lake._engines:
                raise ValueError(f"engine must be one of {sorted(Lake._engines)}, not {want!r}")
            cls = Lake._engines[want]
        return super().__new__(cls)

    def __init__(self, root: str, spark=None, engine: Optional[str] = None,
                 database: str = "finelake", catalog: Optional[str] = None,
                 commit_attempts: int = 8, commit_backoff_s: float = 0.5,
                 commit_backoff_max_s: float = 30.0):
        if engine is not None and engine != self.engine:
            raise ValueError(f"{type(self).__name__} is the {self.engine!r} engine, not {engine!r}")
        self.root = root.rstrip("/")
        self.spark = spark
        self.database = database
        self.catalog = catalog
        self.commit_attempts = max(1, int(commit_attempts))
        self.commit_backoff_s = float(commit_backoff_s)
        self.commit_backoff_max_s = float(commit_backoff_max_s)
        self._layouts: dict[str, tuple[bool, bool]] = {}  # path -> (has key_bucket, complete)
        self._registered: set[str] = set()

    # -- naming
    def path(self, tdef: Union[TableDef, str]) -> str:
        """The table's folder or URI: ``<root>/<name>`` (a local root made absolute)."""
        name = tdef if isinstance(tdef, str) else tdef.name
        return f"{storage.root(self.root)}/{name}"

    def sql_name(self, tdef: Union[TableDef, str]) -> str:
        """The table's SQL name, ``<catalog.>database.name``."""
        name = tdef if isinstance(tdef, str) else tdef.name
        db = f"{self.catalog}.{self.database}" if self.catalog else self.database
        return f"{db}.{name}"

    # -- metadata
    @abstractmethod
    def exists(self, tdef: TableDef) -> bool:
        """Whether the table has been created (its ``_delta_log`` holds a commit)."""

    def version(self, tdef: TableDef) -> Optional[int]:
        """Latest version of the table, or None when it does not exist."""
        return self._version(tdef) if self.exists(tdef) else None

    def history(self, tdef: TableDef, limit: int = 20) -> list[dict]:
        """Commit history, newest first: ``{"version", "operation", "run_id", "timestamp"}``
        each, ``run_id`` from the commit metadata. Empty when the table does not exist."""
        return self._history(tdef, limit) if self.exists(tdef) else []

    def storage_schema(self, tdef: TableDef) -> pa.Schema:
        """The columns stored: the declared ones plus ``key_bucket`` (int32) when :func:`bucketed`."""
        if not buckets.bucketed(tdef):
            return tdef.schema
        return tdef.schema.append(pa.field(KEY_BUCKET, pa.int32()))

    def _clear_uncommitted_log(self, tdef: TableDef, settle_s: float = 5.0) -> None:
        """Remove a ``_delta_log`` that holds no commit: what a create killed before its first
        commit leaves behind (the directory, perhaps a commit's temp file). Delta takes such a
        path for a table (``isDeltaTable`` says no, but ``CREATE ... IF NOT EXISTS`` fails with
        ``DELTA_TABLE_NOT_FOUND``), so every later run of the stage would fail. Nothing was ever
        committed there, so nothing is lost. A log changed less than ``settle_s`` seconds ago may
        be another writer's create in progress: it is given that long to commit first."""
        log_dir = storage.join(self.path(tdef), "_delta_log")

        def uncommitted() -> bool:
            return (storage.exists(self.spark, log_dir) and not any(
                _COMMIT_FILE.match(n) for n in storage.listdir(self.spark, log_dir)))

        if not uncommitted():
            return
        age = time.time() - storage.newest_mtime(self.spark, log_dir)
        if age < settle_s:
            time.sleep(settle_s - age)
            if not uncommitted():
                return
        log.warning("%s: _delta_log holds no commit (a create that was killed); removing it and "
                    "creating the table again", self.path(tdef))
        storage.remove_tree(self.spark, log_dir)

    def create(self, tdef: TableDef) -> None:
        """Create the table (empty) when it does not exist yet; a no-op otherwise. A new table
        has ``key_bucket`` (:meth:`storage_schema`). A ``_delta_log`` left without a commit by a
        killed create is removed first (:meth:`_clear_uncommitted_log`)."""
        if self.exists(tdef):
            return
        self._clear_uncommitted_log(tdef)
        self._create(tdef)

    def bucket_layout(self, tdef: TableDef, migrate: bool = True) -> tuple[bool, bool]:
        """``(has key_bucket, every row has one)`` for an existing table, cached per Lake.

        A table written before ``key_bucket`` existed gets the column (a metadata-only commit, like
        :meth:`add_missing_columns`) when ``migrate``; its old rows stay null, so merges read them
        too, until :meth:`backfill_buckets` (run by ``finelake optimize``) fills them in.
        """
        path = self.path(tdef)
        if not buckets.bucketed(tdef):
            return (False, False)
        if path in self._layouts:
            return self._layouts[path]
        if KEY_BUCKET not in self._stored_columns(tdef):
            if not migrate:
                return (False, False)
            log.info("%s: adding column %s (rows written before it are read by every merge "
                     "until `finelake optimize` fills it in)", tdef.name, KEY_BUCKET)
            self._add_bucket_column(tdef)
        layout = (True, not self._has_null_buckets(tdef))
        self._layouts[path] = layout
        return layout

    def add_missing_columns(self, tdef: TableDef) -> list[str]:
        """Add the declared columns an existing table lacks (a lake written before they were
        declared), as nullable columns: old rows read them as null. A metadata-only commit, made
        once; a no-op when the table is missing or complete.

        Returns:
            The names of the columns added.
        """
        if not self.exists(tdef):
            return []
        have = set(self._stored_columns(tdef))
        missing = [f for f in tdef.schema if f.name not in have]
        if missing:
            self._add_columns(tdef, missing)
        return [f.name for f in missing]

    # -- writes
    def _with_retry(self, tdef: TableDef, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried on a commit conflict (:func:`is_commit_conflict`) up to
        ``commit_attempts`` tries with exponential backoff and full jitter (``commit_backoff_s``
        doubling, at most ``commit_backoff_max_s``); each retry is logged at WARNING.

        Raises:
            LakeError: still conflicting after the last try (the message says rerunning is safe).
        """
        from tenacity import (Retrying, retry_if_exception, stop_after_attempt,
                              wait_random_exponential)

        def before_sleep(state) -> None:
            exc = state.outcome.exception()
            log.warning("%s: %s conflicted with another writer (try %d of %d), retrying in "
                        "%.1f s: %s", tdef.name, what, state.attempt_number, self.commit_attempts,
                        state.next_action.sleep if state.next_action else 0.0,
                        str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__)
            self._layouts.pop(self.path(tdef), None)  # a metadata change may be what conflicted

        retrying = Retrying(stop=stop_after_attempt(self.commit_attempts),
                            wait=wait_random_exponential(multiplier=self.commit_backoff_s,
                                                         max=self.commit_backoff_max_s),
                            retry=retry_if_exception(is_commit_conflict),
                            before_sleep=before_sleep, reraise=True)
        try:
            return retrying(fn)
        except Exception as exc:
            if not is_commit_conflict(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise LakeError(
                f"{tdef.name}: {what} conflicted with another writer's commit "
                f"{self.commit_attempts} times and gave up; nothing of this write was committed "
                f"and rerunning is safe (the merge is on the table key). Last conflict: {first}"
            ) from exc

    def merge(self, tdef: TableDef, rows, run_id: str, update: bool = False,
              update_when: Optional[str] = None) -> MergeResult:
        """Merge rows into the table on its key.

        Args:
            tdef: target table.
            rows: a ``pyarrow.Table`` or a Spark DataFrame with the table's columns (missing
                nullable columns become null; ``run_id`` is filled in).
            run_id: recorded on new rows and in the commit metadata.
            update: also overwrite rows whose key exists (default: insert only, so a rerun
                leaves finished rows as they were).
            update_when: SQL predicate over ``t`` (target) and ``s`` (source) limiting which
                matched rows are updated, so an unchanged rerun commits nothing new.

        The source is conformed and deduplicated on the key (first row wins, see
        :mod:`finelake.lake.rows`), and the target is restricted to the key buckets of the source
        (:mod:`finelake.lake.buckets`), so the merge reads about ``table rows x source buckets /
        KEY_BUCKETS`` target rows.

        Concurrent writers: a commit that conflicts with another writer's (Delta's optimistic
        concurrency: ``ConcurrentAppendException`` and friends, delta-rs ``CommitFailedError``)
        commits nothing, and the whole merge is run again against the new table version, with
        backoff (``commit_attempts``, ``commit_backoff_s``). That is safe for every merge here:
        the source is computed once (persisted), an insert-only merge on the key inserts exactly
        the keys still absent whenever it runs, and an update merge re-applies the same values
        on top of the other writer's (last writer wins per key, as with a later rerun).

        Returns:
            :class:`MergeResult`; ``version`` is None when nothing was committed.

        Raises:
            LakeError: rows lack a key column or a column has an incompatible type, or the commit
                still conflicted after ``commit_attempts`` tries.
        """
        self._with_retry(tdef, "create", lambda: self.create(tdef))
        return self._merge(tdef, rows, run_id, update, update_when)

    # -- maintenance
    def backfill_buckets(self, tdef: TableDef) -> int:
        """Fill ``key_bucket`` in rows written before the column existed (one commit), so later
        merges skip their files. Returns the rows filled (0: nothing to do, nothing committed)."""
        if not buckets.bucketed(tdef) or not self.exists(tdef):
            return 0
        _, complete = self.bucket_layout(tdef)
        if complete:
            return 0
        n = self._backfill_buckets(tdef)
        self._layouts[self.path(tdef)] = (True, True)
        return n

    def optimize(self, tdef: TableDef) -> dict:
        """Compact the table's small files, ordered by ``key_bucket`` (``OPTIMIZE ... ZORDER BY
        (key_bucket)``; on one column that is a range layout) so each file covers a narrow range
        of buckets and merges keep skipping most files; plain compaction for tables without it.

        Returns:
            ``{"files_added", "files_removed"}`` (0/0: nothing to do).
        """
        if not self.exists(tdef):
            return {"files_added": 0, "files_removed": 0}
        has, _ = self.bucket_layout(tdef)
        return self._optimize(tdef, has)

    @abstractmethod
    def version_timestamp(self, tdef: TableDef, version: int):
        """Commit time of ``version`` (a UTC ``datetime``), or None when the log no longer has it."""

    def vacuum(self, tdef: TableDef, retention_hours: int, dry_run: bool = True) -> list[str]:
        """Delete files no version younger than ``retention_hours`` needs (Delta ``VACUUM``).

        Time travel to a version stays possible while every file its snapshot lists is kept,
        which holds for every version committed within the retention. The caller picks the
        retention (``finelake optimize`` derives it from the pinned versions); this method does
        not apply Delta's 7-day safety check, so that a configured minimum below it works.

        Returns:
            The files deleted (``dry_run``: that would be deleted), as paths or URIs.
        """
        if not self.exists(tdef):
            return []
        return self._vacuum(tdef, max(0, int(math.ceil(retention_hours))), dry_run)

    # -- reads
    def read(self, tdef: TableDef, version: Optional[int] = None):
        """The table as a Spark DataFrame, optionally pinned to a Delta version.

        Raises:
            LakeError: the table does not exist (run the stage that writes it first), or this
                Lake has no Spark session.
        """
        if self.spark is None:
            raise LakeError("this Lake has no Spark session; use read_arrow")
        if not self.exists(tdef):
            raise LakeError(f"table {tdef.name} does not exist at {self.path(tdef)}; "
                            f"run the stage that writes it first")
        df = self._read_stored(tdef, version)
        return df if KEY_BUCKET in tdef.columns else df.drop(KEY_BUCKET)

    def read_chunk(self, tdef: TableDef, column: str, n_chunks: int, chunk: int):
        """The rows of ``tdef`` whose ``column`` falls in chunk ``chunk`` of ``n_chunks``
        (``abs(xxhash64(column)) % n_chunks == chunk``), as a Spark DataFrame.

        When ``column`` is the table's first key and the table carries ``key_bucket``, the read
        also filters on the chunk's bucket range (:func:`finelake.lake.buckets.chunk_bucket_range`),
        which Delta's file statistics use to skip every file outside it once the table is
        clustered by bucket (``finelake optimize``): a chunk then reads its share of the table,
        not all of it.

        Raises:
            LakeError: as :meth:`read`.
        """
        from pyspark.sql import functions as F

        self.read(tdef)  # the checks: a session, an existing table
        df = self._read_stored(tdef)
        if column == tdef.key[0] and buckets.bucketed(tdef) and KEY_BUCKET in df.columns:
            complete = self.bucket_layout(tdef)[1]
            lo, hi = buckets.chunk_bucket_range(n_chunks, chunk)
            cond = F.col(KEY_BUCKET).between(lo, hi)
            df = df.where(cond if complete else (cond | F.col(KEY_BUCKET).isNull()))
        if KEY_BUCKET in df.columns and KEY_BUCKET not in tdef.columns:
            df = df.drop(KEY_BUCKET)
        return df.where(F.abs(F.xxhash64(column)) % F.lit(n_chunks) == F.lit(chunk))

    def read_arrow(self, tdef: TableDef, version: Optional[int] = None,
                   columns: Optional[list[str]] = None) -> pa.Table:
        """The table (or ``columns`` of it) as an Arrow table, on the driver. Missing table:
        empty rows. ``key_bucket`` is left out unless asked for in ``columns``."""
        if not self.exists(tdef):
            t = tdef.empty()
            return t.select(columns) if columns else t
        return self._read_arrow(tdef, version, columns)

    # -- SQL
    def register(self, tdef: TableDef) -> str:
        """Register the table under ``<catalog.>database.name`` for Spark SQL; returns that name
        (a no-op without a session or before the table exists)."""
        name = self.sql_name(tdef)
        if self.spark is None or name in self._registered or not self.exists(tdef):
            return name
        self.spark.sql(f"CREATE DATABASE IF NOT EXISTS {name.rsplit('.', 1)[0]}")
        self._register(tdef, name)
        self._registered.add(name)
        return name

    def register_all(self, tables) -> list[str]:
        """:meth:`register` each existing table of ``tables``; returns their SQL names."""
        return [self.register(t) for t in tables if self.exists(t)]

    # -- what each engine implements
    @abstractmethod
    def _version(self, tdef: TableDef) -> int:
        """Latest version of an existing table."""

    @abstractmethod
    def _history(self, tdef: TableDef, limit: int) -> list[dict]:
        """:meth:`history` of an existing table."""

    @abstractmethod
    def _create(self, tdef: TableDef) -> None:
        """Create the missing table with :meth:`storage_schema`, its description and partitions."""

    @abstractmethod
    def _stored_columns(self, tdef: TableDef) -> list[str]:
        """The column names of an existing table, ``key_bucket`` included."""

    @abstractmethod
    def _has_null_buckets(self, tdef: TableDef) -> bool:
        """Whether a row lacks ``key_bucket`` (written before the column existed)."""

    @abstractmethod
    def _add_bucket_column(self, tdef: TableDef) -> None:
        """Add a nullable int ``key_bucket`` column (metadata-only commit)."""

    @abstractmethod
    def _add_columns(self, tdef: TableDef, fields: list[pa.Field]) -> None:
        """Add ``fields`` as nullable columns (metadata-only commit)."""

    @abstractmethod
    def _merge(self, tdef: TableDef, rows, run_id: str, update: bool,
               update_when: Optional[str]) -> MergeResult:
        """:meth:`merge` into an existing table, retrying conflicts with :meth:`_with_retry`."""

    @abstractmethod
    def _backfill_buckets(self, tdef: TableDef) -> int:
        """Fill the null ``key_bucket`` values in one commit; returns the rows filled."""

    @abstractmethod
    def _optimize(self, tdef: TableDef, has_bucket: bool) -> dict:
        """:meth:`optimize` of an existing table."""

    @abstractmethod
    def _vacuum(self, tdef: TableDef, retention_hours: int, dry_run: bool) -> list[str]:
        """:meth:`vacuum` of an existing table, whole hours."""

    @abstractmethod
    def _read_stored(self, tdef: TableDef, version: Optional[int] = None):
        """The table as stored (``key_bucket`` included), as a Spark DataFrame."""

    @abstractmethod
    def _read_arrow(self, tdef: TableDef, version: Optional[int],
                    columns: Optional[list[str]]) -> pa.Table:
        """:meth:`read_arrow` of an existing table."""

    @abstractmethod
    def _register(self, tdef: TableDef, name: str) -> None:
        """Make the existing table readable in Spark SQL as ``name`` (its database exists)."""
