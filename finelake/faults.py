"""Which failures are worth retrying: the error classifier and the retry rule of the model stages.

Pure functions (no Spark, no model): genericize, instantiate and judge classify every failed row
with :func:`classify`, and the UDF layer uses :func:`is_engine_fault` to decide whether the
worker's cached model must be evicted (:func:`finelake.udfs.cache.evict`).

**Transient** (the same request may well succeed later; :func:`classify` returns its kind):

=============  ==================================================================================
kind           matched in the exception's class names (its MRO) or the error text
=============  ==================================================================================
``timeout``    ``TimeoutError``, ``APITimeoutError``, ``ReadTimeout``, "timed out", "timeout",
               "deadline exceeded"
``oom``        ``OutOfMemoryError`` (torch), ``MemoryError``, "out of memory" (CUDA OOM)
``engine``     ``EngineDeadError`` (vLLM), "engine core ... died/dead/failed", "engine is dead",
               ``ConnectionError`` (refused, reset, aborted), ``APIConnectionError``,
               ``BrokenPipeError``, "connection refused/reset", "server disconnected"
``cuda``       the device or its collective library failed: "CUDA error" (any), "illegal memory
               access", "uncorrectable ECC", ``cudaError…`` codes, ``AcceleratorError`` /
               ``CudaError`` (torch), "NCCL" / ``nccl…Error`` (a GPU of a tensor-parallel group)
``http``       ``RateLimitError``, ``InternalServerError`` (openai SDK), HTTP 429 and 5xx
               ("Error code: 503", "status 429", "Too Many Requests", "Service Unavailable",
               "Bad Gateway", "Gateway Timeout")
=============  ==================================================================================

Kinds are tried in the order ``oom``, ``engine``, ``cuda``, ``http``, ``timeout``: "CUDA error: out
of memory" is ``oom``, "NCCL watchdog timeout" is ``cuda``.

Everything else is **permanent** (``classify`` returns None): a bad request (HTTP 400), a reply
that does not parse, a prompt that does not fit, a configuration error. Retrying those would
give the same failure.

**Engine-level** faults (``oom``, ``engine`` and ``cuda``) raised by a model call mean the
worker's model is no longer usable: the UDF layer closes and drops it so the next batch reloads it.
A **dead engine** (``engine`` and ``cuda``: :func:`is_engine_dead`) cannot serve another request,
so the bisecting batch runner (:func:`finelake.models.generation.run_isolated`) raises it at once
instead of trying the batch's halves on it; an ``oom`` inside a batch is bisected (half the batch
may fit), and a single request that still runs out of memory is that row's transient error.

**Rows.** A row of genericize / instantiate / judge whose model call failed gets, through
:func:`settle`, status ``retry`` (transient, attempts left: the next run tries it again) or
``error`` (permanent, or transient on its last allowed attempt, reason prefixed
``gave up after N attempts:``). Every row carries ``attempts``, the number of runs that tried it.
``error`` rows are copied to the ``quarantine`` table (see :func:`finelake.jobs.common.quarantine_failures`).
"""

from __future__ import annotations

import re
from typing import Optional, Union

RETRY = "retry"
"""Status of a row whose last try failed transiently and that the next run tries again."""
ERROR = "error"
"""Status of a row that failed for good (permanent error, or out of attempts): quarantined."""

TRANSIENT_KINDS = ("timeout", "oom", "engine", "cuda", "http")
ENGINE_KINDS = ("oom", "engine", "cuda")
"""Kinds after which the worker's cached model is evicted."""
DEAD_ENGINE_KINDS = ("engine", "cuda")
"""Kinds after which the engine cannot run another request (no bisection: :func:`is_engine_dead`)."""

_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("oom", re.compile(r"\bOutOfMemoryError\b|\bMemoryError\b|out of memory|\bOOM\b", re.I)),
    ("engine", re.compile(
        r"EngineDeadError|engine[ _-]?core\b.*\b(died|dead|failed|exited)|engine (is )?dead|"
        r"\bAPIConnectionError\b|\bConnection(Refused|Reset|Aborted)?Error\b|BrokenPipeError|"
        r"connection (was )?(refused|reset|aborted)|server disconnected|RemoteProtocolError",
        re.I)),
    ("cuda", re.compile(
        r"CUDA error|illegal memory access|uncorrectable ECC|\bcudaError\w*|"
        r"\bAcceleratorError\b|\bCudaError\b|\bNCCL\b|\bnccl\w*Error\b", re.I)),
    ("http", re.compile(
        r"\bRateLimitError\b|\bInternalServerError\b|\bServiceUnavailableError\b|"
        r"(error code|status(?: code)?|http(?:/[\d.]+)?)\s*[:=]?\s*(429|5\d\d)\b|"
        r"too many requests|rate limit|service unavailable|bad gateway|gateway timeout", re.I)),
    ("timeout", re.compile(r"Timeout|timed out|deadline exceeded", re.I)),
]


def error_text(error: Union[BaseException, str, None]) -> str:
    """``"TypeName: message"`` for an exception (with the names of its base classes after a
    ``|``, so a subclass of ``TimeoutError`` classifies as one), the string itself otherwise."""
    if error is None:
        return ""
    if isinstance(error, BaseException):
        bases = [c.__name__ for c in type(error).__mro__[1:]
                 if c not in (BaseException, Exception, object)]
        return f"{type(error).__name__}: {error}" + (f" | {' '.join(bases)}" if bases else "")
    return str(error)


def classify(error: Union[BaseException, str, None]) -> Optional[str]:
    """The transient kind of ``error`` (``timeout``, ``oom``, ``engine``, ``http``), or None when
    it is permanent (or empty). ``error`` is an exception or a row's error / reason text."""
    text = error_text(error)
    if not text:
        return None
    for kind, pat in _PATTERNS:
        if pat.search(text):
            return kind
    return None


def is_transient(error: Union[BaseException, str, None]) -> bool:
    """Whether a later try of the same request may succeed (see the module docstring)."""
    return classify(error) is not None


def is_engine_fault(error: Union[BaseException, str, None]) -> bool:
    """Whether ``error`` means the model itself is gone or out of memory (evict and reload it)."""
    return classify(error) in ENGINE_KINDS


def is_engine_dead(error: Union[BaseException, str, None]) -> bool:
    """Whether ``error`` means the engine (or its GPU) cannot run another request: a dead engine
    process or a CUDA/NCCL failure (kinds ``engine`` and ``cuda``). Such an error is raised past
    the batch runner so the UDF layer evicts the model; it is never bisected."""
    return classify(error) in DEAD_ENGINE_KINDS


def settle(reason: str, attempts: int, max_attempts: int) -> tuple[str, str]:
    """``(status, reason)`` of a row whose model call failed on its ``attempts``-th try.

    Transient with ``attempts < max_attempts``: ``("retry", reason)``; transient on the last
    allowed try: ``("error", "gave up after N attempts: " + reason)``; permanent:
    ``("error", reason)``.
    """
    if is_transient(reason):
        if attempts < max_attempts:
            return RETRY, reason
        return ERROR, f"gave up after {attempts} attempts: {reason}"
    return ERROR, reason
