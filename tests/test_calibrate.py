"""`finelake calibrate` (jobs/calibrate.py, issue 25 item 4) on a small lake with an IVF index of
two lists probed one at a time: candidates per document and recall at the threshold for K=5
against K=10 and for nprobe against every list, cross-checked with what match itself found."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from click.testing import CliRunner

from finelake.config import load_config
from finelake.jobs import calibrate, index, match
from finelake.jobs.common import arrow_from_rows
from finelake.runtime import StageContext
from finelake.tables import DOCUMENTS, GENERICIZATIONS, MATCH_LOG, TEMPLATES

KINDS = ["a recipe", "a news article", "a biography", "a scientific explanation", "a product review",
         "a travel guide", "a legal text", "a sports report", "a software tutorial", "a poem"]
TOPICS = ["about food and cooking", "about business and money", "about a historical person",
          "about nature and animals", "about computers and programming", "about health",
          "about music and art", "about cities and travel"]
N_DOCS = 8
OVERRIDES = ["match.thresholds.embedded:all-minilm-l6-v2=0.25", "index.exact_below=1",
             "index.recall_documents=0",
             "index.nlist=2", "index.nprobe=1", "match.top_k=5"]


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    lake_dir = str(tmp_path_factory.mktemp("calibrate") / "lake")
    ctx = StageContext(load_config("local", OVERRIDES, lake=lake_dir), spark=spark)
    lines = resources.files("finelake.sample").joinpath("documents.jsonl").read_text(
        encoding="utf-8").split("\n")[:N_DOCS]
    docs = [{"doc_id": f"d{i}", "text": json.loads(line)["text"], "source": "sample",
             "num_tokens": 100} for i, line in enumerate(lines)]
    descs = [f"{k} {t}" for k in KINDS for t in TOPICS]  # 80 templates
    tpls = [{"template_id": f"t{i:02d}", "template": f"Tell me about <fi>topic {i}</fi>.",
             "compatible_document_description": d, "num_slots": 1 + i % 3,
             "source_query_ids": [f"q{i}"], "source_count": 1} for i, d in enumerate(descs)]
    gens = [{"query_id": f"q{i}", "status": "ok", "template_id": f"t{i:02d}", "num_slots": 1 + i % 3}
            for i in range(len(descs))]
    for tdef, rows in ((DOCUMENTS, docs), (TEMPLATES, tpls), (GENERICIZATIONS, gens)):
        ctx.lake.merge(tdef, arrow_from_rows(rows, tdef), ctx.run_id)
    index.run_index(ctx)
    match.run_match(ctx)
    return lake_dir


def test_calibrate_reports_k_and_nprobe_recall(spark, lake):
    ctx = StageContext(load_config("local", OVERRIDES, lake=lake), spark=spark)
    cal = calibrate.run_calibrate(ctx, n=N_DOCS)
    assert cal.documents == N_DOCS and cal.index["kind"] == "ivf_flat_ip" and cal.index["nlist"] == 2
    own, every = "nprobe 1 (index)", "all 2 lists"
    assert set(cal.counts) == {(k, p) for k in (5, 10) for p in (own, every)}
    # match searched as calibrate's K=5 at the index's nprobe: the same candidates per document
    log = ctx.lake.read(MATCH_LOG).toPandas()
    assert cal.counts[(5, own)].mean == pytest.approx(log["candidates"].mean())
    assert cal.counts[(5, own)].with_candidate == int((log["candidates"] > 0).sum())
    for k in (5, 10):
        probed, full = cal.counts[(k, own)], cal.counts[(k, every)]
        # probing one list finds a subset of probing both: recall = pairs found / pairs there
        assert full.mean >= probed.mean > 0
        assert cal.probe_recall[(k, own)] == pytest.approx(probed.mean / full.mean)
        assert cal.probe_recall[(k, every)] == pytest.approx(1.0)
    for pair in ((5, 10), (10, 5)):
        assert 0.0 <= cal.k_recall[pair] <= 1.0
    # score quantiles (the profile's K, top-k search): each column ascending, every score at most
    # its document's best, so the best scores' upper quantile reaches the median of all scores
    assert len(cal.best) == len(calibrate.QUANTILES)
    assert cal.best == sorted(cal.best) and cal.top_k == sorted(cal.top_k)
    assert cal.best[-1] >= cal.top_k[2] and all(-1.0 <= v <= 1.0 for v in cal.best + cal.top_k)
    shares = [share for _, share, _ in cal.thresholds]
    assert len(shares) == 5 and shares == sorted(shares, reverse=True)  # higher keeps fewer
    text = cal.text()
    assert "K=5 finds" in text and "vs all lists" in text and "reference" in text


def test_cli_prints_the_report(spark, lake):
    from finelake.cli import cli

    r = CliRunner().invoke(cli, ["calibrate", "--sample", "3", "--lake", lake,
                                 *[a for o in OVERRIDES for a in ("--set", o)]])
    assert r.exit_code == 0, r.output
    assert "documents: 3" in r.output and "nprobe 1 (index)" in r.output
