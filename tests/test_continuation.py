"""The continue job on real sample documents with the embedded generator: rows for every sampled
document, splits inside [1/4, 3/4], reasons on dropped rows, lineage, and a rerun that adds nothing."""

import json
from importlib import resources

import pyarrow as pa
import pytest

from finelake.config import load_config
from finelake.jobs.common import stable_hash
from finelake.method import continuation as C
from finelake.method import instructional as I
from finelake.runtime import StageContext
from finelake.tables import CONTINUATIONS, DOCUMENTS

MAX_TOKENS = 24


def _short_documents(n=10, max_chars=700):
    text = resources.files("finelake.sample").joinpath("documents.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    picked = [r for r in rows if len(r["text"]) <= max_chars][:n]
    return {stable_hash(r["text"]): r["text"] for r in picked}


@pytest.fixture
def ctx_cfg(lake_dir):
    # truncation=drop with a tiny token limit: most continuations are cut mid-sentence, so the
    # dropped path runs for real; kept rows are checked by the same assertions.
    return load_config("local", ["catalog.database=finelake_test",
                                 f"continue.max_tokens={MAX_TOKENS}", "continue.truncation=drop"],
                       lake=lake_dir)


def test_run_continue_writes_rows_and_rerun_adds_nothing(spark, ctx_cfg):
    from finelake.jobs.continuation import run_continue, with_instructional

    docs = _short_documents()
    ctx = StageContext(ctx_cfg, spark=spark)
    ctx.lake.merge(DOCUMENTS, pa.table({"doc_id": list(docs), "text": list(docs.values())}), "setup")

    stats = run_continue(ctx, max_documents=4)
    rows = ctx.lake.read_arrow(CONTINUATIONS).to_pylist()
    assert stats.rows_in == 4 and len(rows) == 4 and stats.skipped == 0
    # Spark's sha1 order is the pure sample_key order: the same 4 documents every time.
    assert {r["doc_id"] for r in rows} == set(sorted(docs, key=lambda d: C.sample_key(d, 0))[:4])

    rules = C.QualityRules(truncation="drop")
    for r in rows:
        text = docs[r["doc_id"]]
        n = len(text)
        assert n / 4 <= r["split_char"] <= 3 * n / 4 and r["doc_chars"] == n
        split = C.choose_split(text, r["doc_id"], 0)
        assert (r["split_char"], r["split_unit"]) == (split.char, split.unit)
        assert r["prompt"] == text[:r["split_char"]].rstrip()
        assert r["original_second_half"] == text[r["split_char"]:]
        assert r["model_id"] == "llama_cpp:embedded:smollm2-135m-instruct"
        assert r["prompt_version"] == "continue-v1" and r["seed"] == 0 and r["run_id"] == ctx.run_id
        assert r["status"] in ("ok", "dropped"), r["reason"]  # no generation errors
        assert 0 < r["completion_tokens"] <= MAX_TOKENS and r["finish_reason"]
        # The stored verdict is the pure rules applied to what the model returned.
        v = C.assess_continuation(r["raw_output"], r["finish_reason"], r["prompt"], rules)
        assert (r["status"], r["reason"], r["continuation"]) == (v.status, v.reason, v.text)
        if r["status"] == "dropped":
            assert r["reason"].split(":")[0] in C.DROP_REASONS and r["continuation"] is None
        else:
            assert r["reason"] is None and r["continuation"]
        d, p = I.score_text(text), I.score_text(r["prompt"])
        c = I.score_text(r["continuation"]) if r["continuation"] else None
        assert r["document_instructional_score"] == pytest.approx(d.score)
        assert r["prompt_instructional_score"] == pytest.approx(p.score)
        assert r["continuation_instructional_score"] == (pytest.approx(c.score) if c else None)
        assert r["instructional_score"] == pytest.approx(max(d.score, p.score, c.score if c else 0))
        assert r["instructional"] == (r["instructional_score"] >= 0.5)
        for part, s in (("document", d), ("prompt", p), ("continuation", c)):
            assert [f for f in r["flags"] if f.startswith(part + ":")] == \
                [f"{part}:{f}" for f in (s.flags if s else ())]
        assert set(f for f in r["flags"] if ":" not in f) <= set(C.QUALITY_FLAGS)
    # Most 24-token continuations end mid-sentence: with truncation=drop they are dropped.
    dropped = [r for r in rows if r["status"] == "dropped"]
    assert dropped and all(r["reason"] for r in dropped)
    assert sum(stats.dropped.values()) == len(dropped) and stats.rows_out == 4 - len(dropped)

    version = ctx.lake.version(CONTINUATIONS)
    again = run_continue(StageContext(ctx_cfg, spark=spark), max_documents=4)
    assert again.skipped == 4 and again.rows_in == 4
    assert ctx.lake.version(CONTINUATIONS) == version  # nothing committed
    assert sorted(ctx.lake.read_arrow(CONTINUATIONS).to_pylist(), key=lambda r: r["doc_id"]) == \
        sorted(rows, key=lambda r: r["doc_id"])

    # The same filter on the documents table.
    scored = with_instructional(ctx.lake.read(DOCUMENTS)).collect()
    assert len(scored) == len(docs)
    for r in scored:
        s = I.score_text(r["text"])
        assert r["instructional_score"] == pytest.approx(s.score)
        assert r["instructional"] == s.instructional and list(r["instructional_flags"]) == list(s.flags)
