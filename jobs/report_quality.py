"""The run report's quality page: sampled pairs a person can read in five minutes (issue 26).

``quality.md`` beside ``report.md``: the drop counts by reason, the answer-position distribution
(plot and quantiles, beside the 19-71% of FineInstructions §3.2), 20 kept pairs and 10 dropped
ones with their reasons, drawn with a fixed seed so the same lake gives the same page. Reads the
Delta tables through delta-rs only (no Spark), like the rest of the report.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Optional

from finelake.lake import Lake
from finelake.tables import (BUDGET_LEDGER, INGEST_DROPS, INSTANTIATIONS, JUDGMENTS, PAIRS,
                             QUARANTINE)

SEED = 0
"""Seed of the sampled pairs."""
KEPT_SAMPLE, DROPPED_SAMPLE = 20, 10
PAPER_RANGE = (0.19, 0.71)
"""Where most answer excerpts start in FineInstructions (§3.2), as fractions of the document."""
_SHOW_CHARS = 1200


def _read(lake: Lake, tdef, cols: list[str]) -> dict[str, list]:
    """Columns of a table as lists; a column the table lacks (a lake from before it) reads as
    None values."""
    try:
        return lake.read_arrow(tdef, columns=cols).to_pydict()
    except Exception:  # noqa: BLE001 - a lake from before a column: read the ones it has
        got = {}
        for c in cols:
            try:
                got[c] = lake.read_arrow(tdef, columns=[c]).column(0).to_pylist()
            except Exception:  # noqa: BLE001
                pass
        n = len(next(iter(got.values()))) if got else 0
        return {c: got.get(c, [None] * n) for c in cols}


def reason_key(status: str, reason: Optional[str]) -> str:
    """A drop reason without its detail: ``status: rule`` (``filtered: quality:answer_short``,
    ``excerpt_rejected: answer_too_short``); the detail is what follows the first ``": "``."""
    head = (reason or "").split(": ")[0].strip()
    return f"{status}: {head}" if head else status


def quantiles(values: list[float], qs=(0.1, 0.25, 0.5, 0.75, 0.9)) -> dict[float, float]:
    """Nearest-rank quantiles of ``values`` (empty dict for none)."""
    v = sorted(values)
    return {q: v[min(len(v) - 1, int(q * len(v)))] for q in qs} if v else {}


def drops_by_reason(lake: Lake, min_score: int) -> list[tuple[str, int]]:
    """Every dropped pair counted by reason, most frequent first: instantiations that are not
    ``ok`` (``retry`` rows excluded: not final), judged pairs not kept (``judged out: score < N``
    or, for the embedded judge, the quality rule it names), pairs over the token budget and
    pairs refused at budget as ungrounded."""
    c: Counter = Counter()
    inst = _read(lake, INSTANTIATIONS, ["status", "reason"])
    for s, r in zip(inst["status"], inst["reason"]):
        if s not in ("ok", "retry"):
            c[reason_key(s, r)] += 1
    j = _read(lake, JUDGMENTS, ["kept", "judge_score", "judge_reason", "status"])
    for kept, score, reason, status in zip(j["kept"], j["judge_score"], j["judge_reason"], j["status"]):
        if kept or status == "retry":
            continue
        if score is None:
            c["judged out: no score (judge_error)"] += 1
        elif (reason or "").startswith("quality:"):
            c[f"judged out: {reason.split(': ')[0]}"] += 1
        else:
            c[f"judged out: score < {min_score}"] += 1
    over = sum(_read(lake, BUDGET_LEDGER, ["dropped_over_budget"])["dropped_over_budget"])
    if over:
        c["over token budget"] += int(over)
    refused = sum(1 for t in _read(lake, QUARANTINE, ["target"])["target"] if t == PAIRS.name)
    if refused:
        c["refused at budget: ungrounded"] += refused
    return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))


def ingest_drops_by_reason(lake: Lake) -> list[tuple[str, str, int]]:
    """Input rows ingest removed, counted by table and reason, most frequent first:
    ``(target, reason, rows)``. Reasons are ingest's codes (``duplicate``, ``near_duplicate``,
    ``contaminated``, ``duplicate_id``) and the document filters' ``<filter>:<datatrove reason>``
    (``gopher_quality:gopher_below_alpha_threshold``); a filter's detail after ``": "`` is left
    out. An empty list when nothing was dropped or the lake has no ``ingest_drops`` table."""
    d = _read(lake, INGEST_DROPS, ["target", "reason"])
    c = Counter((t, (r or "").split(": ")[0].strip() or "(no reason)")
                for t, r in zip(d["target"], d["reason"]))
    return sorted(((t, r, n) for (t, r), n in c.items()), key=lambda x: (-x[2], x[0], x[1]))


def kept_positions(lake: Lake) -> list[float]:
    """``answer_position`` of every kept pair (instantiations rows of the pairs in ``pairs``)."""
    kept = set(_read(lake, PAIRS, ["pair_id"])["pair_id"])
    inst = _read(lake, INSTANTIATIONS, ["pair_key", "answer_position"])
    return [p for k, p in zip(inst["pair_key"], inst["answer_position"]) if k in kept and p is not None]


def position_lines(positions: list[float], out: str, plot_name: str = "answer_position.png") -> list[str]:
    """Markdown (and a histogram in ``out``) for the answer positions of kept pairs."""
    if not positions:
        return ["No kept pair has an answer position (a lake from before `answer_position`, or "
                "no kept pairs)."]
    from finelake.plots import saved_figure

    lo, hi = PAPER_RANGE
    with saved_figure(os.path.join(out, plot_name), figsize=(5, 3.2)) as (fig, ax):
        ax.axvspan(lo, hi, color="#f2c14e", alpha=0.3, label="paper: most answers (19-71%)")
        ax.hist(positions, bins=[i / 20 for i in range(21)], color="#3b6ea5", edgecolor="white")
        ax.set_title("Where kept answers start in their documents")
        ax.set_xlabel("answer start / document length")
        ax.set_ylabel("kept pairs")
        ax.legend(fontsize=7)
    q = quantiles(positions)
    inside = sum(1 for p in positions if lo <= p <= hi) / len(positions)
    return [f"![answer position]({plot_name})", "",
            "Answer start as a fraction of the document (kept pairs, n = {:,}): ".format(len(positions))
            + ", ".join(f"p{int(k * 100)} {v:.0%}" for k, v in q.items())
            + f"; {inside:.0%} start within 19-71%, where FineInstructions reports most answer "
              f"excerpts (§3.2; its documents are long web pages, these may be short)."]


def _block(i: int, title: str, instruction: str, answer: str, extra: list[str]) -> list[str]:
    ans = (answer or "")[:_SHOW_CHARS] + ("…" if len(answer or "") > _SHOW_CHARS else "")
    return [f"### {i}. {title}", "", "**Instruction:** " + " ".join((instruction or "").split()),
            *extra, "", "````text", ans, "````", ""]


def sample_pairs(lake: Lake, min_score: int, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(kept, dropped) samples: up to 20 kept pairs and 10 dropped pairs that have an instruction
    and an answer (filtered, excerpt-rejected or judged out), each a dict with the pair's text,
    ids, ``why`` (dropped) and ``answer_position``; drawn with ``random.Random(seed)`` from the
    rows sorted by key."""
    inst = _read(lake, INSTANTIATIONS, ["pair_key", "doc_id", "status", "reason", "instruction",
                                        "answer", "answer_position"])
    rows = {k: dict(zip(inst, vals)) for k, *vals in zip(inst["pair_key"], *inst.values())}
    j = _read(lake, JUDGMENTS, ["pair_key", "judge_score", "judge_reason", "kept", "status"])
    judged = {k: dict(zip(j, vals)) for k, *vals in zip(j["pair_key"], *j.values())}
    kept_ids = sorted(set(_read(lake, PAIRS, ["pair_id"])["pair_id"]) & set(rows))
    dropped = []
    for k in sorted(rows):
        r = rows[k]
        if not (r["instruction"] and r["answer"]):
            continue
        jr = judged.get(k)
        if r["status"] in ("filtered", "excerpt_rejected"):
            dropped.append({**r, "why": f"`{r['status']}`: {r['reason']}"})
        elif r["status"] == "ok" and jr and jr["status"] != "retry" and not jr["kept"]:
            dropped.append({**r, "why": f"judged out (score {jr['judge_score']} < {min_score}): "
                                        f"{jr['judge_reason']}"})
    rng = random.Random(seed)
    kept = [{**rows[k], "judge": judged.get(k, {})} for k in
            rng.sample(kept_ids, min(KEPT_SAMPLE, len(kept_ids)))]
    return kept, rng.sample(dropped, min(DROPPED_SAMPLE, len(dropped)))


