"""Models held by a Python worker: at most one at a time, on the GPU Spark assigned the task.

Spark reuses Python workers (``spark.python.worker.reuse``), and this module is imported by them, so
a model stored here survives across batches, tasks and jobs of the same worker. Keys are the model's
configuration, so two stages with the same model share one copy. Never keep models in a closure: a
closure is pickled per job and reloads every time.

**One resident model.** A worker holds at most one *model* (``exclusive=True``, the default: the
generator, embedder or judge a stage needs). Before a different model loads, the resident one is
closed (its ``close()``: a vLLM engine shuts down its engine-core processes), dropped, garbage
collected and, where CUDA is initialized, ``torch.cuda.empty_cache()`` returns its device memory.
Without this, a worker that ran genericize, match and instantiate would hold three engines each
sized to 90% of the GPU. Small non-model objects (a FAISS index) are cached with
``exclusive=False`` and never evict a model.

**GPU topology: a worker keeps its GPU.** Inside a Spark task that was assigned ``gpu`` addresses
(``TaskContext.get().resources()["gpu"].addresses``, from the executor's discovery script), the
worker's first model load takes a lease on as many GPUs for the rest of its life
(:mod:`finelake.udfs.gpu_lease`: an ``flock`` per address on the node, the task's own addresses
when free), and every model it loads sees exactly those through ``CUDA_VISIBLE_DEVICES`` (so does
the engine process it spawns), not GPU 0. Spark reuses idle workers first in, first out, so on an
executor with several GPUs the address it names for a task changes between jobs; the worker keeps
its leased GPU instead, so its model stays loaded across chunks and stages and is never reloaded
onto a GPU another worker fills. Spark's GPU accounting still bounds how many model tasks run at
once. Only workers of the model stages' pool (``$FINELAKE_WORKER_POOL=models``,
:func:`finelake.resources.model_worker_pool`, where tasks hold whole GPUs) take a lease; a task
of a CPU stage that holds a fraction of a GPU (and loads, say, an endpoint client) is pinned to
its address as before and leases nothing. This was chosen over refusing multi-GPU executors because Databricks runs one executor per
node (4-8 GPUs), which a refusal would leave unusable except through tensor parallelism. A stage
whose tasks need another number of GPUs (``tensor_parallel_size``) evicts the worker's model and
takes a new lease.

**Faults.** A model whose ``generate()`` / ``score()`` raised an engine-level error (a dead
engine, out of memory: :func:`finelake.faults.is_engine_fault`) is closed and dropped by
:func:`evict` (called by :mod:`finelake.udfs.generation` and :mod:`finelake.udfs.judge`), so the
next batch loads a fresh one instead of failing on the dead one; the failed batch's rows are
retryable (:mod:`finelake.faults`).

**Log.** Loads, evictions, each task's first use of its model and every model call go to the
``finelake.udfs.cache`` logger and, when ``$FINELAKE_LOAD_LOG`` names a file, as one JSON object
per line (``event``: ``load`` / ``evict`` / ``task`` / ``call_start`` / ``call_end``; ``t`` (Unix
time, s), ``pid``, ``executor``, ``kind``, ``key``, ``gpus`` (the worker's leased GPUs),
``task_gpus`` (what Spark assigned the task), ``resident`` = models held after the event,
``seconds`` for loads and calls, ``reason`` for evictions; ``task`` events add ``stage``,
``partition``, ``attempt``; calls add ``prompts`` and, when the call raised, ``error``), so a test
or the cluster check can verify it across Spark's processes, down to the model pool's idle gaps.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator

from finelake.resources import MODEL_POOL_ENV
from finelake.udfs import gpu_lease

log = logging.getLogger(__name__)

_MODELS: dict[str, Any] = {}
_EXCLUSIVE: dict[str, list[str]] = {}
"""key -> GPU addresses it was loaded under, for the exclusive (model) entries of ``_MODELS``."""
_LOCK = threading.RLock()
_TASKS_SEEN: set[tuple[int, str]] = set()
LOAD_COUNTS: dict[str, int] = {}
"""How many times each key was loaded in this process (for tests and benchmarks)."""
CALLS = {"calls": 0, "prompts": 0}
"""Model calls made by this process and the prompts (rows) they carried (:func:`record_call`)."""


def cache_key(kind: str, spec: dict) -> str:
    """``kind:`` + the spec as sorted JSON: equal configurations share one cached model."""
    return kind + ":" + json.dumps(dict(spec), sort_keys=True, default=str)


def task_gpus() -> list[str]:
    """The ``gpu`` addresses Spark assigned the running task; [] outside a task or without GPUs."""
    try:
        from pyspark import TaskContext
    except ImportError:  # pragma: no cover - pyspark is part of the spark extra
        return []
    tc = TaskContext.get()
    if tc is None:
        return []
    try:
        info = tc.resources().get("gpu")
    except Exception:  # noqa: BLE001 - no resources on this Spark / mode
        return []
    return [str(a) for a in info.addresses] if info is not None else []


def executor_id() -> str:
    """Best-effort id of the executor running this worker: on a standalone cluster its working
    directory is ``<work>/<app-id>/<executor-id>``, returned as ``<app-id>/<executor-id>``;
    ``driver`` outside Spark tasks."""
    try:
        from pyspark import TaskContext

        if TaskContext.get() is None:
            return "driver"
    except ImportError:  # pragma: no cover
        return "driver"
    cwd = os.getcwd()
    return f"{os.path.basename(os.path.dirname(cwd))}/{os.path.basename(cwd)}"


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001
        return False


def pin_gpus(addresses: list[str]) -> None:
    """Make ``addresses`` the only GPUs a model loaded next in this process (or a process it
    starts) can see, through ``CUDA_VISIBLE_DEVICES``. No-op for an empty list.

    CUDA reads the variable once per process: if this process already initialized CUDA under
    another set, the engine's own processes (vLLM's engine core) still get the new set, and a
    warning is logged for in-process models.
    """
    if not addresses:
        return
    want = ",".join(addresses)
    if os.environ.get("CUDA_VISIBLE_DEVICES") == want:
        return
    if _cuda_initialized():
        log.warning("CUDA was initialized in pid %d under CUDA_VISIBLE_DEVICES=%s; the task was "
                    "assigned gpu %s (only processes started from now on see it)",
                    os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), want)
    os.environ["CUDA_VISIBLE_DEVICES"] = want


def close_model(model: Any) -> None:
    """Release a model: its ``close()`` if it has one, then garbage collection and, where CUDA
    is initialized, ``torch.cuda.empty_cache()``. Errors while closing are logged, not raised."""
    close = getattr(model, "close", None)
    if callable(close):
        try:
            close()
        except Exception as exc:  # noqa: BLE001 - a failing close must not fail the next stage
            log.warning("closing %s failed: %s: %s", type(model).__name__, type(exc).__name__, exc)
    gc.collect()
    if _cuda_initialized():
        torch = sys.modules["torch"]
        torch.cuda.empty_cache()


def _event(event: str, kind: str, key: str, gpus: list[str], **extra: Any) -> None:
    rec = {"event": event, "t": round(time.time(), 3), "pid": os.getpid(),
           "executor": executor_id(), "kind": kind, "key": key, "gpus": gpus,
           "resident": len(_EXCLUSIVE), **extra}
    log.info("model %s: %s pid=%d executor=%s gpu=%s resident=%d%s", event, kind, rec["pid"],
             rec["executor"], ",".join(gpus) or "-", rec["resident"],
             "".join(f" {k}={v}" for k, v in extra.items()))
    path = os.environ.get("FINELAKE_LOAD_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")


def _note_task(kind: str, key: str, gpus: list[str], assigned: list[str]) -> None:
    """Log a task's first use of its model (once per task attempt and process)."""
    try:
        from pyspark import TaskContext

        tc = TaskContext.get()
    except ImportError:  # pragma: no cover
        tc = None
    if tc is None:
        return
    mark = (tc.taskAttemptId(), key)
    if mark in _TASKS_SEEN:
        return
    _TASKS_SEEN.add(mark)
    _event("task", kind, key, gpus, task_gpus=assigned, stage=tc.stageId(),
           partition=tc.partitionId(), attempt=tc.taskAttemptId())


