"""finelake.method.budget: token-for-token budget with rollover and the pair format (§4.2)."""

from __future__ import annotations

import random
from itertools import accumulate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finelake.method.budget import (
    BudgetState,
    LedgerRow,
    apply_bucketed_budget,
    apply_token_budget,
    budget_bucket,
    budget_order_key,
    format_pair,
    walk_bucket,
)


def test_format_pair_is_exact():
    assert format_pair("what effects does diabetes have?", "Diabetes has several effects.") == (
        "Instruction: what effects does diabetes have?\n\nAnswer: Diabetes has several effects.")
    assert format_pair(" a ", "b\n") == "Instruction:  a \n\nAnswer: b\n"  # nothing stripped
    assert format_pair("{x}", "{}") == "Instruction: {x}\n\nAnswer: {}"  # braces are not a template
    with pytest.raises(TypeError):
        format_pair(None, "a")


def test_single_document_keeps_within_its_tokens():
    kept, (row,) = apply_token_budget([("d1", 100, [("a", 60), ("b", 50), ("c", 30)])], seed=0)
    assert sum(dict(a=60, b=50, c=30)[k] for k in kept) == row.used_tokens <= 100
    assert row == LedgerRow("d1", 0, 100, 0, row.used_tokens, 100 - row.used_tokens, 3, len(kept),
                            3 - len(kept))
    assert row.as_dict()["used_tokens"] == row.used_tokens


def test_rollover_lets_a_later_document_exceed_its_own_count():
    docs = [("d1", 100, [("a", 80)]), ("d2", 50, [("b", 70)])]
    kept, ledger = apply_token_budget(docs, seed=0)
    assert kept == ["a", "b"]
    assert [(r.carry_in, r.used_tokens, r.carry_out) for r in ledger] == [(0, 80, 20), (20, 70, 0)]
    assert ledger[1].used_tokens > ledger[1].doc_tokens
    # without the first document the same pair does not fit
    assert apply_token_budget([("d2", 50, [("b", 70)])], seed=0)[0] == []


def test_documents_without_pairs_roll_over_their_whole_budget():
    kept, ledger = apply_token_budget([("d1", 40, []), ("d2", 0, []), ("d3", 10, [("p", 45)])])
    assert kept == ["p"] and [r.carry_out for r in ledger] == [40, 40, 5]


def test_pair_larger_than_any_budget_is_dropped_and_others_still_fill():
    docs = [("d1", 100, [("huge", 10 ** 6), ("small", 10)]), ("d2", 100, [("huge2", 10 ** 6)])]
    kept, ledger = apply_token_budget(docs, seed=0)
    assert kept == ["small"]
    assert [r.dropped_over_budget for r in ledger] == [1, 1]
    assert ledger[1].carry_out == 190


def test_max_carry_caps_rollover():
    kept, ledger = apply_token_budget([("d1", 100, []), ("d2", 10, [("p", 50)])], max_carry=30)
    assert ledger[0].carry_out == 30 and kept == []


def test_determinism_seed_and_input_order():
    rng = random.Random(5)
    docs = [(f"d{i}", rng.randint(50, 400), [(f"d{i}p{j}", rng.randint(20, 200)) for j in range(6)])
            for i in range(50)]
    a = apply_token_budget(docs, seed=1)
    assert apply_token_budget(docs, seed=1) == a
    permuted = [(d, t, list(reversed(p))) for d, t, p in docs]
    assert apply_token_budget(permuted, seed=1) == a  # pair order in the input does not matter
    assert apply_token_budget(docs, seed=2)[0] != a[0]  # the seed does


def test_shuffle_gives_each_pair_a_fair_chance():
    """Two 60-token pairs, budget 100: only one fits; over many documents each wins about half."""
    docs = [(f"d{i}", 100, [("first", 60), ("second", 60)]) for i in range(2000)]
    state = BudgetState(seed=0, max_carry=0)
    wins = sum(state.step(d, t, p)[0] == ["first"] for d, t, p in docs)
    assert abs(wins / 2000 - 0.5) < 0.045  # 4 standard errors (0.011)


