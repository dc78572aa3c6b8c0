"""instantiate_rows with the quality rules (issue 26): filtered rows, answer positions and the
body-only sentence list, driven by the ``load`` generator (schema-valid replies chosen by a hash
of the prompt; grounded by construction) on a Debian manual page and a sample document."""

import json
from importlib import resources
from pathlib import Path

import pandas as pd

from finelake.jobs.instantiate import instantiate_rows
from finelake.method import prompts

# polkitd(8), Debian polkitd 122-3 (LGPL-2.0+ and Expat; tests/data/manpages/README.md)
POLKITD = (Path(__file__).parent / "data" / "manpages" / "polkitd.8.txt").read_text(encoding="utf-8")

TEMPLATES = ["How do I <fi>task</fi> with <fi>tool</fi>?",
             "What does <fi>program</fi> do?",
             "Why would <fi>user</fi> need <fi>service</fi>?",
             "Explain <fi>concept</fi> in simple terms",
             "What is the history of <fi>thing</fi>?",
             "Where does <fi>program</fi> get <fi>setting</fi> from?"]


def _spec():
    return {"backend": "load", "model": "load", "revision": None, "batch_size": 8,
            "max_tokens": 64, "temperature": 0.0, "options": {"null_rate": 0.0}}


def _frame(docs):
    rows = [{"doc_id": f"d{i}", "template_id": f"t{j}", "text": d, "template": t}
            for i, d in enumerate(docs) for j, t in enumerate(TEMPLATES)]
    return pd.DataFrame(rows)


def _run(pdf, **quality):
    return instantiate_rows(pdf, _spec(), "decomposed", 6000, 0.8, 4, "test", 40,
                            quality_rules=quality or None)


def _sample_doc(start):
    text = resources.files("finelake.sample").joinpath("documents.jsonl").read_text("utf-8")
    return next(json.loads(x)["text"] for x in text.split("\n") if x.strip()
                and json.loads(x)["text"].startswith(start))


def test_the_decomposed_prompt_numbers_only_the_body():
    with_header = prompts.instantiate_request(POLKITD, TEMPLATES[1], "decomposed", 6000)
    body = prompts.instantiate_request(POLKITD, TEMPLATES[1], "decomposed", 6000, prefer_body=True)
    assert with_header.sentences[0].text.startswith("POLKITD(8)")
    assert body.sentences[0].text.startswith("polkitd provides")
    assert "SYNOPSIS" not in body.messages[0]["content"]


def test_rows_are_filtered_with_the_rule_and_carry_answer_positions():
    pdf = _frame([POLKITD, _sample_doc("The wild boar, also known as")])
    rows = _run(pdf, prefer_body=False)
    by_status = {}
    for r in rows:
        by_status.setdefault(r["status"], []).append(r)
    assert set(by_status) <= {"ok", "filtered", "null", "excerpt_rejected", "invalid"}
    assert by_status.get("filtered"), [r["answer"] for r in rows]
    for r in by_status["filtered"]:
        assert r["reason"].startswith("quality:") and r["answer"]
    for r in by_status.get("ok", []):
        assert r["reason"] is None
        doc = POLKITD if r["doc_id"] == "d0" else pdf["text"].iloc[-1]
        assert 0 <= r["answer_position"] < 1
        assert doc[int(round(r["answer_position"] * len(doc))):].lstrip()[:20] == r["answer"][:20] or \
            abs(doc.find(r["answer"]) / len(doc) - r["answer_position"]) < 1e-3
    # the rules off: the same pairs are ok where they parsed ok
    off = {r["pair_key"]: r for r in _run(pdf, enabled=False, prefer_body=False)}
    for r in by_status["filtered"]:
        assert off[r["pair_key"]]["status"] == "ok" and off[r["pair_key"]]["answer"] == r["answer"]


def test_prefer_body_keeps_answers_out_of_the_header_block():
    pdf = _frame([POLKITD])
    header_end = POLKITD.index("polkitd provides")
    for r in _run(pdf):
        if r["answer_position"] is not None:
            assert r["answer_position"] * len(POLKITD) >= header_end - 1
            assert not (r["reason"] or "").startswith("quality:answer_header_block")
