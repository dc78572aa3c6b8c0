"""One model spec: what the driver checked is what the executors load.

A model is configured once (:class:`finelake.config.ModelConfig`, a section of the profile). On the
driver, :meth:`ModelSpec.of` checks its backend and options with the backend's own
``check_options`` (vLLM's ``EngineArgs`` fields, a sentence-transformers embedder's parameters, a
judge's format and cuts) without loading anything, and freezes the result: the options as the
backend converted them. That frozen, picklable spec is what a stage ships to its executors, what
:mod:`finelake.udfs.cache` keys the worker's model by (:attr:`ModelSpec.key`), and what the backends
are built from (:meth:`ModelSpec.as_dict`). There is no second conversion on the way.

A spec is also a read-only mapping of its fields (``spec["batch_size"]``, ``spec.get("max_tokens")``),
so the row functions read it like the configuration it came from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from finelake.errors import ConfigError
from finelake.models.base import OptionError

KINDS = ("generator", "embedder", "judge")


def _frozen(value: Any) -> Any:
    """A JSON round trip: plain dicts, lists, strings and numbers (what crosses to executors)."""
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class ModelSpec(Mapping):
    """A checked model configuration, frozen on the driver and shipped unchanged to executors.

    Attributes:
        kind: ``generator``, ``embedder`` or ``judge`` (which backends check and build it).
        backend: registered backend name (``vllm``, ``sentence_transformers``, ``llm``, ...).
        model: local path, hub id or ``embedded:<name>``.
        revision: hub revision, or None.
        options: the backend's options as its ``check_options`` returned them (types converted).
        batch_size: requests per model call.
        max_tokens: generation length limit per request.
        temperature: sampling temperature (0: greedy).
    """

    kind: str
    backend: str
    model: str
    revision: Optional[str] = None
    options: dict = field(default_factory=dict)
    batch_size: int = 16
    max_tokens: int = 256
    temperature: float = 0.0

    @classmethod
    def of(cls, model: Any, kind: str = "generator", key: str = "model") -> "ModelSpec":
        """The checked spec of ``model`` (a :class:`ModelConfig`, a dict of its fields, or a spec,
        returned as is).

        Args:
            kind: ``generator``, ``embedder`` or ``judge``.
            key: where the model is configured (``models.generator``), for messages.

        Raises:
            ConfigError: an unknown backend, or an option the backend does not take or of the wrong
                type (``<key>.options.<name>: ...``, with close names suggested).
        """
        if isinstance(model, ModelSpec):
            return model
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        cfg = model.model_dump() if hasattr(model, "model_dump") else dict(model)
        for name in ("backend", "model"):
            if not cfg.get(name):
                raise ConfigError(f"{key}.{name}: required")
        options = _checked_options(cfg, kind, key)
        return cls(kind=kind, backend=str(cfg["backend"]), model=str(cfg["model"]),
                   revision=cfg.get("revision"), options=_frozen(options),
                   batch_size=int(cfg.get("batch_size") or 16),
                   max_tokens=int(cfg.get("max_tokens") or 256),
                   temperature=float(cfg.get("temperature") or 0.0))

    def as_dict(self) -> dict:
        """The spec as the plain dict backends are built from (``backend``, ``model``,
        ``revision``, ``options``, ``batch_size``, ``max_tokens``, ``temperature``)."""
        return {"backend": self.backend, "model": self.model, "revision": self.revision,
                "options": dict(self.options), "batch_size": self.batch_size,
                "max_tokens": self.max_tokens, "temperature": self.temperature}

    @property
    def key(self) -> str:
        """``kind:`` + the spec as sorted JSON: equal specs share one cached model per worker."""
        return self.kind + ":" + json.dumps(self.as_dict(), sort_keys=True, default=str)

    @property
    def label(self) -> str:
        """``backend:model[@revision]`` for lineage columns."""
        return f"{self.backend}:{self.model}" + (f"@{self.revision}" if self.revision else "")

    def __getitem__(self, name: str) -> Any:
        return self.as_dict()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __hash__(self) -> int:
        return hash(self.key)


def _checked_options(cfg: dict, kind: str, key: str) -> dict:
    """The backend's ``check_options`` of ``cfg["options"]`` (judges: their own settings too).

    Raises:
        ConfigError: naming ``<key>.backend`` or ``<key>.options.<name>``.
    """
    options = dict(cfg.get("options") or {})
    try:
        if kind == "judge":
            from finelake.models.judge import check_judge_options

            check_judge_options(cfg)  # the judge's settings and its inner backend's options
            return options  # a judge spec keeps its options' shape (settings and inner options)
        if kind == "embedder":
            from finelake.models.base import get_embedder_class

            return get_embedder_class(cfg["backend"]).check_options(options)
        from finelake.models.generation import backend_class

        return backend_class(cfg["backend"]).check_options(options)
    except OptionError as exc:
        raise ConfigError(f"{key}.options.{exc.key}: {exc.detail} ({exc.backend} backend)") from None
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"{key}.backend: {exc}") from None