def _evict(key: str, kind: str, reason: str) -> None:
    model = _MODELS.pop(key)
    gpus = _EXCLUSIVE.pop(key, [])
    close_model(model)
    del model
    _event("evict", kind, key, gpus, reason=reason)


def get_or_load(kind: str, spec: dict, loader: Callable[[], Any], exclusive: bool = True) -> Any:
    """Return the cached object for (kind, spec), calling ``loader()`` only when it is not held.

    Args:
        kind: what it is (``generator``, ``embedder``, ``judge``, ``faiss_index``...).
        spec: its JSON-serializable configuration (with ``kind``, the cache key).
        loader: builds it; called with ``CUDA_VISIBLE_DEVICES`` set to the task's GPUs.
        exclusive: a model that occupies the accelerator: loading it first closes any other
            exclusive entry, so a worker holds one. False for small helpers (an index).

    Returns:
        The cached object.

    Raises:
        Whatever ``loader`` raises (nothing is cached then).
    """
    key = cache_key(kind, spec)
    assigned = task_gpus() if exclusive else []
    with _LOCK:
        gpus = assigned
        if assigned and os.environ.get(MODEL_POOL_ENV) == "models":
            if len(gpu_lease.held()) not in (0, len(assigned)):  # another tensor-parallel size
                for other in list(_EXCLUSIVE):
                    _evict(other, other.split(":", 1)[0],
                           reason=f"{kind} needs {len(assigned)} gpu(s)")
            gpus = gpu_lease.lease(assigned)  # this worker's GPUs, kept for its life
        m = _MODELS.get(key)
        if m is not None and exclusive and gpus and _EXCLUSIVE.get(key) != gpus:
            _evict(key, kind, reason=f"worker's gpu is now {','.join(gpus)}")
            m = None
        if m is None:
            if exclusive:
                for other in [k for k in _EXCLUSIVE if k != key]:
                    _evict(other, other.split(":", 1)[0], reason=f"{kind} needed")
                pin_gpus(gpus)
            t0 = time.monotonic()
            m = loader()
            _MODELS[key] = m
            if exclusive:
                _EXCLUSIVE[key] = gpus
            LOAD_COUNTS[key] = LOAD_COUNTS.get(key, 0) + 1
            _event("load", kind, key, gpus, task_gpus=assigned,
                   seconds=round(time.monotonic() - t0, 2))
        if exclusive:
            _note_task(kind, key, gpus, assigned)
    return m


