"""End to end on real rows with the embedded models: every stage, its invariants, reruns, and a
run killed in the middle of instantiate that resumes to the same pairs.

One module-scoped run feeds every assertion (the models are small, but this is still the slowest
test file: about a minute or two of model work on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from deltalake import DeltaTable

from conftest import ENGINE, sample_slice
from finelake.config import load_config
from finelake.jobs import budget, genericize, index, instantiate, judge, match
from finelake.jobs.ingest import run_ingest
from finelake.method import budget as budget_rules
from finelake.method import excerpts, templates
from finelake.runtime import StageContext

pytestmark = pytest.mark.slow

N_QUERIES, N_DOCS = 60, 10
LATE = (instantiate.run_instantiate, judge.run_judge, budget.run_budget)


def _cfg(lake):
    return load_config("local", [
        f"run.max_queries={N_QUERIES}", f"run.max_documents={N_DOCS}",
        "instantiate.chunk_documents=3", "models.generator.max_tokens=48",
        # few templates from 60 queries: a lower MiniLM threshold gives each document candidates
        "match.thresholds.embedded:all-minilm-l6-v2=0.12",
    ], lake=lake)


def _table(lake, name):
    return DeltaTable(os.path.join(lake, name)).to_pandas()


def _versions(lake):
    return {d: DeltaTable(os.path.join(lake, d)).version() for d in sorted(os.listdir(lake))
            if os.path.isdir(os.path.join(lake, d, "_delta_log"))}


@pytest.fixture(scope="module")
def runs(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    queries = sample_slice(tmp, "queries.jsonl", N_QUERIES)
    documents = sample_slice(tmp, "documents.jsonl", N_DOCS)
    lake_a, lake_b = str(tmp / "lake_a"), str(tmp / "lake_b")
    ctx = StageContext(_cfg(lake_a), spark=spark)
    assert ctx.lake.engine == ENGINE  # delta-spark wherever the jars are: the cluster code path
    run_ingest(ctx, queries=queries, documents=documents)
    for fn in (genericize.run_genericize, index.run_index, match.run_match):
        fn(ctx)
    # lake B starts from the same matches (index path rewritten), and is killed in instantiate
    shutil.copytree(lake_a, lake_b)
    latest_b = os.path.join(lake_b, "_index", "LATEST")
    meta = json.load(open(latest_b))
    meta["path"] = meta["path"].replace(lake_a, lake_b)
    json.dump(meta, open(latest_b, "w"))
    for fn in LATE:
        fn(ctx)
    versions_a = _versions(lake_a)
    # rerun everything on lake A: nothing may change
    for fn in (genericize.run_genericize, index.run_index, match.run_match, *LATE):
        fn(StageContext(_cfg(lake_a), spark=spark))
    rerun_versions = _versions(lake_a)

    ctx_b = StageContext(_cfg(lake_b), spark=spark)
    os.environ["FINELAKE_FAIL_AFTER"] = "instantiate:1"
    try:
        with pytest.raises(RuntimeError, match="simulated failure"):
            instantiate.run_instantiate(ctx_b)
    finally:
        del os.environ["FINELAKE_FAIL_AFTER"]
    partial = len(_table(lake_b, "instantiations"))
    for fn in LATE:
        fn(StageContext(_cfg(lake_b), spark=spark))
    return {"a": lake_a, "b": lake_b, "versions": versions_a, "rerun_versions": rerun_versions,
            "partial": partial}


def test_pairs_are_grounded_formatted_and_within_budget(runs):
    lake = runs["a"]
    pairs = _table(lake, "pairs")
    docs = _table(lake, "documents").set_index("doc_id")
    assert len(pairs) > 0, "the embedded pipeline kept no pair on the sample"
    for p in pairs.itertuples():
        doc = docs.loc[p.doc_id, "text"]
        # independent recomputation from plain text, not the stage's own number
        assert excerpts.excerpt_ratio(p.answer, doc) >= 0.8, (p.answer, p.doc_id)
        assert p.text == f"Instruction: {p.instruction}\n\nAnswer: {p.answer}"
        assert templates.unfilled_slots(p.instruction) == 0
        assert p.judge_score >= 4
    ledger = _table(lake, "budget_ledger").sort_values("budget_order")
    used = ledger["used_tokens"].cumsum()
    allowed = ledger["doc_tokens"].cumsum()
    assert (used <= allowed).all()
    kept_tokens = pairs.groupby("doc_id")["num_tokens"].sum()
    for r in ledger.itertuples():
        assert kept_tokens.get(r.doc_id, 0) == r.used_tokens
        assert r.carry_out == r.doc_tokens + r.carry_in - r.used_tokens


def test_templates_have_balanced_slots(runs):
    tpl = _table(runs["a"], "templates")
    assert len(tpl) > 0
    for t in tpl.itertuples():
        assert templates.validate_template(t.template, t.compatible_document_description) == []
        assert t.num_slots == templates.num_slots(t.template) >= 1


def test_every_row_is_accounted_for(runs):
    lake = runs["a"]
    q = _table(lake, "queries")
    gen = _table(lake, "genericizations")
    assert len(gen) == min(N_QUERIES, len(q))
    assert gen.loc[gen.status != "ok", "reason"].notna().all()
    ml = _table(lake, "match_log")
    assert len(ml) == min(N_DOCS, len(_table(lake, "documents")))
    matches = _table(lake, "matches")
    assert (matches.groupby("doc_id").size() <= 6).all()
    inst = _table(lake, "instantiations")
    assert set(zip(inst.doc_id, inst.template_id)) == set(zip(matches.doc_id, matches.template_id))
    assert inst.loc[inst.status != "ok", "reason"].notna().all()
    jd = _table(lake, "judgments")
    assert set(jd.pair_key) == set(inst.loc[inst.status == "ok", "pair_key"])
    kept = jd[jd.kept]
    ledger = _table(lake, "budget_ledger")
    pairs = _table(lake, "pairs")
    assert set(pairs.pair_id) <= set(kept.pair_key)
    assert len(kept) == ledger["kept"].sum() + ledger["dropped_over_budget"].sum()
    assert len(pairs) == ledger["kept"].sum()


def test_rerun_changes_nothing(runs):
    assert runs["rerun_versions"] == runs["versions"]


def test_killed_instantiate_resumes_to_the_same_pairs(runs):
    a, b = _table(runs["a"], "pairs"), _table(runs["b"], "pairs")
    inst_b = _table(runs["b"], "instantiations")
    assert 0 < runs["partial"] < len(inst_b)  # the first run really stopped part way
    cols = ["pair_id", "doc_id", "template_id", "instruction", "answer", "text", "num_tokens"]
    assert (a[cols].sort_values("pair_id").reset_index(drop=True)
            .equals(b[cols].sort_values("pair_id").reset_index(drop=True)))


def test_budget_rule_matches_pure_walk(runs):
    """The job's kept set equals the pure §4.2 walk over the same inputs."""
    lake = runs["a"]
    ledger = _table(lake, "budget_ledger").sort_values("budget_order")
    jd = _table(lake, "judgments")
    pairs = _table(lake, "pairs").set_index("pair_id")
    # token counts of every kept-by-judge pair: kept ones from pairs, others re-counted
    from finelake.models.tokenizer import count_tokens

    inst = _table(lake, "instantiations").set_index("pair_key")
    cand = jd[jd.kept]
    texts = [budget_rules.format_pair(inst.loc[k, "instruction"], inst.loc[k, "answer"]) for k in cand.pair_key]
    toks = dict(zip(cand.pair_key, count_tokens("embedded:smollm2-135m-instruct", texts)))
    docs = [(r.doc_id, int(r.doc_tokens), [(k, toks[k]) for k in cand[cand.doc_id == r.doc_id].pair_key])
            for r in ledger.itertuples()]
    kept, _ = budget_rules.apply_token_budget(docs, seed=0)
    assert set(kept) == set(pairs.index)


def test_report_counts_the_funnel_from_the_tables_and_draws_its_plots(runs, spark, tmp_path):
    from finelake.jobs.report import funnel, run_report
    from finelake.lake import Lake

    lake = runs["a"]
    path = run_report(StageContext(_cfg(lake), spark=spark), out=str(tmp_path))
    text = open(path, encoding="utf-8").read()
    counts = dict(funnel(Lake(lake, None)))
    # independent counts from the Delta tables
    assert counts["kept pairs"] == len(_table(lake, "pairs"))
    assert counts["matches sampled"] == len(_table(lake, "matches"))
    assert counts["instantiated ok"] == int((_table(lake, "instantiations").status == "ok").sum())
    assert f"| kept pairs | {len(_table(lake, 'pairs')):,} |" in text
    for png in ("excerpt_ratio.png", "judge_scores.png"):
        assert f"]({png})" in text
        with open(tmp_path / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
