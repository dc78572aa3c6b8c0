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


# ----------------------------------------------------------------------------- scenarios

checks = cluster.sys.modules["cluster_checks"]
JUDGE_KEY = 'judge:{"backend": "llm"}'


def _e(event, t, pid=10, kind="judge", executor="app/0", gpus=("0",), **kw):
    return {"event": event, "t": t, "pid": pid, "kind": kind, "key": JUDGE_KEY if kind == "judge"
            else kind + ":{}", "executor": executor, "gpus": list(gpus), "resident": 1, **kw}


def test_pool_gaps_take_calls_and_loads_as_busy_time():
    events = [_e("load", 50, seconds=40), _e("task", 50), _e("call_start", 51),
              _e("call_end", 61, seconds=10), _e("call_start", 150),
              _e("call_end", 200, seconds=50), _e("task", 205, executor="app/1")]
    assert checks.pool_gaps(events) == {"app/0": 89.0, "app/1": 0.0}


def test_idle_gap_check_needs_the_workers_stopped_no_orphan_and_a_reload():
    events = [_e("load", 10, seconds=5), _e("call_start", 11), _e("call_end", 15, seconds=4),
              _e("load", 110, pid=20, seconds=30), _e("call_start", 111, pid=20),
              _e("call_end", 120, pid=20, seconds=9)]
    watch = ([], {"engines_seen": 2, "outlived_parent": 2, "longest_orphan_s": 1.0})
    bad, line = checks.check_idle_gap(events, (20, 100), watch, {10}, set())
    assert bad == [] and "pool idle 65 s" in line and "reloaded the judge 1x (30 s)" in line
    bad, _ = checks.check_idle_gap(events, (20, 100), watch, {10}, {10})
    assert any("did not stop the idle workers [10]" in b for b in bad)
    orphan = (["vLLM engine processes outlived their Python worker: ..."], watch[1])
    assert checks.check_idle_gap(events, (20, 100), orphan, {10}, set())[0] == orphan[0]
    no_reload = [e for e in events if e["pid"] == 10]
    assert any("the next chunk must load" in b
               for b in checks.check_idle_gap(no_reload, (20, 100), watch, {10}, set())[0])


def test_engine_kill_check():
    killed = {"pid": 10, "cores": [99], "t_call": 100.0, "t_kill": 101.0, "executor": "app/0",
              "prompts": 2}
    events = [_e("call_start", 100), _e("call_end", 104, seconds=4, error="EngineDeadError"),
              _e("evict", 104.5, reason="EngineDeadError: ..."),
              _e("load", 150, seconds=40), _e("call_end", 160, seconds=5)]
    judged = [{"status": "retry", "judge_reason": "judge_error: EngineDeadError: x"}] * 2 + \
        [{"status": "ok", "judge_reason": "fine"}]
    pairs = [{"pair_id": "a", "judge_score": 4}]
    bad, line = checks.check_engine_kill(events, killed, judged, [{"status": "ok"}] * 3, pairs,
                                         list(pairs))
    assert bad == [] and "2 rows retry" in line and "reloaded in the same worker (40 s)" in line
    assert "pairs 1 == uninterrupted 1" in line
    bad, _ = checks.check_engine_kill(events, killed, judged, judged, pairs, [])
    assert any("still retry" in b for b in bad) and any("differ" in b for b in bad)
    errored = [{"status": "error", "judge_reason": "gave up: EngineDeadError"}]
    assert any("rows must all be retry" in b for b in checks.check_engine_kill(
        events, killed, errored, errored, pairs, pairs)[0])
    assert checks.check_engine_kill(events, {}, judged, judged, pairs, pairs)[0] == [
        "engine-kill: no engine core was found to kill during a judge call"]


def _mgpu_events():
    out = []
    for stage, kind, t in ((1, "generator", 0), (2, "generator", 10), (3, "generator", 20),
                           (4, "judge", 30), (5, "judge", 40), (6, "judge", 50)):
        for pid, gpu, spark_gpu in ((10, "0", "1"), (11, "1", "0")):
            if stage in (1, 4):
                out.append(_e("load", t, pid=pid, kind=kind, gpus=[gpu], seconds=1))
            out.append(_e("task", t + 1, pid=pid, kind=kind, gpus=[gpu], task_gpus=[spark_gpu],
                          stage=stage))
    return out


def test_multi_gpu_check():
    bad, line = checks.check_multi_gpu(_mgpu_events())
    assert bad == [], bad
    assert "2 Python workers" in line and "'generator': 3, 'judge': 3" in line
    assert "12 of 12 tasks ran on the worker's gpu" in line
    moved = _mgpu_events() + [_e("task", 60, pid=10, kind="judge", gpus=["1"], stage=6)]
    assert any("changed GPU" in b for b in checks.check_multi_gpu(moved)[0])
    reload = _mgpu_events() + [_e("load", 55, pid=10, kind="judge", gpus=["0"], seconds=1)]
    assert any("1 reloads" in b for b in checks.check_multi_gpu(reload)[0])
    short = [e for e in _mgpu_events() if e.get("stage") not in (3,)]
    assert any("generator ran in 2 chunks" in b for b in checks.check_multi_gpu(short)[0])


def test_serving_check():
    rows = [{"model_id": "openai:smollm2", "status": "invalid"}] * 3
    log = "\n".join(['INFO: 127.0.0.1:1 - "POST /v1/chat/completions HTTP/1.1" 200 OK'] * 3)
    bad, line = checks.check_serving([], rows, log, "genericize: default scheduling, tasks=4", 
                                     "openai:smollm2")
    assert bad == [] and "3 rows {'invalid': 3}" in line
    bad, _ = checks.check_serving([], rows, "", "genericize: stage-level scheduling", "openai:smollm2")
    assert len(bad) == 2
