"""The ``sentence_transformers`` embedding backend: global and Gaussian-pooled text embeddings.

Templates' compatible-document descriptions are embedded with :meth:`embed` (one vector each) and
documents with :meth:`embed_pooled` (K+1 vectors each: the global mean and K chunk-local vectors,
FineInstructions §3.2 "Gaussian Pooling", Appendix B). Both come from the same token embeddings, so
``embed(texts) == embed_pooled(texts, K, σ, α)[:, 0]``.

How a batch is computed: texts are tokenized once (truncated to ``max_seq_length`` tokens, special
tokens included), sorted by token length (longest first) and cut into batches of at most
``batch_size`` texts and at most ``max_batch_tokens`` padded tokens, so each padded batch is nearly
rectangular and long documents go in smaller batches than short templates (on a CPU, batches of a
few thousand tokens keep the activations in cache: 16 x 256 tokens ran ~1.5x faster per token than
128 x 256 with all-MiniLM-L6-v2); the model's transformer module (``SentenceTransformer[0]``)
produces token embeddings ``[b, T, d]`` under ``torch.inference_mode``; pooling
(:func:`finelake.method.pooling.gaussian_pool`) turns them into ``[b, K+1, d]`` unit vectors; rows
are put back in input order.

Units: vectors are float32 with unit L2 norm, so inner product = cosine similarity; lengths are in
tokens of the embedding model's own tokenizer.

The modules after the transformer in a sentence-transformers folder (its Pooling, Normalize) are
replaced by the pooling above: the global vector is the masked mean of the token embeddings, which
is exactly what a mean-pooling model (all-MiniLM-L6-v2) outputs. A model whose own Pooling module is
not mean (BGE-M3 pools the CLS token) is refused, since its vectors would differ from the ones its
match thresholds (§3.2's 0.865) were set on, unless the profile says ``options.pooling: mean``
explicitly (then a warning; recalibrate ``match.thresholds`` with ``finelake calibrate``). Extra
modules (Dense) are skipped with a warning: ``embed`` then differs from the model's own ``encode``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Literal, Optional, Union

import numpy as np

from finelake.config import ModelConfig
from finelake.method.pooling import check_params, gaussian_pool
from finelake.models.base import EmbeddingBackend, get_embedder_class, register_embedder
from finelake.models.resolve import hf_path

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


@register_embedder("sentence_transformers")
class SentenceTransformersEmbedder(EmbeddingBackend):
    """A sentence-transformers model (local folder, hub id, or ``embedded:<name>``) as an embedder.

    Args:
        model: anything :func:`finelake.models.resolve.hf_path` accepts.
        batch_size: at most this many texts per forward pass (after length sorting). Default 64.
        max_batch_tokens: at most this many tokens (padding included) per forward pass; default
            4096 on CPU, unbounded on GPU (where larger batches are better). ``0`` = unbounded.
        max_seq_length: truncation length in tokens (default: the model's own, 256 for MiniLM).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default ``"cuda"`` when available, else CPU.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``: weights and activations of
            the transformer. Pooling is always float32.
        threads: ``torch.set_num_threads`` for this process (process-wide!). Default: leave torch's
            setting alone. Under Spark the UDF glue sets it to the task's CPUs.
        pooling: ``"mean"`` to mean-pool a model whose own Pooling module is not mean (CLS, max,
            ...); unset, such a model is refused (ValueError).
        revision: hub revision (ignored for local folders).
        **options: any other key is rejected (TypeError), so typos in ``options:`` surface.

    Attributes:
        dim: embedding width d (the transformer's hidden size).
        max_seq_length: effective truncation length in tokens.
        stats: running totals in this process: ``texts``, ``tokens`` (real tokens), ``padded_tokens``
            (tokens computed, padding included), ``batches``, ``seconds`` (time in embed calls).

    Raises:
        ValueError: unknown dtype, max_seq_length beyond the model's positions, the model's
            first module is not a transformer, or its own pooling is not mean and ``pooling`` is
            not set.
        finelake.models.resolve.ModelNotFound: an embedded model's package is missing.
    """

    def __init__(self, model: str, *, batch_size: int = 64, max_seq_length: Optional[int] = None,
                 device: Optional[str] = None, dtype: str = "float32", threads: Optional[int] = None,
                 revision: Optional[str] = None, max_batch_tokens: Optional[int] = None,
                 pooling: Optional[Literal["mean"]] = None, **options: Any):
        if options:
            raise TypeError(f"sentence_transformers backend: unknown options {sorted(options)}")
        if pooling not in (None, "mean"):
            raise ValueError(f"sentence_transformers backend: pooling must be 'mean', not {pooling!r}")
        self.pooling_override = pooling
        super().__init__(model, batch_size=batch_size, max_seq_length=max_seq_length, device=device,
                         dtype=dtype, threads=threads, revision=revision,
                         max_batch_tokens=max_batch_tokens)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if threads:
            torch.set_num_threads(int(threads))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_batch_tokens is None:
            max_batch_tokens = 0 if str(device).startswith("cuda") else 4096
        self.max_batch_tokens = int(max_batch_tokens)
        path = hf_path(model)
        kwargs: dict[str, Any] = {"device": device}
        if revision and not os.path.isdir(path):
            kwargs["revision"] = revision
        self._st = SentenceTransformer(path, **kwargs)
        self._st.eval()
        self.torch_dtype = getattr(torch, _DTYPES[dtype])
        if self.torch_dtype != torch.float32:
            self._st.to(self.torch_dtype)
        self._transformer = self._st[0]
        if not (hasattr(self._transformer, "auto_model") and hasattr(self._transformer, "tokenizer")):
            raise ValueError(f"{model}: first module is {type(self._transformer).__name__}, not a "
                             "transformer; Gaussian pooling needs token embeddings")
        self.tokenizer = self._transformer.tokenizer
        if max_seq_length is not None:
            limit = getattr(self._transformer.auto_model.config, "max_position_embeddings", None)
            if int(max_seq_length) < 1 or (limit and int(max_seq_length) > limit):
                raise ValueError(f"max_seq_length must be in 1..{limit} for {model}, got {max_seq_length}")
            self._st.max_seq_length = int(max_seq_length)
        self.max_seq_length = int(self._st.max_seq_length or self.tokenizer.model_max_length)
        self.dim = int(self._transformer.auto_model.config.hidden_size)
        self._check_modules()
        self.stats = {"texts": 0, "tokens": 0, "padded_tokens": 0, "batches": 0, "seconds": 0.0}

    # ------------------------------------------------------------------ public API

    def embed(self, texts: list[str]) -> np.ndarray:
        """Global embeddings: masked mean of the token embeddings, L2-normalized.

        Args:
            texts: n strings (empty strings allowed: they still have special tokens).

        Returns:
            float32 ``[n, dim]``, unit rows. Equals sentence-transformers' ``encode(...,
            normalize_embeddings=True)`` for a mean-pooling model, up to float rounding.

        Raises:
            TypeError: an element is not a string.
        """
        return self._run(texts, 0, 1.0, 1.0)[:, 0, :]

    def embed_pooled(self, texts: list[str], chunks: int = 5, sigma: float = 0.05,
                     alpha: float = 1.0) -> np.ndarray:
        """Gaussian-pooled embeddings (Appendix B), computed from one forward pass per batch.

        Args:
            texts: n strings.
            chunks: K ≥ 0 Gaussian chunks (paper: 5).
            sigma: σ > 0, kernel width as a fraction of the text's token length (paper: 0.05).
            alpha: α ∈ [0, 1], weight of the chunk embedding vs the global mean (paper: 1.0).

        Returns:
            float32 ``[n, K+1, dim]``, unit rows; ``[:, 0]`` is the global mean (= :meth:`embed`),
            ``[:, k]`` the chunk centred at ``k/(K+1)`` of the (truncated) text.

        Raises:
            TypeError: an element is not a string. ValueError: invalid K, σ or α.
        """
        check_params(chunks, sigma, alpha)
        return self._run(texts, int(chunks), float(sigma), float(alpha))

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Tokens each text occupies in a forward pass (special tokens included, truncated at
        ``max_seq_length``): the unit of the throughput figures."""
        return [len(ids) for ids in self._tokenize(list(texts))["input_ids"]]

    def close(self) -> None:
        """Drop the model (frees GPU memory)."""
        self._st = None
        self._transformer = None

    # ------------------------------------------------------------------ internals

    def _check_modules(self) -> None:
        mods = list(self._st)
        names = [type(m).__name__ for m in mods]
        mode = own_pooling_mode(mods)
        if mode != "mean":
            if self.pooling_override != "mean":
                raise ValueError(
                    f"{self.model_id}: its own pooling is {mode!r} (sentence-transformers Pooling "
                    "module), but finelake embeds with mean pooling (Gaussian pooling, §3.2 and "
                    "Appendix B), so its vectors would not be the ones its match threshold was "
                    "set on; set models.embedder.options.pooling: mean to use mean pooling anyway "
                    "(and recalibrate match.thresholds with finelake calibrate)")
            log.warning("%s: own pooling %r replaced by mean pooling (options.pooling: mean)",
                        self.model_id, mode)
        extra = [n for n in names[1:] if n not in ("Pooling", "Normalize")]
        if extra:
            log.warning("%s: modules %s; embed() skips %s, so it differs from this model's own "
                        "encode()", self.model_id, names, extra)

    def _tokenize(self, texts: list[str]):
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; element {bad[0]} is {type(texts[bad[0]]).__name__}")
        return self.tokenizer(texts, truncation=True, max_length=self.max_seq_length, padding=False)

    def _batches(self, order: np.ndarray, lengths: np.ndarray):
        """Consecutive slices of ``order`` (longest first): ≤ batch_size texts, ≤ max_batch_tokens
        padded tokens (the first text of a slice is its longest)."""
        start, n = 0, len(order)
        while start < n:
            size = self.batch_size
            if self.max_batch_tokens:
                size = max(1, min(size, self.max_batch_tokens // int(lengths[order[start]])))
            yield order[start:start + size]
            start += size

    def _run(self, texts: list[str], chunks: int, sigma: float, alpha: float) -> np.ndarray:
        import torch

        texts = list(texts)
        n = len(texts)
        out = np.empty((n, chunks + 1, self.dim), dtype=np.float32)
        if n == 0:
            return out
        t0 = time.perf_counter()
        enc = self._tokenize(texts)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        lengths = np.fromiter((len(x) for x in enc["input_ids"]), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")  # longest first: memory peaks show up at once
        with torch.inference_mode():
            for idx in self._batches(order, lengths):
                batch = self.tokenizer.pad({k: [enc[k][i] for i in idx] for k in keys},
                                           return_tensors="pt")
                feats = {k: v.to(self.device) for k, v in batch.items()}
                tok = self._transformer(feats)["token_embeddings"]
                pooled = gaussian_pool(tok, feats["attention_mask"], chunks, sigma, alpha)
                out[idx] = pooled.cpu().numpy()
                self.stats["padded_tokens"] += int(batch["input_ids"].numel())
                self.stats["batches"] += 1
        self.stats["texts"] += n
        self.stats["tokens"] += int(lengths.sum())
        self.stats["seconds"] += time.perf_counter() - t0
        return out


_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens":
                  "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
                  "pooling_mode_lasttoken": "lasttoken"}


def pooling_mode_of(config: dict[str, Any]) -> str:
    """The pooling mode a sentence-transformers Pooling config declares, as one string.

    Args:
        config: the Pooling module's ``config.json`` (``1_Pooling/config.json``): either
            ``{"pooling_mode": "cls"}`` (sentence-transformers >= 6) or the boolean flags
            ``pooling_mode_cls_token``, ``pooling_mode_mean_tokens``, ... (older folders).

    Returns:
        ``"mean"``, ``"cls"``, ``"max"``, ...; several flags set give ``"cls+mean"`` (sorted);
        no flag set gives ``"none"``.
    """
    mode = config.get("pooling_mode")
    if isinstance(mode, str):
        return mode
    if isinstance(mode, (list, tuple)):
        return "+".join(sorted(str(m) for m in mode)) or "none"
    on = sorted(v for k, v in _POOLING_FLAGS.items() if config.get(k))
    return "+".join(on) or "none"


def own_pooling_mode(modules) -> str:
    """The pooling mode of a loaded SentenceTransformer's Pooling module (:func:`pooling_mode_of`
    of its config); ``"mean"`` when there is none (sentence-transformers then adds mean pooling)."""
    pooling = [m for m in modules if type(m).__name__ == "Pooling"]
    if not pooling:
        return "mean"
    p = pooling[0]
    if hasattr(p, "get_config_dict"):
        return pooling_mode_of(p.get_config_dict())
    return pooling_mode_of({k: getattr(p, k) for k in ("pooling_mode", *_POOLING_FLAGS)
                            if hasattr(p, k)})


def create_embedder(model_cfg: Union[ModelConfig, dict]) -> EmbeddingBackend:
    """Build the embedder a :class:`~finelake.config.ModelConfig` describes.

    ``batch_size`` and ``revision`` come from the config's fields, everything else from
    ``options`` (``max_seq_length``, ``max_batch_tokens``, ``device``, ``dtype``, ``threads``).
    ``max_tokens`` and
    ``temperature`` (generation settings) are ignored.

    Args:
        model_cfg: a ``ModelConfig`` or a dict with its fields (``backend``, ``model``, ...).

    Returns:
        An instance of the registered backend class.

    Raises:
        ValueError: unknown backend name (the message lists the registered ones), invalid config.
        TypeError: an option the backend does not know.
    """
    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig(**model_cfg)
    cls = get_embedder_class(cfg.backend)
    opts = dict(cfg.options)
    opts.setdefault("batch_size", cfg.batch_size)
    if cfg.revision is not None:
        opts.setdefault("revision", cfg.revision)
    return cls(cfg.model, **opts)
