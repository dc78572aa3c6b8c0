"""The ``finelake`` command line: one subcommand per job, ``run`` for the whole pipeline.

Every subcommand takes ``--conf PROFILE`` (a YAML path or a packaged profile name), ``--set
key.path=value`` overrides, ``--lake DIR`` and ``--run-id``. The same commands run under
``spark-submit bin/finelake_job.py <command> --conf conf/<profile>.yaml ...``.

Errors a user can cause (a missing file, a bad config, an unreadable table) end with one line on
stderr and exit status 1, never a Java stack trace; ``-v`` shows tracebacks.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable, Optional

import click

from finelake.config import hub_model_ids
from finelake.errors import ConfigError, FinelakeError
from finelake.runtime import StageContext
from finelake.validate import load_checked

log = logging.getLogger("finelake")

def _common(f: Callable) -> Callable:
    """Options every subcommand shares."""

    @click.option("--conf", "profile", default=lambda: os.environ.get("FINELAKE_PROFILE", "local"),
                  show_default="local", help="Profile: a YAML file or a packaged name (local, databricks, emr).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config value, e.g. --set judge.min_score=3 (repeatable).")
    @click.option("--lake", default=None, help="Lake root folder/URI (overrides the profile's lake).")
    @click.option("--run-id", default=None, help="Run id recorded on rows and commits (default: new).")
    @click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
    @functools.wraps(f)
    def wrapper(profile, overrides, lake, run_id, verbose, **kwargs):
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("py4j", "httpx", "urllib3", "filelock", "numba", "faiss", "faiss.loader",
                      "sentence_transformers", "transformers", "httpcore", "openai"):
            logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
        if not verbose:
            # Model loaders' progress bars and info lines, on the driver and (inherited by local
            # Spark's workers) on the executors: one stage progress line is what the user reads.
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            cfg = load_checked(profile, list(overrides), lake=lake)
            if not hub_model_ids(cfg):  # embedded models only: never ask the hub (driver side)
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            ctx = StageContext(cfg, run_id=run_id)
            return f(ctx, **kwargs)
        except FinelakeError as exc:  # what a user can fix: one line, no traceback
            if verbose:
                raise
            _fail(exc)

    return wrapper


class _Failed(click.ClickException):
    """A :class:`FinelakeError` as click's one-line error, with the error's own exit status
    (1; a failed canary 3)."""

    def __init__(self, exc: BaseException):
        super().__init__(_one_line(exc) if not getattr(exc, "exit_code", None) else str(exc))
        self.exit_code = int(getattr(exc, "exit_code", 1) or 1)

    def show(self, file=None) -> None:
        if self.exit_code == 1:
            super().show(file)
        else:  # a message that speaks for itself ("canary failed: ..."), several lines
            click.echo(self.format_message(), err=True, file=file)


def _fail(exc: BaseException):
    raise _Failed(exc) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    return first if len(first) < 600 else first[:600] + "..."


def _print_stats(stats) -> None:
    for s in stats if isinstance(stats, (list, tuple)) else [stats]:
        click.echo(s.summary())


_limits = [
    click.option("--max-queries", type=int, default=None, help="Process at most N queries."),
    click.option("--max-documents", type=int, default=None, help="Process at most N documents."),
]
_inputs = [
    click.option("--queries", type=str, default=None, help="Queries: JSONL/Parquet/CSV/text folder/Delta."),
    click.option("--documents", type=str, default=None, help="Documents: JSONL/Parquet/CSV/text folder/Delta."),
]

_fields = [
    click.option("--query-field", default=None, help="Field holding the query text (default: query)."),
    click.option("--text-field", default=None, help="Field holding the document text (default: text)."),
    click.option("--id-field", default=None, help="Field holding a row id (default: content hash)."),
    click.option("--source-field", default=None, help="Field holding the source name."),
]


def _apply(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f

    return deco


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="finelake")
def cli() -> None:
    """finelake: FineInstructions (real queries -> templates -> grounded instruction/answer pairs)
    as Spark jobs over Delta tables."""


_STAGE_OPTIONS = {
    "inputs": _inputs + _fields,
    "max_queries": _limits[:1],
    "max_documents": _limits[1:],
    "out": [click.option("--out", default=None,
                         help="Folder for report.md and plots (default: <lake>/_reports/<run>).")],
}
"""A stage's declared options (:attr:`finelake.stage.Stage.options`) -> their click options."""

_FORCE = click.option("--force", is_flag=True,
                      help="Start even while an upstream stage has rows left to retry (a gate).")
_CANARY = click.option("--no-canary", "no_canary", is_flag=True,
                       help="Skip the canary chunk and its quality gates (quality.canary).")


