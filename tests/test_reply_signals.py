"""The ``flags`` column of genericizations / instantiations and the stage summary's parse rate
(issue 25 items 2-3), on the synthetic ``load`` backend: its replies are schema-valid JSON when a
schema is sent and fixed non-JSON text when not, so the expected counts are known in advance."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pyarrow as pa

from finelake.config import load_config

LOAD_GEN = {"backend": "load", "model": "load", "revision": None, "batch_size": 8,
            "max_tokens": 64, "temperature": 0.0, "options": {}}
QUERIES = ["how do I repair a bicycle chain at home", "explain the causes of World War I",
           "write a python function that sorts a list"]


def _rows(constrained):
    from finelake.jobs.genericize import genericize_rows

    pdf = pd.DataFrame({"query_id": ["q0", "q1", "q2"], "query": QUERIES})
    return genericize_rows(pdf, LOAD_GEN, "decomposed", 3, "genericize-v1", constrained=constrained)


def test_genericize_rows_flag_each_reply_constrained_or_not():
    tight = _rows(True)
    assert [r["flags"] for r in tight] == [["constrained"]] * 3
    assert all(r.get("reason") != "unparseable_output" for r in tight), tight
    free = _rows(False)
    # the load backend answers a request without a schema with plain text: nothing to parse
    assert [(r["status"], r["reason"], r["flags"]) for r in free] == \
        [("invalid", "unparseable_output", [])] * 3
    assert all(r["raw_output"].startswith("load backend reply") for r in free)


def test_instantiate_rows_flag_decomposed_replies():
    from finelake.jobs.instantiate import instantiate_rows

    doc = ("The wild boar is a suid native to much of Eurasia and North Africa. Wild boars are "
           "omnivores and eat roots, fruit and small animals, mostly at night.")
    pdf = pd.DataFrame({"doc_id": ["d0"], "template_id": ["t0"], "text": [doc],
                        "template": ["what does the <fi>animal</fi> eat?"]})
    rows = instantiate_rows(pdf, LOAD_GEN, "decomposed", 6000, 0.8, 4, "instantiate-v1")
    assert rows[0]["flags"] == ["constrained"] and rows[0]["raw_output"]


def test_stage_summary_and_old_lakes(spark, tmp_path):
    """A lake whose genericizations table predates ``flags`` gets the column; the summary shows
    the parse rate of the run's replies and the flag counts; the column is queryable."""
    from conftest import sample_slice
    from finelake.jobs.genericize import run_genericize
    from finelake.jobs.ingest import run_ingest
    from finelake.runtime import StageContext
    from finelake.tables import GENERICIZATIONS

    lake_dir = str(tmp_path / "lake")
    ctx = StageContext(load_config("load-test", ["genericize.chunk_rows=8"], lake=lake_dir),
                       spark=spark)
    run_ingest(ctx, queries=sample_slice(tmp_path, "queries.jsonl", 8))
    old = dataclasses.replace(GENERICIZATIONS, schema=GENERICIZATIONS.schema.remove(
        GENERICIZATIONS.schema.get_field_index("flags")))
    ctx.lake.create(old)
    assert "flags" not in ctx.lake.read(GENERICIZATIONS).columns

    stats = run_genericize(ctx, max_queries=4)
    rows = ctx.lake.read_arrow(GENERICIZATIONS).to_pylist()
    replied = [r for r in rows if r["raw_output"] is not None]
    assert replied and all(r["flags"] == ["constrained"] for r in replied)
    assert all(r["flags"] is None for r in rows if r["raw_output"] is None)
    n = len(replied)
    unparseable = sum(r["reason"] == "unparseable_output" for r in replied)
    assert stats.extra["parse_rate"] == f"{(n - unparseable) / n:.3f} ({n - unparseable}/{n})"
    assert stats.extra["flags"] == f"{{constrained:{n}}}"

    # unconstrained: the next queries' plain-text replies are all unparseable, and flagged so
    free = StageContext(load_config("load-test", ["genericize.chunk_rows=8",
                                                  "genericize.constrained=false"],
                                    lake=lake_dir), spark=spark)
    s2 = run_genericize(free, max_queries=8)
    new = [r for r in ctx.lake.read_arrow(GENERICIZATIONS).to_pylist()
           if r["raw_output"] is not None and r["flags"] == []]
    assert new and all(r["reason"] == "unparseable_output" for r in new)
    total = n + len(new)
    assert s2.extra["parse_rate"] == f"{(n - unparseable) / total:.3f} ({n - unparseable}/{total})"
    assert ctx.lake.read(GENERICIZATIONS).where("array_contains(flags, 'constrained')").count() == n
    assert pa.types.is_list(ctx.lake.read_arrow(GENERICIZATIONS).schema.field("flags").type)
