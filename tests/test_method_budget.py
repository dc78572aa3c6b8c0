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
    apply_token_budget,
    budget_order_key,
    format_pair,
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
