"""Scoring the model under test's responses, benchmark by benchmark (``finelake evaluate``).

IFEval by Google's rule-based checkers, AlpacaEval's pairwise win rates, the multi-aspect scores and
MT-Bench grades by the judge model, and the token distribution shift against a base model; the
statistics themselves are pure logic in :mod:`finelake.method` (``ifeval``, ``winrate``,
``token_shift``). Each ``score_*`` returns ``(metrics, per-item rows)``.
"""

from __future__ import annotations

from typing import Optional

from finelake.jobs.eval_models import Generation, ModelUnderTest
from finelake.method import ifeval as ifm
from finelake.method import token_shift as tsm
from finelake.method import winrate as wr
from finelake.runtime import FinelakeError

def score_ifeval(items: list[dict], gens: list[Generation]) -> tuple[dict, list[dict]]:
    """IFEval metrics and per-item rows (prompt-level and instruction-level, strict and loose)."""
    results, rows = [], []
    for it, g in zip(items, gens):
        r = ifm.check(it["prompt"], g.text, it["instruction_id_list"], it["kwargs"])
        results.append(r)
        rows.append({"item_id": it["item_id"], "response": g.text, "strict": r.strict,
                     "loose": r.loose, "instructions": r.instruction_ids})
    return ifm.aggregate(results), rows


def _judge_texts(judge, requests) -> list[Optional[str]]:
    if not requests:
        return []
    return [r.text if r.error is None else None for r in judge.generate(requests)]


def score_alpacaeval(judge, items: list[dict], gens: list[Generation],
                     both_orders: bool = True) -> tuple[dict, list[dict]]:
    """Win rate, win margin and length-controlled win rate against the reference outputs."""
    from finelake.models.base import GenerationRequest

    reqs = []
    for it, g in zip(items, gens):
        reqs.append(GenerationRequest(wr.pairwise_messages(it["prompt"], g.text, it["reference"]),
                                      max_tokens=2, regex=wr.PAIRWISE_REGEX))
        if both_orders:
            reqs.append(GenerationRequest(wr.pairwise_messages(it["prompt"], it["reference"], g.text),
                                          max_tokens=2, regex=wr.PAIRWISE_REGEX))
    texts = _judge_texts(judge, reqs)
    step = 2 if both_orders else 1
    prefs, rows = [], []
    for k, (it, g) in enumerate(zip(items, gens)):
        first = wr.parse_pairwise(texts[k * step])
        second = wr.parse_pairwise(texts[k * step + 1]) if both_orders else None
        p = wr.preference(first, second)
        prefs.append(p)
        rows.append({"item_id": it["item_id"], "response": g.text, "verdict_model_first": first,
                     "verdict_model_second": second, "preference": p,
                     "len_model": len(g.text), "len_reference": len(it["reference"] or "")})
    metrics = wr.win_rates(prefs)
    verdicts = [v for r in rows for v in (r["verdict_model_first"], r["verdict_model_second"])
                if v is not None]
    metrics["judge_first_position_share"] = sum(v == 1 for v in verdicts) / max(len(verdicts), 1)
    lc = wr.length_controlled_win_rate(prefs, [r["len_model"] for r in rows],
                                       [r["len_reference"] for r in rows])
    metrics.update({"lc_win_rate": lc["lc_win_rate"], "length_coef": lc["length_coef"],
                    "avg_len_model": sum(r["len_model"] for r in rows) / len(rows),
                    "avg_len_reference": sum(r["len_reference"] for r in rows) / len(rows)})
    return metrics, rows


def score_aspects(judge, items: list[dict], gens: list[Generation], max_tokens: int) -> tuple[dict, list[dict]]:
    """Mean 1-5 score per aspect (helpfulness, clarity, factuality, depth, engagement)."""
    from finelake.models.base import GenerationRequest

    reqs = [GenerationRequest(wr.aspect_messages(it["prompt"], g.text), max_tokens=max_tokens,
                              json_schema=wr.ASPECT_SCHEMA) for it, g in zip(items, gens)]
    texts = _judge_texts(judge, reqs)
    rows, metrics = [], {}
    for it, g, t in zip(items, gens, texts):
        rows.append({"item_id": it["item_id"], "response": g.text, **wr.parse_aspects(t), "raw": t})
    means = []
    for a in wr.ASPECTS:
        vals = [r[a] for r in rows if r[a] is not None]
        if vals:
            metrics[a] = sum(vals) / len(vals)
            metrics[f"n_{a}"] = float(len(vals))
            means.append(metrics[a])
    if means:
        metrics["mean"] = sum(means) / len(means)
    return metrics, rows


def score_mt_bench(judge, items: list[dict], gens: list[Generation]) -> tuple[dict, list[dict]]:
    """Mean 1-10 single-answer grade of the first turns."""
    from finelake.models.base import GenerationRequest

    reqs = [GenerationRequest(wr.grade_messages(it["prompt"], g.text), max_tokens=3,
                              regex=wr.GRADE_REGEX) for it, g in zip(items, gens)]
    texts = _judge_texts(judge, reqs)
    rows = [{"item_id": it["item_id"], "response": g.text, "grade": wr.parse_grade(t)}
            for it, g, t in zip(items, gens, texts)]
    grades = [r["grade"] for r in rows if r["grade"] is not None]
    metrics = {"score": sum(grades) / len(grades), "n": float(len(grades))} if grades else {}
    return metrics, rows


def token_shift(tuned: ModelUnderTest, base: ModelUnderTest, gens: list[Generation],
                top_k: int = 20) -> Optional[dict]:
    """Token distribution shift of ``tuned`` from ``base`` along ``tuned``'s greedy responses
    (:func:`finelake.method.token_shift.summarize`); None when every response was empty.

    Raises:
        FinelakeError: the two tokenizers differ (positions would not correspond).
    """
    if tuned.tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise FinelakeError(f"token_shift: {tuned.label} and {base.label} have different tokenizers")
    results = []
    for g in gens:
        if not g.output_ids:
            continue
        t = tuned.generator.next_token_logits(g.prompt_ids, g.output_ids)
        b = base.generator.next_token_logits(g.prompt_ids, g.output_ids)
        results.append(tsm.position_shift(t, b, g.output_ids))
    if not results:
        return None
    return tsm.summarize(results, decode=lambda i: tuned.tokenizer.decode([i]), top_k=top_k)

