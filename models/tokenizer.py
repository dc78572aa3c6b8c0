"""Token counts in the training tokenizer (the unit of every token budget, §4.2)."""

from __future__ import annotations

import functools
import os
from typing import Iterable

from finelake.models.resolve import hf_path


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str):
    """The ``transformers`` tokenizer for ``model`` (embedded name, path or hub id), cached per process."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_path(model))


def count_tokens(model: str, texts: Iterable[str]) -> list[int]:
    """Number of tokens of each text, without special tokens.

    Args:
        model: tokenizer name as in ``tokenizer.model`` of the profile.
        texts: strings (None counts as 0).

    Returns:
        One int per text, same order.
    """
    tok = load_tokenizer(model)
    texts = list(texts)
    idx = [i for i, t in enumerate(texts) if t]
    out = [0] * len(texts)
    if idx:
        enc = tok([texts[i] for i in idx], add_special_tokens=False)["input_ids"]
        for i, ids in zip(idx, enc):
            out[i] = len(ids)
    return out
