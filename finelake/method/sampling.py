"""Complexity-weighted template sampling for each document (FineInstructions §3.2).

Every template above the cosine threshold for a document (from any of its K+1 embeddings) is a
candidate. §3.2 samples among them with weights chosen so that the *complexity* (number of
``<fi>`` slots) of the kept templates follows the complexity distribution of real user queries
(WildChat, LMSys, OAsst1, ShareLM), not that of whatever the index returns.

Randomness is derived with :func:`stable_seed` (BLAKE2b), never Python's ``hash()``, so a
document gets the same templates on every machine, run and partitioning.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Mapping, NamedTuple, Optional


def stable_seed(*parts: object) -> int:
    """A 64-bit integer from ``parts`` (str, int, float, bytes, None), stable across processes.

    Each part is encoded with its type and length, so ``("a", "bc")`` and ``("ab", "c")`` differ.
    """
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if isinstance(p, bytes):
            b, tag = p, "b"
        elif isinstance(p, str):
            b, tag = p.encode("utf-8"), "s"
        elif p is None or isinstance(p, (bool, int, float)):
            b, tag = repr(p).encode("ascii"), type(p).__name__
        else:
            raise TypeError(f"stable_seed: unsupported part type {type(p).__name__}")
        h.update(f"{tag}:{len(b)}:".encode("ascii"))
        h.update(b)
    return int.from_bytes(h.digest(), "big")


def stable_uniform(*parts: object) -> float:
    """A float in the open interval (0, 1), uniform over 2**53 values, determined by ``parts``."""
    return ((stable_seed(*parts) >> 11) + 0.5) / 2.0 ** 53


class Candidate(NamedTuple):
    """A retrieved template for one document.

    Attributes:
        template_id: the template's id.
        num_slots: its complexity (number of ``<fi>`` slots).
        score: cosine similarity with the document embedding that retrieved it.
        chunk_index: which embedding retrieved it (0 = global, 1..K = Gaussian chunks).
    """

    template_id: str
    num_slots: int
    score: float
    chunk_index: int


def complexity_weights(target_counts: Mapping[int, int], pool_counts: Mapping[int, int],
                       smoothing: float = 1.0) -> dict[int, float]:
    """Per-complexity sampling weights that turn the candidate pool's mix into the target mix.

    With ``C`` the union of complexities in both mappings and additive smoothing ``s``::

        target_share(c) = (target[c] + s) / (sum(target) + s * |C|)
        pool_share(c)   = (pool[c]   + s) / (sum(pool)   + s * |C|)
        weight(c)       = target_share(c) / pool_share(c)

    so one weighted draw from candidates distributed like the pool has exactly the target
    distribution, and ``sum(pool_share(c) * weight(c)) == 1`` (a pool-average weight of 1).
    Smoothing keeps complexities seen on only one side samplable: one missing from the target
    gets a small weight instead of never being chosen, one missing from the pool gets a finite
    weight. With ``s == 0`` a complexity absent from the target gets weight 0 (never sampled)
    and one absent from the pool gets weight 0 too (it has no candidates to weigh).

    Several draws without replacement from a small per-document pool pull the kept mix back
    toward the pool's (once the favoured complexities are used up, the rest must be drawn);
    ``tests/test_method_sampling.py`` measures that effect.

    Args:
        target_counts: complexity → number of real queries/templates with it (counts >= 0).
        pool_counts: complexity → number of candidates with it in the run (counts >= 0).
        smoothing: pseudo-count added to every complexity on both sides (>= 0).

    Returns:
        complexity → weight (>= 0), for every complexity in either mapping.

    Raises:
        ValueError: negative count or smoothing; a side with no mass and ``smoothing == 0``.
    """
    if smoothing < 0:
        raise ValueError("smoothing must be >= 0")
    keys = sorted(set(target_counts) | set(pool_counts))
    if not keys:
        return {}
    for name, counts in (("target", target_counts), ("pool", pool_counts)):
        if any(v < 0 for v in counts.values()):
            raise ValueError(f"{name} counts must be >= 0")
    t_tot = sum(target_counts.values()) + smoothing * len(keys)
    p_tot = sum(pool_counts.values()) + smoothing * len(keys)
    if t_tot <= 0 or p_tot <= 0:
        raise ValueError("target and pool need some mass (non-zero counts or smoothing > 0)")
    out = {}
    for c in keys:
        t = (target_counts.get(c, 0) + smoothing) / t_tot
        p = (pool_counts.get(c, 0) + smoothing) / p_tot
        out[c] = t / p if p > 0 else 0.0
    return out


def dedupe_candidates(candidates: Iterable[Candidate]) -> list[Candidate]:
    """One candidate per template: the highest score (ties: lowest chunk_index), sorted by id."""
    best: dict[str, Candidate] = {}
    for c in candidates:
        cur = best.get(c.template_id)
        if cur is None or (c.score, -c.chunk_index) > (cur.score, -cur.chunk_index):
            best[c.template_id] = c
    return [best[k] for k in sorted(best)]


def sample_templates(candidates: Iterable[Candidate], weights: Optional[Mapping[int, float]],
                     n: int = 6, seed: int = 0, key: str = "") -> list[Candidate]:
    """Weighted sample of at most ``n`` distinct templates for one document, without replacement (§3.2).

    Candidates of the same template retrieved by several embeddings are first merged, keeping the
    best-scoring one (:func:`dedupe_candidates`). Each remaining candidate ``c`` with weight
    ``w = weights[c.num_slots] > 0`` gets the Efraimidis–Spirakis key ``u ** (1 / w)`` (computed
    as ``log(u) / w``), with ``u = stable_uniform(seed, key, c.template_id)``; the ``n`` largest
    keys are kept. This is a draw of ``n`` items without replacement, each step picking a
    remaining item with probability proportional to its weight. Deriving ``u`` per template
    (instead of from one RNG stream) makes the result independent of the candidates' order and
    leaves a template's key unchanged when other candidates come or go. Candidates with weight 0
    are never kept. The cosine score does not weigh the draw (every candidate is already above
    the threshold); it only picks which duplicate survives and breaks exact key ties.

    Args:
        candidates: the document's candidates (any order, duplicates allowed).
        weights: complexity → weight (e.g. :func:`complexity_weights`); None = uniform.
        n: number of templates to keep (>= 0).
        seed: run-level seed (``match.seed``).
        key: the document's key, usually its doc_id.

    Returns:
        Up to ``n`` candidates, distinct template ids, in draw order (rank 0 first).

    Raises:
        ValueError: ``n < 0``; a candidate's complexity has no weight; a negative or non-finite weight.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    keyed = []
    for c in dedupe_candidates(candidates):
        if weights is None:
            w = 1.0
        elif c.num_slots not in weights:
            raise ValueError(f"no weight for complexity {c.num_slots} (template {c.template_id})")
        else:
            w = float(weights[c.num_slots])
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight for complexity {c.num_slots} must be finite and >= 0, got {w}")
        if w == 0:
            continue
        k = math.log(stable_uniform(seed, key, c.template_id)) / w
        keyed.append((-k, -c.score, c.template_id, c))
    keyed.sort()
    return [t[-1] for t in keyed[:n]]


def complexity_shares(**distributions: Mapping[int, int]) -> list[tuple[int, dict[str, float]]]:
    """The complexity distributions of §3.2 side by side, as shares, for the run report: the
    target (real queries' templates), the candidates retrieval returned (the weights' pool) and
    the kept pairs' templates, each normalized to sum to 1 (an empty one stays all 0).

    Args:
        **distributions: name -> (complexity = number of slots -> count >= 0).

    Returns:
        ``[(complexity, {name: share})]`` for every complexity in any distribution, ascending.

    Raises:
        ValueError: a negative count.
    """
    out: dict[int, dict[str, float]] = {}
    for name, counts in distributions.items():
        counts = {int(k): int(v) for k, v in counts.items()}
        if any(v < 0 for v in counts.values()):
            raise ValueError(f"{name}: negative count in {counts}")
        total = sum(counts.values())
        for k in counts:
            out.setdefault(k, {})
        for k in out:
            out[k][name] = counts.get(k, 0) / total if total else 0.0
    for k in out:
        for name in distributions:
            out[k].setdefault(name, 0.0)
    return sorted(out.items())
