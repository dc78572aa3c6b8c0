"""A Python worker's GPUs for its whole life: a per-node lease by ``flock`` on one lock file per
GPU address.

**Why.** Spark hands GPU addresses to *tasks*, and a Python worker is reused by whichever task
comes next (idle workers first in, first out). On an executor with several GPUs (Databricks runs
one executor per node: 4 on a g5.12xlarge, 8 on a p4d) the worker that loaded a model on GPU 0
in one job is given a task for GPU 1 in the next; reloading there would put a second engine on a
GPU that another worker's engine still fills. Spark's accounting stays the bound on *how many*
model tasks run at once (one per GPU for a one-GPU task); this module decides *which* GPU a
worker uses, and keeps it:

* A worker's first model load leases as many addresses as its task was assigned: the task's own
  addresses when free, otherwise any free address of the same executor (the addresses its tasks
  were ever given, recorded per executor pool in ``finelake-gpu-seen-<pool>``). It keeps them
  for its life: later tasks, chunks and stages run on the same GPU whatever address Spark names,
  so the model stays loaded.
* The lease is an exclusive ``flock`` on ``<dir>/finelake-gpu-<address>.lock`` (``dir``:
  ``$FINELAKE_GPU_LOCK_DIR``, default ``/tmp``: one per node, shared by every executor and
  application there). The kernel drops it when the process ends, however it ends (Spark's idle
  kill included), and the worker's engine dies with it (:mod:`finelake.models.engine_guard`).
  The file holds the holder's pid, for error messages.
* A worker that finds no free address waits (a worker killed by Spark's one-minute idle timeout
  frees its lease) and gives up after ``$FINELAKE_GPU_LEASE_TIMEOUT`` seconds (default 600) with
  :class:`GpuLeaseTimeout`, naming the addresses and their holders. While Spark runs at most one
  model task per GPU and reuses idle workers before starting new ones, a free address always
  exists when a new worker asks (each busy worker holds one lease, and the addresses of the tasks
  running now are all recorded), so the wait is a safety net, not a schedule.

Pure OS calls (``fcntl``, files); nothing here imports Spark or a model.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from typing import Optional

from finelake.errors import FinelakeError

LOCK_DIR_ENV = "FINELAKE_GPU_LOCK_DIR"
TIMEOUT_ENV = "FINELAKE_GPU_LEASE_TIMEOUT"
DEFAULT_LOCK_DIR = "/tmp"
DEFAULT_TIMEOUT_S = 600.0

_HELD: dict[str, int] = {}
"""address -> open file descriptor holding its lock (this process's lease)."""
_RECORDED: set[str] = set()
"""Addresses this process knows are in its pool's record (saves a file lock per batch)."""


class GpuLeaseTimeout(FinelakeError):
    """No GPU address of this executor became free in time for a new model worker."""


def lock_dir() -> str:
    """The node-wide folder of the lock files (``$FINELAKE_GPU_LOCK_DIR``, default ``/tmp``)."""
    return os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR


def lock_path(address: str, folder: Optional[str] = None) -> str:
    """``<dir>/finelake-gpu-<address>.lock``."""
    return os.path.join(folder or lock_dir(), f"finelake-gpu-{address}.lock")


def _order(addresses) -> list[str]:
    return sorted(set(addresses), key=lambda a: (not a.isdigit(), int(a) if a.isdigit() else 0, a))


def pool_id() -> str:
    """The executor pool this worker belongs to: its parent's pid and start time (Spark's
    ``pyspark.daemon`` forks every worker of one executor's pool; the start time keeps a reused
    pid from naming an earlier executor's pool)."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat", encoding="ascii") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "0"
    return f"{ppid}-{start}"


def record_seen(addresses: list[str], folder: Optional[str] = None,
                pool: Optional[str] = None) -> list[str]:
    """Add ``addresses`` to the pool's record of the GPU addresses its tasks were given and
    return the whole record (sorted), under an exclusive lock on the record file."""
    path = os.path.join(folder or lock_dir(), f"finelake-gpu-seen-{pool or pool_id()}")
    fd, _ = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "r+", encoding="ascii") as f:
            seen = {line.strip() for line in f if line.strip()}
            new = set(addresses) - seen
            if new:
                f.seek(0, os.SEEK_END)
                f.write("".join(f"{a}\n" for a in _order(new)))
                f.flush()
        return _order(seen | set(addresses))
    finally:
        os.close(fd)  # releases the flock


def _open_lock_file(path: str) -> tuple[int, bool]:
    """``(fd, writable)``: the lock file opened for writing (created, left writable by every
    user: executors of other applications may run as other users), or read-only when another
    user created it (``flock`` needs no write access)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY), False
    try:
        os.fchmod(fd, 0o666)
    except OSError:
        pass  # another user's file that we may write anyway
    return fd, True


