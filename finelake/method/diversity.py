"""Template diversity of the generated instructions (FineInstructions §6.1).

The paper reports that no template makes up more than 0.09% of the instructions, that most
templates instantiate few instructions, and that unique templates used grow with documents as a
power law, ``y = 16,891 · x^0.24`` with ``r² = 0.96`` (x = documents, y = unique templates).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Optional, Sequence

import numpy as np


def power_law_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares fit of ``y = a · x^b`` in log-log space (§6.1).

    Fits ``ln y = ln a + b ln x`` by ordinary least squares; ``r2`` is the coefficient of
    determination of that linear fit (in log space, as spreadsheet "power" trendlines report
    it). When all ``ln y`` are equal the fit is exact and ``r2`` is 1.0.

    Args:
        xs, ys: equal-length sequences of positive numbers, at least two distinct xs.

    Returns:
        ``(a, b, r2)`` as floats.

    Raises:
        ValueError: length mismatch, fewer than 2 points, a non-positive or non-finite value,
            all xs equal.
    """
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("xs and ys must be 1-d and of equal length")
    if len(x) < 2:
        raise ValueError("need at least 2 points")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError("xs and ys must be finite and > 0 for a log-log fit")
    lx, ly = np.log(x), np.log(y)
    if np.ptp(lx) == 0:
        raise ValueError("all xs are equal")
    b, ln_a = np.polyfit(lx, ly, 1)
    resid = ly - (ln_a + b * lx)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    ss_res = float(np.sum(resid ** 2))
    r2 = 1.0 if ss_tot == 0 else 1.0 - ss_res / ss_tot
    return float(math.exp(ln_a)), float(b), float(r2)


def _curve_points(n: int, max_points: Optional[int]) -> list[int]:
    """Document counts 1..n to report: all, or about ``max_points`` log-spaced ones ending at n."""
    if max_points is None or n <= max_points:
        return list(range(1, n + 1))
    pts = np.unique(np.round(np.geomspace(1, n, max_points)).astype(int))
    return [int(p) for p in pts]


def template_usage_stats(template_ids_in_doc_order: Iterable[Sequence[str]],
                         max_points: Optional[int] = None) -> dict:
    """How evenly templates are used, and how unique templates grow with documents (§6.1).

    Args:
        template_ids_in_doc_order: for each document, in processing order, the template ids of
            the instructions kept for it (``[]`` for a document that kept none: it still counts
            as a document).
        max_points: report the curve at about this many log-spaced document counts instead of
            every one (None = every document; the last document is always included).

    Returns:
        dict with
          - ``num_documents``, ``num_instructions``, ``unique_templates``: counts;
          - ``top_template_id``, ``top_template_share``: the most used template (ties: smallest
            id) and its share of instructions (0.0 / None when there are none);
          - ``median_uses_per_template``: median instructions per used template (0.0 if none);
          - ``curve``: ``[(documents seen, unique templates used so far), ...]``;
          - ``fit``: :func:`power_law_fit` ``(a, b, r2)`` over the curve points with at least
            one template, or None when fewer than two such points exist.
    """
    counts: Counter[str] = Counter()
    per_doc_unique: list[int] = []
    for ids in template_ids_in_doc_order:
        if isinstance(ids, str):
            raise TypeError("each document's entry must be a sequence of template ids, not a str")
        counts.update(ids)
        per_doc_unique.append(len(counts))
    n_docs = len(per_doc_unique)
    total = sum(counts.values())
    top_id: Optional[str] = None
    top_share = 0.0
    if counts:
        top_id, top_n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        top_share = top_n / total
    curve = [(x, per_doc_unique[x - 1]) for x in _curve_points(n_docs, max_points)]
    fit_pts = [(x, y) for x, y in curve if y > 0]
    fit = None
    if len(fit_pts) >= 2:
        fit = power_law_fit([p[0] for p in fit_pts], [p[1] for p in fit_pts])
    return {
        "num_documents": n_docs,
        "num_instructions": total,
        "unique_templates": len(counts),
        "top_template_id": top_id,
        "top_template_share": top_share,
        "median_uses_per_template": float(np.median(list(counts.values()))) if counts else 0.0,
        "curve": curve,
        "fit": fit,
    }


def few_shot_slot_copies(templates: Iterable[str]) -> tuple[int, int]:
    """Count slots whose description is one of the genericize few-shot turns' own kinds.

    A quality signal for small genericizers: a copied kind ("kitchen tool") says the model echoed
    the prompt's examples instead of naming the query's own category (§3.1 prompt, see
    :data:`finelake.method.prompts.EXAMPLE_KINDS`). Descriptions compare NFKC-, case- and
    whitespace-blind, as templates are compared with their queries.

    Args:
        templates: valid template strings (the ``templates`` table).

    Returns:
        ``(copied, slots)``: slots with a few-shot kind, and all slots.

    Raises:
        ValueError: a template has malformed tags (see :func:`finelake.method.templates.parse_slots`).
    """
    from finelake.method.prompts import EXAMPLE_KINDS
    from finelake.method.templates import _norm_text, parse_slots

    slots = [_norm_text(d) for t in templates for d in parse_slots(t)]
    return sum(d in EXAMPLE_KINDS for d in slots), len(slots)
