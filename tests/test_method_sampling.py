"""finelake.method.sampling: complexity weights and seeded weighted sampling (§3.2)."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finelake.method.sampling import (
    Candidate,
    complexity_weights,
    dedupe_candidates,
    sample_templates,
    stable_seed,
    stable_uniform,
)


def test_stable_seed_is_stable_and_type_aware():
    assert stable_seed(0, "doc-1") == stable_seed(0, "doc-1")
    assert stable_seed(0, "doc-1") != stable_seed(1, "doc-1")
    assert stable_seed("a", "bc") != stable_seed("ab", "c")
    assert stable_seed(1) != stable_seed("1")
    assert 0 <= stable_seed("x") < 2 ** 64
    # pinned: seeds drive what lands in Delta tables, they must not drift between versions
    expected = hashlib.blake2b(b"int:1:0s:5:doc-1", digest_size=8).digest()
    assert stable_seed(0, "doc-1") == int.from_bytes(expected, "big")
    with pytest.raises(TypeError):
        stable_seed(object())
    us = [stable_uniform(7, i) for i in range(2000)]
    assert all(0 < u < 1 for u in us)
    assert abs(np.mean(us) - 0.5) < 0.03  # SE of the mean is 0.0065


def test_complexity_weights_exact_values():
    w = complexity_weights({1: 1, 2: 3}, {1: 3, 2: 1}, smoothing=0)
    assert w == pytest.approx({1: (1 / 4) / (3 / 4), 2: (3 / 4) / (1 / 4)})
    w = complexity_weights({1: 1, 2: 3}, {1: 3, 2: 1, 3: 4}, smoothing=1)
    # C = {1, 2, 3}; target (2, 4, 1)/7, pool (4, 2, 5)/11
    assert w == pytest.approx({1: (2 / 7) / (4 / 11), 2: (4 / 7) / (2 / 11), 3: (1 / 7) / (5 / 11)})


def test_one_weighted_draw_reproduces_the_target_exactly():
    target = {1: 50, 2: 30, 3: 15, 5: 5}
    pool = {1: 900, 2: 60, 3: 30, 5: 10}
    w = complexity_weights(target, pool, smoothing=0)
    mass = {c: pool[c] * w[c] for c in pool}
    total = sum(mass.values())
    for c in target:
        assert mass[c] / total == pytest.approx(target[c] / sum(target.values()))
    # pool-average weight is 1
    assert sum(pool[c] / sum(pool.values()) * w[c] for c in pool) == pytest.approx(1.0)


def test_complexity_weights_one_sided_complexities():
    w = complexity_weights({1: 10}, {1: 5, 7: 5}, smoothing=1.0)
    assert 0 < w[7] < w[1]  # absent from target: small but samplable
    w0 = complexity_weights({1: 10}, {1: 5, 7: 5}, smoothing=0)
    assert w0[7] == 0.0
    w = complexity_weights({1: 5, 9: 5}, {1: 10}, smoothing=1.0)
    assert math.isfinite(w[9]) and w[9] > w[1]  # absent from pool: finite
    assert complexity_weights({1: 5, 9: 5}, {1: 10}, smoothing=0)[9] == 0.0
    assert complexity_weights({}, {}) == {}
    with pytest.raises(ValueError):
        complexity_weights({1: -1}, {1: 1})
    with pytest.raises(ValueError):
        complexity_weights({1: 1}, {1: 1}, smoothing=-0.5)
    with pytest.raises(ValueError):
        complexity_weights({1: 0}, {1: 3}, smoothing=0)


def test_dedupe_keeps_best_score_then_lowest_chunk():
    cands = [Candidate("t1", 2, 0.90, 3), Candidate("t1", 2, 0.95, 4), Candidate("t2", 1, 0.9, 2),
             Candidate("t2", 1, 0.9, 0), Candidate("t0", 1, 0.88, 1)]
    assert dedupe_candidates(cands) == [Candidate("t0", 1, 0.88, 1), Candidate("t1", 2, 0.95, 4),
                                        Candidate("t2", 1, 0.9, 0)]


def _cands(k: int, slots=(1, 2, 3)) -> list[Candidate]:
    return [Candidate(f"t{i}", slots[i % len(slots)], 0.9 + i / 1000, i % 6) for i in range(k)]


def test_sample_is_deterministic_and_order_independent():
    cands = _cands(30) + [Candidate("t3", 1, 0.99, 5)]  # a duplicate template from another chunk
    w = {1: 1.0, 2: 2.0, 3: 0.5}
    a = sample_templates(cands, w, n=6, seed=3, key="doc-9")
    shuffled = cands[:]
    random.Random(0).shuffle(shuffled)
    assert sample_templates(shuffled, w, n=6, seed=3, key="doc-9") == a
    assert len(a) == 6 and len({c.template_id for c in a}) == 6
    # the duplicate is represented by its best-scoring copy
    assert all(c == Candidate("t3", 1, 0.99, 5) for c in a if c.template_id == "t3")
    draws = {tuple(c.template_id for c in sample_templates(cands, w, n=6, seed=3, key=f"doc-{i}"))
             for i in range(20)}
    assert len(draws) > 15  # different documents get different draws
    assert sample_templates(cands, w, n=6, seed=4, key="doc-9") != a


def test_sample_edge_cases():
    cands = _cands(4)
    w = {1: 1.0, 2: 0.0, 3: 1.0}
    out = sample_templates(cands, w, n=10, seed=0, key="d")
    assert sorted(c.template_id for c in out) == ["t0", "t2", "t3"]  # t1 has weight 0
    assert sample_templates(cands, w, n=0, seed=0, key="d") == []
    assert sample_templates([], w, n=6, seed=0, key="d") == []
    assert len(sample_templates(cands, None, n=10, seed=0, key="d")) == 4
    with pytest.raises(ValueError, match="no weight for complexity 3"):
        sample_templates(cands, {1: 1.0, 2: 1.0}, n=2, seed=0, key="d")
    with pytest.raises(ValueError, match="finite"):
        sample_templates(cands, {1: 1.0, 2: float("inf"), 3: 1.0}, n=2, seed=0, key="d")
    with pytest.raises(ValueError):
        sample_templates(cands, None, n=-1, seed=0, key="d")


@settings(max_examples=100, deadline=None)
@given(k=st.integers(0, 40), n=st.integers(0, 8), seed=st.integers(0, 10 ** 6), key=st.text(max_size=8),
       extra=st.integers(0, 5))
def test_sample_properties(k, n, seed, key, extra):
    cands = _cands(k, slots=(1, 2, 3, 4))
    w = {1: 0.3, 2: 1.0, 3: 2.5, 4: 4.0}
    out = sample_templates(cands, w, n=n, seed=seed, key=key)
    ids = [c.template_id for c in out]
    assert len(ids) == min(n, k) and len(set(ids)) == len(ids)
    assert set(out) <= set(cands)
    # a template's key does not depend on the other candidates: adding some keeps the
    # relative order of the old ones in the full ranking
    full_old = [c.template_id for c in sample_templates(cands, w, n=k, seed=seed, key=key)]
    more = cands + [Candidate(f"new{i}", 2, 0.9, 0) for i in range(extra)]
    full_new = [c.template_id for c in sample_templates(more, w, n=k + extra, seed=seed, key=key)]
    assert [t for t in full_new if not t.startswith("new")] == full_old


def test_efraimidis_spirakis_inclusion_probabilities():
    """n=1 picks item i with p = w_i / W; n=2 includes i with the sequential-draw probability."""
    weights = {1: 1.0, 2: 2.0, 3: 7.0}
    cands = [Candidate("a", 1, 0.9, 0), Candidate("b", 2, 0.9, 0), Candidate("c", 3, 0.9, 0)]
    trials = 20000
    first = Counter(sample_templates(cands, weights, n=1, seed=1, key=str(i))[0].template_id
                    for i in range(trials))
    pair = Counter(t.template_id for i in range(trials)
                   for t in sample_templates(cands, weights, n=2, seed=2, key=str(i)))
    wv = {"a": 1.0, "b": 2.0, "c": 7.0}
    total = sum(wv.values())
    for t, wt in wv.items():
        p1 = wt / total
        p2 = p1 + sum(wv[o] / total * wt / (total - wv[o]) for o in wv if o != t)
        for got, p in ((first[t] / trials, p1), (pair[t] / trials, p2)):
            se = math.sqrt(p * (1 - p) / trials)
            assert abs(got - p) < 4.5 * se, (t, got, p)


def _simulated_docs(num_docs: int, per_doc: int, pool_dist: dict[int, float], seed: int):
    rng = np.random.default_rng(seed)
    ks, ps = list(pool_dist), list(pool_dist.values())
    return [[Candidate(f"d{d}-t{i}", int(c), 0.9, i % 6)
             for i, c in enumerate(rng.choice(ks, size=per_doc, p=ps))] for d in range(num_docs)]


POOL = {1: 0.50, 2: 0.30, 3: 0.12, 4: 0.05, 5: 0.03}   # what retrieval returns: mostly simple
TARGET = {1: 0.20, 2: 0.30, 3: 0.25, 4: 0.15, 5: 0.10}  # real queries: more complex


def _kept_distribution(docs, weights, n):
    kept = Counter(c.num_slots for d, cands in enumerate(docs)
                   for c in sample_templates(cands, weights, n=n, seed=0, key=f"doc{d}"))
    total = sum(kept.values())
    return {c: kept[c] / total for c in TARGET}, total


def _tv(p, q):
    return 0.5 * sum(abs(p[c] - q[c]) for c in q)


def test_kept_complexity_approaches_target_one_draw_per_document():
    """3,000 documents × 40 candidates, one template kept each: the kept mix is the target up to
    sampling noise. Per class the binomial standard error is sqrt(q(1-q)/3000) <= 0.0092; we allow
    4 SE. Total variation from noise alone is about 0.014 on average; we allow 0.035. Without
    weights the kept mix stays at the pool's (TV 0.30), so the test cannot pass by accident."""
    docs = _simulated_docs(3000, 40, POOL, seed=11)
    pool_counts = Counter(c.num_slots for cands in docs for c in cands)
    w = complexity_weights({c: round(q * 10000) for c, q in TARGET.items()}, pool_counts)
    kept, total = _kept_distribution(docs, w, n=1)
    assert total == 3000
    for c, q in TARGET.items():
        assert abs(kept[c] - q) < 4 * math.sqrt(q * (1 - q) / total), (c, kept[c], q)
    assert _tv(kept, TARGET) < 0.035
    unweighted, _ = _kept_distribution(docs, None, n=1)
    assert _tv(unweighted, TARGET) > 0.25


