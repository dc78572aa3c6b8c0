"""jobs/budget.py at scale (issue 16 item 1): the walk runs on the executors in budget.buckets
independent walks, the ledger records the kept pair ids and pairs is derived from it, so a kill
between the two writes and a rerun give the tables of an uninterrupted run."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from finelake.config import load_config
from finelake.method import budget as rules

N_DOCS = 24


def _sentences(i: int) -> list[str]:
    return [f"Document {i} sentence {j} explains how the valve number {i * 7 + j} controls the "
            f"flow of water in section {j} of the plant." for j in range(5)]


def _write_lake(lake, ready=range(N_DOCS)):
    """Documents with 0-5 judged pairs each, all grounded (an answer is one of the document's
    sentences); pairs of documents not in ``ready`` are matched but not yet instantiated."""
    from finelake.jobs.instantiate import pair_key
    from finelake.tables import DOCUMENTS, INSTANTIATIONS, JUDGMENTS, MATCH_LOG, MATCHES

    rng = random.Random(3)
    docs, matches, inst, judg = [], [], [], []
    for i in range(N_DOCS):
        d = f"doc{i:03d}"
        sents = _sentences(i)
        docs.append({"doc_id": d, "text": " ".join(sents), "source": "t",
                     "num_tokens": rng.randint(0, 70)})
        for j in range(rng.randint(0, 5)):
            t = f"t{j}"
            matches.append({"doc_id": d, "template_id": t, "sample_rank": j})
            pad = " really" * rng.randint(0, 6)  # drawn either way: the lake does not depend on ready
            if i in ready:
                k = pair_key(d, t)
                inst.append({"pair_key": k, "doc_id": d, "template_id": t, "status": "ok",
                             "instruction": f"what does part {j} of {d} say?" + pad,
                             "answer": sents[j], "excerpt_ratio": 1.0})
                judg.append({"pair_key": k, "doc_id": d, "template_id": t,
                             "judge_score": 5 if j != 3 else 2, "kept": j != 3})
    lake.merge(DOCUMENTS, pa.Table.from_pylist(docs), "setup")
    lake.merge(MATCH_LOG, pa.Table.from_pylist([{"doc_id": r["doc_id"], "candidates": 5,
                                                 "sampled": 5} for r in docs]), "setup")
    lake.merge(MATCHES, pa.Table.from_pylist(matches), "setup")
    if inst:
        lake.merge(INSTANTIATIONS, pa.Table.from_pylist(inst), "setup")
        lake.merge(JUDGMENTS, pa.Table.from_pylist(judg), "setup")


def _ctx(spark, lake_dir, *overrides):
    from finelake.runtime import StageContext

    return StageContext(load_config("local", list(overrides), lake=lake_dir), spark=spark)


def _rows(lake, tdef, key):
    rows = lake.read_arrow(tdef).to_pylist()
    for r in rows:
        r.pop("run_id")
    return sorted(rows, key=lambda r: r[key])


def _expected_input(lake):
    """(doc_id, doc_tokens, [(pair_key, tokens)]) of every ready document, pair tokens counted
    here with the training tokenizer on the formatted pair."""
    from finelake.models.tokenizer import count_tokens
    from finelake.tables import DOCUMENTS, INSTANTIATIONS, JUDGMENTS

    docs = lake.read_arrow(DOCUMENTS).to_pylist()
    kept = {r["pair_key"] for r in lake.read_arrow(JUDGMENTS).to_pylist() if r["kept"]}
    inst = [r for r in lake.read_arrow(INSTANTIATIONS).to_pylist() if r["pair_key"] in kept]
    texts = [rules.format_pair(r["instruction"], r["answer"]) for r in inst]
    tokens = count_tokens(load_config("local").tokenizer.model, texts)
    pairs: dict[str, list] = {}
    for r, n in zip(inst, tokens):
        pairs.setdefault(r["doc_id"], []).append((r["pair_key"], int(n)))
    return [(d["doc_id"], d["num_tokens"], pairs.get(d["doc_id"], [])) for d in docs]


@pytest.mark.parametrize("buckets", [1, 3])
def test_bucketed_walk_matches_the_pure_walk_and_pairs_follow_the_ledger(spark, lake_dir, buckets):
    from finelake.jobs.budget import run_budget
    from finelake.tables import BUDGET_LEDGER, PAIRS

    ctx = _ctx(spark, lake_dir, f"budget.buckets={buckets}")
    _write_lake(ctx.lake)
    stats = run_budget(ctx)
    ledger = _rows(ctx.lake, BUDGET_LEDGER, "doc_id")
    docs = _expected_input(ctx.lake)
    if buckets == 1:  # exactly the single walk in the hashed order
        ordered = sorted(docs, key=lambda d: (rules.budget_order_key(d[0], 0), d[0]))
        kept, rows = rules.apply_token_budget(ordered, seed=0)
        expected = {r.doc_id: (r, k) for r, k in zip(rows, _split(kept, rows))}
    else:
        walks = rules.apply_bucketed_budget(docs, buckets, seed=0)
        assert len(walks) == buckets
        expected = {r.doc_id: (r, k) for w in walks.values() for k, r in w}
    assert len(ledger) == N_DOCS
    for row in ledger:
        want, want_kept = expected[row["doc_id"]]
        assert {k: row[k] for k in want.as_dict()} == want.as_dict()
        assert row["bucket"] == rules.budget_bucket(row["doc_id"], buckets)
        assert row["buckets"] == buckets and row["kept_pair_ids"] == list(want_kept)
    pairs = _rows(ctx.lake, PAIRS, "pair_id")
    assert sorted(p["pair_id"] for p in pairs) == sorted(k for r in ledger for k in r["kept_pair_ids"])
    assert stats.rows_out == len(pairs) > 0
    order = {r["doc_id"]: r["budget_order"] for r in ledger}
    assert all(p["budget_order"] == order[p["doc_id"]] for p in pairs)
    # per bucket: pair tokens over any prefix of the walk <= doc tokens (+ carry in, 0 here)
    tokens = {p["pair_id"]: p["num_tokens"] for p in pairs}
    for b in range(buckets):
        walk = sorted((r for r in ledger if r["bucket"] == b), key=lambda r: r["budget_order"])
        assert [r["budget_order"] for r in walk] == list(range(len(walk)))
        used = allowed = 0
        for r in walk:
            used += sum(tokens[k] for k in r["kept_pair_ids"])
            allowed += r["doc_tokens"]
            assert used <= allowed
    # a rerun changes nothing
    versions = (ctx.lake.version(BUDGET_LEDGER), ctx.lake.version(PAIRS))
    again = run_budget(_ctx(spark, lake_dir, f"budget.buckets={buckets}"))
    assert again.rows_in == 0 and (ctx.lake.version(BUDGET_LEDGER), ctx.lake.version(PAIRS)) == versions


def _split(kept, rows):
    out, i = [], 0
    for r in rows:
        out.append(kept[i:i + r.kept])
        i += r.kept
    return out


def test_kill_between_ledger_and_pairs_then_rerun_gives_the_uninterrupted_tables(
        spark, tmp_path, monkeypatch):
    from finelake.jobs.budget import run_budget
    from finelake.tables import BUDGET_LEDGER, PAIRS

    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    for d in (whole, killed):
        (tmp_path / d).mkdir()
    ctx = _ctx(spark, whole, "budget.buckets=2")
    _write_lake(ctx.lake)
    run_budget(ctx)

    kctx = _ctx(spark, killed, "budget.buckets=2")
    _write_lake(kctx.lake)
    monkeypatch.setenv("FINELAKE_FAIL_AFTER", "budget:1")
    with pytest.raises(RuntimeError, match="simulated failure in budget"):
        run_budget(kctx)
    assert kctx.lake.exists(BUDGET_LEDGER) and not kctx.lake.exists(PAIRS)  # killed in between
    monkeypatch.delenv("FINELAKE_FAIL_AFTER")
    run_budget(_ctx(spark, killed, "budget.buckets=2"))
    for tdef, key in ((BUDGET_LEDGER, "doc_id"), (PAIRS, "pair_id")):
        assert _rows(kctx.lake, tdef, key) == _rows(ctx.lake, tdef, key)


def test_incremental_runs_continue_each_buckets_carry(spark, lake_dir):
    from finelake.jobs.budget import run_budget
    from finelake.tables import BUDGET_LEDGER, MATCHES

    first = set(range(0, N_DOCS, 2))
    ctx = _ctx(spark, lake_dir, "budget.buckets=2")
    _write_lake(ctx.lake, ready=first)
    run_budget(ctx)
    before = _rows(ctx.lake, BUDGET_LEDGER, "doc_id")
    matched = {r["doc_id"] for r in ctx.lake.read_arrow(MATCHES).to_pylist()}
    unmatched = {f"doc{i:03d}" for i in range(N_DOCS)} - matched  # nothing to wait for
    assert {r["doc_id"] for r in before} == {f"doc{i:03d}" for i in first} | unmatched  # others unfinished
    assert len(before) < N_DOCS
    _write_lake(ctx.lake)  # the rest become ready
    run_budget(_ctx(spark, lake_dir, "budget.buckets=2"))
    after = _rows(ctx.lake, BUDGET_LEDGER, "doc_id")
    assert len(after) == N_DOCS and [r for r in after if r["doc_id"] in {b["doc_id"] for b in before}] == before
    for b in range(2):
        walk = sorted((r for r in after if r["bucket"] == b), key=lambda r: r["budget_order"])
        assert [r["budget_order"] for r in walk] == list(range(len(walk)))
        for prev, nxt in zip(walk, walk[1:]):
            assert nxt["carry_in"] == prev["carry_out"]  # rollover never resets between runs

    with pytest.raises(Exception, match="walked with \\[2\\] bucket"):
        run_budget(_ctx(spark, lake_dir, "budget.buckets=3"))


def test_a_ledger_from_before_buckets_gets_the_columns_and_continues(spark, lake_dir):
    """A lake whose budget_ledger lacks bucket/buckets/kept_pair_ids: budget adds them (null) and
    continues the single walk from its last row instead of failing."""
    from deltalake import write_deltalake

    from finelake.jobs.budget import run_budget
    from finelake.tables import BUDGET_LEDGER, MATCHES

    ctx = _ctx(spark, lake_dir)
    _write_lake(ctx.lake, ready=set(range(N_DOCS // 2, N_DOCS)))
    old_cols = [f for f in BUDGET_LEDGER.schema if f.name not in ("bucket", "buckets", "kept_pair_ids")]
    old = pa.Table.from_pylist([{"doc_id": "legacy", "budget_order": 0, "doc_tokens": 10,
                                 "carry_in": 0, "used_tokens": 3, "carry_out": 7, "candidates": 1,
                                 "kept": 1, "dropped_over_budget": 0, "run_id": "old"}],
                               schema=pa.schema(old_cols))
    write_deltalake(ctx.lake.path(BUDGET_LEDGER), old)
    run_budget(ctx)
    rows = {r["doc_id"]: r for r in _rows(ctx.lake, BUDGET_LEDGER, "doc_id")}
    assert rows["legacy"]["kept_pair_ids"] is None and rows["legacy"]["bucket"] is None
    walk = sorted(rows.values(), key=lambda r: r["budget_order"])
    assert walk[0]["doc_id"] == "legacy" and walk[1]["carry_in"] == 7 and walk[1]["budget_order"] == 1
    matched = {r["doc_id"] for r in ctx.lake.read_arrow(MATCHES).to_pylist()}
    ready = {f"doc{i:03d}" for i in range(N_DOCS)} - (matched - {f"doc{i:03d}" for i in range(N_DOCS // 2, N_DOCS)})
    assert set(rows) == {"legacy"} | ready


def test_add_missing_columns_on_the_delta_rs_engine(tmp_path):
    """The delta-rs path (local lakes without the jars): the ledger's new columns are added as
    nullable, old rows read them as null, a second call adds nothing."""
    from deltalake import DeltaTable, write_deltalake

    from finelake.lake import Lake
    from finelake.tables import BUDGET_LEDGER

    lake = Lake(str(tmp_path), None, engine="deltalake")
    old_schema = pa.schema([f for f in BUDGET_LEDGER.schema if f.name not in ("bucket", "kept_pair_ids")])
    write_deltalake(lake.path(BUDGET_LEDGER), pa.Table.from_pylist(
        [{"doc_id": "a", "budget_order": 0, "carry_out": 5}], schema=old_schema))
    assert lake.add_missing_columns(BUDGET_LEDGER) == ["bucket", "kept_pair_ids"]
    assert lake.add_missing_columns(BUDGET_LEDGER) == []
    got = DeltaTable(lake.path(BUDGET_LEDGER)).to_pyarrow_table()
    assert set(got.column_names) == set(BUDGET_LEDGER.schema.names)
    assert got.column("kept_pair_ids").to_pylist() == [None] and got.column("carry_out").to_pylist() == [5]
