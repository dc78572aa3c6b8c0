"""The contracts every model backend implements, and the registries that name them.

Generation: a batch of chat requests in, one :class:`GenerationResult` per request out (never an
exception for one bad request: the result carries ``error``). Embedding: texts in, L2-normalized
vectors out, optionally Gaussian-pooled (FineInstructions Appendix B).

Backends register by name (``@register_generator("llama_cpp")``); a second registration under the
same name raises ``ValueError``. Configuration chooses a backend by that name
(``models.generator.backend`` in ``conf/*.yaml``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np


@dataclass
class GenerationRequest:
    """One chat request.

    Attributes:
        messages: OpenAI-style ``[{"role": "system"|"user"|"assistant", "content": str}]``.
        max_tokens: generation limit in tokens of the model's tokenizer.
        temperature: 0 for greedy.
        json_schema: when set, output is constrained to JSON matching this schema.
        regex: when set (and no schema), output is constrained to this regular expression.
        seed: sampling seed (ignored when greedy).
        request_id: caller's id, echoed back for bookkeeping.
    """

    messages: list[dict[str, str]]
    max_tokens: int = 256
    temperature: float = 0.0
    json_schema: Optional[dict[str, Any]] = None
    regex: Optional[str] = None
    seed: Optional[int] = None
    request_id: Optional[str] = None


@dataclass
class GenerationResult:
    """What one request produced.

    Attributes:
        text: generated text (None when ``error`` is set).
        prompt_tokens / completion_tokens: token counts in the model's tokenizer.
        finish_reason: ``"stop"``, ``"length"`` or the backend's own word.
        error: why this request failed; None on success.
    """

    text: Optional[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    request_id: Optional[str] = None


class GenerationBackend(ABC):
    """A text generator. Subclasses load their model in ``__init__`` (once per worker)."""

    name: str = "base"

    def __init__(self, model: str, **options: Any):
        self.model_id = model
        self.options = options

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run a batch; the result list has the same length and order as ``requests``."""

    def close(self) -> None:  # pragma: no cover - optional
        """Release the model (GPU memory, server connections)."""


class EmbeddingBackend(ABC):
    """A text encoder producing L2-normalized vectors."""

    name: str = "base"
    dim: int

    def __init__(self, model: str, **options: Any):
        self.model_id = model
        self.options = options

    @abstractmethod
    def embed(self, texts: list[str]) -> np.ndarray:
        """Global (mean-pooled) embeddings, shape ``[n, dim]``, float32, unit L2 norm."""

    @abstractmethod
    def embed_pooled(self, texts: list[str], chunks: int, sigma: float, alpha: float) -> np.ndarray:
        """Gaussian-pooled embeddings, shape ``[n, chunks + 1, dim]``: index 0 is the global mean,
        1..K the chunk-local embeddings (Appendix B); float32, each vector unit L2 norm."""


_GENERATORS: dict[str, Callable[..., GenerationBackend]] = {}
_EMBEDDERS: dict[str, Callable[..., EmbeddingBackend]] = {}


def _register(registry: dict, kind: str, name: str):
    def deco(cls):
        if name in registry:
            raise ValueError(f"{kind} backend {name!r} is already registered ({registry[name]!r})")
        registry[name] = cls
        cls.name = name
        return cls

    return deco


def register_generator(name: str):
    """Class decorator: make a :class:`GenerationBackend` available under ``name``."""
    return _register(_GENERATORS, "generation", name)


def register_embedder(name: str):
    """Class decorator: make an :class:`EmbeddingBackend` available under ``name``."""
    return _register(_EMBEDDERS, "embedding", name)


def generator_names() -> list[str]:
    return sorted(_GENERATORS)


def embedder_names() -> list[str]:
    return sorted(_EMBEDDERS)


def get_generator_class(name: str):
    """Raises: ValueError naming the registered backends."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown generation backend {name!r}; registered: {generator_names()}")
    return _GENERATORS[name]


def get_embedder_class(name: str):
    """Raises: ValueError naming the registered backends."""
    if name not in _EMBEDDERS:
        raise ValueError(f"unknown embedding backend {name!r}; registered: {embedder_names()}")
    return _EMBEDDERS[name]
