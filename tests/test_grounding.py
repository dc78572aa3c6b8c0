"""Grounding of answers in their own document (§3.3), on manual-like text, and the budget's
refusal to write a pair whose answer is not grounded.

The held-out run of issue 10 (software manual pages as documents) kept an answer that an
independent check (difflib blocks of >= 12 characters, whitespace-normalized) found 0% copied
from its document. The cause: sentence splitting on manuals yields fragments (``OPTIONS``,
``[FILE]...``, ``--debug``); the small instantiator picked one as the whole answer, which is an
exact excerpt by the tag accounting (ratio 1.0) but grounds nothing and is shorter than any
block a grounding check counts.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re

import pyarrow as pa
import pytest

from finelake.config import load_config
from finelake.method import excerpts, prompts
from finelake.method.excerpts import grounding_failure
from finelake.method.spans import split_sentences

# A manual page in the layout of man(1) output: a header line repeated in the footer, a synopsis
# with bracketed arguments, option lists, a code block, an exit-status table, repeated lines.
MANUAL = """TSYNC(1)                     User Commands                     TSYNC(1)

NAME
tsync - copy a tree of files to a backup host

SYNOPSIS
tsync [OPTION]... SOURCE... DEST

DESCRIPTION
Copy every SOURCE to DEST, skipping files whose size and modification time match.
See below.

OPTIONS
-n, --dry-run
show what would be copied, copy nothing.

-v, --verbose
name each file as it is copied.

--delete
remove files from DEST that are missing from SOURCE.
See below.

EXAMPLES
$ tsync -av ./src/ backup:/srv/src/
$ tsync --delete ./photos/ backup:/srv/photos/

The first command copies the tree src to the backup host; the second also removes deleted photos.

EXIT STATUS
0 if OK,
1 if a file could not be read,
2 if DEST is unreachable.

