"""Gaussian pooling (Appendix B) against a direct, loop-by-loop evaluation of the paper's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finelake.method.pooling import (gaussian_pool, gaussian_pool_numpy, gaussian_weights,
                                     gaussian_weights_numpy)


def reference(H: np.ndarray, mask: np.ndarray, K: int, sigma: float, alpha: float) -> np.ndarray:
    """Appendix B written out term by term, float64, one text at a time.

    The unmasked tokens of a text are taken in order and numbered t = 1..T (T = their count); the
    padding is simply not part of the sequence.
    """
    n, _, d = H.shape
    out = np.zeros((n, K + 1, d))
    for i in range(n):
        toks = [H[i, j].astype(np.float64) for j in range(H.shape[1]) if mask[i, j]]
        T = len(toks)
        hbar = sum(toks) / T
        vecs = [hbar]
        for k in range(1, K + 1):
            c = k / (K + 1) * T
            raw = [math.exp(-0.5 * ((t - c) / (sigma * T)) ** 2) for t in range(1, T + 1)]
            Z = sum(raw)
            htilde = sum((r / Z) * h for r, h in zip(raw, toks))
            vecs.append((1 - alpha) * hbar + alpha * htilde)
        for k, v in enumerate(vecs):
            out[i, k] = v / np.linalg.norm(v)
    return out


def _batch(lengths, T, d=8, seed=0, side="right"):
    rng = np.random.default_rng(seed)
    H = rng.normal(size=(len(lengths), T, d)).astype(np.float32)
    mask = np.zeros((len(lengths), T), dtype=np.int64)
    for i, L in enumerate(lengths):
        if side == "right":
            mask[i, :L] = 1
        else:
            mask[i, T - L:] = 1
    # Padding positions hold garbage that must not leak into the result.
    H[mask == 0] = 1e3
    return H, mask


def _both(H, mask, K, sigma, alpha):
    t = gaussian_pool(torch.from_numpy(H), torch.from_numpy(mask), K, sigma, alpha).numpy()
    n = gaussian_pool_numpy(H, mask, K, sigma, alpha)
    return t, n


@pytest.mark.parametrize("K,sigma,alpha", [(5, 0.05, 1.0), (3, 0.2, 0.3), (1, 0.5, 1.0), (8, 0.05, 0.7)])
def test_right_padding_matches_formulas(K, sigma, alpha):
    H, mask = _batch([40, 7, 64, 2, 13], T=64)
    ref = reference(H, mask, K, sigma, alpha)
    t, n = _both(H, mask, K, sigma, alpha)
    assert t.shape == n.shape == (5, K + 1, 8)
    np.testing.assert_allclose(t, ref, atol=2e-5)
    np.testing.assert_allclose(n, ref, atol=2e-5)


def test_left_padding_matches_formulas_and_right_padding():
    lengths = [40, 7, 64, 2, 13]
    Hr, mr = _batch(lengths, T=64, side="right")
    Hl, ml = _batch(lengths, T=64, side="left")
    # Same tokens, moved to the end of the row.
    for i, L in enumerate(lengths):
        Hl[i, 64 - L:] = Hr[i, :L]
    ref = reference(Hl, ml, 5, 0.05, 1.0)
    tl, nl = _both(Hl, ml, 5, 0.05, 1.0)
    tr, _ = _both(Hr, mr, 5, 0.05, 1.0)
    np.testing.assert_allclose(tl, ref, atol=2e-5)
    np.testing.assert_allclose(nl, ref, atol=2e-5)
    np.testing.assert_allclose(tl, tr, atol=1e-6)


def test_padding_in_the_middle_counts_unmasked_positions():
    rng = np.random.default_rng(3)
    H = rng.normal(size=(3, 50, 6)).astype(np.float32)
    mask = (rng.random((3, 50)) > 0.4).astype(np.int64)
    ref = reference(H, mask, 4, 0.1, 1.0)
    t, n = _both(H, mask, 4, 0.1, 1.0)
    np.testing.assert_allclose(t, ref, atol=2e-5)
    np.testing.assert_allclose(n, ref, atol=2e-5)


def test_single_token_text_gives_that_token_everywhere():
    # sigma*T = 0.05 tokens: the raw Gaussian weight of the only token underflows float32, the
    # normalized weight is exactly 1.
    H, mask = _batch([1, 20], T=20, seed=5)
    ref = reference(H, mask, 5, 0.05, 1.0)
    t, n = _both(H, mask, 5, 0.05, 1.0)
    assert np.isfinite(t).all() and np.isfinite(n).all()
    np.testing.assert_allclose(t, ref, atol=2e-5)
    np.testing.assert_allclose(n, ref, atol=2e-5)
    tok = H[0, 0] / np.linalg.norm(H[0, 0])
    for k in range(6):
        np.testing.assert_allclose(t[0, k], tok, atol=1e-6)


def test_k0_is_just_the_global_mean():
    H, mask = _batch([10, 3], T=12)
    t, n = _both(H, mask, 0, 0.05, 1.0)
    assert t.shape == (2, 1, 8) and n.shape == (2, 1, 8)
    for i, L in enumerate([10, 3]):
        g = H[i, :L].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(t[i, 0], g / np.linalg.norm(g), atol=1e-6)
    np.testing.assert_allclose(n, t, atol=1e-6)


def test_alpha0_gives_k_copies_of_the_global():
    H, mask = _batch([30, 9], T=30)
    t, n = _both(H, mask, 5, 0.05, 0.0)
    for k in range(1, 6):
        np.testing.assert_allclose(t[:, k], t[:, 0], atol=1e-6)
        np.testing.assert_allclose(n[:, k], n[:, 0], atol=1e-6)


def test_weights_are_distributions_peaking_at_the_centres():
    mask = np.zeros((2, 120), dtype=np.int64)
    mask[0, :100] = 1
    mask[1, 20:] = 1  # left-padded, also 100 tokens
    w = gaussian_weights(torch.from_numpy(mask), 5, 0.05).numpy()
    wn = gaussian_weights_numpy(mask, 5, 0.05)
    np.testing.assert_allclose(w, wn, atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert (w[:, :, mask[0] == 0][0] == 0).all() and (w[1][:, :20] == 0).all()
    # Centres c_k = k/6 * 100 -> the heaviest token is the one numbered round(c_k) (1-based).
    peaks0 = w[0].argmax(-1) + 1
    peaks1 = w[1].argmax(-1) - 20 + 1
    expected = [round(k / 6 * 100) for k in range(1, 6)]
    assert list(peaks0) == expected and list(peaks1) == expected


def test_bf16_input_is_pooled_in_float32():
    H, mask = _batch([16, 5], T=16)
    out = gaussian_pool(torch.from_numpy(H).to(torch.bfloat16), torch.from_numpy(mask))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference(H, mask, 5, 0.05, 1.0), atol=2e-2)


@pytest.mark.parametrize("kwargs", [dict(chunks=-1), dict(sigma=0.0), dict(alpha=1.5)])
def test_bad_parameters_raise(kwargs):
    H, mask = _batch([4], T=4)
    with pytest.raises(ValueError):
        gaussian_pool(torch.from_numpy(H), torch.from_numpy(mask), **kwargs)
    with pytest.raises(ValueError):
        gaussian_pool_numpy(H, mask, **kwargs)


def test_all_padding_row_raises():
    H, mask = _batch([4, 1], T=4)
    mask[1] = 0
    with pytest.raises(ValueError, match="unmasked"):
        gaussian_pool(torch.from_numpy(H), torch.from_numpy(mask))
    with pytest.raises(ValueError, match="unmasked"):
        gaussian_pool_numpy(H, mask)