def test_kept_complexity_with_six_draws_per_document():
    """n=6 of 40 without replacement: draws after the first come from a pool depleted of the
    favoured complexities, which pulls the mix back toward the pool. Measured on this setup:
    TV ≈ 0.037 (vs 0.30 unweighted). We allow 0.06 (bias ≈ 0.035 plus noise ≈ 0.01 over
    9,000 draws) and require at least a 5x improvement over no weighting."""
    docs = _simulated_docs(1500, 40, POOL, seed=12)
    pool_counts = Counter(c.num_slots for cands in docs for c in cands)
    w = complexity_weights({c: round(q * 10000) for c, q in TARGET.items()}, pool_counts)
    kept, total = _kept_distribution(docs, w, n=6)
    unweighted, _ = _kept_distribution(docs, None, n=6)
    assert total == 9000
    assert _tv(kept, TARGET) < 0.06
    assert _tv(kept, TARGET) * 5 < _tv(unweighted, TARGET)


def test_complexity_shares_put_the_three_distributions_side_by_side():
    from finelake.method.sampling import complexity_shares

    rows = complexity_shares(target={"1": 3, "3": 1}, candidates={1: 6, 2: 2}, kept={})
    assert [k for k, _ in rows] == [1, 2, 3]
    assert rows[0][1] == {"target": 0.75, "candidates": 0.75, "kept": 0.0}
    assert rows[1][1] == {"target": 0.0, "candidates": 0.25, "kept": 0.0}
    assert rows[2][1] == {"target": 0.25, "candidates": 0.0, "kept": 0.0}
    with pytest.raises(ValueError, match="kept: negative"):
        complexity_shares(kept={1: -1})
