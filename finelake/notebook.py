"""What the Databricks notebook (``notebooks/finelake_pipeline.py``) reads from its widgets.

The notebook runs against a workspace's lake, so its inputs are explicit: without a ``queries``
or ``documents`` widget it refuses to ingest, instead of falling back to the pipeline's default
(the shipped sample, which belongs in a local lake only). Pure parsing, no Spark: tested in
``tests/test_notebook.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from finelake.errors import ConfigError


@dataclass(frozen=True)
class NotebookInputs:
    """The notebook's run, from its widgets.

    Attributes:
        profile: ``--conf`` of the run (a packaged name or a workspace path).
        queries, documents: what ingest reads (None: that table is not ingested this run).
        ingest: False to run the stages over what the lake already holds.
        max_documents: limit for the stages after ingest (None: the profile's).
        run_id: the run id (None: a new run; an earlier id resumes that run).
    """

    profile: str
    queries: Optional[str]
    documents: Optional[str]
    ingest: bool
    max_documents: Optional[int]
    run_id: Optional[str]


def notebook_inputs(widgets: Mapping[str, str]) -> NotebookInputs:
    """Parse the notebook's widget values (all strings; empty means unset).

    Raises:
        ConfigError: ``ingest`` is ``yes`` and neither ``queries`` nor ``documents`` is set, or
            ``max_documents`` / ``ingest`` / ``profile`` has a bad value (the widget is named).
    """
    def text(name: str) -> Optional[str]:
        value = (widgets.get(name) or "").strip()
        return value or None

    ingest = (text("ingest") or "yes").lower()
    if ingest not in ("yes", "no"):
        raise ConfigError(f"widget ingest: 'yes' or 'no', not {ingest!r}")
    queries, documents = text("queries"), text("documents")
    if ingest == "yes" and queries is None and documents is None:
        raise ConfigError("widget queries / documents: name the files or folders to ingest (e.g. "
                          "/Volumes/<catalog>/<schema>/inputs/documents), or set ingest to 'no' to "
                          "run the stages over the lake's tables; the notebook never ingests the "
                          "shipped sample into a workspace lake")
    limit = text("max_documents")
    try:
        max_documents = int(limit) if limit is not None else None
    except ValueError:
        raise ConfigError(f"widget max_documents: a whole number, not {limit!r}") from None
    if max_documents is not None and max_documents < 1:
        raise ConfigError(f"widget max_documents: at least 1, not {max_documents}")
    profile = text("profile")
    if profile is None:
        raise ConfigError("widget profile: empty (e.g. databricks)")
    return NotebookInputs(profile=profile, queries=queries, documents=documents,
                          ingest=ingest == "yes", max_documents=max_documents,
                          run_id=text("run_id"))