def _try_lock(address: str, folder: str) -> Optional[int]:
    fd, writable = _open_lock_file(lock_path(address, folder))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    if writable:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def holder(address: str, folder: Optional[str] = None) -> Optional[int]:
    """The pid written in an address's lock file (the last holder; None when unreadable)."""
    try:
        with open(lock_path(address, folder), encoding="ascii") as f:
            text = f.read().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def held() -> list[str]:
    """The addresses this process holds (empty before its first lease)."""
    return _order(_HELD)


def lease(task_addresses: list[str], timeout: Optional[float] = None, poll: float = 0.5,
          folder: Optional[str] = None, pool: Optional[str] = None) -> list[str]:
    """The GPU addresses this worker runs its models on: held for life once taken.

    Args:
        task_addresses: the ``gpu`` addresses Spark assigned the running task; their number is
            how many GPUs the worker needs (a tensor-parallel stage's task holds several).
        timeout: seconds to wait for free addresses (default ``$FINELAKE_GPU_LEASE_TIMEOUT``
            or 600).
        poll: seconds between tries while waiting.
        folder, pool: the lock folder and executor pool (tests; default :func:`lock_dir` and
            :func:`pool_id`).

    Returns:
        The leased addresses, sorted: the ones already held when their number matches the task's
        (a worker keeps its GPU), else newly taken ones, the task's own first. [] when the task
        has no GPU.

    Raises:
        GpuLeaseTimeout: not enough addresses of this executor were free within ``timeout``.
    """
    if not task_addresses:
        return []
    folder = folder or lock_dir()
    need = len(task_addresses)
    if len(_HELD) == need:
        if not set(task_addresses) <= _RECORDED:  # tell later workers of this executor
            _RECORDED.update(record_seen(list(task_addresses), folder, pool))
        return held()
    release()  # a stage needing another number of GPUs: the caller evicted its models first
    seen = record_seen(list(task_addresses), folder, pool)
    _RECORDED.update(seen)
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    deadline = time.monotonic() + timeout
    while True:
        got: dict[str, int] = {}
        for a in list(task_addresses) + [s for s in seen if s not in task_addresses]:
            fd = _try_lock(a, folder)
            if fd is not None:
                got[a] = fd
                if len(got) == need:
                    _HELD.update(got)
                    return held()
        for fd in got.values():  # never hold part of a lease while waiting for the rest
            os.close(fd)
        if time.monotonic() >= deadline:
            holders = {a: holder(a, folder) for a in seen}
            raise GpuLeaseTimeout(
                f"no {need} free GPU(s) for Python worker {os.getpid()} after {timeout:.0f} s: "
                f"this executor's addresses {seen} are held by pids {holders} (lock files "
                f"{lock_path('<address>', folder)}). Each Python worker that runs a model keeps "
                "its GPU for life (finelake.udfs.gpu_lease); more model workers than GPUs means a "
                "process outside this executor's model tasks holds one (an earlier application's "
                "worker or engine: see `ps`), or the executor runs more GPU tasks at once than it "
                "has GPUs (spark.task.resource.gpu.amount / the stage's tensor_parallel_size)")
        time.sleep(poll)
        seen = record_seen([], folder, pool)


def release() -> None:
    """Give the lease up (a worker changing how many GPUs it needs; tests)."""
    _RECORDED.clear()
    while _HELD:
        _, fd = _HELD.popitem()
        try:
            os.close(fd)
        except OSError:
            pass
