"""Token distribution shift between a base and a tuned model (Ghosh et al., "A Closer Look at the
Limitations of Instruction Tuning", token distribution analysis, after Lin et al.'s URIAL).

Along the tuned model's greedy response to a prompt, both models see the same prefix (prompt +
response so far) and predict the next token. At each position ``t``:

* ``kl[t] = KL(P_tuned(.|prefix) || P_base(.|prefix))`` in nats;
* ``base_rank[t]`` = 1 + the number of vocabulary entries the base model scores strictly higher
  than the token the tuned model chose (1: the base model would have picked it greedily too).

A token is **shifted** when its base rank is above 1 (the brief's and the paper's "ranked below
first"); URIAL further splits these into *marginal* (rank 2-3) and *strongly shifted* (rank > 3).
LoRA tuning is expected to shift few tokens (mostly style and response-initiation tokens) and full
fine-tuning more. Pure logic over logits: the models are run by :mod:`finelake.jobs.evaluate`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass
class ShiftResult:
    """Per-position statistics of one response.

    Attributes:
        tokens: the tuned model's greedy token ids, shape ``[T]``.
        kl: KL(tuned || base) per position, nats, shape ``[T]``.
        base_rank: rank of each token under the base model (1 = top), shape ``[T]``.
    """

    tokens: list[int]
    kl: list[float]
    base_rank: list[int]

    @property
    def shifted(self) -> list[bool]:
        return [r > 1 for r in self.base_rank]


def position_shift(tuned_logits, base_logits, tokens) -> ShiftResult:
    """KL divergence and base rank at every position of one response.

    Args:
        tuned_logits: ``[T, V]`` next-token logits of the tuned model at the positions that
            produced ``tokens`` (torch tensor or array; any float dtype).
        base_logits: ``[T, V]`` logits of the base model on the same prefixes.
        tokens: ``[T]`` token ids chosen by the tuned model.

    Returns:
        :class:`ShiftResult`.

    Raises:
        ValueError: shapes disagree.
    """
    import torch

    t = torch.as_tensor(tuned_logits).float()
    b = torch.as_tensor(base_logits).float()
    ids = torch.as_tensor(tokens).long().reshape(-1)
    if t.ndim != 2 or t.shape != b.shape or t.shape[0] != ids.shape[0]:
        raise ValueError(f"shapes disagree: tuned {tuple(t.shape)}, base {tuple(b.shape)}, "
                         f"tokens {tuple(ids.shape)}")
    lt = torch.log_softmax(t, dim=-1)
    lb = torch.log_softmax(b, dim=-1)
    kl = (lt.exp() * (lt - lb)).sum(-1).clamp(min=0.0)
    chosen = b.gather(1, ids[:, None])
    rank = (b > chosen).sum(-1) + 1
    return ShiftResult(ids.tolist(), kl.tolist(), rank.tolist())


def summarize(results: Sequence[ShiftResult], decode: Optional[Callable[[int], str]] = None,
              top_k: int = 20) -> dict:
    """Aggregate over responses (token-weighted).

    Args:
        results: one :class:`ShiftResult` per response.
        decode: token id -> text for the most frequent shifted tokens (None: ids as strings).
        top_k: how many shifted tokens to list.

    Returns:
        ``kl_mean`` (nats/token), ``shifted_share`` (rank > 1), ``marginal_share`` (rank 2-3),
        ``strong_shift_share`` (rank > 3), ``n_tokens``, ``n_responses``, ``kl_by_position``
        (mean KL at each position index, list), ``top_shifted`` (list of ``[token, count]``).

    Raises:
        ValueError: no tokens at all.
    """
    ranks = [r for res in results for r in res.base_rank]
    kls = [k for res in results for k in res.kl]
    if not ranks:
        raise ValueError("no generated tokens to compare")
    n = len(ranks)
    by_pos: dict[int, list[float]] = {}
    for res in results:
        for i, k in enumerate(res.kl):
            by_pos.setdefault(i, []).append(k)
    counter: Counter = Counter()
    for res in results:
        for tok, r in zip(res.tokens, res.base_rank):
            if r > 1:
                counter[decode(tok) if decode else str(tok)] += 1
    return {
        "kl_mean": sum(kls) / n,
        "shifted_share": sum(r > 1 for r in ranks) / n,
        "marginal_share": sum(1 < r <= 3 for r in ranks) / n,
        "strong_shift_share": sum(r > 3 for r in ranks) / n,
        "n_tokens": n,
        "n_responses": len(results),
        "kl_by_position": [sum(v) / len(v) for _, v in sorted(by_pos.items())],
        "top_shifted": [[tok, c] for tok, c in counter.most_common(top_k)],
    }
