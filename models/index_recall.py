"""How well an approximate template index finds what exact search finds (recorded at build time).

:func:`exact_scan` is brute-force inner-product search streamed over a :class:`VectorSource`;
:func:`measure_recalls` compares an index with it: recall@k and, at the match threshold, recall,
precision and the largest score error (definitions in :mod:`finelake.models.index`).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from finelake.models.index_search import threshold_search
from finelake.models.index_vectors import ArrayVectors, VectorSource

EXACT_BATCH = 32768  # template rows per brute-force block when measuring recall


def exact_scan(source: VectorSource, queries: np.ndarray, k: int, threshold: Optional[float],
               block: int = EXACT_BATCH) -> tuple[np.ndarray, Optional[tuple[np.ndarray, np.ndarray]]]:
    """Brute-force inner products of ``queries`` with every vector of ``source``, streamed
    ``block`` rows at a time (memory: q x block x 12 bytes: the scores and their partition,
    plus 12 bytes per pair kept; linear in n: a partition per block, not a sort).

    Returns:
        ``(top_labels, pairs)``: int64 ``[q, k]`` exact top-k labels, and when ``threshold`` is
        given ``(keys, scores)`` of every pair with score >= threshold, ``key = query * n + label``
        (int64, ascending) and its float32 exact score.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = int(source.n)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_l = np.zeros((len(q), 0), dtype=np.int64)
    keys, vals = [], []
    start = 0
    for b in source.batches(block):
        s = q @ np.ascontiguousarray(b, dtype=np.float32).T
        if threshold is not None:
            qi, li = np.nonzero(s >= np.float32(threshold))
            keys.append(qi.astype(np.int64) * n + li + start)
            vals.append(s[qi, li])
        # this block's top k by partition (linear), then merged with the running top k
        kb = min(k, s.shape[1])
        part = np.argpartition(s, s.shape[1] - kb, axis=1)[:, s.shape[1] - kb:] if kb < s.shape[1] \
            else np.broadcast_to(np.arange(s.shape[1]), s.shape)
        cs = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        cl = np.concatenate([best_l, part + start], axis=1)
        del s, part
        order = np.lexsort((cl, -cs), axis=1)[:, :min(k, cs.shape[1])]  # score desc, label asc
        best_s = np.take_along_axis(cs, order, axis=1)
        best_l = np.take_along_axis(cl, order, axis=1)
        start += len(b)
    if threshold is None:
        return best_l, None
    keys_a = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    vals_a = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    order = np.argsort(keys_a, kind="stable")
    return best_l, (keys_a[order], vals_a[order])


def measure_recalls(index: Any, source: VectorSource, queries: np.ndarray, k: int,
                    threshold: Optional[float]) -> dict:
    """Recall@k and, with a threshold, recall/precision at the threshold of ``index`` against exact
    inner-product search over ``source`` (see the module docstring for the definitions).

    Returns:
        ``{"recall_at_k", and with a threshold "recall_at_threshold", "precision_at_threshold",
        "pairs_at_threshold", "score_error_max"}``.
    """
    truth, pairs = exact_scan(source, queries, k, threshold)
    _, got = index.search(queries, k)
    hits = sum(len(set(t.tolist()) & set(g[g >= 0].tolist())) for t, g in zip(truth, got))
    out: dict = {"recall_at_k": hits / (k * len(queries))}
    if threshold is None:
        return out
    true_keys, true_scores = pairs
    lims, scores, labels = threshold_search(index, queries, threshold)
    qi = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(lims))
    got_keys = qi * int(source.n) + labels
    pos = np.searchsorted(true_keys, got_keys)
    pos_c = np.minimum(pos, max(len(true_keys) - 1, 0))
    hit = (pos < len(true_keys)) & (true_keys[pos_c] == got_keys) if len(true_keys) else \
        np.zeros(len(got_keys), bool)
    n_hit = int(np.unique(got_keys[hit]).size)
    out["pairs_at_threshold"] = int(len(true_keys))
    out["recall_at_threshold"] = n_hit / len(true_keys) if len(true_keys) else None
    out["precision_at_threshold"] = float(hit.mean()) if len(got_keys) else None
    out["score_error_max"] = (float(np.abs(scores[hit] - true_scores[pos_c[hit]]).max())
                              if hit.any() else None)
    return out


def measure_recall(index: Any, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Recall@k of ``index`` against exact inner-product search over in-memory ``vectors``
    (mean |approximate top-k ∩ exact top-k| / k, in [0, 1])."""
    return measure_recalls(index, ArrayVectors(vectors, [str(i) for i in range(len(vectors))]),
                           np.ascontiguousarray(queries, dtype=np.float32), k, None)["recall_at_k"]
