"""Token counts in the training tokenizer (the unit of every token budget, §4.2)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable

from finelake.models.resolve import hf_path


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str):
    """The tokenizer for ``model`` (embedded name, path or hub id), cached per process.

    A local folder with a ``tokenizer.json`` is opened with the ``tokenizers`` library (well under
    a second; no torch import), anything else with ``transformers.AutoTokenizer``. Both expose
    the same counting through :func:`count_tokens`.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = hf_path(model)
    if (Path(path) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def count_tokens(model: str, texts: Iterable[str]) -> list[int]:
    """Number of tokens of each text, without special tokens.

    Args:
        model: tokenizer name as in ``tokenizer.model`` of the profile.
        texts: strings (None or empty counts as 0).

    Returns:
        One int per text, same order.
    """
    tok = load_tokenizer(model)
    texts = list(texts)
    idx = [i for i, t in enumerate(texts) if t]
    out = [0] * len(texts)
    if not idx:
        return out
    batch = [texts[i] for i in idx]
    if hasattr(tok, "encode_batch"):  # tokenizers.Tokenizer
        lens = [len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False)]
    else:
        lens = [len(ids) for ids in tok(batch, add_special_tokens=False)["input_ids"]]
    for i, n in zip(idx, lens):
        out[i] = n
    return out


def prefix_chars(model: str, texts: Iterable[str], max_tokens: int) -> list[int]:
    """Length in characters of the longest prefix of each text that has at most ``max_tokens``
    tokens (no special tokens); the whole length when the text is shorter.

    Used to cut documents so a prompt fits a model's context (``instantiate.max_document_tokens``).

    Args:
        model: tokenizer name as in ``tokenizer.model``.
        texts: strings (None counts as "").
        max_tokens: token limit (>= 1).

    Returns:
        One int per text; ``texts[i][:result[i]]`` ends on a token boundary.

    Raises:
        ValueError: ``max_tokens < 1``.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    tok = load_tokenizer(model)
    texts = [t or "" for t in texts]
    # Each distinct text is tokenized once: instantiate asks for a document's cut once per
    # template matched to it (six per document, §3.2).
    distinct = list(dict.fromkeys(texts))
    if hasattr(tok, "encode_batch"):  # tokenizers.Tokenizer
        offsets = [e.offsets for e in tok.encode_batch(distinct, add_special_tokens=False)]
    else:
        offsets = tok(distinct, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = {t: len(t) if len(o) <= max_tokens else int(o[max_tokens - 1][1])
           for t, o in zip(distinct, offsets)}
    return [cut[t] for t in texts]
