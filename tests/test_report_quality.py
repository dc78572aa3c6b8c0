"""The report's quality page (issue 26.5): drops by reason, answer positions, 20 kept and 10
dropped pairs drawn with a fixed seed. A small lake written through delta-rs (no Spark)."""

import pyarrow as pa

from finelake.jobs import report_quality as rq
from finelake.lake import Lake
from finelake.tables import (BUDGET_LEDGER, INGEST_DROPS, INSTANTIATIONS, JUDGMENTS, PAIRS,
                             QUARANTINE)

NAV = "quality:answer_navigation: navigation line 'polkit   May 2009   POLKITD(8)'"


def _lake(tmp_path):
    lake = Lake(str(tmp_path), None, engine="deltalake")
    inst, judged, pairs = [], [], []
    for i in range(40):
        key = f"p{i:02d}"
        row = {"pair_key": key, "doc_id": f"d{i // 4}", "template_id": f"t{i % 4}",
               "instruction": f"What does program {i} do?", "answer": f"Program {i} compares files.",
               "answer_position": i / 40, "reason": None}
        if i < 30:
            inst.append({**row, "status": "ok"})
            kept = i < 26
            judged.append({"pair_key": key, "doc_id": row["doc_id"], "template_id": row["template_id"],
                           "judge_score": 5 if kept else 2, "kept": kept, "status": "ok",
                           "judge_reason": "relevance cosine 0.700 -> 5; quality rules passed"
                           if kept else "relevance cosine 0.200 -> 2; quality rules passed"})
            if kept:
                pairs.append({"pair_id": key, "doc_id": row["doc_id"], "template_id": row["template_id"],
                              "instruction": row["instruction"], "answer": row["answer"]})
        elif i < 36:
            inst.append({**row, "status": "filtered", "reason": NAV})
        elif i < 38:
            inst.append({**row, "status": "excerpt_rejected", "reason": "answer_too_short: 12 characters"})
        else:
            inst.append({**row, "instruction": None, "answer": None, "answer_position": None,
                         "status": "null", "reason": "incompatible_template"})
    lake.merge(INSTANTIATIONS, pa.Table.from_pylist(inst), "r")
    lake.merge(JUDGMENTS, pa.Table.from_pylist(judged), "r")
    lake.merge(PAIRS, pa.Table.from_pylist(pairs), "r")
    lake.merge(BUDGET_LEDGER, pa.Table.from_pylist([{"doc_id": "d0", "dropped_over_budget": 1}]), "r")
    lake.create(QUARANTINE)
    return lake


def test_drops_are_counted_by_rule(tmp_path):
    lake = _lake(tmp_path)
    assert rq.drops_by_reason(lake, 4) == [
        ("filtered: quality:answer_navigation", 6), ("judged out: score < 4", 4),
        ("excerpt_rejected: answer_too_short", 2), ("null: incompatible_template", 2),
        ("over token budget", 1)]
    assert rq.reason_key("filtered", NAV) == "filtered: quality:answer_navigation"


def test_quality_page_samples_20_kept_and_10_dropped_with_reasons(tmp_path):
    lake = _lake(tmp_path)
    out = tmp_path / "report"
    out.mkdir()
    text = open(rq.write_quality_page(lake, str(out), 4)).read()
    assert "## 20 kept pairs" in text and "## 10 dropped pairs" in text
    assert text.count("*Dropped:*") == 10 and text.count("*Judge:*") == 20
    assert "`filtered`: " + NAV in text and "judged out (score 2 < 4)" in text
    assert "| filtered: quality:answer_navigation | 6 |" in text
    assert (out / "answer_position.png").stat().st_size > 0
    assert "start within 19-71%" in text
    again = tmp_path / "again"
    again.mkdir()
    assert open(rq.write_quality_page(lake, str(again), 4)).read() == text  # seeded


def test_answer_positions_of_kept_pairs_and_quantiles(tmp_path):
    positions = rq.kept_positions(_lake(tmp_path))
    assert sorted(positions) == [i / 40 for i in range(26)]
    assert rq.quantiles(positions)[0.5] == 13 / 40
    assert rq.quantiles([]) == {}
    assert rq.quantiles([0.1, 0.2, 0.3, 0.4])[0.5] == 0.3


def test_ingest_drops_are_counted_by_table_and_reason(tmp_path):
    lake = _lake(tmp_path)
    assert rq.ingest_drops_by_reason(lake) == []  # no ingest_drops table yet
    rows = ([("documents", "gopher_quality:gopher_below_alpha_threshold")] * 3
            + [("documents", "fineweb_quality:line_punct_ratio")] * 2
            + [("queries", "duplicate"), ("documents", "duplicate")])
    lake.merge(INGEST_DROPS, pa.Table.from_pylist(
        [{"drop_id": f"x{i}", "target": t, "source": "s", "location": f"f:{i}", "reason": r}
         for i, (t, r) in enumerate(rows)]), "r")
    assert rq.ingest_drops_by_reason(lake) == [
        ("documents", "gopher_quality:gopher_below_alpha_threshold", 3),
        ("documents", "fineweb_quality:line_punct_ratio", 2),
        ("documents", "duplicate", 1), ("queries", "duplicate", 1)]
