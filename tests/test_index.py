"""The template index: exact and IVF FAISS search, recorded recall, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finelake.models.index import (FORMAT_VERSION, KIND_FLAT, KIND_IVF, IndexFormatError,
                                   TemplateIndex, build_index)

SAMPLE = Path(__file__).resolve().parents[1] / "sample"


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, d: int, centres: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few directions: embedding-like structure, so IVF is meaningful."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    return _unit(c[rng.integers(0, centres, n)] + 0.6 * rng.normal(size=(n, d)))


def _true_topk(x: np.ndarray, q: np.ndarray, k: int):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


def _recall(index: TemplateIndex, x: np.ndarray, q: np.ndarray, k: int) -> float:
    truth, _ = _true_topk(x, q, k)
    _, got = index.search(q, k)
    pos = {t: i for i, t in enumerate(index.ids)}
    return float(np.mean([len(set(t) & {pos[g] for g in row}) / k for t, row in zip(truth, got)]))


def test_exact_index_returns_the_true_top_k():
    rng = np.random.default_rng(1)
    x = _unit(rng.normal(size=(500, 32)))
    ids = [f"t{i}" for i in range(500)]
    idx = build_index(x, ids, exact_below=1000, nlist=16, nprobe=4, recall_k=10,
                      embedding_model="test-model")
    assert idx.kind == KIND_FLAT and len(idx) == 500 and idx.dim == 32
    assert idx.recall_at_k == 1.0 and idx.meta["recall_queries"] == 0
    q = _unit(rng.normal(size=(25, 32)))
    scores, got = idx.search(q, 10)
    truth, true_scores = _true_topk(x, q, 10)
    assert scores.shape == (25, 10) and scores.dtype == np.float32
    assert got == [[ids[j] for j in row] for row in truth]
    np.testing.assert_allclose(scores, true_scores, atol=1e-5)


def test_missing_neighbours_are_dropped():
    x = _unit(np.random.default_rng(2).normal(size=(7, 8)))
    idx = build_index(x, [str(i) for i in range(7)], exact_below=100, embedding_model="m")
    scores, got = idx.search(x[:3], 10)
    assert [len(r) for r in got] == [7, 7, 7]
    assert np.isneginf(scores[:, 7:]).all() and np.isfinite(scores[:, :7]).all()
    assert [r[0] for r in got] == ["0", "1", "2"]  # a vector's nearest neighbour is itself
    # An IVF probe that reaches fewer than k vectors: one list of ~40 visited, k = 100.
    y = _clustered(200, 16, seed=3)
    ivf = build_index(y, [f"y{i}" for i in range(200)], exact_below=10, nlist=5, nprobe=1,
                      embedding_model="m")
    s, g = ivf.search(y[:5], 100)
    for row, sc in zip(g, s):
        assert len(row) < 100 and len(set(row)) == len(row)
        assert np.isneginf(sc[len(row):]).all() and np.isfinite(sc[:len(row)]).all()


def test_ivf_records_the_recall_it_measures():
    x = _clustered(6000, 32, seed=4)
    ids = [f"t{i}" for i in range(6000)]
    held_out = _clustered(300, 32, seed=5)
    idx = build_index(x, ids, exact_below=5000, nlist=64, nprobe=2, recall_k=10,
                      embedding_model="m", recall_queries=held_out)
    assert idx.kind == KIND_IVF and idx.meta["nlist"] == 64 and idx.meta["nprobe"] == 2
    assert 0.0 <= idx.recall_at_k <= 1.0 and idx.meta["recall_queries"] == 300
    assert idx.recall_at_k == pytest.approx(_recall(idx, x, held_out, 10), abs=1e-9)
    assert idx.recall_at_k < 1.0  # 2 of 64 lists on this data does miss neighbours

    # Default: a sample of the indexed vectors; probing every list is exact search.
    full = build_index(x, ids, exact_below=5000, nlist=64, nprobe=64, recall_k=10, embedding_model="m")
    assert full.meta["recall_queries"] == 1000 and full.recall_at_k == pytest.approx(1.0)
    sample = x[np.random.default_rng(0).choice(6000, size=1000, replace=False)]
    assert full.recall_at_k == pytest.approx(_recall(full, x, sample, 10), abs=1e-9)


def test_nlist_is_capped_by_training_points():
    x = _clustered(400, 16, seed=6)
    idx = build_index(x, [str(i) for i in range(400)], exact_below=100, nlist=1024, nprobe=32,
                      embedding_model="m")
    assert idx.meta["nlist"] == 400 // 39 and idx.meta["nprobe"] == 400 // 39


def test_save_load_round_trip(tmp_path):
    x = _clustered(3000, 24, seed=7)
    ids = [f"tpl-{i}" for i in range(3000)]
    q = _clustered(40, 24, seed=8)
    for exact_below in (10000, 1000):  # flat, then IVF
        idx = build_index(x, ids, exact_below=exact_below, nlist=32, nprobe=3, recall_k=5,
                          embedding_model="embedded:all-minilm-l6-v2")
        d = idx.save(tmp_path / f"idx{exact_below}")
        meta = json.loads((d / "meta.json").read_text())
        for key in ("format_version", "kind", "embedding_model", "dim", "size", "recall_at_k",
                    "created", "version"):
            assert key in meta
        assert meta["format_version"] == FORMAT_VERSION and meta["size"] == 3000 and meta["dim"] == 24
        back = TemplateIndex.load(d, embedding_model="embedded:all-minilm-l6-v2")
        assert back.meta == idx.meta and back.ids == ids
        s1, g1 = idx.search(q, 5)
        s2, g2 = back.search(q, 5)
        assert g1 == g2
        np.testing.assert_array_equal(s1, s2)


def test_version_is_a_content_hash():
    x = _unit(np.random.default_rng(9).normal(size=(50, 8)))
    ids = [str(i) for i in range(50)]
    a = build_index(x, ids, embedding_model="m")
    b = build_index(x.copy(), list(ids), embedding_model="m")
    assert a.version == b.version and len(a.version) == 16
    assert build_index(x, ids[::-1], embedding_model="m").version != a.version
    assert build_index(x, ids, embedding_model="other").version != a.version
    y = x.copy()
    y[0] = -y[0]
    assert build_index(y, ids, embedding_model="m").version != a.version


def test_load_refuses_bad_directories(tmp_path):
    x = _unit(np.random.default_rng(10).normal(size=(20, 8)))
    d = build_index(x, [str(i) for i in range(20)], embedding_model="m").save(tmp_path / "i")
    with pytest.raises(IndexFormatError, match="built with"):
        TemplateIndex.load(d, embedding_model="another-model")
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="format_version"):
        TemplateIndex.load(d)
    (d / "meta.json").write_text(json.dumps({**meta, "size": 21}))
    with pytest.raises(IndexFormatError, match="says"):
        TemplateIndex.load(d)
    (d / "ids.json").unlink()
    with pytest.raises(IndexFormatError, match="missing"):
        TemplateIndex.load(d)


def test_build_validates_input():
    x = _unit(np.random.default_rng(11).normal(size=(10, 4)))
    ids = [str(i) for i in range(10)]
    with pytest.raises(ValueError, match="unit-norm"):
        build_index(x * 2, ids, embedding_model="m")
    with pytest.raises(ValueError, match="unique"):
        build_index(x, ["a"] * 10, embedding_model="m")
    with pytest.raises(ValueError, match="ids"):
        build_index(x, ids[:9], embedding_model="m")
    with pytest.raises(ValueError):
        build_index(x[:0], [], embedding_model="m")
    idx = build_index(x, ids, embedding_model="m")
    with pytest.raises(ValueError):
        idx.search(np.zeros((2, 5), dtype=np.float32), 3)
    with pytest.raises(ValueError):
        idx.search(x[:2], 0)


@pytest.mark.slow
def test_real_embeddings_exact_and_ivf():
    """Templates stand-in: real user queries embedded with all-MiniLM-L6-v2; queries: real
    documents, Gaussian-pooled (K+1 vectors each), as the match stage will issue them."""
    from finelake.models.embedding import create_embedder

    emb = create_embedder({"backend": "sentence_transformers", "model": "embedded:all-minilm-l6-v2",
                           "batch_size": 64, "options": {"max_seq_length": 64}})
    with open(SAMPLE / "queries.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:300]
    with open(SAMPLE / "documents.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f][:10]
    x = emb.embed([r["query"] for r in rows])
    ids = [f"q{i}" for i in range(len(rows))]
    q = emb.embed_pooled(docs, chunks=5, sigma=0.05, alpha=1.0).reshape(-1, emb.dim)

    flat = build_index(x, ids, exact_below=10000, embedding_model=emb.model_id)
    scores, got = flat.search(q, 5)
    truth, true_scores = _true_topk(x, q, 5)
    np.testing.assert_allclose(scores, true_scores, atol=1e-5)
    # Same neighbours; real data has near-ties (duplicate queries), so compare by score: every
    # returned template is at least as close as the true 5th neighbour.
    pos = {t: i for i, t in enumerate(ids)}
    exact_s = q.astype(np.float64) @ x.astype(np.float64).T
    for i, row in enumerate(got):
        assert len(row) == 5 and len(set(row)) == 5
        assert all(exact_s[i, pos[t]] >= true_scores[i, -1] - 1e-5 for t in row)
    agree = np.mean([g == [ids[j] for j in t] for g, t in zip(got, truth)])
    assert agree > 0.9
    # Every template's nearest template is itself (cosine 1). Duplicate queries aside.
    s_self, g_self = flat.search(x, 1)
    np.testing.assert_allclose(s_self[:, 0], 1.0, atol=1e-4)

    ivf = build_index(x, ids, exact_below=100, nlist=16, nprobe=2, recall_k=5,
                      embedding_model=emb.model_id, recall_queries=q)
    assert ivf.kind == KIND_IVF and 0.0 <= ivf.recall_at_k <= 1.0
    assert ivf.recall_at_k == pytest.approx(_recall(ivf, x, q, 5), abs=1e-9)
