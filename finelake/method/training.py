"""Training examples from table rows, and equal token budgets (FineInstructions §4.1–4.2).

Pure logic: no model, no Spark. A table is trained on in one of two layouts:

* **pair** — ``instruction``/``answer`` (``pairs``), ``prompt``/``continuation`` (non-instructional
  ``continuations``) or ``prompt``/``completion``: a TRL *prompt-completion* example whose prompt is
  ``"Instruction: {instruction}\\n\\nAnswer:"`` and whose completion is ``" {answer}"``, so that
  prompt + completion is exactly the §4.2 text ``"Instruction: {instruction}\\n\\nAnswer: {answer}"``
  (:data:`finelake.method.budget.PAIR_FORMAT`). The loss can cover the answer only or every token.
* **text** — any table with a ``text`` column (``documents``, the standard pre-training baseline):
  a TRL *language-modeling* example, loss on every token.

Comparisons between tables are token-for-token (§4.1: "all compared models are trained on the same
number of tokens"): :func:`budget_prefix` keeps the longest prefix of whole examples, in a fixed
order, whose token count stays within the budget, and :func:`equal_budget` is the smaller table's
count.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

from finelake.method.budget import PAIR_FORMAT

PROMPT_FORMAT = "Instruction: {instruction}\n\nAnswer:"
"""The training template's prompt part; evaluation prompts models trained on it the same way."""

PAIR_COLUMNS: tuple[tuple[str, str], ...] = (
    ("instruction", "answer"),
    ("prompt", "continuation"),
    ("prompt", "completion"),
)
"""(instruction column, answer column) pairs recognised, in order of preference."""


def layout(columns: Iterable[str]) -> tuple[str, tuple[str, ...]]:
    """How a table with these columns is trained on.

    Args:
        columns: the table's column names.

    Returns:
        ``("pair", (instruction_col, answer_col))`` or ``("text", ("text",))``.

    Raises:
        ValueError: no recognised column combination (the message lists what is accepted).
    """
    cols = set(columns)
    for a, b in PAIR_COLUMNS:
        if a in cols and b in cols:
            return "pair", (a, b)
    if "text" in cols:
        return "text", ("text",)
    accepted = ", ".join(f"{a}+{b}" for a, b in PAIR_COLUMNS)
    raise ValueError(f"cannot train on columns {sorted(cols)}: need {accepted}, or text")


def format_prompt(instruction: str) -> str:
    """``"Instruction: {instruction}\\n\\nAnswer:"`` (the §4.2 template without the answer)."""
    return PROMPT_FORMAT.format(instruction=instruction)


def pair_example(instruction: str, answer: str) -> dict[str, str]:
    """A TRL prompt-completion example; ``prompt + completion`` equals the §4.2 pair text.

    Raises:
        TypeError: a non-str argument.
    """
    if not isinstance(instruction, str) or not isinstance(answer, str):
        raise TypeError("instruction and answer must be str")
    prompt = format_prompt(instruction)
    full = PAIR_FORMAT.format(instruction=instruction, answer=answer)
    return {"prompt": prompt, "completion": full[len(prompt):]}


def build_examples(rows: dict[str, list], kind: str, columns: Sequence[str]) -> list[dict[str, str]]:
    """Training examples from column lists (rows with a null or empty field are skipped).

    Args:
        rows: column name -> list of values (e.g. ``pyarrow.Table.to_pydict()``).
        kind, columns: what :func:`layout` returned.

    Returns:
        ``[{"prompt", "completion"}]`` for pairs, ``[{"text"}]`` for text, in row order.
    """
    out: list[dict[str, str]] = []
    if kind == "pair":
        a, b = columns
        for ins, ans in zip(rows[a], rows[b]):
            if ins and ans:
                out.append(pair_example(ins, ans))
    elif kind == "text":
        out = [{"text": t} for t in rows[columns[0]] if t]
    else:
        raise ValueError(f"unknown layout {kind!r}")
    return out


def example_text(example: dict[str, str]) -> str:
    """The full text a model is trained on for one example (prompt + completion, or text)."""
    return example["text"] if "text" in example else example["prompt"] + example["completion"]


def count_example_tokens(examples: Sequence[dict[str, str]],
                         encode: Callable[[list[str]], list[list[int]]],
                         max_seq_len: Optional[int], eos_tokens: int = 1) -> list[int]:
    """Tokens each example contributes to training: its full text plus ``eos_tokens`` (TRL appends
    EOS), capped at ``max_seq_len`` (TRL truncates longer sequences, keeping the start).

    Args:
        encode: texts -> token id lists, without special tokens added by the caller's choice.
        max_seq_len: cap per example (None: no cap).
    """
    ids = encode([example_text(e) for e in examples]) if examples else []
    n = [len(x) + eos_tokens for x in ids]
    return [min(k, max_seq_len) for k in n] if max_seq_len else n


def budget_prefix(token_counts: Sequence[int], budget: Optional[int]) -> int:
    """Number of leading examples whose cumulative token count stays within ``budget``.

    Whole examples only, so the kept count is at most ``budget`` and exceeds ``budget`` minus
    the next example's length. ``None`` keeps everything.

    Raises:
        ValueError: a negative budget.
    """
    if budget is None:
        return len(token_counts)
    if budget < 0:
        raise ValueError(f"token budget must be >= 0, not {budget}")
    total = 0
    for i, n in enumerate(token_counts):
        if total + n > budget:
            return i
        total += n
    return len(token_counts)


def equal_budget(totals: dict[str, int], cap: Optional[int] = None) -> int:
    """The token budget that makes every table's training set the same size: the smallest
    table's token count (§4.1), optionally capped.

    Raises:
        ValueError: no tables, or a table with no tokens.
    """
    if not totals:
        raise ValueError("no tables to compare")
    empty = [k for k, v in totals.items() if v <= 0]
    if empty:
        raise ValueError(f"tables with no training tokens: {empty}")
    b = min(totals.values())
    return min(b, cap) if cap else b
