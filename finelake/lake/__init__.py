"""Delta tables through one interface, with or without the Delta jars.

Two engines write the same Delta protocol, each a subclass of :class:`Lake` in its own module:

* ``delta-spark`` (:mod:`finelake.lake.spark`): on clusters (Databricks, EMR) or wherever
  ``io.delta`` classes are on the classpath; merges run as Spark ``MERGE`` and scale with the cluster.
* ``deltalake`` (:mod:`finelake.lake.rs`): delta-rs from the driver, for local mode where no jars
  can be downloaded, and for Spark-free reads. Spark reads its tables through a Python data source
  (:mod:`finelake.lake.datasource`) that lists only the files of the snapshot.

``Lake(root, spark, engine=...)`` returns the engine's class; what both share (paths, key buckets,
conform/dedupe, commit retries, the uncommitted-log cleanup) is :class:`finelake.lake.base.Lake`.
Either way the result is a real Delta table that both delta-spark and delta-rs read; there is no
plain-Parquet fallback. Writes are merges on the table's key (reruns never duplicate rows) and every
commit carries the run id in its commit metadata (``finelake.run_id``).

Merges at scale. Every table keyed on a string column carries a stored ``key_bucket`` column and
every merge restricts its target to the buckets its source touches (:mod:`finelake.lake.buckets`).
``key_bucket`` is internal: :meth:`Lake.read` and :meth:`Lake.read_arrow` leave it out.

Concurrent writers. Merges retry Delta's commit conflicts (:func:`is_commit_conflict`) with
exponential backoff and jitter; see :meth:`Lake.merge`.
"""

from finelake.lake.base import DATA_SOURCE_NAME, RUN_ID_KEY, Lake, MergeResult
from finelake.lake.buckets import (KEY_BUCKET, KEY_BUCKET_BITS, KEY_BUCKETS, bucket_filter, bucketed,
                                   chunk_bucket_range, chunk_count, key_bucket_sql, key_buckets)
from finelake.lake.errors import LakeError, is_commit_conflict
from finelake.lake.rows import conform, dedupe_on_key
from finelake.lake.rs import DeltaRsLake, read_delta
from finelake.lake.spark import DeltaSparkLake

__all__ = [
    "DATA_SOURCE_NAME", "RUN_ID_KEY", "KEY_BUCKET", "KEY_BUCKET_BITS", "KEY_BUCKETS",
    "Lake", "DeltaSparkLake", "DeltaRsLake", "MergeResult", "LakeError",
    "bucketed", "bucket_filter", "chunk_bucket_range", "chunk_count", "key_bucket_sql", "key_buckets",
    "conform", "dedupe_on_key", "is_commit_conflict", "read_delta",
]
