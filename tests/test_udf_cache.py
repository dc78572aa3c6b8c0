"""udfs.cache: a Python worker holds one model at a time, closes the previous one before the next
loads, pins the GPU a task was assigned, and logs loads / evictions as JSON lines."""

from __future__ import annotations

import json
import os

import pytest

from finelake.udfs import cache


class Model:
    """A model stand-in that records whether it was closed (the cache's only contract with it)."""

    def __init__(self, name: str):
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch, tmp_path):
    cache.clear()
    monkeypatch.setenv("FINELAKE_LOAD_LOG", str(tmp_path / "events.jsonl"))
    yield tmp_path / "events.jsonl"
    cache.clear()


def test_second_model_closes_the_first(fresh_cache):
    a = cache.get_or_load("generator", {"m": "a"}, lambda: Model("a"))
    assert cache.get_or_load("generator", {"m": "a"}, lambda: Model("again")) is a  # cached
    b = cache.get_or_load("embedder", {"m": "b"}, lambda: Model("b"))
    assert a.closed and not b.closed
    assert cache.resident() == [cache.cache_key("embedder", {"m": "b"})]
    # Coming back to the first model loads it again (a worker holds only the current stage's).
    a2 = cache.get_or_load("generator", {"m": "a"}, lambda: Model("a2"))
    assert a2.name == "a2" and b.closed
    events = [json.loads(line) for line in fresh_cache.read_text().splitlines()]
    assert [(e["event"], e["kind"]) for e in events] == [
        ("load", "generator"), ("evict", "generator"), ("load", "embedder"),
        ("evict", "embedder"), ("load", "generator")]
    assert max(e["resident"] for e in events) == 1
    assert all(e["pid"] == os.getpid() and e["executor"] == "driver" for e in events)


def test_helpers_do_not_evict_the_model():
    m = cache.get_or_load("embedder", {"m": "e"}, lambda: Model("e"))
    idx = cache.get_or_load("faiss_index", {"path": "/x"}, lambda: Model("index"), exclusive=False)
    assert not m.closed and not idx.closed
    assert cache.get_or_load("embedder", {"m": "e"}, lambda: Model("other")) is m
    assert cache.resident() == [cache.cache_key("embedder", {"m": "e"})]


def test_failed_load_caches_nothing_and_a_failing_close_is_not_fatal():
    class Stubborn(Model):
        def close(self):
            raise RuntimeError("engine already gone")

    cache.get_or_load("generator", {"m": "s"}, lambda: Stubborn("s"))

    def boom():
        raise ImportError("no engine")

    with pytest.raises(ImportError):
        cache.get_or_load("judge", {"m": "j"}, boom)
    assert cache.resident() == []  # the previous model was released before the load failed
    assert cache.get_or_load("judge", {"m": "j"}, lambda: Model("j")).name == "j"


def test_pin_gpus_sets_the_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cache.pin_gpus([])
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    cache.pin_gpus(["1"])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    cache.pin_gpus(["2", "3"])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert cache.task_gpus() == []  # outside a Spark task: nothing assigned


def test_record_call_counts_prompts():
    before = dict(cache.CALLS)
    cache.record_call(5)
    cache.record_call(3)
    assert cache.CALLS["calls"] - before["calls"] == 2
    assert cache.CALLS["prompts"] - before["prompts"] == 8


def test_a_worker_keeps_its_leased_gpu_and_its_model_across_tasks(monkeypatch, tmp_path,
                                                                   fresh_cache):
    """Spark names another GPU for the next task (its idle workers are reused first in, first
    out): the worker stays on the GPU it leased and its model stays loaded."""
    from finelake.udfs import gpu_lease

    monkeypatch.setenv(gpu_lease.LOCK_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("FINELAKE_WORKER_POOL", "models")  # a model stage's worker
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assigned = iter([["1"], ["0"], ["0"]])
    monkeypatch.setattr(cache, "task_gpus", lambda: next(assigned))
    a = cache.get_or_load("generator", {"m": "a"}, lambda: Model("a"))
    for _ in range(2):
        assert cache.get_or_load("generator", {"m": "a"}, lambda: Model("reload")) is a
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and not a.closed
    events = [json.loads(line) for line in fresh_cache.read_text().splitlines()]
    assert [e["event"] for e in events] == ["load"]
    assert events[0]["gpus"] == ["1"] and events[0]["task_gpus"] == ["1"]
    assert events[0]["t"] > 1.6e9


def test_a_stage_needing_more_gpus_evicts_and_takes_a_new_lease(monkeypatch, tmp_path,
                                                                fresh_cache):
    from finelake.udfs import gpu_lease

    monkeypatch.setenv(gpu_lease.LOCK_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("FINELAKE_WORKER_POOL", "models")
    assigned = iter([["0"], ["0", "1"]])
    monkeypatch.setattr(cache, "task_gpus", lambda: next(assigned))
    a = cache.get_or_load("generator", {"m": "a"}, lambda: Model("a"))
    b = cache.get_or_load("judge", {"m": "tp2"}, lambda: Model("b"))
    assert a.closed and not b.closed and gpu_lease.held() == ["0", "1"]
    events = [json.loads(line) for line in fresh_cache.read_text().splitlines()]
    assert [(e["event"], e["gpus"]) for e in events] == [
        ("load", ["0"]), ("evict", ["0"]), ("load", ["0", "1"])]
    assert events[1]["reason"] == "judge needs 2 gpu(s)"


def test_model_calls_are_logged_with_their_duration_and_error(fresh_cache):
    cache.get_or_load("generator", {"m": "a"}, lambda: Model("a"))
    with cache.model_call("generator", {"m": "a"}, 3):
        pass
    with pytest.raises(RuntimeError):
        with cache.model_call("generator", {"m": "a"}, 2):
            raise RuntimeError("EngineDeadError")
    calls = [json.loads(line) for line in fresh_cache.read_text().splitlines()][1:]
    assert [(e["event"], e["prompts"], e.get("error")) for e in calls] == [
        ("call_start", 3, None), ("call_end", 3, None),
        ("call_start", 2, None), ("call_end", 2, "RuntimeError")]
    assert all(e["seconds"] >= 0 for e in calls if e["event"] == "call_end")
    assert calls[0]["t"] <= calls[1]["t"] <= calls[2]["t"]


def test_evicting_a_judge_closes_its_engine():
    """The llm judge holds a generator (a vLLM engine on clusters): evicting the judge must shut
    that engine down, not leave it to the garbage collector."""
    from finelake.models.judge import LLMJudge

    gen = Model("judge-engine")
    gen.model_id = "vllm:m"
    cache.get_or_load("judge", {"m": "j"}, lambda: LLMJudge(gen, max_tokens=64))
    assert cache.evict("judge", {"m": "j"}, reason="EngineDeadError: gone")
    assert gen.closed


def test_a_cpu_stage_worker_leases_nothing(monkeypatch, tmp_path, fresh_cache):
    """Outside the model pool a task holds a fraction of a GPU (CPU stages): the model is pinned
    to the task's address and no GPU is leased, so it can never keep a model worker waiting."""
    from finelake.udfs import gpu_lease

    monkeypatch.setenv(gpu_lease.LOCK_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("FINELAKE_WORKER_POOL", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(cache, "task_gpus", lambda: ["1"])
    cache.get_or_load("generator", {"m": "client"}, lambda: Model("c"))
    assert gpu_lease.held() == [] and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
