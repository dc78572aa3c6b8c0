"""The contracts every model backend implements, and the registries that name them.

Generation: a batch of chat requests in, one :class:`GenerationResult` per request out (never an
exception for one bad request: the result carries ``error``). Embedding: texts in, L2-normalized
vectors out, optionally Gaussian-pooled (FineInstructions Appendix B).

Backends register by name (``@register_generator("llama_cpp")``); a second registration under the
same name raises ``ValueError``. Configuration chooses a backend by that name
(``models.generator.backend`` in ``conf/*.yaml``).
"""

from __future__ import annotations

import difflib
import inspect
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from finelake.errors import FinelakeError


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


class OptionError(FinelakeError, ValueError):
    """A backend option is unknown or has the wrong type.

    Attributes:
        key: the option's name (dotted for nested ones, e.g. ``engine_args.max_num_seqs``).
        backend: the backend's registered name.
        detail: what is wrong with it.
    """

    def __init__(self, backend: str, key: str, message: str):
        super().__init__(f"{backend} backend: option {key!r}: {message}")
        self.backend = backend
        self.key = key
        self.detail = message


def unknown_option(backend: str, key: str, known: Iterable[str]) -> OptionError:
    """The :class:`OptionError` for an unknown option, with the closest known names suggested."""
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.7)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return OptionError(backend, key, f"unknown option{hint}")


def check_signature_options(cls: type, options: Mapping[str, Any], *,
                            exclude: Iterable[str] = ("self", "model")) -> dict[str, Any]:
    """Validate backend ``options`` against the keyword parameters of ``cls.__init__``.

    A name that is not a parameter (``**kwargs`` catch-alls do not count) is unknown; a value is
    checked against the parameter's annotation with pydantic (lax mode: ``"1"`` passes as an int,
    ``"x"`` does not). Nothing is imported or loaded beyond ``cls`` itself.

    Args:
        cls: the backend class.
        options: option name -> value, as in a profile's ``options:``.
        exclude: parameters that are not options.

    Returns:
        The options with each value converted to its annotated type.

    Raises:
        OptionError: an unknown option (closest names suggested) or a value of the wrong type;
            ``.key`` names it.
    """
    from pydantic import TypeAdapter, ValidationError

    backend = getattr(cls, "name", cls.__name__)
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in exclude and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: names are still checked
        hints = {}
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in params:
            raise unknown_option(backend, key, params)
        hint = hints.get(key, Any)
        try:
            out[key] = TypeAdapter(hint).validate_python(value)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"] if exc.errors() else str(exc)
            raise OptionError(backend, key, f"{value!r}: {msg}") from None
    return out


class GenerationBackend(ABC):
    """A text generator. Subclasses load their model in ``__init__`` (once per worker)."""

    name: str = "base"

    def __init__(self, model: str, **options: Any):
        self.model_id = model
        self.options = options

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check a profile's ``options:`` for this backend on the driver, without loading a model
        or importing the backend's engine.

        The default compares names and types with ``__init__``'s keyword parameters
        (:func:`check_signature_options`); backends that pass options through to an engine
        override it.

        Returns:
            The options, values converted to their declared types.

        Raises:
            OptionError: unknown option or wrong type (``.key`` names it).
        """
        return check_signature_options(cls, options)

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

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``options`` on the driver without loading the model: names and types against
        ``__init__``'s keyword parameters (:func:`check_signature_options`).

        Raises:
            OptionError: unknown option or wrong type (``.key`` names it).
        """
        return check_signature_options(cls, options)

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


EMBEDDER_MODULES: dict[str, str] = {
    "sentence_transformers": "finelake.models.embedding",
    "load": "finelake.models.load_backend",
}
"""Embedding backend name -> module that registers it (imported on first lookup)."""


def get_embedder_class(name: str):
    """The embedding backend class registered as ``name`` (its module imported first).

    Raises: ValueError naming the registered backends."""
    if name not in _EMBEDDERS and name in EMBEDDER_MODULES:
        import importlib

        importlib.import_module(EMBEDDER_MODULES[name])
    if name not in _EMBEDDERS:
        raise ValueError(f"unknown embedding backend {name!r}; registered: {embedder_names()}")
    return _EMBEDDERS[name]