def _stage_command(stage) -> None:
    """``finelake <stage>`` for one stage of :data:`finelake.jobs.pipeline.PIPELINE`: its declared
    options, ``--force`` where it has gates, ``--no-canary`` where the profile has gates for it."""
    from finelake.config import QualityConfig
    from finelake.stage import ModelStage

    options = [o for name in stage.options for o in _STAGE_OPTIONS[name]]
    if stage.gates:
        options.append(_FORCE)
    canary = isinstance(stage, ModelStage) and stage.name in QualityConfig.model_fields
    if canary:
        options.append(_CANARY)

    @cli.command(name=stage.name, help=stage.help)
    @_apply(options)
    @_common
    def cmd(ctx, max_queries=None, max_documents=None, force=False, no_canary=False, **kwargs):
        from finelake.jobs.runner import run_stage
        from finelake.stage import Limits

        limits = Limits(max_queries=max_queries, max_documents=max_documents, force=force,
                        canary=False if no_canary else None)
        stats = run_stage(ctx, stage, limits, **kwargs)
        if stage.name != "report":
            _print_stats(stats)


def _register_stages() -> None:
    from finelake.jobs.pipeline import PIPELINE

    for stage in PIPELINE:
        _stage_command(stage)


@cli.command()
@_apply(_inputs + _fields + _limits + [_FORCE, _CANARY])
@_common
def run(ctx, queries, documents, query_field, text_field, id_field, source_field, max_queries,
        max_documents, force, no_canary):
    """Run the whole pipeline: ingest, genericize, index, match, instantiate, judge, budget, report.

    With neither --queries nor --documents, the inputs are the shipped sample; with one named,
    only that one is ingested and the other table must already be in the lake. Stops before a
    stage whose gate holds (rows left to retry: rerun to retry them) or after a failed canary
    (exit status 3)."""
    from finelake.jobs.pipeline import run_pipeline

    run_pipeline(ctx, queries=queries, documents=documents, max_queries=max_queries,
                 max_documents=max_documents,  # prints each stage's summary as it finishes
                 fields=dict(query_field=query_field, text_field=text_field, id_field=id_field,
                             source_field=source_field),
                 force=force, canary=False if no_canary else None)


@cli.command()
@click.option("--sample", "n", type=int, default=200, help="Documents to score.")
@_common
def calibrate(ctx, n):
    """Measure retrieval on the lake's documents: candidates per document and recall at the
    threshold for K=5 against K=10 and for the index's nprobe, and the cosine distribution to
    choose a match threshold."""
    from finelake.jobs.calibrate import run_calibrate

    click.echo(run_calibrate(ctx, n).text())


def _local_sql_fits(cfg) -> bool:
    """``finelake sql --engine auto``: the local engine for a lake on this machine (a path or a
    ``file:`` URI) whose profile runs Spark locally (master ``local[...]`` or unset) and registers
    no Unity Catalog catalog; Spark otherwise (clusters)."""
    from finelake import storage

    local_lake = not storage.is_uri(cfg.lake) or cfg.lake.startswith("file:")
    master = cfg.spark.master
    return local_lake and (master is None or master.startswith("local")) and not cfg.catalog.catalog


@cli.command()
@click.argument("query")
@click.option("--limit", type=int, default=50, show_default=True, help="Rows to print.")
@click.option("--engine", "sql_engine", type=click.Choice(["auto", "local", "spark"]), default="auto",
              show_default=True,
              help="local: read-only queries through delta-rs's SQL engine (DataFusion), in about a "
                   "second, no Spark; spark: Spark SQL (clusters, statements that write); auto: local "
                   "when the lake is a local path and the profile's Spark master is local or unset.")
@_common
def sql(ctx, query, limit, sql_engine):
    """Run SQL over the lake's tables, e.g. finelake sql "SELECT count(*) FROM finelake.pairs"."""
    from finelake.tables import ALL_TABLES

    if sql_engine == "local" or (sql_engine == "auto" and _local_sql_fits(ctx.cfg)):
        from finelake.lake import Lake
        from finelake.lake.query import LocalSQL, show_string

        lake = Lake(ctx.cfg.lake, None, database=ctx.cfg.catalog.database, catalog=ctx.cfg.catalog.catalog)
        rows, more = LocalSQL(lake, ALL_TABLES.values()).sql(query, limit=limit)
        click.echo(show_string(rows, more))  # what Spark's path below prints
        return
    ctx.lake.register_all(ALL_TABLES.values())
    df = ctx.spark.sql(query)
    click.echo(df._show_string(limit, 80, False) if hasattr(df, "_show_string") else df.limit(limit).toPandas().to_string())


