"""The model stages' reply signals over a Spark table (the ``flags`` column; issue 25).

One aggregation per call: rows are grouped by (had a reply, reason prefix, flags) and counted on
the cluster; the few groups come back to the driver and are counted by the pure
:func:`finelake.method.replies.stage_signals`.
"""

from __future__ import annotations

from finelake.method.replies import StageSignals, stage_signals


def reply_signals(df) -> StageSignals:
    """Reply count, unparseable replies and flag counts of a ``genericizations`` or
    ``instantiations`` DataFrame (columns ``raw_output``, ``reason``, ``flags``).

    A row has a reply when ``raw_output`` is not null. Rows written before ``flags`` existed read
    it as null (no flag).

    Returns:
        :class:`finelake.method.replies.StageSignals`; ``.summary()`` gives the stage summary's
        ``parse_rate=`` and ``flags=`` items.
    """
    from pyspark.sql import functions as F

    groups = (df.select(F.col("raw_output").isNotNull().alias("replied"),
                        F.substring_index(F.col("reason"), ":", 1).alias("reason"),
                        F.array_sort(F.col("flags")).alias("flags"))
              .groupBy("replied", "reason", "flags").count().collect())
    return stage_signals((r["replied"], r["reason"], r["flags"], r["count"]) for r in groups)