def write_quality_page(lake: Lake, out: str, min_score: int, seed: int = SEED) -> str:
    """Write ``quality.md`` (and its plot) into ``out``; return its path."""
    drops = drops_by_reason(lake, min_score)
    lines = ["# Quality check", "",
             "A page to read in five minutes: are the kept pairs something a user would ask, with an "
             "answer that responds to it? Pairs are drawn at random with a fixed seed "
             f"({seed}); the funnel is in [report.md](report.md).", "",
             "## Dropped pairs by reason", "", "| reason | pairs |", "|---|---:|"]
    lines += [f"| {k} | {n:,} |" for k, n in drops] or ["| (none) | 0 |"]
    lines += ["", "## Where answers come from", "", *position_lines(kept_positions(lake), out), ""]
    kept, dropped = sample_pairs(lake, min_score, seed)
    lines += [f"## {len(kept)} kept pairs", ""]
    for i, r in enumerate(kept, 1):
        pos = f" · answer at {r['answer_position']:.0%}" if r.get("answer_position") is not None else ""
        score = r["judge"].get("judge_score")
        lines += _block(i, f"doc `{r['doc_id']}`{pos} · judge {score}", r["instruction"], r["answer"],
                        [f"*Judge:* {r['judge'].get('judge_reason') or ''}"])
    lines += [f"## {len(dropped)} dropped pairs", ""]
    for i, r in enumerate(dropped, 1):
        pos = f" · answer at {r['answer_position']:.0%}" if r.get("answer_position") is not None else ""
        lines += _block(i, f"doc `{r['doc_id']}`{pos}", r["instruction"], r["answer"],
                        [f"*Dropped:* {r['why']}"])
    path = os.path.join(out, "quality.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