@cli.command()
@_common
def tables(ctx):
    """List the tables, their location, version and row count."""
    from finelake.lake import Lake
    from finelake.lake.query import LocalSQL
    from finelake.tables import ALL_TABLES

    # delta-rs's SQL engine: no Spark start, counts from the files' statistics
    lake = Lake(ctx.cfg.lake, None, database=ctx.cfg.catalog.database, catalog=ctx.cfg.catalog.catalog)
    q = LocalSQL(lake, ALL_TABLES.values())
    for t in ALL_TABLES.values():
        v = q.names.get(lake.sql_name(t))
        rows = q.count(lake.sql_name(t)) if v is not None else "-"
        click.echo(f"{t.name:16} v{'-' if v is None else v:<4} rows={rows:<8} {lake.path(t)}  {t.description}")


@cli.command()
@click.option("--table", "tables_", multiple=True, metavar="NAME",
              help="Only this table (repeatable; default: every table of the lake).")
@click.option("--dry-run", is_flag=True, help="Change nothing; list the files VACUUM would delete.")
@click.option("--no-vacuum", is_flag=True, help="Compact only.")
@click.option("--no-compact", is_flag=True, help="VACUUM only.")
@_common
def optimize(ctx, tables_, dry_run, no_vacuum, no_compact):
    """Table maintenance: OPTIMIZE (compaction by key bucket) and VACUUM keeping pinned versions.

    VACUUM keeps every file the oldest Delta version pinned by a training run (MLflow) or by
    maintenance.pinned_versions needs, and at least maintenance.min_retention_hours of history.
    """
    from finelake.maintenance import optimize_lake
    from finelake.tables import ALL_TABLES

    unknown = [t for t in tables_ if t not in ALL_TABLES]
    if unknown:
        raise FinelakeError(f"unknown table(s) {unknown}; known: {sorted(ALL_TABLES)}")
    for r in optimize_lake(ctx.cfg, ctx.lake, list(tables_) or None, dry_run=dry_run,
                           vacuum=not no_vacuum, compact=not no_compact):
        click.echo(r.summary(dry_run))
        if dry_run:
            for f in r.vacuumed:
                click.echo(f"  {f}")


@cli.command()
@click.option("--table", default=None, help="Training table: pairs, documents, continuations, or any with a text column (default: train.table).")
@click.option("--version", "version", type=int, default=None, help="Delta version of the table (default: latest; recorded).")
@click.option("--method", type=click.Choice(["lora", "full", "scratch"]), default=None, help="LoRA, full fine-tuning, or pre-training from scratch (default: train.method).")
@click.option("--token-budget", type=int, default=None, help="Train on at most N tokens (whole examples).")
@click.option("--match-tokens", default=None, metavar="TABLE[@V]", help="Cap the tokens at another table's count (equal-token comparison).")
@click.option("--max-steps", type=int, default=None, help="Override train.max_steps.")
@_common
def train(ctx, table, version, method, token_budget, match_tokens, max_steps):
    """Train a model on a Delta table with TRL (LoRA / full / scratch); tracked in MLflow."""
    from finelake.jobs.train import run_train

    _print_stats(run_train(ctx, table=table, version=version, method=method, token_budget=token_budget,
                           match_tokens_of=match_tokens, max_steps=max_steps))


@cli.command()
@click.option("--model", default=None, metavar="URI_OR_PATH", help="models:/name/version, runs:/id/model, a folder, or embedded:<name> (default: train.base_model).")
@click.option("--base", default=None, metavar="URI_OR_PATH", help="Base model for the token distribution shift (default: the trained model's base).")
@click.option("--limit", type=int, default=None, help="First N items of each benchmark (default: evaluate.limit).")
@click.option("--benchmark", "benchmarks", multiple=True, type=click.Choice(["ifeval", "alpacaeval", "aspects", "mt_bench", "token_shift"]), help="Run only these (repeatable; default: evaluate.benchmarks).")
@_common
def evaluate(ctx, model, base, limit, benchmarks):
    """IFEval, AlpacaEval-style win rates, aspect scores, token shift -> MLflow and evaluations."""
    from finelake.jobs.evaluate import run_evaluate

    _print_stats(run_evaluate(ctx, model=model, base=base, limit=limit, benchmarks=list(benchmarks) or None))


@cli.command()
@click.option("--out", default=None, help="Folder for compare.md and plots (default: <lake>/_reports/compare-<run>).")
@_common
def compare(ctx, out):
    """Small-scale grid: pairs vs documents at equal tokens, LoRA vs full; Markdown + plots."""
    from finelake.jobs.compare import run_compare

    click.echo(f"comparison written to {run_compare(ctx, out=out)}")


@cli.command()
@click.option("--skip", multiple=True, type=click.Choice(["spark", "models"]),
              help="Leave out a group of checks (repeatable).")
