"""The whole pipeline: ingest -> genericize -> index -> match -> instantiate -> judge -> budget -> report.

Each stage reads and writes Delta tables through the table layer and skips finished work, so a
rerun changes nothing and a killed run resumes. Stage statistics of the run are saved to
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
        FinelakeError: after ingest, when the queries or documents table has no row.
    """
    import importlib

    from finelake.jobs.ingest import run_ingest, sample_path

    if queries is None and documents is None:
        queries, documents = sample_path("queries.jsonl"), sample_path("documents.jsonl")
    out: list[StageStats] = []
    ing = run_ingest(ctx, queries=queries, documents=documents, **(fields or {}))
    out.extend(ing if isinstance(ing, (list, tuple)) else [ing])
    for s in out:
        print(s.summary(), flush=True)
    _require_ingested_rows(ctx, out)
    for stage in STAGES:
        mod = importlib.import_module(f"finelake.jobs.{stage}")
        st = getattr(mod, f"run_{stage}")(ctx, max_queries=max_queries, max_documents=max_documents)
        print(st.summary(), flush=True)
        out.append(st)
    save_run_stats(ctx, out)
    if report:
        from finelake.jobs.report import run_report

        path = run_report(ctx)
        print(f"report written to {path}", flush=True)
    return out


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
