"""The pipeline, defined once: ingest -> genericize -> index -> match -> instantiate -> judge ->
budget -> report (and ``continue``, run on its own).

:data:`PIPELINE` is the one list of stages (:mod:`finelake.stage`) that the command line
(``finelake <stage>``), ``finelake run``, the retry gates, the Databricks bundle's tasks
(``resources/finelake_pipeline.yml``, checked against it by ``tests/test_deploy_bundle.py``) and
``finelake emr-steps`` read. Adding a stage is one entry here plus its row function.

Each stage reads and writes Delta tables through the table layer and skips finished work, so a
rerun changes nothing and a killed run resumes. ``finelake run`` stops before a stage whose gate
holds (``index`` while genericize left rows to retry, ``budget`` while instantiate or judge did:
:mod:`finelake.jobs.gates`): rerunning retries them, and the eventual tables equal those of a run
without faults. Stage statistics of the run are saved to ``<lake>/_runs/<run_id>.json`` for
``finelake report``.

    spark-submit bin/finelake_job.py run --conf conf/local.yaml          # = finelake run
"""

from __future__ import annotations

from typing import Optional, Union

from finelake.jobs.budget import BUDGET
from finelake.jobs.common import save_run_stats
from finelake.jobs.continuation import CONTINUE
from finelake.jobs.gates import GateHeld
from finelake.jobs.genericize import GENERICIZE
from finelake.jobs.index import INDEX
from finelake.jobs.ingest import INGEST
from finelake.jobs.instantiate import INSTANTIATE
from finelake.jobs.judge import JUDGE
from finelake.jobs.match import MATCH
from finelake.jobs.report import REPORT
from finelake.jobs.runner import run_stage
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.stage import Limits, ModelStage, Stage

PIPELINE: tuple[Union[Stage, ModelStage], ...] = (
    INGEST, GENERICIZE, INDEX, MATCH, INSTANTIATE, JUDGE, BUDGET, REPORT, CONTINUE)
"""Every stage, in the order ``finelake run`` runs those with ``in_run`` (continue has not)."""

STAGES: dict[str, Union[Stage, ModelStage]] = {s.name: s for s in PIPELINE}
"""Stage name -> stage."""


def run_order() -> tuple[Union[Stage, ModelStage], ...]:
    """The stages of ``finelake run`` and of the scheduled pipeline, in order."""
    return tuple(s for s in PIPELINE if s.in_run)


def run_pipeline(ctx: StageContext, queries=None, documents=None, max_queries=None,
                 max_documents=None, report: bool = True, fields: Optional[dict] = None,
                 force: bool = False, canary: Optional[bool] = None) -> list[StageStats]:
    """Run every stage of :func:`run_order` on one Spark session, printing each stage's summary
    line as it finishes; returns their statistics.

    Args:
        queries, documents: inputs for ingest. With neither named, the shipped sample (the
            README's main job); with one named, only that one is read and the other table must
            already be in the lake.
        max_queries, max_documents: limits for genericize / match and later (None: the profile's
            ``run`` section).
        report: also write the report (``finelake report``).
        fields: ``query_field`` / ``text_field`` / ``id_field`` / ``source_field`` for ingest
            (None values: the defaults, see :func:`finelake.jobs.ingest.run_ingest`).
        force: start stages whose gates hold (``--force``).
        canary: run the model stages' canaries (None: the profile's ``quality.canary``).

    Raises:
        ConfigError: before ingest, when the session's GPU settings cannot run the model stages
            (dynamic allocation with GPU executors, a tensor-parallel size the executors cannot
            hold: :func:`finelake.resources.refuse_gpu_settings`).
        FinelakeError: after ingest, when the queries or documents table has no row.
        CanaryFailed: a model stage's canary failed a quality gate.
    """
    from finelake.jobs.ingest import sample_path
    from finelake.resources import refuse_gpu_settings

    refuse_gpu_settings(ctx.cfg, ctx.spark)  # before any stage: a run that would hang fails now
    if queries is None and documents is None:
        queries, documents = sample_path("queries.jsonl"), sample_path("documents.jsonl")
    limits = Limits(max_queries=max_queries, max_documents=max_documents, force=force,
                    canary=canary)
    out: list[StageStats] = []
    if not run_stages(ctx, out, limits, inputs=dict(queries=queries, documents=documents,
                                                    **(fields or {}))):
        return out
    if report:
        run_stage(ctx, REPORT, limits)
    return out


def run_stages(ctx: StageContext, out: list[StageStats], limits: Limits = Limits(),
               inputs: Optional[dict] = None) -> bool:
    """The stages of :func:`run_order` but the report, in order, each summary printed and appended
    to ``out``; ingest only when ``inputs`` are given. Stops before a stage whose gate holds
    (printing ``[run] stopped before <stage>: ...``). The run's statistics are saved
    (:func:`save_run_stats`) when it stops and after budget.

    Returns:
        True when every stage ran, False when the run stopped at a gate.
    """
    for stage in run_order():
        if stage is REPORT or (stage is INGEST and inputs is None):
            continue
        try:
            stats = run_stage(ctx, stage, limits, **(inputs if stage is INGEST else {}))
        except GateHeld as exc:
            print(f"[run] stopped before {stage.name}: {exc}", flush=True)
            save_run_stats(ctx, out)
            return False
        for s in stats if isinstance(stats, (list, tuple)) else [stats]:
            print(s.summary(), flush=True)
            out.append(s)
        if stage is INGEST:
            _require_ingested_rows(ctx, out)
    save_run_stats(ctx, out)  # the report reads this run's statistics
    return True


def _require_ingested_rows(ctx: StageContext, ingested: list[StageStats]) -> None:
    """Stop after ingest when the queries or documents table has no row, naming why.

    Raises:
        FinelakeError: a table is empty, e.g. every input row was quarantined because the text
            field has another name (the message gives the quarantine reasons and ``--query-field``
            / ``--text-field``).
    """
    from finelake.tables import DOCUMENTS, QUERIES

    by_stage = {s.stage: s for s in ingested}
    for tdef, stage, flag in ((QUERIES, "ingest:queries", "--query-field"),
                              (DOCUMENTS, "ingest:documents", "--text-field")):
        if ctx.lake.exists(tdef) and ctx.lake.read_arrow(tdef, columns=list(tdef.key)).num_rows:
            continue
        st = by_stage.get(stage)
        why = (f"this ingest read {st.rows_in} rows and quarantined {st.quarantined} "
               f"{st.extra.get('quarantine', '(no reason recorded)')}" if st else "nothing was ingested")
        raise FinelakeError(
            f"table {tdef.name} at {ctx.lake.path(tdef)} has no row: {why}; the quarantine table "
            f"says why per row; if the text is in another field, name it with {flag}")
