"""The embedder's host-side pipeline (issue 16 item 7): NumPy padding, tokenization in groups on a
background thread, pooled rows kept on the device and copied back in one go. Each path must give
the vectors of the plain path (one group, no thread) and of sentence-transformers' own encode."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from finelake.models.embedding import SentenceTransformersEmbedder, _Prefetch, create_embedder

MODEL = "embedded:all-minilm-l6-v2"
DOCS = Path(__file__).resolve().parents[1] / "sample" / "documents.jsonl"


def _docs(n: int, start: int = 0) -> list[str]:
    with open(DOCS, encoding="utf-8") as f:
        rows = [json.loads(line)["text"] for line in f]
    return rows[start:start + n]


@pytest.fixture(scope="module")
def emb():
    return create_embedder({"backend": "sentence_transformers", "model": MODEL, "batch_size": 4,
                            "options": {"max_seq_length": 128}})


@pytest.fixture(scope="module")
def texts():
    # Mixed lengths, some truncated, an empty string, duplicates of a short one.
    return _docs(21, start=100) + ["", "hi", "hi", "A slightly longer sentence about wild boars."]


def _with(emb, **attrs):
    old = {k: getattr(emb, k) for k in attrs}
    for k, v in attrs.items():
        setattr(emb, k, v)
    return old


def test_cpu_defaults_are_the_plain_path(emb):
    assert emb.prefetch is False and emb.tokenize_group >= 1 << 30 and emb.max_batch_tokens == 4096
    assert emb.attn_implementation in ("sdpa", "eager")


@pytest.mark.parametrize("prefetch,group,flush", [(True, 1 << 62, 256 << 20), (False, 5, 256 << 20),
                                                  (True, 5, 256 << 20), (True, 3, 1)])
def test_pipeline_variants_give_the_plain_vectors(emb, texts, prefetch, group, flush):
    plain = emb.embed_pooled(texts, 5, 0.05, 1.0)
    old = _with(emb, prefetch=prefetch, tokenize_group=group, _flush_bytes=flush)
    try:
        before = dict(emb.stats)
        got = emb.embed_pooled(texts, 5, 0.05, 1.0)
        assert emb.stats["tokens"] - before["tokens"] == sum(emb.token_lengths(texts))
        assert emb.stats["texts"] - before["texts"] == len(texts)
        glob = emb.embed(texts)
    finally:
        _with(emb, **old)
    assert got.shape == (len(texts), 6, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, plain, atol=2e-5)
    theirs = emb._st.encode(texts, batch_size=7, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(glob, theirs, atol=2e-5)


def test_groups_cover_every_text_once_longest_first(emb, texts):
    old = _with(emb, tokenize_group=4)
    try:
        groups = emb._groups(texts)
    finally:
        _with(emb, **old)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(texts)))
    assert all(len(g) <= 4 and (np.diff(g) > 0).all() for g in groups)  # input order inside
    chars = [max(len(texts[i]) for i in g) for g in groups]
    assert chars == sorted(chars, reverse=True)


@pytest.mark.parametrize("side", ["right", "left"])
def test_numpy_padding_equals_tokenizer_pad(emb, texts, side):
    tok = emb.tokenizer
    old = tok.padding_side
    tok.padding_side = side
    try:
        enc = emb._tokenize(texts)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        lengths = np.array([len(x) for x in enc["input_ids"]])
        sel = np.array([3, 21, 0, 22, 7])
        ours = emb._pad(enc, keys, sel, lengths)
        theirs = tok.pad({k: [enc[k][i] for i in sel] for k in keys}, return_tensors="np")
    finally:
        tok.padding_side = old
    assert set(ours) == set(keys)
    for k in keys:
        assert ours[k].dtype == np.int64
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_eager_attention_gives_the_same_vectors(texts):
    e = SentenceTransformersEmbedder(MODEL, max_seq_length=128, attn_implementation="eager")
    assert e.attn_implementation == "eager"
    ref = SentenceTransformersEmbedder(MODEL, max_seq_length=128, attn_implementation="sdpa")
    assert ref.attn_implementation == "sdpa"
    np.testing.assert_allclose(e.embed_pooled(texts[:8]), ref.embed_pooled(texts[:8]), atol=2e-5)


def test_bad_input_raises_before_any_thread_and_no_thread_is_left(emb):
    old = _with(emb, prefetch=True, tokenize_group=2)
    try:
        with pytest.raises(TypeError, match="element 2"):
            emb.embed(["a", "b", 3])
        assert emb.embed_pooled(["a", "b", "c"]).shape == (3, 6, 384)
    finally:
        _with(emb, **old)
    assert not [t for t in threading.enumerate() if t.name == "finelake-embed-prefetch"]


def test_prefetch_reraises_the_producers_error_and_stops():
    def gen():
        yield 1
        yield 2
        raise RuntimeError("tokenizer broke")

    p = _Prefetch(gen(), depth=1)
    got = []
    with pytest.raises(RuntimeError, match="tokenizer broke"):
        for x in p:
            got.append(x)
    p.close()
    assert got == [1, 2]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    p = _Prefetch(endless(), depth=2)
    assert next(iter(p)) == 0
    p.close()  # the consumer stopped early: the producer must not run on
    assert not p._thread.is_alive() and len(produced) <= 5


def test_option_errors():
    for bad in ({"tokenize_group": -1}, {"max_batch_tokens": -5}):
        with pytest.raises(ValueError):
            create_embedder({"backend": "sentence_transformers", "model": MODEL, "options": bad})
