"""Token-for-token budget with rollover (FineInstructions §4.2 and its footnote).

For each pre-training document, randomly chosen instruction-answer pairs are kept while their
total token count does not exceed the document's own; budget a document cannot use (because its
pairs cannot fill it exactly) rolls over to the next documents. The result has at most as many
tokens as the documents it replaces, counted in the training tokenizer over the formatted text
(:func:`format_pair`, template included).

Exact rule (documents in the order given; choose it with :func:`budget_order_key`):

1. ``budget = doc_tokens + carry_in`` (``carry_in`` = previous document's ``carry_out``, 0 first).
2. The document's pairs are put in a random order: ascending ``stable_seed(seed, doc_id,
   pair_id)`` (a uniform permutation that depends neither on the input order nor on the other
   documents).
3. Walking that order, a pair is kept when ``used + num_tokens <= budget``; otherwise it is
   dropped (``dropped_over_budget``) and the walk goes on, so a smaller pair later in the order
   can still fill the remaining budget (first fit, not stop-at-first-miss).
4. ``carry_out = budget - used`` (capped at ``max_carry`` when given; the paper has no cap).

Invariant: for every i, the tokens kept over the first i documents are at most their
``doc_tokens`` summed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

from finelake.method.sampling import stable_seed

PAIR_FORMAT = "Instruction: {instruction}\n\nAnswer: {answer}"


def format_pair(instruction: str, answer: str) -> str:
    """The training text of a pair (§4.2): exactly ``"Instruction: {instruction}\\n\\nAnswer: {answer}"``.

    Nothing is stripped or escaped. Raises TypeError for non-str arguments.
    """
    if not isinstance(instruction, str) or not isinstance(answer, str):
        raise TypeError("instruction and answer must be str")
    return PAIR_FORMAT.format(instruction=instruction, answer=answer)


def budget_order_key(doc_id: str, seed: int = 0) -> int:
    """A deterministic, content-independent sort key for the budget walk: sort documents by
    ``(budget_order_key(doc_id, seed), doc_id)``.

    Ordering by a hash spreads rollover evenly instead of favouring whichever source or shard is
    read first; the ledger's ``budget_order`` is the position in that order.
    """
    return stable_seed("budget-order", seed, doc_id)


@dataclass(frozen=True)
class LedgerRow:
    """One document's accounting; field names match the ``budget_ledger`` table.

    ``used_tokens <= doc_tokens + carry_in``; ``carry_out = doc_tokens + carry_in - used_tokens``
    (or ``max_carry`` if smaller); ``kept + dropped_over_budget == candidates``.
    """

    doc_id: str
    budget_order: int
    doc_tokens: int
    carry_in: int
    used_tokens: int
    carry_out: int
    candidates: int
    kept: int
    dropped_over_budget: int

    def as_dict(self) -> dict:
        return asdict(self)


class BudgetState:
    """The running walk: feed documents in budget order with :meth:`step`.

    Keeps the carry and the position, so a job can stream documents (or resume from a saved
    ``carry``/``position``) and still apply one global walk.

    Args:
        seed: seed of the per-document shuffles (``budget.seed``).
        carry: budget carried into the next document (>= 0).
        position: ``budget_order`` of the next document.
        max_carry: optional cap on the carried budget (None = unbounded, as in the paper).
    """

    def __init__(self, seed: int = 0, carry: int = 0, position: int = 0,
                 max_carry: Optional[int] = None):
        if carry < 0 or position < 0 or (max_carry is not None and max_carry < 0):
            raise ValueError("carry, position and max_carry must be >= 0")
        self.seed, self.carry, self.position, self.max_carry = seed, carry, position, max_carry
        self._seen: set[str] = set()

    def step(self, doc_id: str, doc_tokens: int,
             pairs: Sequence[tuple[str, int]]) -> tuple[list[str], LedgerRow]:
        """Apply the budget to one document.

        Args:
            doc_id: the document's id (each id at most once per state).
            doc_tokens: its token count (>= 0).
            pairs: ``(pair_id, num_tokens)`` candidates (distinct ids, tokens >= 0).

        Returns:
            (kept pair ids in the shuffled order, the document's ledger row).

        Raises:
            ValueError: repeated doc_id, repeated pair_id, negative token count.
        """
        if doc_id in self._seen:
            raise ValueError(f"document {doc_id!r} appears twice in the budget walk")
        if doc_tokens < 0:
            raise ValueError(f"document {doc_id!r}: negative doc_tokens {doc_tokens}")
        ids = [p for p, _ in pairs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"document {doc_id!r}: repeated pair_id")
        if any(t < 0 for _, t in pairs):
            raise ValueError(f"document {doc_id!r}: negative pair token count")
        self._seen.add(doc_id)
        budget = doc_tokens + self.carry
        order = sorted(pairs, key=lambda p: (stable_seed(self.seed, doc_id, p[0]), p[0]))
        kept, used = [], 0
        for pair_id, tokens in order:
            if used + tokens <= budget:
                kept.append(pair_id)
                used += tokens
        carry_out = budget - used
        if self.max_carry is not None:
            carry_out = min(carry_out, self.max_carry)
        row = LedgerRow(doc_id, self.position, doc_tokens, self.carry, used, carry_out,
                        len(pairs), len(kept), len(pairs) - len(kept))
        self.carry, self.position = carry_out, self.position + 1
        return kept, row


def apply_token_budget(docs: Iterable[tuple[str, int, Sequence[tuple[str, int]]]], seed: int = 0,
                       max_carry: Optional[int] = None,
                       state: Optional[BudgetState] = None) -> tuple[list[str], list[LedgerRow]]:
    """Keep pairs within each document's token count plus rolled-over budget (§4.2); rule in the module doc.

    Args:
        docs: ``(doc_id, doc_tokens, [(pair_id, num_tokens), ...])`` in budget order (a
            deterministic order: e.g. sorted by :func:`budget_order_key`). A document whose
            pairs were all filtered out still belongs here with ``[]``: its budget rolls over.
        seed: shuffle seed (ignored when ``state`` is given: the state's own seed is used).
        max_carry: optional cap on rollover (ignored when ``state`` is given).
        state: continue an earlier walk (its carry, position, seed, cap) instead of starting
            at carry 0.

    Returns:
        (kept pair ids in walk order, one :class:`LedgerRow` per document).

    Raises:
        ValueError: see :meth:`BudgetState.step`.
    """
    st = state if state is not None else BudgetState(seed=seed, max_carry=max_carry)
    kept_all: list[str] = []
    ledger: list[LedgerRow] = []
    for doc_id, doc_tokens, pairs in docs:
        kept, row = st.step(doc_id, doc_tokens, pairs)
        kept_all.extend(kept)
        ledger.append(row)
    return kept_all, ledger


# ----------------------------------------------------------------------------- bucketed walk


def budget_bucket(doc_id: str, buckets: int) -> int:
    """The walk a document belongs to when the budget runs as ``buckets`` independent walks (§4.2).

    ``stable_seed("budget-bucket", doc_id) % buckets``: a fixed function of the id alone
    (independent of the seed, the order key and the run), so a document never changes bucket.

    Raises:
        ValueError: ``buckets < 1``.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    return stable_seed("budget-bucket", doc_id) % buckets


def walk_bucket(docs: Iterable[tuple[str, int, Sequence[tuple[str, int]]]], seed: int = 0,
                carry: int = 0, position: int = 0,
                max_carry: Optional[int] = None) -> list[tuple[list[str], LedgerRow]]:
    """One bucket's walk (§4.2): its documents sorted by ``(budget_order_key(doc_id, seed),
    doc_id)`` whatever order they come in, then walked with one carry from ``carry`` (the
    bucket's last ``carry_out``, 0 for a new bucket) and positions from ``position``.

    Args:
        docs: ``(doc_id, doc_tokens, [(pair_id, num_tokens), ...])`` of one bucket, any order.

    Returns:
        ``(kept pair ids, ledger row)`` per document, in walk order; ``budget_order`` is the
        position within the bucket.

    Raises:
        ValueError: see :meth:`BudgetState.step`.
    """
    state = BudgetState(seed=seed, carry=carry, position=position, max_carry=max_carry)
    ordered = sorted(docs, key=lambda d: (budget_order_key(d[0], seed), d[0]))
    return [state.step(doc_id, doc_tokens, pairs) for doc_id, doc_tokens, pairs in ordered]


def apply_bucketed_budget(docs: Iterable[tuple[str, int, Sequence[tuple[str, int]]]], buckets: int,
                          seed: int = 0, starts: Optional[dict[int, tuple[int, int]]] = None,
                          max_carry: Optional[int] = None
                          ) -> dict[int, list[tuple[list[str], LedgerRow]]]:
    """The budget as ``buckets`` independent walks (§4.2): each document goes to
    :func:`budget_bucket`, each bucket is walked by :func:`walk_bucket` with its own carry.

    ``buckets=1`` is exactly :func:`apply_token_budget` over the documents sorted by
    :func:`budget_order_key`. Within every bucket the walk's invariant holds (tokens kept over
    the bucket's first i documents <= their doc tokens + the bucket's starting carry), hence
    overall too.

    Args:
        docs: ``(doc_id, doc_tokens, [(pair_id, num_tokens), ...])``, any order.
        starts: ``{bucket: (carry, position)}`` to continue earlier walks (missing: ``(0, 0)``).

    Returns:
        ``{bucket: [(kept pair ids, ledger row), ...]}`` for every bucket that got a document.

    Raises:
        ValueError: ``buckets < 1``; see :meth:`BudgetState.step`.
    """
    by_bucket: dict[int, list] = {}
    for d in docs:
        by_bucket.setdefault(budget_bucket(d[0], buckets), []).append(d)
    starts = starts or {}
    return {b: walk_bucket(ds, seed, *starts.get(b, (0, 0)), max_carry=max_carry)
            for b, ds in sorted(by_bucket.items())}
