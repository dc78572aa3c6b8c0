"""Gaussian pooling: one global and K chunk-local embeddings per text (FineInstructions §3.2,
"Gaussian Pooling for Document Coverage"; formulas in Appendix B).

Given token embeddings ``H = [h_1..h_T]`` (``h_t`` in R^d) and an attention mask ``m_t`` in {0, 1}:

* global mean        ``h̄ = Σ_t m_t h_t / Σ_t m_t``
* centres            ``c_k = ρ_k · T_eff``, ``ρ_k = k / (K+1)``, ``k = 1..K``
* weights            ``w_{k,t} = m_t exp(-½((t − c_k)/(σ T_eff))²) / Σ_t' m_t' exp(-½((t' − c_k)/(σ T_eff))²)``
* chunk embeddings   ``h̃_k = Σ_t w_{k,t} h_t``
* blend              ``h*_k = (1 − α) h̄ + α h̃_k``
* output             ``E = [h̄, h*_1, .., h*_K]``, each row L2-normalized here (retrieval uses cosine).

Position convention (the paper leaves it implicit). ``T`` in Appendix B is "the effective sequence
length"; we take ``T_eff = Σ_t m_t`` (number of unmasked tokens, special tokens included when the
mask includes them) and number the *unmasked* tokens ``t = 1..T_eff`` in order, whatever padding
precedes, follows or interleaves them. With right padding this is the plain index ``1..T``; with
left padding the first real token is still ``t = 1``. So the same text gets the same embeddings
whichever side the tokenizer pads, and the centres ``c_k`` always fall inside the text.

The weights are computed as a masked softmax of ``-½((t − c_k)/(σ T_eff))²`` over the unmasked
positions. That is the normalized formula above exactly (the common factor ``exp(max)`` cancels), and
it does not underflow to 0/0 for very short texts (one token, σ = 0.05: ``exp(-139)`` is 0 in
float32). Pooling is done in float32 whatever dtype ``H`` has.

:func:`gaussian_pool` (torch, used by the embedding backend) and :func:`gaussian_pool_numpy` (NumPy,
same rules, for code without torch) must agree; the tests check both against a direct evaluation
of the Appendix B formulas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is only needed by the torch variant
    import torch

__all__ = ["gaussian_pool", "gaussian_pool_numpy", "gaussian_weights", "gaussian_weights_numpy",
           "check_params"]

_EPS = 1e-12


def check_params(chunks: int, sigma: float, alpha: float) -> None:
    """Validate the pooling hyper-parameters (Appendix B: K ≥ 0, σ > 0, α ∈ [0, 1]).

    Raises:
        ValueError: ``chunks`` is negative or not an int, ``sigma`` ≤ 0, or ``alpha`` outside [0, 1].
    """
    if int(chunks) != chunks or chunks < 0:
        raise ValueError(f"chunks (K) must be an integer >= 0, got {chunks!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


# ----------------------------------------------------------------------------- torch


def gaussian_weights(mask: "torch.Tensor", chunks: int, sigma: float) -> "torch.Tensor":
    """Gaussian chunk weights ``w_{k,t}`` of Appendix B.

    Args:
        mask: attention mask ``[n, T]`` (bool or 0/1 of any dtype); padding may sit anywhere.
        chunks: K, the number of Gaussians (centres at ``k/(K+1)·T_eff``).
        sigma: width as a fraction of the effective length (σ; the kernel's std is ``σ·T_eff`` tokens).

    Returns:
        float32 tensor ``[n, K, T]``; each ``[i, k, :]`` sums to 1 over the unmasked positions and is
        0 at masked ones. ``[n, 0, T]`` when K = 0.

    Raises:
        ValueError: a row has no unmasked token, or invalid parameters.
    """
    import torch

    check_params(chunks, sigma, 0.0)
    m = mask.to(torch.float32)
    t_eff = m.sum(dim=1)  # [n]
    if bool((t_eff <= 0).any()):
        raise ValueError("every row needs at least one unmasked token (attention mask all zero)")
    n, T = m.shape
    if chunks == 0:
        return m.new_zeros((n, 0, T))
    keep = m > 0
    pos = torch.cumsum(m, dim=1)  # 1..T_eff at unmasked tokens
    rho = torch.arange(1, chunks + 1, dtype=torch.float32, device=m.device) / (chunks + 1)  # [K]
    centres = rho[None, :] * t_eff[:, None]  # [n, K]
    width = (sigma * t_eff)[:, None, None]  # [n, 1, 1]
    z = (pos[:, None, :] - centres[:, :, None]) / width  # [n, K, T]
    logits = (-0.5 * z * z).masked_fill(~keep[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def gaussian_pool(token_embeddings: "torch.Tensor", mask: "torch.Tensor", chunks: int = 5,
                  sigma: float = 0.05, alpha: float = 1.0, normalize: bool = True) -> "torch.Tensor":
    """Global mean plus K Gaussian-pooled chunk embeddings (Appendix B; §3.2 "Gaussian Pooling").

    Args:
        token_embeddings: ``H``, ``[n, T, d]`` (any float dtype; pooled in float32).
        mask: attention mask ``[n, T]``, 1 for real tokens, 0 for padding (anywhere).
        chunks: K ≥ 0 (paper: 5).
        sigma: σ > 0, kernel width as a fraction of the effective length (paper: 0.05).
        alpha: α ∈ [0, 1], weight of the chunk embedding in the blend with the global mean
            (paper: 1.0, i.e. pure chunk embeddings).
        normalize: L2-normalize every output vector (default; retrieval uses cosine = inner product).

    Returns:
        float32 tensor ``[n, K+1, d]``: index 0 the global mean ``h̄``, ``1..K`` the blended chunk
        embeddings ``h*_k`` in document order (k = 1 nearest the start).

    Raises:
        ValueError: shapes disagree, a row has no unmasked token, or invalid parameters.
    """
    import torch

    check_params(chunks, sigma, alpha)
    if token_embeddings.dim() != 3 or mask.dim() != 2 or token_embeddings.shape[:2] != mask.shape:
        raise ValueError(f"need H [n,T,d] and mask [n,T]; got {tuple(token_embeddings.shape)} and "
                         f"{tuple(mask.shape)}")
    H = token_embeddings.to(torch.float32)
    m = mask.to(torch.float32)
    t_eff = m.sum(dim=1, keepdim=True)  # [n, 1]
    if bool((t_eff <= 0).any()):
        raise ValueError("every row needs at least one unmasked token (attention mask all zero)")
    glob = torch.bmm(m[:, None, :], H) / t_eff[:, :, None]  # [n, 1, d]
    if chunks:
        w = gaussian_weights(mask, chunks, sigma)  # [n, K, T]
        local = torch.bmm(w, H)  # [n, K, d]
        if alpha != 1.0:
            local = (1.0 - alpha) * glob + alpha * local
        out = torch.cat([glob, local], dim=1)
    else:
        out = glob
    if normalize:
        out = torch.nn.functional.normalize(out, p=2.0, dim=-1, eps=_EPS)
    return out


# ----------------------------------------------------------------------------- numpy


def gaussian_weights_numpy(mask: np.ndarray, chunks: int, sigma: float) -> np.ndarray:
    """NumPy twin of :func:`gaussian_weights`: ``[n, T]`` mask in, ``[n, K, T]`` float64 weights out.

    Raises:
        ValueError: a row has no unmasked token, or invalid parameters.
    """
    check_params(chunks, sigma, 0.0)
    m = np.asarray(mask).astype(np.float64)
    t_eff = m.sum(axis=1)
    if (t_eff <= 0).any():
        raise ValueError("every row needs at least one unmasked token (attention mask all zero)")
    n, T = m.shape
    if chunks == 0:
        return np.zeros((n, 0, T))
    pos = np.cumsum(m, axis=1)
    rho = np.arange(1, chunks + 1) / (chunks + 1)
    centres = rho[None, :] * t_eff[:, None]
    z = (pos[:, None, :] - centres[:, :, None]) / (sigma * t_eff)[:, None, None]
    logits = np.where(m[:, None, :] > 0, -0.5 * z * z, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def gaussian_pool_numpy(token_embeddings: np.ndarray, mask: np.ndarray, chunks: int = 5,
                        sigma: float = 0.05, alpha: float = 1.0, normalize: bool = True) -> np.ndarray:
    """NumPy twin of :func:`gaussian_pool` (same rules, same shapes): ``[n, T, d]`` and ``[n, T]`` in,
    float32 ``[n, K+1, d]`` out (computed in float64). Appendix B.

    Raises:
        ValueError: shapes disagree, a row has no unmasked token, or invalid parameters.
    """
    check_params(chunks, sigma, alpha)
    H = np.asarray(token_embeddings, dtype=np.float64)
    m = np.asarray(mask).astype(np.float64)
    if H.ndim != 3 or m.ndim != 2 or H.shape[:2] != m.shape:
        raise ValueError(f"need H [n,T,d] and mask [n,T]; got {H.shape} and {m.shape}")
    t_eff = m.sum(axis=1)
    if (t_eff <= 0).any():
        raise ValueError("every row needs at least one unmasked token (attention mask all zero)")
    glob = np.einsum("nt,ntd->nd", m, H) / t_eff[:, None]
    w = gaussian_weights_numpy(m, chunks, sigma)
    local = (1.0 - alpha) * glob[:, None, :] + alpha * np.einsum("nkt,ntd->nkd", w, H)
    out = np.concatenate([glob[:, None, :], local], axis=1)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), _EPS)
    return out.astype(np.float32)
