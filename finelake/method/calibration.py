"""Figures ``finelake calibrate`` reports on a lake's own documents (§3.2; issue 25 item 4).

Candidates of a document are the templates whose cosine with one of its K+1 Gaussian-pooled
embeddings reaches the threshold. Calibration compares sets of candidates found in different
ways (K=5, the paper's value, against K=10, the released helper's; the index probed at its
``nprobe`` against every list) and summarizes how many each way finds:

* :func:`count_summary`: documents, documents with at least one candidate, candidates per
  document (mean, median, 95th percentile);
* :func:`pair_recall`: of the (document, template) pairs a reference finds, the share another way
  finds too: the recall at the threshold of probing ``nprobe`` lists (reference: all lists), or
  of K=5 against K=10;
* :func:`score_quantiles`: quantiles of a list of cosines (choosing a threshold for another
  embedding model).

Pure functions over Python sets and lists; the search itself is :mod:`finelake.jobs.calibrate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class CountSummary:
    """Candidates per document over a sample.

    Attributes:
        documents: documents in the sample.
        with_candidate: documents with at least one candidate.
        mean, median, p95: candidates per document (0.0 for an empty sample).
    """

    documents: int
    with_candidate: int
    mean: float
    median: float
    p95: float

    @property
    def share_with_candidate(self) -> float:
        """Share of documents with at least one candidate, in [0, 1] (0.0 for no documents)."""
        return self.with_candidate / self.documents if self.documents else 0.0


def count_summary(candidates: Sequence[set]) -> CountSummary:
    """Summarize candidate sets, one per document (see :class:`CountSummary`)."""
    n = np.array([len(c) for c in candidates], dtype=np.float64)
    if not len(n):
        return CountSummary(0, 0, 0.0, 0.0, 0.0)
    return CountSummary(int(len(n)), int((n > 0).sum()), float(n.mean()), float(np.median(n)),
                        float(np.quantile(n, 0.95)))


def pair_recall(reference: Sequence[set], found: Sequence[set]) -> Optional[float]:
    """Share of the reference's (document, template) pairs that ``found`` has too.

    Args:
        reference: per document, the candidate template ids of the reference search.
        found: per document (same order and length), those of the search measured.

    Returns:
        ``sum |reference_i ∩ found_i| / sum |reference_i|`` in [0, 1]; None when the reference
        has no pair.

    Raises:
        ValueError: the two lists cover different numbers of documents.
    """
    if len(reference) != len(found):
        raise ValueError(f"{len(reference)} reference documents, {len(found)} measured")
    total = sum(len(r) for r in reference)
    if not total:
        return None
    return sum(len(r & f) for r, f in zip(reference, found)) / total


def score_quantiles(scores: Sequence[float], qs: Sequence[float]) -> list[Optional[float]]:
    """The ``qs`` quantiles (linear interpolation) of ``scores``; None each when empty."""
    if not len(scores):
        return [None] * len(qs)
    return [float(v) for v in np.quantile(np.asarray(scores, dtype=np.float64), list(qs))]
