"""The figures of `finelake calibrate` (finelake.method.calibration), on hand-made candidate sets."""

from __future__ import annotations

import pytest

from finelake.method.calibration import count_summary, pair_recall, score_quantiles


def test_count_summary():
    c = count_summary([{"a", "b"}, set(), {"a"}, {"a", "b", "c", "d"}])
    assert (c.documents, c.with_candidate) == (4, 3)
    assert c.mean == pytest.approx(7 / 4) and c.median == pytest.approx(1.5)
    assert c.share_with_candidate == pytest.approx(0.75)
    assert 3 <= c.p95 <= 4
    empty = count_summary([])
    assert (empty.documents, empty.mean, empty.share_with_candidate) == (0, 0.0, 0.0)


def test_pair_recall_counts_pairs_not_documents():
    reference = [{"a", "b", "c"}, {"x"}, set()]
    found = [{"a", "z"}, {"x"}, {"q"}]
    # pairs: reference has 4, found shares (d0,a) and (d1,x): 2 of 4
    assert pair_recall(reference, found) == pytest.approx(0.5)
    assert pair_recall(found, reference) == pytest.approx(2 / 4)  # found has 4 pairs, 2 shared
    assert pair_recall([set(), set()], [{"a"}, set()]) is None
    with pytest.raises(ValueError):
        pair_recall([{"a"}], [{"a"}, set()])


def test_score_quantiles():
    assert score_quantiles([0.0, 1.0], (0.0, 0.5, 1.0)) == [0.0, 0.5, 1.0]
    assert score_quantiles([], (0.5,)) == [None]