GNU tools 1.2                   March 2026                      TSYNC(1)
"""

TEMPLATE = "how do I <fi>task</fi> with <fi>tool</fi>?"


def difflib_coverage(answer: str, document: str, block: int = 12) -> float:
    """The issue's independent check: share of the (whitespace-normalized) answer inside
    difflib matching blocks of at least ``block`` characters."""
    a, d = (re.sub(r"\s+", " ", t).strip() for t in (answer, document))
    m = difflib.SequenceMatcher(None, a, d, autojunk=False)
    return sum(b.size for b in m.get_matching_blocks() if b.size >= block) / max(1, len(a))


def _non_ws(s: str) -> int:
    return len(re.sub(r"\s", "", s))


def test_sentence_units_on_a_manual_join_fragments_and_keep_offsets():
    plain = split_sentences(MANUAL)
    assert any(_non_ws(s.text) < 12 for s in plain)  # the fragments that caused the bug
    units = split_sentences(MANUAL, min_chars=40)
    assert all(MANUAL[u.start:u.end] == u.text for u in units)
    assert all(_non_ws(u.text) >= 40 for u in units)
    # units are runs of the plain sentences: same first start, same last end, in order
    assert units[0].start == plain[0].start and units[-1].end == plain[-1].end
    assert all(a.end <= b.start for a, b in zip(units, units[1:]))
    starts = {s.start for s in plain}
    assert all(u.start in starts for u in units)
    assert split_sentences("Too short.", min_chars=40) == split_sentences("Too short.")


def test_every_decomposed_answer_on_a_manual_is_grounded():
    """Whatever sentence range the model picks, an ``ok`` answer passes both independent checks."""
    req = prompts.instantiate_request(MANUAL, TEMPLATE, "decomposed", 6000)
    n = len(req.sentences)
    oks = 0
    for first, last in itertools.product(range(1, n + 1), repeat=2):
        out = json.dumps({"fills": [1, 2], "first": first, "last": last})
        res = prompts.parse_instantiate(MANUAL, TEMPLATE, req, out, "decomposed", 0.8)
        if res.status != "ok":
            assert res.status == "excerpt_rejected", res.reason
            continue
        oks += 1
        assert difflib_coverage(res.answer, MANUAL) >= 0.8, (first, last, res.answer)
        assert grounding_failure(res.answer, MANUAL) is None
    assert oks >= n  # the fix does not reject the manual's answers, it makes them whole units


def test_a_fragment_answer_is_rejected_in_direct_mode():
    req = prompts.instantiate_request(MANUAL, TEMPLATE, "direct", 6000)
    out = json.dumps({"instruction": "how do I list options with tsync?",
                      "answer": "<excerpt>OPTIONS</excerpt>"})
    res = prompts.parse_instantiate(MANUAL, TEMPLATE, req, out, "direct", 0.8)
    assert res.status == "excerpt_rejected" and res.reason.startswith("answer_too_short")
    assert res.excerpt_ratio == 1.0  # the tag accounting alone would have let it through


def test_a_span_holding_an_ellipsis_marker_is_invalid_not_a_crash():
    doc = "Usage: tool <...> FILE is the form every command takes in this manual page."
    req = prompts.instantiate_request(doc, TEMPLATE, "decomposed", 6000)
    out = json.dumps({"fills": [1, 1], "first": 1, "last": 1})
    res = prompts.parse_instantiate(doc, TEMPLATE, req, out, "decomposed", 0.8)
    assert res.status == "invalid" and res.reason.startswith("unpointable_span")


@pytest.mark.parametrize("answer, reason", [
    ("OPTIONS", "answer_too_short"),
    ("Copy every SOURCE to DEST, skipping files whose size and modification time match.", None),
    ("In short: copy every SOURCE to DEST, skipping files whose size and modification time match.", None),
    ("Mostly acorns and beech nuts gathered in autumn forests, plus insects and roots.", "ungrounded"),
])
def test_grounding_failure_reasons(answer, reason):
    why = grounding_failure(answer, MANUAL, 0.8)
    assert (why.split(":")[0] if why else None) == reason
    if reason is None:
        assert difflib_coverage(answer, MANUAL) >= 0.8


# ----------------------------------------------------------------------------- budget invariant

OTHER_DOC = ("The wild boar is a suid native to much of Eurasia and North Africa. Wild boars are "
             "omnivores and eat roots, fruit and small animals.")


def _write_judged_pairs(lake):
    """Two documents, two judged and kept pairs: one grounded, one whose answer comes from the
    other document (what a join gone wrong would produce)."""
    from finelake.jobs.instantiate import pair_key
    from finelake.tables import DOCUMENTS, INSTANTIATIONS, JUDGMENTS, MATCH_LOG, MATCHES

    docs = [("man-tsync", MANUAL), ("boar", OTHER_DOC)]
    lake.merge(DOCUMENTS, pa.Table.from_pylist([
        {"doc_id": d, "text": t, "source": "t", "num_tokens": 400} for d, t in docs]), "setup")
    lake.merge(MATCH_LOG, pa.Table.from_pylist([
        {"doc_id": d, "candidates": 1, "sampled": 1} for d, _ in docs]), "setup")
    lake.merge(MATCHES, pa.Table.from_pylist([
        {"doc_id": d, "template_id": "t1", "sample_rank": 0} for d, _ in docs]), "setup")
    grounded = "Copy every SOURCE to DEST, skipping files whose size and modification time match."
    answers = {"man-tsync": grounded, "boar": grounded}  # the boar pair carries the manual's text
    rows = [{"pair_key": pair_key(d, "t1"), "doc_id": d, "template_id": "t1", "status": "ok",
             "instruction": f"what does {d} say?", "answer": answers[d], "excerpt_ratio": 1.0}
            for d, _ in docs]
    lake.merge(INSTANTIATIONS, pa.Table.from_pylist(rows), "setup")
    lake.merge(JUDGMENTS, pa.Table.from_pylist([
        {"pair_key": r["pair_key"], "doc_id": r["doc_id"], "template_id": "t1", "judge_score": 5,
         "kept": True} for r in rows]), "setup")
    return {d: pair_key(d, "t1") for d, _ in docs}


def test_budget_refuses_a_pair_not_grounded_in_its_document(spark, lake_dir):
    from finelake.jobs.budget import run_budget
    from finelake.jobs.report import funnel
    from finelake.runtime import StageContext
    from finelake.tables import PAIRS, QUARANTINE

    ctx = StageContext(load_config("local", lake=lake_dir), spark=spark)
    keys = _write_judged_pairs(ctx.lake)
    stats = run_budget(ctx)
    pairs = ctx.lake.read_arrow(PAIRS).to_pylist()
    assert [p["pair_id"] for p in pairs] == [keys["man-tsync"]]
    q = ctx.lake.read_arrow(QUARANTINE).to_pylist()
    assert len(q) == 1 and q[0]["target"] == "pairs" and q[0]["source"] == "budget"
    assert keys["boar"] in q[0]["location"] and q[0]["reason"].startswith("ungrounded")
    assert json.loads(q[0]["raw"])["answer"].startswith("Copy every SOURCE")
    assert stats.quarantined == 1 and stats.dropped == {"ungrounded_answer": 1}
    counts = dict(funnel(ctx.lake))  # the report counts the refusal apart from input quarantine
    assert counts["refused at budget: answer not grounded (quarantined)"] == 1
    assert counts["input rows quarantined (both tables)"] == 0 and counts["kept pairs"] == 1
    versions = {t.name: ctx.lake.version(t) for t in (PAIRS, QUARANTINE)}
    again = run_budget(StageContext(load_config("local", lake=lake_dir), spark=spark))
    assert again.rows_in == 0  # both documents are in the ledger: nothing is walked twice
    assert {t.name: ctx.lake.version(t) for t in (PAIRS, QUARANTINE)} == versions


def test_budget_can_fail_instead_and_then_writes_nothing(spark, lake_dir):
    from finelake.jobs.budget import run_budget
    from finelake.runtime import FinelakeError, StageContext
    from finelake.tables import BUDGET_LEDGER, PAIRS

    ctx = StageContext(load_config("local", ["budget.on_ungrounded=fail"], lake=lake_dir), spark=spark)
    _write_judged_pairs(ctx.lake)
    with pytest.raises(FinelakeError, match="not grounded in their own document"):
        run_budget(ctx)
    assert not ctx.lake.exists(PAIRS) and not ctx.lake.exists(BUDGET_LEDGER)


def test_excerpt_expansion_is_the_documents_text_on_a_manual():
    """Pointers into repeated lines and code blocks expand to document text, never the model's copy."""
    for unit in split_sentences(MANUAL, min_chars=40):
        ptr = excerpts.make_excerpt_pointer(unit.text, document=MANUAL)
        got = excerpts.expand_excerpts(ptr, MANUAL)
        assert got.ok and got.text == unit.text.strip()


