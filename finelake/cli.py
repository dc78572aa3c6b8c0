"""The ``finelake`` command line: one subcommand per job, ``run`` for the whole pipeline.

Every subcommand takes ``--conf PROFILE`` (a YAML path or a packaged profile name), ``--set
key.path=value`` overrides, ``--lake DIR`` and ``--run-id``. The same commands run under
``spark-submit jobs/<job>.py --conf conf/<profile>.yaml ...``.

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

from finelake.config import ConfigError, hub_model_ids, load_config
from finelake.runtime import FinelakeError, StageContext

log = logging.getLogger("finelake")

STAGES = ("ingest", "genericize", "index", "match", "instantiate", "judge", "budget")


def _common(f: Callable) -> Callable:
    """Options every subcommand shares."""

    @click.option("--conf", "profile", default=lambda: os.environ.get("FINELAKE_PROFILE", "local"),
                  show_default="local", help="Profile: a YAML file or a packaged name (local, databricks, emr).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config value, e.g. --set match.threshold=0.5 (repeatable).")
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
            cfg = load_config(profile, list(overrides), lake=lake)
            if not hub_model_ids(cfg):  # embedded models only: never ask the hub (driver side)
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            ctx = StageContext(cfg, run_id=run_id)
            return f(ctx, **kwargs)
        except (ConfigError, FinelakeError, FileNotFoundError, KeyError, ValueError) as exc:
            if verbose:
                raise
            raise click.ClickException(_one_line(exc)) from None
        except Exception as exc:  # Spark's AnalysisException and friends
            name = type(exc).__name__
            if verbose or not (name.endswith("Exception") or "Lake" in name):
                raise
            raise click.ClickException(f"{name}: {_one_line(exc)}") from None

    return wrapper


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


@cli.command()
@_apply(_inputs + _fields)
@_common
def ingest(ctx, queries, documents, query_field, text_field, id_field, source_field):
    """Ingest queries and/or documents into Delta (normalize, dedup, decontaminate, quarantine).

    Only the inputs named are read."""
    from finelake.jobs.ingest import run_ingest

    _print_stats(run_ingest(ctx, queries=queries, documents=documents, query_field=query_field,
                            text_field=text_field, id_field=id_field, source_field=source_field))


def _stage_command(stage: str, help_text: str):
    @cli.command(name=stage, help=help_text)
    @_apply(_limits)
    @_common
    def cmd(ctx, max_queries, max_documents):
        import importlib

        mod = importlib.import_module(f"finelake.jobs.{stage}")
        _print_stats(getattr(mod, f"run_{stage}")(ctx, max_queries=max_queries,
                                                  max_documents=max_documents))

    return cmd


_stage_command("genericize", "Genericize queries into <fi> templates (queries -> templates).")
_stage_command("index", "Embed compatible document descriptions and build the FAISS template index.")
_stage_command("match", "Match documents to templates (Gaussian-pooled embeddings, threshold, weighted sample).")
_stage_command("instantiate", "Instantiate matched templates against their documents (excerpt answers).")
_stage_command("judge", "Score instantiated pairs 1-5 and keep those >= judge.min_score.")
_stage_command("budget", "Keep judged pairs within each document's token budget (with rollover) -> pairs.")


@cli.command(name="continue")
@click.option("--max-documents", type=int, default=None, help="Continue at most N documents (seeded uniform sample).")
@_common
def continue_cmd(ctx, max_documents):
    """Non-instructional data: halve sampled documents, a teacher continues them (documents -> continuations)."""
    from finelake.jobs.continuation import run_continue

    _print_stats(run_continue(ctx, max_documents=max_documents))


@cli.command()
@_apply(_inputs + _fields + _limits)
@_common
def run(ctx, queries, documents, query_field, text_field, id_field, source_field, max_queries,
        max_documents):
    """Run the whole pipeline: ingest, genericize, index, match, instantiate, judge, budget, report.

    With neither --queries nor --documents, the inputs are the shipped sample; with one named,
    only that one is ingested and the other table must already be in the lake."""
    from finelake.jobs.pipeline import run_pipeline

    run_pipeline(ctx, queries=queries, documents=documents, max_queries=max_queries,
                 max_documents=max_documents,  # prints each stage's summary as it finishes
                 fields=dict(query_field=query_field, text_field=text_field, id_field=id_field,
                             source_field=source_field))


@cli.command()
@click.option("--out", default=None, help="Folder for report.md and plots (default: <lake>/_reports/<run>).")
@_common
def report(ctx, out):
    """Print and save the funnel, distributions, template diversity and stage speeds."""
    from finelake.jobs.report import run_report

    path = run_report(ctx, out=out)
    click.echo(f"report written to {path}")


@cli.command()
@click.option("--sample", "n", type=int, default=200, help="Documents to score.")
@_common
def calibrate(ctx, n):
    """Print the distribution of document-template cosine scores to choose a match threshold."""
    from finelake.jobs.match import calibrate as run_calibrate

    click.echo(run_calibrate(ctx, n))


@cli.command()
@click.argument("query")
@click.option("--limit", type=int, default=50, show_default=True, help="Rows to print.")
@_common
def sql(ctx, query, limit):
    """Run Spark SQL over the registered tables, e.g. finelake sql "SELECT count(*) FROM finelake.pairs"."""
    from finelake.tables import ALL_TABLES

    ctx.lake.register_all(ALL_TABLES.values())
    df = ctx.spark.sql(query)
    click.echo(df._show_string(limit, 80, False) if hasattr(df, "_show_string") else df.limit(limit).toPandas().to_string())


@cli.command()
@_common
def tables(ctx):
    """List the tables, their location, version and row count."""
    from finelake.lake import Lake
    from finelake.tables import ALL_TABLES

    lake = Lake(ctx.cfg.lake, None)  # delta-rs only: no Spark start needed
    for t in ALL_TABLES.values():
        v = lake.version(t)
        rows = lake.read_arrow(t, columns=[t.key[0]]).num_rows if v is not None else "-"
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
def validate(profile, overrides, lake, print_yaml):
    """Check a profile without loading any model: keys and types, every model's backend and
    options, the Spark/GPU settings (against the running session when there is one). Exit 1
    naming the bad key."""
    from finelake.validate import resolved_yaml, run_validate

    try:
        cfg, lines, problems = run_validate(profile, list(overrides), lake=lake)
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
        cfg = load_config(profile, list(overrides), lake=lake)
        steps = deploy.emr_steps(cfg, profile=profile, run_id=run_id or new_run_id(), wheel=wheel,
                                 lake=lake, overrides=overrides, queries=queries,
                                 documents=documents, max_queries=max_queries,
                                 max_documents=max_documents)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(_one_line(exc)) from None
    click.echo(json.dumps(steps, indent=2))


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``finelake`` console script and of ``jobs/*.py`` under spark-submit."""
    cli.main(args=argv, prog_name="finelake", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
