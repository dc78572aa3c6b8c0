"""The pipeline is defined once (finelake.jobs.pipeline.PIPELINE): the stage declarations hold
together, and the command line offers each stage with the options it declares."""

from __future__ import annotations

from click.testing import CliRunner

from finelake.cli import cli
from finelake.jobs.pipeline import PIPELINE, STAGES, run_order
from finelake.stage import ModelStage, Stage


def test_every_stage_is_declared_once_with_its_tables():
    names = [s.name for s in PIPELINE]
    assert len(names) == len(set(names)) and set(STAGES) == set(names)
    for s in PIPELINE:
        assert isinstance(s, (Stage, ModelStage)) and s.help
        if isinstance(s, ModelStage):
            cols = s.table.schema.names
            assert s.key in cols and s.table in s.writes
            for c in ("status", "attempts"):  # pending = no row, or retry; attempts bound retries
                assert c in cols, (s.name, c)
            assert s.resources.uses_gpu  # a model task asks for a GPU where there are GPUs


def test_gates_wait_for_model_stages_that_come_first():
    order = [s.name for s in run_order()]
    for s in PIPELINE:
        for g in s.gates:
            upstream = STAGES[g.stage]
            assert isinstance(upstream, ModelStage) and upstream.table == g.table
            assert order.index(g.stage) < order.index(s.name)
    assert {g.stage for g in STAGES["index"].gates} == {"genericize"}
    assert {g.stage for g in STAGES["budget"].gates} == {"instantiate", "judge"}


def test_the_cli_has_a_command_per_stage_with_its_options():
    runner = CliRunner()
    for s in PIPELINE:
        assert s.name in cli.commands
        out = runner.invoke(cli, [s.name, "--help"]).output
        assert ("--max-documents" in out) == ("max_documents" in s.options), s.name
        assert ("--max-queries" in out) == ("max_queries" in s.options), s.name
        assert ("--force" in out) == bool(s.gates), s.name
        assert ("--queries" in out) == ("inputs" in s.options), s.name
    run_help = runner.invoke(cli, ["run", "--help"]).output
    assert "--force" in run_help and "--no-canary" in run_help