def test_a_long_manual_is_cut_so_the_instantiate_prompt_fits_the_context():
    """Dense manual text runs ~2.5 characters per token: 6,000 characters overflowed SmolLM2's
    2,048-token context (the held-out run lost 216 of 328 pairs to ``prompt has N tokens``)."""
    from finelake.models.tokenizer import count_tokens, prefix_chars

    cfg = load_config("local")
    tok, limit = cfg.tokenizer.model, cfg.instantiate.max_document_tokens
    doc = "\n\n".join(MANUAL.replace("tsync", f"tsync{i}") for i in range(12))
    cut = prefix_chars(tok, [doc[:cfg.instantiate.max_document_chars]], limit)[0]
    assert 0 < cut < cfg.instantiate.max_document_chars
    assert count_tokens(tok, [doc[:cut]])[0] <= limit < count_tokens(tok, [doc[:cut + 20]])[0]
    req = prompts.instantiate_request(doc, TEMPLATE, "decomposed", cut)
    assert req.sentences[-1].end <= cut
    prompt = sum(count_tokens(tok, [m["content"] for m in req.messages])) + 10 * len(req.messages)
    gen = cfg.models.generator
    assert prompt + gen.max_tokens <= gen.options["n_ctx"]
    full = prompts.instantiate_request(doc, TEMPLATE, "decomposed", cfg.instantiate.max_document_chars)
    assert sum(count_tokens(tok, [m["content"] for m in full.messages])) > gen.options["n_ctx"]
