"""Models held once per Python worker.

Spark reuses Python workers (``spark.python.worker.reuse``), and this module is imported by them, so
a model stored here survives across batches, tasks and jobs of the same worker. Keys are the model's
configuration, so two stages with the same model share one copy. Never keep models in a closure: a
closure is pickled per job and reloads every time.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable

_MODELS: dict[str, Any] = {}
_LOCK = threading.Lock()
LOAD_COUNTS: dict[str, int] = {}
"""How many times each key was loaded in this process (for tests and benchmarks)."""


def cache_key(kind: str, spec: dict) -> str:
    return kind + ":" + json.dumps(spec, sort_keys=True, default=str)


def get_or_load(kind: str, spec: dict, loader: Callable[[], Any]) -> Any:
    """Return the cached model for (kind, spec), calling ``loader()`` only the first time.

    Every load is also appended to the file named by ``$FINELAKE_LOAD_LOG`` (one line per load:
    pid and key), so a test can count loads across Spark's worker processes.
    """
    key = cache_key(kind, spec)
    m = _MODELS.get(key)
    if m is not None:
        return m
    with _LOCK:
        m = _MODELS.get(key)
        if m is None:
            m = loader()
            _MODELS[key] = m
            LOAD_COUNTS[key] = LOAD_COUNTS.get(key, 0) + 1
            log_path = os.environ.get("FINELAKE_LOAD_LOG")
            if log_path:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(f"{os.getpid()}\t{key}\n")
    return m


def clear() -> None:
    """Drop every cached model (tests)."""
    with _LOCK:
        _MODELS.clear()
