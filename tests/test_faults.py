"""Faults are normal (issue 16 item 5): the transient/permanent classifier, eviction of a dead
model, retryable rows with ``attempts`` that become quarantined failures after
``max_attempts`` runs, judge in committed chunks with errors counted as errors, and budget
readiness with retryable rows. The model side is the ``load`` backend's own fault injection
(``error_rate``, ``engine_error_rate``), not a mock."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from finelake import faults


@pytest.mark.parametrize("error,kind", [
    ("RateLimitError: Error code: 429 - injected by the load backend", "http"),
    ("APITimeoutError: Request timed out. (injected by the load backend)", "timeout"),
    ("InternalServerError: Error code: 503 - {'error': 'overloaded'}", "http"),
    ("APIStatusError: Error code: 502 - Bad Gateway", "http"),
    ("APIConnectionError: Connection error.", "engine"),
    ("generation_error: LoadEngineDeadError: EngineDeadError: engine core died", "engine"),
    ("RuntimeError: Engine core initialization failed. EngineCore died unexpectedly", "engine"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
    ("RuntimeError: CUDA error: out of memory", "oom"),
    ("RuntimeError: CUDA error: an illegal memory access was encountered", "cuda"),
    ("torch.AcceleratorError: CUDA error: uncorrectable ECC error encountered", "cuda"),
    ("RuntimeError: cudaErrorIllegalAddress: an illegal memory access was encountered", "cuda"),
    ("RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error", "cuda"),
    ("DistBackendError: ncclSystemError: System call (e.g. socket, malloc) failed", "cuda"),
    ("RuntimeError: [Rank 0] Watchdog caught collective operation timeout: NCCL WorkNCCL", "cuda"),
    ("RuntimeError: CUDA error: device-side assert triggered", "cuda"),
    ("ValueError: NCCL_P2P_DISABLE must be 0 or 1", None),
    ("judge_error: RateLimitError: Error code: 429", "http"),
    (TimeoutError("read"), "timeout"),
    (ConnectionRefusedError(111, "Connection refused"), "engine"),
    (MemoryError(), "oom"),
    ("BadRequestError: Error code: 400 - unknown field 'guided_json'", None),
    ("ValueError: prompt of 9000 tokens exceeds max_model_len 8192", None),
    ("judge_error: no score in reply", None),
    ("generation_error: missing", None),
    ("", None),
    (None, None),
])
def test_classifier(error, kind):
    assert faults.classify(error) == kind
    assert faults.is_transient(error) is (kind is not None)
    assert faults.is_engine_fault(error) is (kind in ("oom", "engine", "cuda"))
    assert faults.is_engine_dead(error) is (kind in ("engine", "cuda"))


def test_a_subclass_of_a_transient_exception_is_transient():
    class ReadTimedOut(TimeoutError):
        pass

    assert faults.classify(ReadTimedOut("x")) == "timeout"


def test_settle_bounds_retries():
    t = "generation_error: APITimeoutError: Request timed out."
    assert faults.settle(t, 1, 3) == ("retry", t)
    assert faults.settle(t, 2, 3) == ("retry", t)
    assert faults.settle(t, 3, 3) == ("error", f"gave up after 3 attempts: {t}")
    assert faults.settle("generation_error: ValueError: bad", 1, 3) == (
        "error", "generation_error: ValueError: bad")


def _load_spec(**options):
    return {"backend": "load", "model": "load", "revision": None, "batch_size": 8,
            "max_tokens": 32, "temperature": 0.0, "options": {"null_rate": 0.0, **options}}


def test_dead_engine_is_evicted_and_its_rows_are_transient():
    from finelake.udfs import cache
    from finelake.udfs.generation import generate_frame
    from finelake.udfs.judge import judge_frame

    cache.clear()
    pdf = pd.DataFrame({"messages": ['[{"role": "user", "content": "hello %d"}]' % i
                                     for i in range(4)]})
    dead = _load_spec(engine_error_rate=1.0)
    key = cache.cache_key("generator", dead)
    out = generate_frame(dead, pdf)
    assert out["text"].isna().all()
    assert all(faults.is_engine_fault(e) for e in out["error"])
    assert cache.resident() == [] and cache.EVICTIONS[key] == 1
    generate_frame(dead, pdf)  # the next batch loads a fresh engine (and it dies again)
    assert cache.LOAD_COUNTS[key] == 2 and cache.EVICTIONS[key] == 2

    healthy = _load_spec()
    out = generate_frame(healthy, pdf)
    assert out["error"].isna().all() and out["text"].notna().all()
    assert cache.resident() == [cache.cache_key("generator", healthy)]

    # per-request transient errors are the rows' errors; the engine stays
    flaky = _load_spec(error_rate=1.0)
    out = generate_frame(flaky, pdf)
    assert all(faults.classify(e) in ("http", "timeout") for e in out["error"])
    assert cache.resident() == [cache.cache_key("generator", flaky)]

    judge = {"backend": "llm", "model": "load", "revision": None, "batch_size": 8,
             "max_tokens": 64, "temperature": 0.0,
             "options": {"inner_backend": "load", "format": "json", "engine_error_rate": 1.0}}
    j = judge_frame(judge, pd.DataFrame({"instruction": ["a?", "b?"], "answer": ["x", "y"]}))
    assert j["judge_score"].isna().all()
    assert all(faults.is_engine_fault(r) for r in j["judge_reason"])
    assert cache.resident() == [] and cache.EVICTIONS[cache.cache_key("judge", judge)] == 1
    cache.clear()


def _ctx(spark, lake_dir, *overrides):
    from finelake.config import load_config
    from finelake.runtime import StageContext

    return StageContext(load_config("load-test", list(overrides), lake=lake_dir), spark=spark)


def _rows(lake, tdef):
    return {r[tdef.key[0]]: r for r in lake.read_arrow(tdef).to_pylist()}


def test_retry_attempts_and_quarantine_in_genericize(spark, tmp_path):
    from conftest import sample_slice
    from finelake.jobs.genericize import run_genericize
    from finelake.jobs.ingest import run_ingest
    from finelake.tables import GENERICIZATIONS, QUARANTINE

    lake_dir = str(tmp_path / "lake")
    queries = sample_slice(tmp_path, "queries.jsonl", 12)
    common = ["genericize.max_attempts=2", "genericize.chunk_rows=4"]
    ctx = _ctx(spark, lake_dir, *common, "models.generator.options.error_rate=1.0")
    run_ingest(ctx, queries=queries)
    s1 = run_genericize(ctx, max_queries=8)
    g1 = _rows(ctx.lake, GENERICIZATIONS)
    model_rows = sorted(q for q, r in g1.items() if r["reason"] != "no_candidate_span")
    assert len(model_rows) >= 4
    assert all(g1[q]["status"] == "retry" and g1[q]["attempts"] == 1 for q in model_rows)
    assert s1.retry == len(model_rows) and s1.quarantined == 0

    # the first 4 (by id) are retried by a run without faults: overwritten, ok, attempts 2
    first4 = sorted(g1)[:4]
    s2 = run_genericize(_ctx(spark, lake_dir, *common), max_queries=4)
    g2 = _rows(ctx.lake, GENERICIZATIONS)
    for q in first4:
        if q in model_rows:
            assert g2[q]["status"] in ("ok", "invalid") and g2[q]["attempts"] == 2, g2[q]
            assert g2[q]["raw_output"]
    assert s2.retry == 0

    # the rest fail again on their last allowed attempt: errors, quarantined with the reason
    s3 = run_genericize(_ctx(spark, lake_dir, *common, "models.generator.options.error_rate=1.0"),
                        max_queries=8)
    g3 = _rows(ctx.lake, GENERICIZATIONS)
    rest = [q for q in model_rows if q not in first4]
    assert rest
    for q in rest:
        assert g3[q]["status"] == "error" and g3[q]["attempts"] == 2
        assert g3[q]["reason"].startswith("gave up after 2 attempts: generation_error: ")
    for q in first4:  # finished rows are never rewritten
        assert g3[q] == g2[q]
    quarantined = [r for r in ctx.lake.read_arrow(QUARANTINE).to_pylist()
                   if r["target"] == "genericizations"]
    assert sorted(r["row_key"] for r in quarantined) == sorted(rest)
    assert all(r["source"] == "genericize" and r["attempts"] == 2 and
               r["reason"].startswith("gave up after 2") for r in quarantined)
    assert s3.quarantined == len(rest) and s3.retry == 0
    assert s3.dropped.get("error:gave up after 2 attempts") == len(rest)
    # a rerun changes nothing
    v = ctx.lake.version(GENERICIZATIONS), ctx.lake.version(QUARANTINE)
    run_genericize(_ctx(spark, lake_dir, *common), max_queries=8)
    assert (ctx.lake.version(GENERICIZATIONS), ctx.lake.version(QUARANTINE)) == v


def _instantiated(lake, n=10):
    from finelake.jobs.instantiate import pair_key
    from finelake.tables import INSTANTIATIONS

    rows = [{"pair_key": pair_key(f"d{i % 3}", f"t{i}"), "doc_id": f"d{i % 3}",
             "template_id": f"t{i}", "status": "ok", "instruction": f"What is item {i}?",
             "answer": f"Item {i} is a thing that is described in the document.",
             "excerpt_ratio": 1.0, "attempts": 1} for i in range(n)]
    lake.merge(INSTANTIATIONS, pa.Table.from_pylist(rows), "setup")
    return rows


def test_judge_commits_chunks_retries_and_counts_errors(spark, tmp_path, monkeypatch):
    from finelake.jobs.judge import run_judge
    from finelake.tables import JUDGMENTS

    lake_dir = str(tmp_path / "lake")
    ctx = _ctx(spark, lake_dir, "judge.chunk_rows=3", "models.judge.batch_size=2")
    pairs = _instantiated(ctx.lake)
    # killed after its first chunk: that chunk is committed, the rest is not
    monkeypatch.setenv("FINELAKE_FAIL_AFTER", "judge:1")
    with pytest.raises(RuntimeError, match="FINELAKE_FAIL_AFTER"):
        run_judge(ctx)
    monkeypatch.delenv("FINELAKE_FAIL_AFTER")
    first = _rows(ctx.lake, JUDGMENTS)
    assert 0 < len(first) < len(pairs)

    # every request fails transiently: rows are retry, not judge_score<4
    s = run_judge(_ctx(spark, lake_dir, "judge.chunk_rows=3", "models.judge.batch_size=2",
                       "models.judge.options.error_rate=1.0"))
    j = _rows(ctx.lake, JUDGMENTS)
    assert len(j) == len(pairs)
    retry = [k for k, r in j.items() if r["status"] == "retry"]
    assert len(retry) == len(pairs) - len(first)
    assert all(j[k]["attempts"] == 1 and not j[k]["kept"] for k in retry)
    assert s.retry == len(retry) == s.dropped["retry:judge_error"]
    assert sum(v for k, v in s.dropped.items() if k.startswith("judge_score")) + s.rows_out == len(first)

    # the next run scores them; nothing else is rewritten
    s = run_judge(_ctx(spark, lake_dir, "judge.chunk_rows=3", "models.judge.batch_size=2"))
    j2 = _rows(ctx.lake, JUDGMENTS)
    assert all(j2[k]["status"] == "ok" and j2[k]["attempts"] == 2 for k in retry)
    assert all(j2[k] == first[k] for k in first)
    assert s.retry == 0 and s.rows_in == len(pairs)


def test_budget_waits_for_retryable_rows(spark, tmp_path):
    from test_budget_job import _write_lake

    from finelake.jobs.budget import run_budget
    from finelake.tables import BUDGET_LEDGER, INSTANTIATIONS, JUDGMENTS

    lake_dir = str(tmp_path / "lake")
    ctx = _ctx(spark, lake_dir)
    _write_lake(ctx.lake)
    inst = ctx.lake.read_arrow(INSTANTIATIONS).to_pylist()
    docs = sorted({r["doc_id"] for r in inst})
    a, b, c = docs[:3]
    ra = next(r for r in inst if r["doc_id"] == a)
    rb = next(r for r in ctx.lake.read_arrow(JUDGMENTS).to_pylist() if r["doc_id"] == b)
    rc = next(r for r in inst if r["doc_id"] == c)
    ctx.lake.add_missing_columns(INSTANTIATIONS)
    ctx.lake.add_missing_columns(JUDGMENTS)
    ctx.lake.merge(INSTANTIATIONS, pa.Table.from_pylist([{**ra, "status": "retry", "attempts": 1}]),
                   "t", update=True)
    ctx.lake.merge(JUDGMENTS, pa.Table.from_pylist([{**rb, "status": "retry", "kept": False,
                                                      "judge_score": None, "attempts": 1}]),
                   "t", update=True)
    # a permanent error is final: its document is ready (the pair is simply not kept)
    ctx.lake.merge(INSTANTIATIONS, pa.Table.from_pylist([{**rc, "status": "error", "attempts": 3}]),
                   "t", update=True)
    run_budget(ctx)
    ledgered = {r["doc_id"] for r in ctx.lake.read_arrow(BUDGET_LEDGER).to_pylist()}
    assert a not in ledgered and b not in ledgered and c in ledgered
    # settled: the next run walks them
    ctx.lake.merge(INSTANTIATIONS, pa.Table.from_pylist([{**ra, "attempts": 2}]), "t", update=True)
    ctx.lake.merge(JUDGMENTS, pa.Table.from_pylist([{**rb, "status": "ok", "attempts": 2}]), "t",
                   update=True)
    run_budget(ctx)
    ledgered = {r["doc_id"] for r in ctx.lake.read_arrow(BUDGET_LEDGER).to_pylist()}
    assert {a, b} <= ledgered


def test_gates_hold_a_stage_while_upstream_rows_are_left_to_retry(spark, tmp_path):
    from finelake.jobs.budget import BUDGET
    from finelake.jobs.gates import GateHeld, check_gates, held
    from finelake.jobs.index import INDEX
    from finelake.jobs.match import MATCH
    from finelake.tables import GENERICIZATIONS, JUDGMENTS

    ctx = _ctx(spark, str(tmp_path / "lake"))
    assert held(ctx, INDEX) == "" and held(ctx, BUDGET) == ""  # no table yet: nothing to wait for
    rows = [{"query_id": f"q{i}", "status": "retry" if i < 3 else "ok", "attempts": 1}
            for i in range(5)]
    ctx.lake.merge(GENERICIZATIONS, pa.Table.from_pylist(rows), "t")
    assert held(ctx, INDEX) == "3 genericize row(s) to retry"
    with pytest.raises(GateHeld, match="index waits: 3 genericize row.*'finelake genericize'.*--force"):
        check_gates(ctx, INDEX)
    check_gates(ctx, INDEX, force=True)  # --force starts it anyway
    check_gates(ctx, MATCH)  # match has no gate
    ctx.lake.merge(JUDGMENTS, pa.Table.from_pylist(
        [{"pair_key": "p1", "status": "retry", "attempts": 1}]), "t")
    assert held(ctx, BUDGET) == "1 judge row(s) to retry"
    ctx.lake.merge(GENERICIZATIONS, pa.Table.from_pylist(
        [{**r, "status": "ok", "attempts": 2} for r in rows[:3]]), "t", update=True)
    assert held(ctx, INDEX) == ""