def test_streaming_and_resuming_match_one_walk():
    rng = random.Random(9)
    docs = [(f"d{i}", rng.randint(0, 300), [(f"d{i}p{j}", rng.randint(10, 150)) for j in range(6)])
            for i in range(40)]
    kept, ledger = apply_token_budget(docs, seed=3)
    first_kept, first_ledger = apply_token_budget(docs[:17], seed=3)
    resumed = BudgetState(seed=3, carry=first_ledger[-1].carry_out, position=17)
    rest_kept, rest_ledger = apply_token_budget(docs[17:], state=resumed)
    assert first_kept + rest_kept == kept and first_ledger + rest_ledger == ledger
    assert [r.budget_order for r in ledger] == list(range(40))


@pytest.mark.parametrize("docs,match", [
    ([("d", 10, []), ("d", 10, [])], "appears twice"),
    ([("d", 10, [("p", 1), ("p", 2)])], "repeated pair_id"),
    ([("d", -1, [])], "negative doc_tokens"),
    ([("d", 10, [("p", -3)])], "negative pair token"),
])
def test_bad_input_raises(docs, match):
    with pytest.raises(ValueError, match=match):
        apply_token_budget(docs)


def test_budget_order_key():
    ids = [f"doc{i}" for i in range(100)]
    order = sorted(ids, key=lambda d: (budget_order_key(d, 0), d))
    assert order == sorted(ids, key=lambda d: (budget_order_key(d, 0), d))
    assert order != ids and order != sorted(ids, key=lambda d: (budget_order_key(d, 1), d))


