"""jobs/match.py stable across runs (issue 16 item 3): complexity weights once per index version,
incremental runs sample as one run and never a document twice, a kill between the two writes and a rerun give
the uninterrupted tables, and no sort or cache of the documents (text) without a limit."""

from __future__ import annotations

import json
import os
from importlib import resources

import pytest

from finelake.config import load_config
from finelake.jobs import index, match
from finelake.jobs.common import arrow_from_rows
from finelake.runtime import StageContext
from finelake.tables import DOCUMENTS, GENERICIZATIONS, MATCH_LOG, MATCHES, TEMPLATES

DESCRIPTIONS = ["a recipe or cooking guide", "a news article about business or finance",
                "a biography of a historical person", "a scientific explanation of a natural process",
                "a product review or buying guide"]
SLOTS = [1, 2, 1, 3, 2]
QUERY_SLOTS = [1, 1, 1, 2, 3, 3, 3, 3]  # the real queries' complexities (target)
N_DOCS = 6


def _ctx(spark, lake_dir, *overrides):
    return StageContext(load_config("local", ["match.thresholds.embedded:all-minilm-l6-v2=0.0",
                                              "match.templates_per_doc=2", *overrides],
                                    lake=lake_dir), spark=spark)


def _lake(spark, lake_dir, n_docs=N_DOCS, *overrides):
    ctx = _ctx(spark, lake_dir, *overrides)
    lines = resources.files("finelake.sample").joinpath("documents.jsonl").read_text(
        encoding="utf-8").splitlines()[:n_docs]
    docs = [{"doc_id": f"d{i}", "text": json.loads(line)["text"], "source": "sample",
             "num_tokens": 100} for i, line in enumerate(lines)]
    tpls = [{"template_id": f"t{i}", "template": f"Tell me about <fi>topic {i}</fi>.",
             "compatible_document_description": d, "num_slots": k, "source_query_ids": [f"q{i}"],
             "source_count": 1} for i, (d, k) in enumerate(zip(DESCRIPTIONS, SLOTS))]
    gens = [{"query_id": f"q{i}", "status": "ok", "template_id": f"t{i % 5}", "num_slots": k}
            for i, k in enumerate(QUERY_SLOTS)]
    for tdef, rows in ((DOCUMENTS, docs), (TEMPLATES, tpls), (GENERICIZATIONS, gens)):
        ctx.lake.merge(tdef, arrow_from_rows(rows, tdef), ctx.run_id)
    return ctx


def _rows(ctx, tdef):
    out = []
    for r in ctx.lake.read_arrow(tdef).to_pylist():
        r.pop("run_id")
        out.append(tuple(sorted((k, round(v, 5) if isinstance(v, float) else v) for k, v in r.items())))
    return sorted(out, key=repr)


def test_weights_are_stored_once_per_index_version(spark, lake_dir):
    ctx = _lake(spark, lake_dir)
    index.run_index(ctx)
    latest = index.latest_index(ctx.cfg, spark)
    path = os.path.join(latest["path"], index.WEIGHTS_FILE)
    stored = json.load(open(path))
    # target: ok genericizations per num_slots; pool: the candidates (every template above the
    # threshold) of the calibration documents per num_slots (issue 25 item 5), here all six
    assert stored["target"] == {"1": 3, "2": 1, "3": 4}
    pool = {int(k): v for k, v in stored["pool"].items()}
    T, P = sum(stored["target"].values()), sum(pool.values())
    w = {int(k): v for k, v in stored["weights"].items()}
    # smoothing 1 over 3 complexities: (t+1)/(T+3) / ((p+1)/(P+3))
    assert w == pytest.approx({k: ((stored["target"][str(k)] + 1) / (T + 3)) /
                                  ((pool.get(k, 0) + 1) / (P + 3)) for k in (1, 2, 3)})
    # more real queries later: the version's weights do not move (never rewritten)
    ctx.lake.merge(GENERICIZATIONS, arrow_from_rows([{"query_id": "q99", "status": "ok",
                                                      "template_id": "t1", "num_slots": 2}],
                                                    GENERICIZATIONS), "later")
    index.run_index(_ctx(spark, lake_dir))
    assert json.load(open(path)) == stored
    stats = match.run_match(_ctx(spark, lake_dir))
    assert stats.extra["weights"] == "{" + ", ".join(f"{k}:{v:.2f}" for k, v in sorted(w.items())) + "}"
    # the pool counts what match's own search found for the same documents (threshold 0: every
    # template the search returns), by the templates' slot counts
    slots = dict(zip((f"t{i}" for i in range(len(SLOTS))), SLOTS))
    assert P == sum(r["candidates"] for r in ctx.lake.read_arrow(MATCH_LOG).to_pylist())
    assert set(pool) <= set(slots.values())