@_common
def doctor(ctx, skip):
    """Check this machine for the profile: versions, CPU, llama.cpp build, Delta, models (one short
    generation, one embedding). Exit 1 when a check fails; make setup ends with it."""
    from finelake.doctor import run_doctor

    checks = run_doctor(ctx.cfg, skip=tuple(skip))
    for c in checks:
        click.echo(c.line())
    failed = [c.name for c in checks if c.ok is False]
    if failed:
        raise click.ClickException(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}")
    click.echo(f"doctor: all checks passed for profile {ctx.cfg.profile}")


@cli.command("delta-jars")
@click.option("--force", is_flag=True, help="Resolve again even when a complete set is there.")
@click.option("--check", is_flag=True, help="Only say where the jars are; exit 1 when they are missing.")
@click.option("--list", "as_list", is_flag=True, help="Print the jar paths comma-separated (for spark-submit --jars); exit 1 when missing.")
def delta_jars(force, check, as_list):
    """Fetch the Delta Lake jars for local Spark from Maven Central into the virtualenv (make setup runs this)."""
    from finelake import delta_jars as dj

    if as_list:
        jars = dj.installed_jars()
        click.echo(",".join(jars))
        sys.exit(0 if jars else 1)
    if check:
        jars = dj.installed_jars()
        click.echo(f"{len(jars)} Delta jars ({dj.COORDINATES}) in {dj.jars_dir()}")
        sys.exit(0 if jars else 1)
    try:
        jars = dj.fetch(force=force)
    except dj.DeltaJarsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{len(jars)} Delta jars ({dj.COORDINATES}) in {dj.jars_dir()}")


@cli.command()
@click.option("--conf", "profile", default=lambda: os.environ.get("FINELAKE_PROFILE", "local"),
              show_default="local", help="Profile: a YAML file or a packaged name.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value (repeatable).")
@click.option("--lake", default=None, help="Lake root folder/URI (overrides the profile's lake).")
@click.option("--print", "print_yaml", is_flag=True, help="Print the resolved profile as YAML.")
@click.option("--models", "models", is_flag=True,
              help="Also read every model's small files (config, tokenizer, pooling; no weights; "
                   "hub models at their pinned revision) and check them against their stages.")
def validate(profile, overrides, lake, print_yaml, models):
    """Check a profile without loading any model: keys and types, every model's backend and
    options, the Spark/GPU settings (against the running session when there is one); with
    --models each model's chat template, pooling and positions. Exit 1 naming the bad key."""
    from finelake.validate import resolved_yaml, run_validate

    try:
        cfg, lines, problems = run_validate(profile, list(overrides), lake=lake,
                                            model_files=models)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if print_yaml:
        click.echo(resolved_yaml(cfg), nl=False)
    for line in lines:
        click.echo(line, err=print_yaml)
    if problems:
        raise click.ClickException(f"{cfg.source_file}: " + "; ".join(problems))
    click.echo(f"validate: profile {cfg.profile} is valid", err=print_yaml)


@cli.command("emr-steps")
@click.option("--conf", "profile", default="emr", show_default=True,
              help="Profile the steps run with (a packaged name, or a path on the primary node).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value in every step (repeatable).")
@click.option("--lake", default=None, help="Lake root URI for every step (default: the profile's).")
@click.option("--run-id", default=None, help="Run id of every step (default: new).")
@click.option("--wheel", default=None, metavar="S3_URI",
              help="finelake wheel to put first on --py-files (the bootstrap action installs one).")
@click.option("--queries", default=None, help="Ingest's queries input (URI the cluster reads).")
@click.option("--documents", default=None, help="Ingest's documents input (URI the cluster reads).")
@_apply(_limits)
def emr_steps(profile, overrides, lake, run_id, wheel, queries, documents, max_queries,
              max_documents):
    """Print one pipeline run as EMR steps: the JSON for `aws emr add-steps --steps file://...`,
    for a cluster of release emr-spark-8.0.0 (Spark 4.0.2, Delta 4.0.0) created with
    deploy/emr/configurations.json and the bootstrap action deploy/emr/bootstrap.sh."""
    import json

    from finelake import deploy
    from finelake.runtime import new_run_id

    try:
        cfg = load_checked(profile, list(overrides), lake=lake)
        steps = deploy.emr_steps(cfg, profile=profile, run_id=run_id or new_run_id(), wheel=wheel,
                                 lake=lake, overrides=overrides, queries=queries,
                                 documents=documents, max_queries=max_queries,
                                 max_documents=max_documents)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(_one_line(exc)) from None
    click.echo(json.dumps(steps, indent=2))


_register_stages()


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``finelake`` console script and of ``jobs/*.py`` under spark-submit."""
    cli.main(args=argv, prog_name="finelake", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
