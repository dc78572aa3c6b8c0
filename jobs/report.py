"""report: the funnel, distributions, template diversity and stage speeds, as Markdown plus PNGs.

Beside ``report.md``: ``quality.md`` (:mod:`finelake.jobs.report_quality`), the drop counts by
reason, where kept answers start in their documents and sampled kept and dropped pairs.

Reads only the Delta tables (through delta-rs, so it works without starting Spark) and the stage
statistics the last ``finelake run`` saved under ``<lake>/_runs``.

    finelake report [--out DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from typing import Optional

from finelake import storage
from finelake.jobs import report_quality
from finelake.lake import Lake
from finelake.runtime import StageContext, StageStats
from finelake.stage import Stage
from finelake.tables import (BUDGET_LEDGER, DOCUMENTS, GENERICIZATIONS, INSTANTIATIONS, JUDGMENTS,
                             MATCH_LOG, MATCHES, PAIRS, QUARANTINE, QUERIES, TEMPLATES)


def _col(lake: Lake, tdef, cols):
    return lake.read_arrow(tdef, columns=cols).to_pydict()


def funnel(lake: Lake) -> list[tuple[str, int]]:
    """Counts from queries to kept pairs (every table read at its latest version)."""
    g = Counter(_col(lake, GENERICIZATIONS, ["status"])["status"])
    inst = Counter(_col(lake, INSTANTIATIONS, ["status"])["status"])
    judged = Counter(_col(lake, JUDGMENTS, ["kept"])["kept"])
    try:
        retry_judged = Counter(_col(lake, JUDGMENTS, ["status"])["status"]).get("retry", 0)
    except Exception:  # noqa: BLE001 - a lake from before judgment statuses
        retry_judged = 0
    ml = _col(lake, MATCH_LOG, ["candidates", "sampled"])
    ledger = _col(lake, BUDGET_LEDGER, ["dropped_over_budget"])
    quarantined = Counter(_col(lake, QUARANTINE, ["target"])["target"])
    refused = quarantined.pop(PAIRS.name, 0)
    # model-stage rows that failed for good (finelake.faults) are not input rows
    failed = {t: quarantined.pop(t, 0) for t in (GENERICIZATIONS.name, INSTANTIATIONS.name,
                                                 JUDGMENTS.name)}
    return [
        ("queries ingested", len(_col(lake, QUERIES, ["query_id"])["query_id"])),
        ("input rows quarantined (both tables)", sum(quarantined.values())),
        ("queries genericized", sum(g.values())),
        ("  valid templates (per query)", g.get("ok", 0)),
        ("  invalid / no template", sum(v for k, v in g.items() if k != "ok")),
        ("  of which failed for good (error, quarantined)", failed[GENERICIZATIONS.name]),
        ("unique templates", len(_col(lake, TEMPLATES, ["template_id"])["template_id"])),
        ("documents ingested", len(_col(lake, DOCUMENTS, ["doc_id"])["doc_id"])),
        ("documents processed (matched)", len(ml["candidates"])),
        ("candidates above threshold", int(sum(ml["candidates"]))),
        ("matches sampled", len(_col(lake, MATCHES, ["doc_id"])["doc_id"])),
        ("instantiated ok", inst.get("ok", 0)),
        ("  null (incompatible)", inst.get("null", 0)),
        ("  excerpt-rejected", inst.get("excerpt_rejected", 0)),
        ("  filtered by the quality rules (never judged)", inst.get("filtered", 0)),
        ("  invalid output / error", inst.get("invalid", 0) + inst.get("error", 0)),
        ("  of which failed for good (error, quarantined)", failed[INSTANTIATIONS.name]),
        ("judged out (score < min, or no score)", judged.get(False, 0)),
        ("  of which no score (error, quarantined)", failed[JUDGMENTS.name]),
        ("rows left to retry (genericize / instantiate / judge)",
         g.get("retry", 0) + inst.get("retry", 0) + retry_judged),
        ("over token budget", int(sum(ledger["dropped_over_budget"]))),
        ("refused at budget: answer not grounded (quarantined)", refused),
        ("kept pairs", len(_col(lake, PAIRS, ["pair_id"])["pair_id"])),
    ]


def _latest_run(lake_root: str, spark=None) -> Optional[dict]:
    from finelake.jobs.common import runs_dir

    d = runs_dir(lake_root)
    names = [n for n in storage.listdir(spark, d) if n.endswith(".json")]
    return json.loads(storage.read_text(spark, storage.join(d, names[-1]))) if names else None


def _hist_plot(values, bins, title, xlabel, path):
    from finelake.plots import saved_figure

    with saved_figure(path, figsize=(5, 3.2)) as (fig, ax):
        ax.hist(values, bins=bins, color="#3b6ea5", edgecolor="white")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")


def _complexity_section(ctx: StageContext, lake: Lake, kept_template_ids, out: str) -> list[str]:
    """§3.2's three complexity distributions side by side (table and plot): the target (the
    index version's stored target, by default the lake's genericized real queries), the
    candidates of the calibration documents (the weights' pool) and the kept pairs' templates,
    with the sampling weight of each complexity (issue 25 item 5)."""
    from finelake.jobs.index import stored_weights
    from finelake.method.sampling import complexity_shares
    from finelake.plots import saved_figure

    stored = stored_weights(ctx.cfg, ctx.spark if storage.is_uri(ctx.cfg.lake) else None)
    if not stored:
        return []
    slots = dict(zip(*_col(lake, TEMPLATES, ["template_id", "num_slots"]).values()))
    kept = Counter(int(slots[t]) for t in kept_template_ids if slots.get(t) is not None)
    rows = complexity_shares(target=stored["target"], candidates=stored["pool"], kept=kept)
    weights = {int(k): float(v) for k, v in stored["weights"].items()}
    lines = ["", "## Template complexity (§3.2)", "",
             f"Target: {stored.get('target_source', 'genericized real queries')}; candidates: "
             f"{stored.get('pool_source', 'the calibration documents')}; kept: "
             f"{sum(kept.values())} kept pairs' templates.", "",
             "| slots | target | candidates | kept | weight |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {s['target']:.1%} | {s['candidates']:.1%} | {s['kept']:.1%} | "
              f"{weights.get(k, float('nan')):.2f} |" for k, s in rows]
    with saved_figure(os.path.join(out, "complexity.png"), figsize=(5.5, 3.2)) as (fig, ax):
        width = 0.27
        for i, name in enumerate(("target", "candidates", "kept")):
            ax.bar([k + (i - 1) * width for k, _ in rows], [s[name] for _, s in rows], width,
                   label=name)
        ax.set_xlabel("slots per template")
        ax.set_ylabel("share")
        ax.set_xticks([k for k, _ in rows])
        ax.legend()
    return lines + ["", "![template complexity](complexity.png)", ""]


def run_report(ctx: StageContext, out: Optional[str] = None) -> str:
    """Write ``report.md`` and plots; print the Markdown; return the report's path."""
    from finelake.method.diversity import few_shot_slot_copies, template_usage_stats
    from finelake.plots import saved_figure

    cfg = ctx.cfg
    lake = Lake(cfg.lake, None)
    # Reports go to <lake>/_reports/<run_id>; for an object-store lake they are drawn in a local
    # folder and copied there at the end.
    publish = None
    if out is None:
        out = storage.join(storage.root(cfg.lake), "_reports", ctx.run_id)
        if storage.is_uri(out):
            publish, out = out, tempfile.mkdtemp(prefix="finelake-report-")
    os.makedirs(out, exist_ok=True)
    lines = ["# finelake report", "",
             f"lake `{storage.root(cfg.lake)}` · profile `{cfg.profile}` · generator "
             f"`{cfg.models.generator.backend}:{cfg.models.generator.model}` · embedder "
             f"`{cfg.models.embedder.model}` · judge `{cfg.models.judge.backend}:{cfg.models.judge.model}`",
             "", "## Funnel", "", "| stage | rows |", "|---|---:|"]
    f = funnel(lake)
    lines += [f"| {name} | {n:,} |" for name, n in f]
    fd = dict(f)
    docs = fd["documents processed (matched)"]
    if docs:
        lines += ["", f"Kept pairs per processed document: **{fd['kept pairs'] / docs:.2f}**."]
    if fd["queries genericized"]:
        lines += [f"Template validity (valid / genericized queries): "
                  f"**{fd['  valid templates (per query)'] / fd['queries genericized']:.1%}**."]
    drops = report_quality.drops_by_reason(lake, cfg.judge.min_score)
    lines += ["", "### Dropped pairs by reason", "", "| reason | pairs |", "|---|---:|"]
    lines += [f"| {k} | {n:,} |" for k, n in drops] or ["| (none) | 0 |"]
    ingest_drops = report_quality.ingest_drops_by_reason(lake)
    lines += ["", "### Input rows dropped at ingest by reason", "",
              "| table | reason | rows |", "|---|---|---:|"]
    lines += ([f"| {t} | {r} | {n:,} |" for t, r, n in ingest_drops]
              or ["| (none) | | 0 |"])
    report_quality.write_quality_page(lake, out, cfg.judge.min_score)
    lines += ["", "**[quality.md](quality.md)**: 20 kept pairs and 10 dropped ones, sampled with a "
                  "fixed seed, to read in five minutes."]

    inst = _col(lake, INSTANTIATIONS, ["status", "excerpt_ratio"])
    ratios = [r for r, s in zip(inst["excerpt_ratio"], inst["status"])
              if r is not None and s in ("ok", "excerpt_rejected")]
    scores = [s for s in _col(lake, JUDGMENTS, ["judge_score"])["judge_score"] if s is not None]
    lines += ["", "## Distributions", ""]
    if ratios:
        _hist_plot(ratios, 20, "Excerpt ratio of instantiated answers", "excerpted share",
                   os.path.join(out, "excerpt_ratio.png"))
        lines += ["![excerpt ratio](excerpt_ratio.png)", "",
                  f"Excerpt ratio: min {min(ratios):.2f}, median {sorted(ratios)[len(ratios) // 2]:.2f}; "
                  f"threshold {cfg.instantiate.min_excerpt_ratio}.", ""]
    lines += ["### Answer position", "",
              *report_quality.position_lines(report_quality.kept_positions(lake), out), ""]
    if scores:
        _hist_plot(scores, [0.5, 1.5, 2.5, 3.5, 4.5, 5.5], "Judge scores (1-5)", "score",
                   os.path.join(out, "judge_scores.png"))
        c = Counter(scores)
        lines += ["![judge scores](judge_scores.png)", "",
                  "Judge scores: " + ", ".join(f"{k}: {c[k]}" for k in sorted(c)) +
                  f" (kept: score >= {cfg.judge.min_score}).", ""]

    pairs = _col(lake, PAIRS, ["doc_id", "template_id", "budget_order"])
    lines += _complexity_section(ctx, lake, pairs["template_id"], out)

    # Template diversity (§6.1), over kept pairs in budget (processing) order.
    ledger = _col(lake, BUDGET_LEDGER, ["doc_id", "budget_order"])
    by_doc: dict[str, list[str]] = {d: [] for d in ledger["doc_id"]}
    for d, t in zip(pairs["doc_id"], pairs["template_id"]):
        by_doc.setdefault(d, []).append(t)
    order = sorted(zip(ledger["budget_order"], ledger["doc_id"]))
    stats = template_usage_stats([by_doc[d] for _, d in order])
    lines += ["## Template diversity", "",
              f"- documents: {stats['num_documents']}, kept instructions: {stats['num_instructions']}, "
              f"unique templates used: {stats['unique_templates']}",
              f"- share of the most used template: {stats['top_template_share']:.1%}"]
    copied, n_slots = few_shot_slot_copies(_col(lake, TEMPLATES, ["template"])["template"])
    if n_slots:
        lines.append(f"- slot descriptions copied from the genericize few-shot turns: {copied} of "
                     f"{n_slots} ({copied / n_slots:.0%}; a small model's tell)")
    if stats["fit"]:
        a, b, r2 = stats["fit"]
        lines.append(f"- unique templates vs documents: y = {a:.2f}·x^{b:.2f} (r² = {r2:.2f}); "
                     f"the paper reports y = 16,891·x^0.24 over 18M templates")
        xs, ys = zip(*stats["curve"])
        with saved_figure(os.path.join(out, "template_diversity.png"), figsize=(5, 3.2)) as (fig, ax):
            ax.plot(xs, ys, ".", label="observed")
            ax.plot(xs, [a * x ** b for x in xs], "-", label=f"{a:.2f}·x^{b:.2f}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("documents processed")
            ax.set_ylabel("unique templates used")
            ax.legend()
        lines += ["", "![template diversity](template_diversity.png)"]

    run = _latest_run(cfg.lake, ctx.spark if storage.is_uri(cfg.lake) else None)
    if run:
        lines += ["", f"## Stage speeds (run `{run['run_id']}`)", "",
                  "| stage | rows in | rows out | dropped | skipped | seconds | rows/s |", "|---|---:|---:|---:|---:|---:|---:|"]
        for s in run["stages"]:
            secs = s.get("seconds") or 0
            lines.append(f"| {s['stage']} | {s['rows_in']} | {s['rows_out']} | {sum(s['dropped'].values())} | "
                         f"{s['skipped']} | {secs:.1f} | {s['rows_in'] / secs if secs else 0:.1f} |")
    text = "\n".join(lines) + "\n"
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)
    if publish:
        storage.put_dir(ctx.spark, out, publish, last="report.md")
        shutil.rmtree(out, ignore_errors=True)
        return storage.join(publish, "report.md")
    return path


def _report_stage(ctx: StageContext, limits, out: Optional[str] = None) -> StageStats:
    stats = StageStats("report")
    path = run_report(ctx, out=out)
    print(f"report written to {path}", flush=True)
    stats.extra["path"] = path
    return stats.finish()


REPORT = Stage(
    name="report",
    help="Print and save the funnel, distributions, template diversity and stage speeds "
         "(Markdown + PNG under <lake>/_reports/<run id>).",
    reads=(), writes=(), run=_report_stage, options=("out",))
"""report as a stage (:mod:`finelake.stage`): the last of ``finelake run``."""