EVICTIONS: dict[str, int] = {}
"""How many times each key was evicted after a fault in this process (:func:`evict`)."""


def evict(kind: str, spec: dict, reason: str) -> bool:
    """Close and drop the cached (kind, spec) model after a fault that left it unusable (a dead
    engine, out of memory: :func:`finelake.faults.is_engine_fault`), so the next batch that needs
    it loads it again. Logged as an ``evict`` event with ``reason``.

    Returns:
        True when the model was held (and is now dropped), False when it was not.
    """
    key = cache_key(kind, spec)
    with _LOCK:
        if key not in _MODELS:
            return False
        _evict(key, kind, reason=reason)
        EVICTIONS[key] = EVICTIONS.get(key, 0) + 1
    return True


def resident() -> list[str]:
    """Keys of the models (exclusive entries) this process holds now: at most one."""
    with _LOCK:
        return list(_EXCLUSIVE)


def record_call(prompts: int) -> None:
    """Count one model call carrying ``prompts`` rows (read back with :data:`CALLS`)."""
    CALLS["calls"] += 1
    CALLS["prompts"] += int(prompts)


@contextlib.contextmanager
def model_call(kind: str, spec: dict, prompts: int) -> Iterator[None]:
    """Around one call of the cached (kind, spec) model: counts it (:func:`record_call`) and logs
    ``call_start`` / ``call_end`` events (``seconds``; ``error`` = the exception's type when the
    call raised, which is re-raised), so the model pool's busy and idle times can be read from
    the log."""
    key = cache_key(kind, spec)
    gpus = list(_EXCLUSIVE.get(key, []))
    record_call(prompts)
    _event("call_start", kind, key, gpus, prompts=int(prompts))
    t0 = time.monotonic()
    error = None
    try:
        yield
    except BaseException as exc:
        error = type(exc).__name__
        raise
    finally:
        extra = {"error": error} if error else {}
        _event("call_end", kind, key, gpus, prompts=int(prompts),
               seconds=round(time.monotonic() - t0, 3), **extra)


def clear() -> None:
    """Close and drop every cached object and give up the GPU lease (tests)."""
    with _LOCK:
        for key in list(_MODELS):
            if key in _EXCLUSIVE:
                _evict(key, key.split(":", 1)[0], reason="clear")
            else:
                _MODELS.pop(key)
        _TASKS_SEEN.clear()
        gpu_lease.release()
