"""finelake.method.diversity: power-law fit and template usage statistics (§6.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from finelake.method.diversity import power_law_fit, template_usage_stats


def test_power_law_fit_recovers_exact_law():
    xs = [1, 2, 5, 10, 100, 1000]
    a, b, r2 = power_law_fit(xs, [3.0 * x ** 0.5 for x in xs])
    assert a == pytest.approx(3.0) and b == pytest.approx(0.5) and r2 == pytest.approx(1.0)


def test_power_law_fit_on_the_papers_law_with_noise():
    rng = np.random.default_rng(0)
    xs = np.geomspace(1e3, 1e9, 40)
    ys = 16891 * xs ** 0.24 * np.exp(rng.normal(0, 0.05, size=xs.size))
    a, b, r2 = power_law_fit(xs, ys)
    assert b == pytest.approx(0.24, abs=0.01)
    assert a == pytest.approx(16891, rel=0.2)
    assert 0.9 < r2 < 1.0
    # r2 is the squared correlation of the log-log data (simple linear regression identity)
    assert r2 == pytest.approx(np.corrcoef(np.log(xs), np.log(ys))[0, 1] ** 2)


def test_power_law_fit_constant_y_and_errors():
    assert power_law_fit([1, 2, 3], [5, 5, 5]) == pytest.approx((5.0, 0.0, 1.0))
    for xs, ys in [([1], [1]), ([1, 2], [1]), ([0, 1], [1, 2]), ([1, 2], [-1, 2]),
                   ([2, 2], [1, 3]), ([1, float("nan")], [1, 2])]:
        with pytest.raises(ValueError):
            power_law_fit(xs, ys)


def test_template_usage_stats_by_hand():
    s = template_usage_stats([["a", "b"], ["a"], [], ["c", "a"]])
    assert s["num_documents"] == 4 and s["num_instructions"] == 5 and s["unique_templates"] == 3
    assert s["top_template_id"] == "a" and s["top_template_share"] == pytest.approx(3 / 5)
    assert s["median_uses_per_template"] == 1.0
    assert s["curve"] == [(1, 2), (2, 2), (3, 2), (4, 3)]
    a, b, r2 = s["fit"]
    assert (a, b, r2) == pytest.approx(power_law_fit([1, 2, 3, 4], [2, 2, 2, 3]))


def test_template_usage_stats_edges():
    s = template_usage_stats([])
    assert s["num_documents"] == 0 and s["top_template_id"] is None and s["top_template_share"] == 0.0
    assert s["curve"] == [] and s["fit"] is None and s["median_uses_per_template"] == 0.0
    s = template_usage_stats([[], [], ["x"]])
    assert s["curve"] == [(1, 0), (2, 0), (3, 1)] and s["fit"] is None  # one point with y > 0
    assert template_usage_stats([["b"], ["a"]])["top_template_id"] == "a"  # tie: smallest id
    with pytest.raises(TypeError):
        template_usage_stats(["abc"])


def test_curve_subsampling_and_sublinear_growth():
    """Zipf-distributed template use over a large bank: unique templates grow sublinearly."""
    rng = np.random.default_rng(1)
    bank = 200_000
    ranks = np.arange(1, bank + 1)
    p = 1 / ranks ** 1.1
    p /= p.sum()
    docs = [[f"t{i}" for i in row] for row in rng.choice(bank, size=(5000, 3), p=p)]
    s = template_usage_stats(docs, max_points=30)
    xs = [x for x, _ in s["curve"]]
    assert xs[0] == 1 and xs[-1] == 5000 and len(xs) <= 30 and xs == sorted(set(xs))
    ys = [y for _, y in s["curve"]]
    assert ys == sorted(ys) and ys[-1] == s["unique_templates"]
    a, b, r2 = s["fit"]
    assert 0.3 < b < 1.0 and r2 > 0.95
    flat = [t for d in docs for t in d]
    assert s["top_template_share"] == pytest.approx(max(np.unique(flat, return_counts=True)[1]) / 15000)
    assert math.isfinite(a)


def test_few_shot_slot_copies_counts_the_prompts_own_kinds_case_and_space_blind():
    from finelake.method.diversity import few_shot_slot_copies
    from finelake.method.prompts import EXAMPLE_KINDS

    kind = sorted(EXAMPLE_KINDS)[0]
    templates = [f"how do I use a <fi>{kind.upper()}</fi> to cook <fi>dish</fi>?",
                 f"explain <fi> {kind.replace(' ', '  ')} </fi> in <fi>language</fi>",
                 "what is <fi>sourdough starter</fi>"]
    assert few_shot_slot_copies(templates) == (2, 5)
    assert few_shot_slot_copies([]) == (0, 0)
