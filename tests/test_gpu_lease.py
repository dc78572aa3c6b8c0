"""A Python worker keeps its GPU (finelake.udfs.gpu_lease): real ``flock`` leases in a temporary
lock folder, other workers played by other processes (or by lock files held open here, which
``flock`` treats as another holder)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

from finelake.udfs import gpu_lease


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_lease.LOCK_DIR_ENV, str(tmp_path))
    gpu_lease.release()
    yield tmp_path
    gpu_lease.release()


def _hold(address: str, folder) -> int:
    """Another worker's lease on ``address``: an exclusive flock on its own open file."""
    fd = os.open(gpu_lease.lock_path(address, str(folder)), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_worker_keeps_its_gpu_whatever_address_the_next_task_names(lock_dir):
    assert gpu_lease.lease(["1"], pool="p") == ["1"]
    assert gpu_lease.lease(["0"], pool="p") == ["1"]  # Spark named another GPU: kept anyway
    assert gpu_lease.held() == ["1"]
    assert gpu_lease.holder("1") == os.getpid()
    assert gpu_lease.record_seen([], pool="p") == ["0", "1"]


def test_a_new_worker_takes_a_free_gpu_of_its_executor_when_its_tasks_is_held(lock_dir):
    gpu_lease.record_seen(["0", "1", "2"], pool="p")
    fd = _hold("0", lock_dir)  # a busy worker runs on gpu 0 (its task was given another address)
    try:
        assert gpu_lease.lease(["0"], pool="p", timeout=0) == ["1"]
    finally:
        os.close(fd)


def test_addresses_of_another_executor_pool_are_never_taken(lock_dir):
    gpu_lease.record_seen(["5"], pool="other-executor")
    fd = _hold("0", lock_dir)
    try:
        with pytest.raises(gpu_lease.GpuLeaseTimeout) as e:
            gpu_lease.lease(["0"], pool="p", timeout=0.3, poll=0.1)
    finally:
        os.close(fd)
    msg = str(e.value)
    assert "['0']" in msg and "held by pids" in msg and "spark.task.resource.gpu.amount" in msg
    assert gpu_lease.held() == []


def test_a_waiting_worker_gets_the_gpu_when_its_holder_dies(lock_dir):
    """The holder is a real process killed with SIGKILL (as Spark's idle timeout kills a worker):
    the kernel drops its lock and the waiting lease succeeds."""
    code = ("import os, sys, time; from finelake.udfs import gpu_lease;"
            "print(gpu_lease.lease(['0'], pool='p'), flush=True); time.sleep(60)")
    env = dict(os.environ, **{gpu_lease.LOCK_DIR_ENV: str(lock_dir)})
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "['0']"
        assert gpu_lease.holder("0") == holder.pid
        t0 = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        assert gpu_lease.lease(["0"], pool="p", timeout=30, poll=0.1) == ["0"]
        assert time.monotonic() - t0 < 30
    finally:
        holder.kill()
        holder.wait()


def test_tensor_parallel_leases_take_several_gpus_or_none(lock_dir):
    gpu_lease.record_seen(["0", "1", "2", "3"], pool="p")
    fd = _hold("1", lock_dir)
    try:
        assert gpu_lease.lease(["0", "1"], pool="p", timeout=0) == ["0", "2"]
        # a worker of another stage size gives its lease up and takes a new one
        assert gpu_lease.lease(["3"], pool="p", timeout=0) == ["3"]
        assert gpu_lease.held() == ["3"]
        # not enough free: nothing is held while waiting, and nothing is left held after
        held_all = [_hold(a, lock_dir) for a in ("0", "2")]
        gpu_lease.release()
        with pytest.raises(gpu_lease.GpuLeaseTimeout):
            gpu_lease.lease(["0", "1"], pool="p", timeout=0.2, poll=0.05)
        assert gpu_lease.held() == []
        for f in held_all:
            os.close(f)
    finally:
        os.close(fd)


def test_no_task_gpu_no_lease():
    assert gpu_lease.lease([]) == [] and gpu_lease.held() == []