def test_incremental_runs_sample_like_one_run_and_never_twice(spark, tmp_path):
    one = _lake(spark, str(tmp_path / "one"))
    index.run_index(one)
    match.run_match(one)

    inc = _lake(spark, str(tmp_path / "inc"))
    index.run_index(inc)
    match.run_match(_ctx(spark, str(tmp_path / "inc"), "run.max_documents=3"))  # d0, d1, d2
    first = _rows(inc, MATCHES)
    match.run_match(_ctx(spark, str(tmp_path / "inc")))  # the rest
    match.run_match(_ctx(spark, str(tmp_path / "inc")))  # nothing left: no second sample
    got = {r["doc_id"]: r for r in inc.lake.read_arrow(MATCH_LOG).to_pylist()}
    assert len(got) == N_DOCS
    # the first three documents' matches did not move, and every document sampled as the one run
    assert set(first) <= set(_rows(inc, MATCHES))
    assert _rows(one, MATCHES) == _rows(inc, MATCHES)
    one_log = {r["doc_id"]: r for r in one.lake.read_arrow(MATCH_LOG).to_pylist()}
    assert len(_rows(one, MATCHES)) == sum(r["sampled"] for r in one_log.values()) > 0
    assert all(got[d]["sampled"] == one_log[d]["sampled"] for d in got)


def test_kill_between_matches_and_match_log_then_rerun(spark, tmp_path, monkeypatch):
    whole = _lake(spark, str(tmp_path / "whole"))
    index.run_index(whole)
    match.run_match(whole)

    killed = _lake(spark, str(tmp_path / "killed"))
    index.run_index(killed)
    monkeypatch.setenv("FINELAKE_FAIL_AFTER", "match_log:1")  # after matches, before match_log
    with pytest.raises(RuntimeError, match="simulated failure in match_log"):
        match.run_match(killed)
    assert killed.lake.exists(MATCHES) and not killed.lake.exists(MATCH_LOG)
    monkeypatch.delenv("FINELAKE_FAIL_AFTER")
    match.run_match(_ctx(spark, str(tmp_path / "killed")))
    for tdef in (MATCHES, MATCH_LOG):
        assert _rows(killed, tdef) == _rows(whole, tdef)


def test_no_sort_or_cache_of_documents_without_a_limit(spark, lake_dir, monkeypatch):
    from pyspark.sql import DataFrame

    ctx = _lake(spark, lake_dir, N_DOCS, "run.max_documents=null")
    assert ctx.cfg.run.max_documents is None
    index.run_index(ctx)
    seen = []
    for name in ("cache", "persist", "orderBy", "sort"):
        orig = getattr(DataFrame, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            seen.append((_name, tuple(self.columns)))
            return _orig(self, *a, **k)
        monkeypatch.setattr(DataFrame, name, spy)
    stats = match.run_match(ctx)
    assert stats.rows_in == N_DOCS and stats.rows_out > 0
    assert not [s for s in seen if "text" in s[1]], seen
