"""The sentence_transformers embedding backend on the embedded all-MiniLM-L6-v2 and real documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finelake.config import ModelConfig
from finelake.method.pooling import gaussian_pool_numpy
from finelake.models.embedding import SentenceTransformersEmbedder, create_embedder

MODEL = "embedded:all-minilm-l6-v2"
DOCS = Path(__file__).resolve().parents[1] / "sample" / "documents.jsonl"


def _docs(n: int, start: int = 0) -> list[str]:
    with open(DOCS, encoding="utf-8") as f:
        rows = [json.loads(line)["text"] for line in f]
    return rows[start:start + n]


@pytest.fixture(scope="module")
def emb():
    # Small batches so one call spans several padded batches of different lengths.
    return create_embedder(ModelConfig(backend="sentence_transformers", model=MODEL, batch_size=4,
                                       options={"max_seq_length": 256}))


def test_factory_builds_the_registered_backend(emb):
    assert isinstance(emb, SentenceTransformersEmbedder)
    assert emb.dim == 384 and emb.max_seq_length == 256 and emb.batch_size == 4


def test_embed_equals_sentence_transformers_own_output(emb):
    texts = _docs(12) + ["", "short one", "A slightly longer sentence about wild boars."]
    ours = emb.embed(texts)
    theirs = emb._st.encode(texts, batch_size=5, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.shape == (15, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_pooled_global_is_embed_and_rows_are_unit(emb):
    texts = _docs(10, start=20)
    pooled = emb.embed_pooled(texts, chunks=5, sigma=0.05, alpha=1.0)
    assert pooled.shape == (10, 6, 384) and pooled.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(pooled[:, 0], emb.embed(texts), atol=1e-6)
    # Chunks of a real document are distinct vectors, not copies of the global one.
    assert (np.abs(pooled[:, 1] - pooled[:, 5]).max(axis=-1) > 1e-3).all()


def test_pooled_matches_pooling_of_sentence_transformers_token_embeddings(emb):
    """End to end against an independent path: ST's own (unpadded, per text) token embeddings,
    pooled by the NumPy twin."""
    texts = _docs(6, start=40)
    ours = emb.embed_pooled(texts, chunks=5, sigma=0.05, alpha=0.6)
    toks = emb._st.encode(texts, output_value="token_embeddings", batch_size=1,
                          convert_to_numpy=False)
    for i, t in enumerate(toks):
        t = t.float().cpu().numpy()[None]
        ref = gaussian_pool_numpy(t, np.ones(t.shape[:2], dtype=np.int64), 5, 0.05, 0.6)[0]
        np.testing.assert_allclose(ours[i], ref, atol=2e-5)


def test_batching_and_sorting_do_not_change_results(emb):
    texts = _docs(9, start=60)
    together = emb.embed_pooled(texts, 3, 0.1, 1.0)
    alone = np.stack([emb.embed_pooled([t], 3, 0.1, 1.0)[0] for t in texts[::4]])
    np.testing.assert_allclose(together[::4], alone, atol=2e-5)


def test_token_budget_splits_batches_without_changing_results(emb):
    texts = _docs(12, start=80)
    lengths = sorted(emb.token_lengths(texts), reverse=True)
    expected, i = 0, 0
    while i < len(lengths):  # independent count: <= 4 texts and <= 300 padded tokens per batch
        size = max(1, min(4, 300 // lengths[i]))
        expected, i = expected + 1, i + size
    unbudgeted = emb.embed_pooled(texts, 5, 0.05, 1.0)
    old = emb.max_batch_tokens
    emb.max_batch_tokens = 300
    try:
        before = emb.stats["batches"]
        budgeted = emb.embed_pooled(texts, 5, 0.05, 1.0)
        assert emb.stats["batches"] - before == expected > 3
    finally:
        emb.max_batch_tokens = old
    np.testing.assert_allclose(budgeted, unbudgeted, atol=2e-5)


def test_chunks_follow_document_order(emb):
    """Two unrelated documents glued together, A then B: the chunks near the start lean towards A
    and the chunks near the end towards B (what Gaussian pooling is for, §3.2). all-MiniLM-L6-v2 is
    not trained for local representations (the paper fine-tunes for that), so the check compares
    the first two chunks with the last two rather than demanding each chunk pick the right half."""
    docs = [d for d in _docs(200) if 400 <= len(d) <= 520][:8]
    pairs = [(docs[i], docs[i + 1]) for i in range(0, 8, 2)]
    glued = [a + " " + b for a, b in pairs]
    assert max(emb.token_lengths(glued)) < 256  # no truncation: both halves are seen
    pooled = emb.embed_pooled(glued, chunks=5, sigma=0.05, alpha=1.0)
    for (a, b), p in zip(pairs, pooled):
        ea, eb = emb.embed([a, b])
        lean = p[1:] @ ea - p[1:] @ eb  # > 0: nearer A
        assert lean[:2].mean() > lean[3:].mean(), lean


def test_truncation_and_token_lengths():
    e = create_embedder({"backend": "sentence_transformers", "model": MODEL,
                         "options": {"max_seq_length": 32}})
    lens = e.token_lengths(_docs(3) + ["hi"])
    assert lens[:3] == [32, 32, 32] and lens[3] == 3  # [CLS] hi [SEP]
    out = e.embed_pooled(_docs(3), chunks=2)
    assert out.shape == (3, 3, 384)
    assert e.stats["tokens"] == 96 and e.stats["texts"] == 3


def test_empty_input_and_bad_input(emb):
    assert emb.embed([]).shape == (0, 384)
    assert emb.embed_pooled([], chunks=5).shape == (0, 6, 384)
    with pytest.raises(TypeError):
        emb.embed(["ok", None])
    with pytest.raises(ValueError):
        emb.embed_pooled(["ok"], chunks=5, sigma=0.0)


def test_config_errors():
    with pytest.raises(ValueError, match="registered"):
        create_embedder({"backend": "no_such_backend", "model": MODEL})
    with pytest.raises(TypeError, match="unknown options"):
        create_embedder({"backend": "sentence_transformers", "model": MODEL,
                         "options": {"max_seq_len": 128}})
    with pytest.raises(ValueError, match="max_seq_length"):
        create_embedder({"backend": "sentence_transformers", "model": MODEL,
                         "options": {"max_seq_length": 4096}})
    with pytest.raises(ValueError, match="dtype"):
        create_embedder({"backend": "sentence_transformers", "model": MODEL,
                         "options": {"dtype": "int3"}})
