"""The Databricks notebook's widgets (finelake.notebook): explicit inputs, never the sample."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from finelake.errors import ConfigError
from finelake.notebook import notebook_inputs

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "finelake_pipeline.py"
BASE = {"profile": "databricks", "queries": "", "documents": "", "ingest": "yes",
        "max_documents": "", "run_id": ""}


def test_no_input_is_refused_rather_than_ingesting_the_sample():
    with pytest.raises(ConfigError, match="widget queries / documents"):
        notebook_inputs(BASE)
    with pytest.raises(ConfigError, match="widget queries / documents"):
        notebook_inputs({**BASE, "queries": "   "})


def test_inputs_limits_and_run_id_are_read_from_the_widgets():
    got = notebook_inputs({**BASE, "documents": " /Volumes/main/finelake/inputs/documents ",
                           "max_documents": "1000", "run_id": "r-7"})
    assert (got.queries, got.documents) == (None, "/Volumes/main/finelake/inputs/documents")
    assert got.ingest and got.max_documents == 1000 and got.run_id == "r-7"
    resume = notebook_inputs({**BASE, "ingest": "no"})  # the stages over the lake's tables
    assert not resume.ingest and resume.run_id is None and resume.max_documents is None


@pytest.mark.parametrize("widget, value", [("max_documents", "ten"), ("max_documents", "0"),
                                           ("ingest", "maybe"), ("profile", " ")])
def test_bad_widget_values_are_named(widget, value):
    with pytest.raises(ConfigError, match=f"widget {widget}"):
        notebook_inputs({**BASE, "documents": "d", widget: value})


def test_the_notebook_passes_the_widgets_and_never_calls_the_pipeline_without_inputs():
    """Read, not run (it needs a workspace): every run_pipeline call names its inputs."""
    tree = ast.parse(NOTEBOOK.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", getattr(n.func, "attr", "")) == "run_pipeline"]
    assert calls
    for call in calls:
        kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert kw["queries"] == "args.queries" and kw["documents"] == "args.documents"
    assert "notebook_inputs(" in NOTEBOOK.read_text()
