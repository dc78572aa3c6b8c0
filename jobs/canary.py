"""The canary on the driver: count a canary chunk's outcomes and stop the stage on a failed gate.

The gates and their metrics are pure (:mod:`finelake.method.canary`); this module reads the
canary chunk's materialized output (one small Spark aggregation, before anything of it is
committed) into :class:`~finelake.method.canary.Outcomes` and raises
:class:`~finelake.method.canary.CanaryFailed` with the figures, up to five raw replies and the
profile keys that matter.
"""

from __future__ import annotations

import logging
from collections import Counter

from finelake.method.canary import CanaryFailed, Outcomes, failed_gates, failure_message, figures

log = logging.getLogger(__name__)


def outcomes_of(out) -> Outcomes:
    """Counts of a model stage's output rows (a Spark DataFrame with ``status`` and a reason
    column; ``flags``, ``raw_output``, ``kept``, ``judge_score`` where the table has them)."""
    from pyspark.sql import functions as F

    cols = set(out.columns)
    reason = "reason" if "reason" in cols else "judge_reason"
    o = Outcomes()
    code = F.split(F.coalesce(F.col(reason), F.lit("")), ":").getItem(0)
    for r in out.groupBy("status", code.alias("code")).count().collect():
        o.total += r["count"]
        o.statuses[r["status"] or ""] += r["count"]
        if r["code"]:
            o.reasons[r["code"]] += r["count"]
    if "flags" in cols:
        flagged = (out.select(F.array_distinct(F.transform(
            F.coalesce("flags", F.array().cast("array<string>")),
            lambda f: F.split(f, ":").getItem(0))).alias("codes"))
            .select(F.explode("codes").alias("code")).groupBy("code").count().collect())
        o.flags = Counter({r["code"]: r["count"] for r in flagged})
    if "judge_score" in cols:
        agg = out.agg(F.count("judge_score").alias("scored"),
                      F.sum(F.when(F.col("kept"), 1).otherwise(0)).alias("kept")).collect()[0]
        o.scored, o.kept = int(agg["scored"] or 0), int(agg["kept"] or 0)
    raw = F.col("raw_output") if "raw_output" in cols else F.lit(None).cast("string")
    bad = out.where("status <> 'ok'").select("status", F.col(reason).alias("reason"), raw.alias("raw"))
    o.samples = [(r["status"], r["reason"] or "", r["raw"] or "") for r in bad.limit(5).collect()]
    return o


class Canary:
    """One model stage's canary: its size and gates, and the check run on its output.

    Args:
        ctx: the stage context (profile keys for the message).
        stage: the :class:`finelake.stage.ModelStage`.
        gates: ``{gate name: limit}`` (the stage's section of ``quality:``).
        rows: the canary's size in chunk keys (``quality.canary_rows``).
    """

    def __init__(self, ctx, stage, gates: dict, rows: int):
        self.ctx, self.stage, self.gates, self.rows = ctx, stage, dict(gates), int(rows)
        self.outcomes: Outcomes | None = None

    def keys(self) -> dict[str, object]:
        """The profile keys that decide the canary's outcome, with their values."""
        cfg, name = self.ctx.cfg, self.stage.name
        model = self.stage.settings(cfg).model
        out = {f"{name} model": f"{model.backend}:{model.model}"}
        section = getattr(cfg, name, None)
        for k in ("mode", "constrained", "prompt_version", "min_excerpt_ratio", "min_score"):
            if section is not None and hasattr(section, k):
                out[f"{name}.{k}"] = getattr(section, k)
        return out

    def check(self, out) -> None:
        """Count ``out`` (the canary chunk's persisted output) and raise on a failed gate.

        Raises:
            CanaryFailed: a gate failed (exit status 3; the message starts with
                ``canary failed:``).
        """
        o = outcomes_of(out)
        self.outcomes = o
        failed = failed_gates(o, self.gates)
        if failed:
            raise CanaryFailed(failure_message(self.stage.name, o, failed, self.gates, self.keys()))
        log.info("%s: canary passed on %d rows: %s", self.stage.name, o.total,
                 figures(o, self.gates))
        print(f"[{self.stage.name}] canary passed on {o.total} rows: {figures(o, self.gates)}",
              flush=True)