docs_strategy = st.lists(
    st.tuples(st.integers(0, 500), st.lists(st.integers(0, 400), max_size=7)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(raw=docs_strategy, seed=st.integers(0, 1000))
def test_budget_invariants(raw, seed):
    docs = [(f"d{i}", t, [(f"d{i}p{j}", n) for j, n in enumerate(pairs)]) for i, (t, pairs) in enumerate(raw)]
    tokens = {p: n for _, _, pairs in docs for p, n in pairs}
    kept, ledger = apply_token_budget(docs, seed=seed)
    assert len(kept) == len(set(kept)) and set(kept) <= set(tokens)
    assert len(ledger) == len(docs)
    kept_set = set(kept)
    # cumulative invariant: tokens kept over the first i documents <= their doc tokens, for every i
    used = list(accumulate(sum(n for p, n in pairs if p in kept_set) for _, _, pairs in docs))
    allowed = list(accumulate(t for _, t, _ in docs))
    assert all(u <= a for u, a in zip(used, allowed))
    carry = 0
    for (doc_id, doc_tokens, pairs), row in zip(docs, ledger):
        mine = [n for p, n in pairs if p in kept_set]
        assert row.doc_id == doc_id and row.carry_in == carry
        assert row.used_tokens == sum(mine) <= doc_tokens + row.carry_in
        assert row.carry_out == doc_tokens + row.carry_in - row.used_tokens
        assert row.kept == len(mine) and row.kept + row.dropped_over_budget == row.candidates == len(pairs)
        # first fit: every dropped pair is larger than what was left at the end
        assert all(n > row.carry_out for p, n in pairs if p not in kept_set)
        carry = row.carry_out
    # no budget is lost: what was not used is still carried
    assert carry == sum(t for _, t, _ in docs) - sum(tokens[p] for p in kept)


# ----------------------------------------------------------------------------- bucketed walk


def test_budget_bucket_is_a_fixed_spread_of_ids():
    ids = [f"doc{i}" for i in range(4000)]
    got = [budget_bucket(d, 8) for d in ids]
    assert got == [budget_bucket(d, 8) for d in ids] and set(got) == set(range(8))
    counts = [got.count(b) for b in range(8)]
    assert max(counts) - min(counts) < 150  # 500 expected each, sd ~21
    assert {budget_bucket(d, 1) for d in ids} == {0}
    with pytest.raises(ValueError):
        budget_bucket("d", 0)


def _random_docs(rng, n):
    return [(f"d{i}", rng.randint(0, 300), [(f"d{i}p{j}", rng.randint(10, 150))
                                            for j in range(rng.randint(0, 6))]) for i in range(n)]


def test_one_bucket_is_exactly_the_single_walk_in_hashed_order():
    docs = _random_docs(random.Random(11), 60)
    ordered = sorted(docs, key=lambda d: (budget_order_key(d[0], 4), d[0]))
    kept, ledger = apply_token_budget(ordered, seed=4)
    got = apply_bucketed_budget(list(reversed(docs)), 1, seed=4)
    assert list(got) == [0]
    assert [k for ks, _ in got[0] for k in ks] == kept and [r for _, r in got[0]] == ledger


def test_buckets_are_independent_and_resume_from_their_own_carry():
    docs = _random_docs(random.Random(12), 80)
    whole = apply_bucketed_budget(docs, 4, seed=1)
    for b, walked in whole.items():
        mine = [d for d in docs if budget_bucket(d[0], 4) == b]
        assert walk_bucket(mine, seed=1) == walked  # other buckets' documents change nothing
        # a later run continues the bucket from its last ledger row
        first, rest = mine[:len(mine) // 2], mine[len(mine) // 2:]
        done = walk_bucket(first, seed=1)
        last = done[-1][1]
        resumed = walk_bucket(rest, seed=1, carry=last.carry_out, position=last.budget_order + 1)
        assert [r.budget_order for _, r in done + resumed] == list(range(len(mine)))
        assert resumed[0][1].carry_in == last.carry_out


@settings(max_examples=200, deadline=None)
@given(raw=docs_strategy, buckets=st.integers(1, 6), seed=st.integers(0, 1000),
       starts=st.dictionaries(st.integers(0, 5), st.tuples(st.integers(0, 300), st.integers(0, 50))))
def test_bucketed_budget_invariants(raw, buckets, seed, starts):
    docs = [(f"d{i}", t, [(f"d{i}p{j}", n) for j, n in enumerate(pairs)]) for i, (t, pairs) in enumerate(raw)]
    tokens = {p: n for _, _, pairs in docs for p, n in pairs}
    doc_tokens = {d: t for d, t, _ in docs}
    got = apply_bucketed_budget(docs, buckets, seed=seed, starts=starts)
    assert sorted(r.doc_id for w in got.values() for _, r in w) == sorted(doc_tokens)
    all_kept = [k for w in got.values() for ks, _ in w for k in ks]
    assert len(all_kept) == len(set(all_kept)) and set(all_kept) <= set(tokens)
    total_used = total_allowed = 0
    for b, walked in got.items():
        carry0, pos0 = starts.get(b, (0, 0))
        carry, used, allowed = carry0, 0, carry0
        for i, (kept, row) in enumerate(walked):
            assert budget_bucket(row.doc_id, buckets) == b and row.budget_order == pos0 + i
            assert row.carry_in == carry and row.doc_tokens == doc_tokens[row.doc_id]
            assert set(kept) <= {p for p in tokens if p.startswith(row.doc_id + "p")}
            row_used = sum(tokens[k] for k in kept)
            assert row.used_tokens == row_used <= row.doc_tokens + row.carry_in  # per document
            used += row_used
            allowed += row.doc_tokens
            assert used <= allowed  # per bucket, every prefix: pair tokens <= doc tokens + carry in
            carry = row.carry_out
        assert carry == allowed - used  # nothing lost within the bucket
        keys = [(budget_order_key(r.doc_id, seed), r.doc_id) for _, r in walked]
        assert keys == sorted(keys)  # the fixed hashed order
        total_used, total_allowed = total_used + used, total_allowed + allowed
    assert total_used <= total_allowed  # overall
    assert total_used == sum(tokens[k] for k in all_kept)
