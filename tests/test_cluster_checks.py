"""The facts `make cluster-test` checks (tools/cluster.py), on hand-written logs: each check
passes on a good log and names the failure on a bad one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "cluster_tool", Path(__file__).resolve().parent.parent / "tools" / "cluster.py")
cluster = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cluster)

VLLM = 'generator:{"backend": "vllm", "model": "m"}'
JUDGE = 'judge:{"backend": "llm", "options": {"inner_backend": "vllm"}}'


def _ev(event, kind, key, executor, gpus, pid, resident=1):
    return {"event": event, "kind": kind, "key": key, "executor": executor, "gpus": gpus,
            "pid": pid, "resident": resident}


def _good():
    out = []
    for ex, gpu, pid in (("app/0", "0", 10), ("app/1", "1", 11)):
        out += [_ev("load", "generator", VLLM, ex, [gpu], pid), _ev("task", "generator", VLLM, ex, [gpu], pid),
                _ev("evict", "generator", VLLM, ex, [gpu], pid, resident=0),
                _ev("load", "judge", JUDGE, ex, [gpu], pid), _ev("task", "judge", JUDGE, ex, [gpu], pid)]
    return out


def test_model_log_checks():
    bad, facts = cluster.check_model_log(_good())
    assert bad == [] and facts["gpu_addresses_used"] == ["0", "1"] and facts["max_resident"] == 1
    one_gpu = [e for e in _good() if e["executor"] == "app/0"]
    assert any("both 0 and 1" in b for b in cluster.check_model_log(one_gpu)[0])
    moved = _good() + [_ev("task", "judge", JUDGE, "app/0", ["1"], 10)]
    assert any("more than one gpu address" in b for b in cluster.check_model_log(moved)[0])
    two = _good() + [_ev("load", "embedder", "embedder:{}", "app/0", ["0"], 10, resident=2)]
    assert any("held 2 models" in b for b in cluster.check_model_log(two)[0])
    no_vllm = [e for e in _good() if e["kind"] != "judge"]
    assert any("no vLLM judge" in b for b in cluster.check_model_log(no_vllm)[0])
    assert cluster.check_model_log([])[0] == ["no model task was logged by the executors"]


def test_driver_log_and_workers_checks():
    log = "\n".join(
        [f"INFO x: {st}: stage-level scheduling: gpu tasks=2 (2 executors x 1 gpu / 1 per task)"
         for st in ("genericize", "instantiate", "judge")]
        + ["[genericize] in=60 out=40 quarantined=0 model_calls=2 prompts_per_call=30.0 1.0s",
           "[instantiate] in=20 out=5 quarantined=0 model_calls=4 prompts_per_call=5.0 1.0s",
           "[judge] in=5 out=2 quarantined=0 model_calls=2 prompts_per_call=2.5 1.0s"])
    bad, means = cluster.check_driver_log(log)
    assert bad == [] and means == {"genericize": 30.0, "instantiate": 5.0, "judge": 2.5}
    bad, _ = cluster.check_driver_log(log.replace("gpu tasks=2", "tasks=4"))
    assert len(bad) == 3
    workers = {"workers": [{"state": "ALIVE", "resources": {"gpu": {"addresses": ["1"]}}},
                           {"state": "ALIVE", "resources": {"gpu": {"addresses": ["0"]}}}]}
    assert cluster.check_workers(workers) == []
    workers["workers"][0]["state"] = "DEAD"
    assert len(cluster.check_workers(workers)) == 2


def test_a_stage_without_work_only_reports():
    log = "[judge] in=0 out=0 quarantined=0 1.0s\n[instantiate] in=4 out=0 quarantined=0 skipped(already done)=4 1.0s"
    bad, means = cluster.check_driver_log(log, stages=("instantiate", "judge"))
    assert bad == [] and means == {}
    assert cluster.check_driver_log("", stages=("judge",))[0] == ["judge: no summary line"]
