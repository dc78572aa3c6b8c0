"""The whole pipeline: ingest -> genericize -> index -> match -> instantiate -> judge -> budget -> report.

Each stage reads and writes Delta tables through the table layer and skips finished work, so a
rerun changes nothing and a killed run resumes. A run stops before the index while genericize left
rows to retry, and before budget while instantiate or judge did (:func:`retry_gate`): rerunning
retries them, and the eventual tables equal those of a run without faults. Stage statistics of the run are saved to
``<lake>/_runs/<run_id>.json`` for ``finelake report``.

    spark-submit jobs/pipeline.py --conf conf/local.yaml          # = finelake run
"""

from __future__ import annotations

import json
from typing import Optional

from finelake import storage
from finelake.jobs.common import job_main
from finelake.runtime import FinelakeError, StageContext, StageStats

STAGES = ("genericize", "index", "match", "instantiate", "judge", "budget")


def runs_dir(lake_root: str) -> str:
    """``<lake>/_runs``: where each ``finelake run`` leaves its stage statistics (a path or URI)."""
    return storage.join(storage.root(lake_root), "_runs")


def save_run_stats(ctx: StageContext, stats: list[StageStats]) -> str:
    """Write this run's stage statistics as JSON under :func:`runs_dir` (through
    :mod:`finelake.storage`, so an object-store lake works too); returns the file's path or URI."""
    path = storage.join(runs_dir(ctx.cfg.lake), f"{ctx.run_id}.json")
    storage.write_text(ctx.spark, path, json.dumps(
        {"run_id": ctx.run_id, "profile": ctx.cfg.profile, "stages": [s.as_dict() for s in stats]},
        indent=1, default=str))
    return path


def run_pipeline(ctx: StageContext, queries=None, documents=None, max_queries=None,
                 max_documents=None, report: bool = True,
                 fields: Optional[dict] = None) -> list[StageStats]:
    """Run every stage in order on one Spark session, printing each stage's summary line as it
    finishes; returns their statistics.

    Args:
        queries, documents: inputs for ingest. With neither named, the shipped sample (the
            README's main job); with one named, only that one is read and the other table must
            already be in the lake.
        max_queries, max_documents: limits for genericize / match and later (None: the profile's
            ``run`` section).
        report: also write the report (``finelake report``).
        fields: ``query_field`` / ``text_field`` / ``id_field`` / ``source_field`` for ingest
            (None values: the defaults, see :func:`finelake.jobs.ingest.run_ingest`).

    Raises:
        ConfigError: before ingest, when the session's GPU settings cannot run the model stages
            (dynamic allocation with GPU executors, a tensor-parallel size the executors cannot
            hold: :func:`finelake.resources.refuse_gpu_settings`).
        FinelakeError: after ingest, when the queries or documents table has no row.
    """
    from finelake.jobs.ingest import run_ingest, sample_path
    from finelake.resources import refuse_gpu_settings

    refuse_gpu_settings(ctx.cfg, ctx.spark)  # before any stage: a run that would hang fails now
    if queries is None and documents is None:
        queries, documents = sample_path("queries.jsonl"), sample_path("documents.jsonl")
    out: list[StageStats] = []
    ing = run_ingest(ctx, queries=queries, documents=documents, **(fields or {}))
    out.extend(ing if isinstance(ing, (list, tuple)) else [ing])
    for s in out:
        print(s.summary(), flush=True)
    _require_ingested_rows(ctx, out)
    if not run_stages(ctx, out, max_queries=max_queries, max_documents=max_documents):
        save_run_stats(ctx, out)
        return out
    save_run_stats(ctx, out)
    if report:
        from finelake.jobs.report import run_report

        path = run_report(ctx)
        print(f"report written to {path}", flush=True)
    return out


GATES = {"index": ("genericize",), "budget": ("instantiate", "judge")}
"""Stage -> the model stages whose retryable rows hold it back in ``finelake run``."""


def retry_gate(stage: str, done: list[StageStats]) -> str:
    """Why ``finelake run`` must not start ``stage`` yet ("" when it may).

    A stage waits while a model stage it depends on left rows with status ``retry`` in this run
    (:mod:`finelake.faults`): the index is built only from a settled ``genericizations`` table
    (templates that arrive later would change what documents already matched were sampled from),
    and budget walks only when no instantiation or judgment of the run is left to retry (a
    document that became ready a run later would be walked after the others, so the ledger would
    depend on when faults happened). Rows are retried at most ``max_attempts`` runs, so a few
    reruns always get past the gate; a stage run on its own (``finelake budget``) is not gated:
    budget then leaves the documents with retryable rows for later (:func:`unready_documents`).
    """
    by = {s.stage: s for s in done}
    held = [f"{by[g].extra['retry']} {g} row(s) to retry" for g in GATES.get(stage, ())
            if g in by and by[g].extra.get("retry")]
    return ", ".join(held)


def run_stages(ctx: StageContext, out: list[StageStats], max_queries=None,
               max_documents=None) -> bool:
    """The stages after ingest (:data:`STAGES`) in order, each summary printed and appended to
    ``out``; stops before a stage :func:`retry_gate` holds back (printing ``[run] stopped before
    <stage>: ...``).

    Returns:
        True when every stage ran, False when the run stopped at a gate.
    """
    import importlib

    for stage in STAGES:
        held = retry_gate(stage, out)
        if held:
            print(f"[run] stopped before {stage}: {held}; rerun 'finelake run' to retry them "
                  f"(each row at most <stage>.max_attempts runs, then it is quarantined)",
                  flush=True)
            return False
        mod = importlib.import_module(f"finelake.jobs.{stage}")
        st = getattr(mod, f"run_{stage}")(ctx, max_queries=max_queries, max_documents=max_documents)
        print(st.summary(), flush=True)
        out.append(st)
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


def main(argv=None):
    job_main("run", argv)


if __name__ == "__main__":
    main()
