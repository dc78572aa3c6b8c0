"""The ``sentence_transformers`` embedding backend: global and Gaussian-pooled text embeddings.

Templates' compatible-document descriptions are embedded with :meth:`embed` (one vector each) and
documents with :meth:`embed_pooled` (K+1 vectors each: the global mean and K chunk-local vectors,
FineInstructions §3.2 "Gaussian Pooling", Appendix B). Both come from the same token embeddings, so
``embed(texts) == embed_pooled(texts, K, σ, α)[:, 0]``.

How a batch is computed: texts are tokenized in one fast-tokenizer call per *group* (truncated to
``max_seq_length`` tokens, special tokens included), sorted by token length (longest first) and cut
into batches of at most ``batch_size`` texts and at most ``max_batch_tokens`` padded tokens, so each
padded batch is nearly rectangular and long documents go in smaller batches than short templates
(on a CPU, batches of a few thousand tokens keep the activations in cache: 16 x 256 tokens ran ~1.5x
faster per token than 128 x 256 with all-MiniLM-L6-v2); batches are padded with NumPy (as
``tokenizer.pad`` would, without its per-batch Python work); the model's transformer module
(``SentenceTransformer[0]``) produces token embeddings ``[b, T, d]`` under
``torch.inference_mode``; pooling (:func:`finelake.method.pooling.gaussian_pool`) turns them into
``[b, K+1, d]`` unit vectors, which stay on the device and are copied back to the host once per
call (or per 256 MiB of vectors); rows are put back in input order.

On a GPU (the defaults when ``device`` is CUDA) the host work overlaps the forward passes: a
background thread tokenizes groups of 256 texts and pads the next batches into pinned memory while
the GPU runs the current one (the Rust tokenizer releases the GIL while it encodes), inputs are copied with
``non_blocking``, and there is one host sync per call instead of one per batch. Groups are formed
longest-first by character length, so each group's batches stay nearly rectangular. Measured on an
H200 before this (BGE-M3-sized encoder, ~1,200-token documents, fp16): tokenization inside the call
was 28% of the time, padding and copies 12%, the forward 39%, pooling 0.2%; so pooling keeps its
float32 copy of ``[b, T, d]`` (it is not where the time goes). On a CPU the defaults keep the plain
path (one group, no thread): the forward dominates there and a second thread only competes for
the cores. Vectors are the same whichever path runs (within float rounding; tested).

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

import itertools
import logging
import os
import time
from typing import Any, Literal, Optional, Union

import numpy as np

from finelake.config import ModelConfig
from finelake.method.pooling import check_params, gaussian_pool
from finelake.models.base import EmbeddingBackend, get_embedder_class, register_embedder
from finelake.models.prefetch import Prefetch as _Prefetch
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
            4096 on CPU, 131072 on GPU (on an H200 with a BGE-M3-sized encoder: 119 docs/s at 5.2
            GiB peak, vs 96 docs/s at 72.8 GiB unbounded). ``0`` = unbounded.
        max_seq_length: truncation length in tokens (default: the model's own, 256 for MiniLM).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default ``"cuda"`` when available, else CPU.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``: weights and activations of
            the transformer. Pooling is always float32 (vectors are float32 whatever the dtype).
        threads: ``torch.set_num_threads`` for this process (process-wide!). Default: leave torch's
            setting alone. Under Spark the UDF glue sets it to the task's CPUs.
        pooling: ``"mean"`` to mean-pool a model whose own Pooling module is not mean (CLS, max,
            ...); unset, such a model is refused (ValueError).
        revision: hub revision (ignored for local folders).
        prefetch: tokenize and pad on a background thread, ahead of the forward passes. Default:
            on for CUDA, off for CPU.
        tokenize_group: texts per tokenizer call when prefetching (the first forward waits for
            one group only). Default 256 with prefetch, else 0 = the whole call in one group
            (batches then identical to sorting the whole call by token length).
        attn_implementation: passed to transformers (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``...). Default: transformers' own choice (sdpa where the model
            supports it; all-MiniLM-L6-v2 loads with sdpa in transformers 5.19); the one in use is
            ``self.attn_implementation``.
        **options: any other key is rejected (TypeError), so typos in ``options:`` surface.

    Attributes:
        dim: embedding width d (the transformer's hidden size).
        max_seq_length: effective truncation length in tokens.
        stats: running totals in this process: ``texts``, ``tokens`` (real tokens), ``padded_tokens``
            (tokens computed, padding included), ``batches``, ``seconds`` (wall time in embed
            calls, tokenization included; on CUDA it ends after the copy back, so it includes the
            GPU work).
        attn_implementation: the attention kernel transformers loaded (``"sdpa"``, ``"eager"``...).

    Raises:
        ValueError: unknown dtype, max_seq_length beyond the model's positions, negative
            ``max_batch_tokens`` / ``tokenize_group`` or ``batch_size`` < 1, the model's first module
            is not a transformer, its tokenizer has no pad token, or its own pooling is not mean and
            ``pooling`` is not set; transformers' error for an ``attn_implementation`` the model
            does not support.
        finelake.models.resolve.ModelNotFound: an embedded model's package is missing.
    """

    def __init__(self, model: str, *, batch_size: int = 64, max_seq_length: Optional[int] = None,
                 device: Optional[str] = None, dtype: str = "float32", threads: Optional[int] = None,
                 revision: Optional[str] = None, max_batch_tokens: Optional[int] = None,
                 pooling: Optional[Literal["mean"]] = None, prefetch: Optional[bool] = None,
                 tokenize_group: Optional[int] = None, attn_implementation: Optional[str] = None,
                 **options: Any):
        if options:
            raise TypeError(f"sentence_transformers backend: unknown options {sorted(options)}")
        if pooling not in (None, "mean"):
            raise ValueError(f"sentence_transformers backend: pooling must be 'mean', not {pooling!r}")
        self.pooling_override = pooling
        super().__init__(model, batch_size=batch_size, max_seq_length=max_seq_length, device=device,
                         dtype=dtype, threads=threads, revision=revision,
                         max_batch_tokens=max_batch_tokens, prefetch=prefetch,
                         tokenize_group=tokenize_group, attn_implementation=attn_implementation)
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
        cuda = str(device).startswith("cuda")
        if max_batch_tokens is None:
            max_batch_tokens = 131072 if cuda else 4096
        self.max_batch_tokens = int(max_batch_tokens)
        if self.max_batch_tokens < 0:
            raise ValueError("max_batch_tokens must be >= 0 (0: no limit)")
        self.prefetch = cuda if prefetch is None else bool(prefetch)
        if tokenize_group is None:
            tokenize_group = 256 if self.prefetch else 0
        if int(tokenize_group) < 0:
            raise ValueError("tokenize_group must be >= 0 (0: the whole call in one group)")
        self.tokenize_group = int(tokenize_group) or (1 << 62)
        self._flush_bytes = 256 << 20
        path = hf_path(model)
        kwargs: dict[str, Any] = {"device": device}
        if revision and not os.path.isdir(path):
            kwargs["revision"] = revision
        if attn_implementation:
            kwargs["model_kwargs"] = {"attn_implementation": str(attn_implementation)}
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
        self._pad_id = self.tokenizer.pad_token_id
        if self._pad_id is None:
            raise ValueError(f"{model}: the tokenizer has no pad token; batches cannot be padded")
        self._pad_type_id = int(getattr(self.tokenizer, "pad_token_type_id", 0) or 0)
        self.attn_implementation = getattr(self._transformer.auto_model.config,
                                           "_attn_implementation", None)
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

    def _check_texts(self, texts: list) -> None:
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; element {bad[0]} is {type(texts[bad[0]]).__name__}")

    def _tokenize(self, texts: list[str]):
        self._check_texts(texts)
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

    def _groups(self, texts: list[str]) -> list[np.ndarray]:
        """Input indices cut into groups of ≤ ``tokenize_group`` texts, each tokenized in one call.

        One group (the common case: a Spark Arrow batch) is the input order, so batching is the
        same as sorting the whole call by token length. With more, texts go longest first by
        *character* length (a cheap proxy: token lengths are only known after tokenizing) so that
        each group holds texts of similar length; each group is in input order inside.
        """
        n, g = len(texts), self.tokenize_group
        if n <= g:
            return [np.arange(n)]
        chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)
        by_chars = np.argsort(-chars, kind="stable")
        return [np.sort(by_chars[i:i + g]) for i in range(0, n, g)]

    def _pad(self, enc, keys: list[str], sel: np.ndarray, lengths: np.ndarray) -> dict:
        """``[b, T]`` int64 arrays of the texts ``sel`` (indices into ``enc``), padded with NumPy
        the way ``tokenizer.pad`` pads (same side, pad id, token-type pad id; mask 1 on real tokens)."""
        lens = lengths[sel]
        T = int(lens.max())
        cols = np.arange(T)[None, :]
        if self.tokenizer.padding_side == "left":
            mask = cols >= (T - lens)[:, None]
        else:
            mask = cols < lens[:, None]
        total = int(lens.sum())
        out = {}
        for k in keys:
            if k == "attention_mask":
                out[k] = mask.astype(np.int64)
                continue
            fill = self._pad_id if k == "input_ids" else self._pad_type_id
            a = np.full((len(sel), T), fill, dtype=np.int64)
            rows = enc[k]
            # Boolean-mask assignment fills row-major, which is each text's tokens in order.
            a[mask] = np.fromiter(itertools.chain.from_iterable(rows[int(i)] for i in sel),
                                  dtype=np.int64, count=total)
            out[k] = a
        return out

    def _prepared(self, texts: list[str], pin: bool):
        """Host-side work, batch by batch: tokenize a group, sort it by token length, cut it into
        batches (:meth:`_batches`), pad with NumPy. Yields ``(input indices [b], {key: int64 tensor
        [b, T]}, real tokens)``; tensors are in pinned memory when ``pin`` (for async copies)."""
        import torch

        for group in self._groups(texts):
            enc = self._tokenize([texts[int(i)] for i in group])
            keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
            lengths = np.fromiter((len(x) for x in enc["input_ids"]), dtype=np.int64, count=len(group))
            order = np.argsort(-lengths, kind="stable")  # longest first: memory peaks show up at once
            for sel in self._batches(order, lengths):
                arrays = self._pad(enc, keys, sel, lengths)
                tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
                if pin:
                    tensors = {k: v.pin_memory() for k, v in tensors.items()}
                yield group[sel], tensors, int(lengths[sel].sum())

    def _run(self, texts: list[str], chunks: int, sigma: float, alpha: float) -> np.ndarray:
        import torch

        texts = list(texts)
        n = len(texts)
        out = np.empty((n, chunks + 1, self.dim), dtype=np.float32)
        if n == 0:
            return out
        self._check_texts(texts)  # before any thread starts: a bad input raises here, at once
        t0 = time.perf_counter()
        cuda = str(self.device).startswith("cuda")
        source = self._prepared(texts, pin=cuda)
        if self.prefetch:
            source = _Prefetch(source, depth=2)
        # Pooled rows stay on the device and come back in one copy per ~flush_bytes (one host
        # sync then, not one per batch).
        flush_rows = max(1, self._flush_bytes // ((chunks + 1) * self.dim * 4))
        pending: list = []
        pending_rows = 0

        def flush():
            nonlocal pending, pending_rows
            if pending:
                idx = np.concatenate([i for i, _ in pending])
                vecs = torch.cat([v for _, v in pending]) if len(pending) > 1 else pending[0][1]
                out[idx] = vecs.cpu().numpy()
                pending, pending_rows = [], 0

        tokens = 0
        try:
            with torch.inference_mode():
                for idx, batch, real in source:
                    feats = {k: v.to(self.device, non_blocking=cuda) for k, v in batch.items()}
                    tok = self._transformer(feats)["token_embeddings"]
                    pending.append((idx, gaussian_pool(tok, feats["attention_mask"], chunks, sigma, alpha)))
                    pending_rows += len(idx)
                    tokens += real
                    self.stats["padded_tokens"] += int(batch["input_ids"].numel())
                    self.stats["batches"] += 1
                    if pending_rows >= flush_rows:
                        flush()
                flush()
        finally:
            if isinstance(source, _Prefetch):
                source.close()
        self.stats["texts"] += n
        self.stats["tokens"] += tokens
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
