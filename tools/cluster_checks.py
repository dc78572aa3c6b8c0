"""The facts ``make cluster-test`` checks (tools/cluster.py and its scenarios,
tools/cluster_scenarios.py), as pure functions of its logs and tables: the master's JSON status,
the executors' model-event log (:mod:`finelake.udfs.cache`), driver logs, Delta table rows. Each
returns the failures it found (and facts or a scenario's summary line);
``tests/test_cluster_checks.py`` runs them on hand-written inputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

MODEL_KINDS = ("generator", "judge", "embedder")
IDLE_TIMEOUT_S = 60.0
"""Spark's PythonWorkerFactory.IDLE_WORKER_TIMEOUT_NS (fixed; checked every 10 s)."""


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file ([] when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_workers(status: dict) -> list[str]:
    """Failures about the master's ``/json`` status: two ALIVE workers with gpu 0 and 1."""
    alive = [w for w in status.get("workers", []) if w.get("state") == "ALIVE"]
    addrs = sorted(a for w in alive for a in (w.get("resources", {}).get("gpu", {})
                                               .get("addresses", [])))
    out = []
    if len(alive) != 2:
        out.append(f"expected 2 alive workers, the master lists {len(alive)}")
    if addrs != ["0", "1"]:
        out.append(f"expected the workers to advertise gpu addresses ['0', '1'], got {addrs}")
    return out


def check_model_log(events: list[dict]) -> tuple[list[str], dict]:
    """Failures about the executors' model log (:mod:`finelake.udfs.cache` events), and facts.

    Checked per application: every model task (``task`` events) held exactly one gpu address;
    each executor always the same one; both addresses 0 and 1 were used; no event shows more
    than one model resident in a process; the generator and judge loaded vLLM engines.
    """
    out: list[str] = []
    tasks = [e for e in events if e["event"] == "task" and e["kind"] in MODEL_KINDS]
    loads = [e for e in events if e["event"] == "load"]
    facts = {"task_events": len(tasks), "loads": len(loads),
             "evictions": sum(e["event"] == "evict" for e in events),
             "max_resident": max((e["resident"] for e in events), default=0)}
    if not tasks:
        return ["no model task was logged by the executors"], facts
    bad = [e for e in tasks if len(e["gpus"]) != 1]
    if bad:
        out.append(f"{len(bad)} model tasks did not hold exactly one gpu: {bad[:2]}")
    by_exec: dict[str, set] = {}
    for e in tasks:
        by_exec.setdefault(e["executor"], set()).update(e["gpus"])
    shared = {k: sorted(v) for k, v in by_exec.items() if len(v) != 1}
    if shared:
        out.append(f"executors whose model tasks used more than one gpu address: {shared}")
    used = sorted({a for e in tasks for a in e["gpus"]})
    facts["gpu_addresses_used"] = used
    facts["executor_gpus"] = {k: sorted(v) for k, v in sorted(by_exec.items())}
    if used != ["0", "1"]:
        out.append(f"model tasks used gpu addresses {used}, expected both 0 and 1")
    if facts["max_resident"] > 1:
        out.append(f"a Python worker held {facts['max_resident']} models at once")
    kinds = {(e["kind"], '"backend": "vllm"' in e["key"] or '"inner_backend": "vllm"' in e["key"])
             for e in loads}
    for kind in ("generator", "judge"):
        if (kind, True) not in kinds:
            out.append(f"no vLLM {kind} was loaded on the executors")
    return out, facts


SUMMARY = re.compile(r"^\[(?P<stage>[a-z:_]+)\] in=(?P<rows_in>\d+) out=(?P<rows_out>\d+).*$", re.M)


def stage_lines(log_text: str) -> dict[str, str]:
    """Each stage's summary line (``[stage] in=.. out=.. ...``) from a driver log, by stage."""
    return {m["stage"]: m.group(0) for m in SUMMARY.finditer(log_text)}


def check_driver_log(log_text: str, stages=("genericize", "instantiate", "judge")) -> tuple[list[str], dict]:
    """Failures about a driver log: each model stage that had work planned stage-level
    scheduling with two gpu tasks and reported prompts per model call; facts: those means.
    A stage with nothing to do this run (``in=0`` or all skipped) is only required to report."""
    out, facts = [], {}
    lines = stage_lines(log_text)
    for st in stages:
        line = lines.get(st)
        if line is None:
            out.append(f"{st}: no summary line")
            continue
        rows_in = int(re.search(r"in=(\d+)", line).group(1))
        skipped = re.search(r"skipped\(already done\)=(\d+)", line)
        if rows_in - (int(skipped.group(1)) if skipped else 0) <= 0:
            continue
        if not re.search(rf"{st}: stage-level scheduling: gpu tasks=2\b", log_text):
            out.append(f"{st}: no 'stage-level scheduling: gpu tasks=2' plan in the driver log")
        m = re.search(r"prompts_per_call=([\d.]+)", line)
        if m is None:
            out.append(f"{st}: summary line has no prompts_per_call: {line}")
        else:
            facts[st] = float(m.group(1))
    return out, facts


def table_rows(lake: Path, name: str) -> list[dict]:
    """Every row of the lake's table ``name``, through :func:`finelake.lake.rs.read_delta` (not
    ``to_pyarrow_table()``, which can kill the process at exit)."""
    from finelake.lake.rs import read_delta

    return read_delta(str(lake / name)).to_pylist()


def check_direct_rows(lake: Path, report: dict) -> list[str]:
    """Failures about run 2 (direct mode): its genericizations and instantiations rows (the
    latest run id) exist and each has a status, and a reason unless ok."""
    out = []
    for table in ("genericizations", "instantiations"):
        try:
            rows = table_rows(lake, table)
        except Exception as exc:  # noqa: BLE001
            out.append(f"{table}: unreadable ({type(exc).__name__}: {exc})")
            continue
        last = max((r["run_id"] for r in rows), default=None)
        new = [r for r in rows if r["run_id"] == last]
        no_status = [r for r in new if not r.get("status")]
        no_reason = [r for r in new if r.get("status") != "ok" and not r.get("reason")]
        counts: dict[str, int] = {}
        for r in new:
            counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
        report[f"direct_{table}"] = counts
        if not new:
            out.append(f"direct run wrote no {table} rows")
        if no_status or no_reason:
            out.append(f"direct run: {len(no_status)} {table} rows without status, "
                       f"{len(no_reason)} not ok without a reason")
    return out


# ----------------------------------------------------------------------------- model-log facts


def pool_gaps(events: list[dict]) -> dict[str, float]:
    """Per executor (``<app>/<executor>``): the longest time its model workers did nothing
    between two model activities (loads and calls are intervals, first use of a model by a task
    and evictions are instants), in seconds."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if "t" not in e:
            continue
        if e["event"] in ("call_end", "load"):
            span = (e["t"] - float(e.get("seconds", 0)), e["t"])
        elif e["event"] in ("task", "evict", "call_start"):
            span = (e["t"], e["t"])
        else:
            continue
        spans.setdefault(e["executor"], []).append(span)
    out = {}
    for ex, ss in spans.items():
        ss.sort()
        end, gap = ss[0][1], 0.0
        for a, b in ss[1:]:
            gap = max(gap, a - end)
            end = max(end, b)
        out[ex] = round(gap, 1)
    return out


def app_of(e: dict) -> str:
    return e.get("executor", "").split("/")[0]


def check_idle_gap(events: list[dict], pause: tuple[float, float], watch: tuple[list, dict],
                   workers_before: set[int], alive_after: set[int]) -> tuple[list[str], str]:
    """The idle-gap scenario's facts: ``pause`` (start, end) Unix times from the driver log;
    ``watch`` an :meth:`EngineWatch.report`; ``workers_before`` the pids that held the judge
    before the pause; ``alive_after`` those still alive when the pause ended."""
    out, facts = list(watch[0]), dict(watch[1])
    t0, t1 = pause
    judge = [e for e in events if e.get("kind") == "judge"]
    if not workers_before:
        out.append("idle-gap: no Python worker held the judge before the pause")
    if alive_after:
        out.append(f"idle-gap: Spark did not stop the idle workers {sorted(alive_after)} during a "
                   f"{t1 - t0:.0f} s pause (the idle timeout is {IDLE_TIMEOUT_S:.0f} s)")
    reloads = [e for e in judge if e["event"] == "load" and e["t"] > t1]
    done = [e for e in judge if e["event"] == "call_end" and e["t"] > t1 and not e.get("error")]
    if not reloads or not done:
        out.append(f"idle-gap: after the pause {len(reloads)} judge loads and {len(done)} "
                   "finished judge calls (the next chunk must load and finish)")
    gaps = pool_gaps([e for e in events if app_of(e) in {app_of(x) for x in judge if x["t"] > t1}])
    longest = max(gaps.values(), default=0.0)
    if longest <= IDLE_TIMEOUT_S:
        out.append(f"idle-gap: the longest model-pool idle gap was {longest} s, not above Spark's "
                   f"{IDLE_TIMEOUT_S:.0f} s")
    line = (f"pool idle {longest:.0f} s (Spark's idle timeout {IDLE_TIMEOUT_S:.0f} s); "
            f"{len(workers_before)} Python workers stopped by Spark in the gap; "
            f"{facts['engines_seen']} engine processes seen, {facts['outlived_parent']} outlived "
            f"their worker (longest {facts['longest_orphan_s']} s); next chunk reloaded the judge "
            f"{len(reloads)}x ({', '.join(str(e.get('seconds')) + ' s' for e in reloads)}) in "
            f"new workers and finished {len(done)} calls")
    return out, line


def check_engine_kill(events: list[dict], killed: dict, judged: list[dict],
                      rerun_judged: list[dict], pairs_base: list[dict],
                      pairs_rerun: list[dict]) -> tuple[list[str], str]:
    """The engine-kill scenario's facts. ``killed``: :attr:`EngineKiller.killed`; ``judged``:
    run 2's judgments rows; ``rerun_judged`` the same rows after the rerun; ``pairs_*``: the
    uninterrupted run's and the rerun's pairs (rows without ``run_id``)."""
    if not killed or not killed.get("cores"):
        return ["engine-kill: no engine core was found to kill during a judge call"], ""
    out, pid = [], killed["pid"]
    mine = [e for e in events if e["pid"] == pid and e.get("kind") == "judge"]
    dead = [e for e in mine if e["event"] == "call_end" and e["t"] >= killed["t_kill"]
            and e.get("error")]
    evicted = [e for e in mine if e["event"] == "evict" and e["t"] >= killed["t_kill"]]
    same_exec = [e for e in events if e["executor"] == killed["executor"]
                 and e.get("kind") == "judge" and e["event"] == "load" and e["t"] > killed["t_kill"]]
    retry = [r for r in judged if r.get("status") == "retry"]
    errors = [r for r in judged if r.get("status") == "error" and "EngineDead" in (r.get("judge_reason") or "")]
    if not dead:
        out.append(f"engine-kill: worker {pid}'s judge call did not fail after its engine was killed")
    elif "EngineDeadError" not in dead[0]["error"]:
        out.append(f"engine-kill: the call raised {dead[0]['error']}, not EngineDeadError")
    if not evicted:
        out.append(f"engine-kill: worker {pid} did not evict its dead judge")
    if not same_exec:
        out.append("engine-kill: no judge was loaded again on that executor after the kill")
    if len(retry) != killed.get("prompts") or errors:
        out.append(f"engine-kill: {len(retry)} rows retry, {len(errors)} rows error after the kill "
                   "(the killed call's rows must all be retry)")
    if any(r.get("status") == "retry" for r in rerun_judged):
        out.append("engine-kill: rows still retry after the rerun")
    key = lambda r: json.dumps(r, sort_keys=True, default=str)  # noqa: E731
    if sorted(map(key, pairs_base)) != sorted(map(key, pairs_rerun)) or not pairs_base:
        out.append(f"engine-kill: pairs after the rerun ({len(pairs_rerun)}) differ from the "
                   f"uninterrupted run's ({len(pairs_base)})")
    reloaded_in = "the same worker" if any(e["pid"] == pid for e in same_exec) else "a new worker"
    line = (f"killed EngineCore {killed['cores']} of worker {pid} {killed['t_kill'] - killed['t_call']:.1f} s "
            f"into a {killed.get('prompts')}-pair judge call; it raised "
            f"{dead[0]['error'] if dead else '?'} after {dead[0]['seconds'] if dead else '?'} s; "
            f"{len(retry)} rows retry, 0 error; evicted and reloaded in {reloaded_in} "
            f"({same_exec[0].get('seconds') if same_exec else '?'} s); rerun: pairs "
            f"{len(pairs_rerun)} == uninterrupted {len(pairs_base)}")
    return out, line


def check_multi_gpu(events: list[dict], kinds=("generator", "judge"),
                    min_chunks: int = 3) -> tuple[list[str], str]:
    """The multi-gpu scenario's facts from its own model log: each worker always on one GPU, no
    two live workers on one GPU, each model loaded once per worker per stage (no eviction for a
    GPU change), at least ``min_chunks`` chunks (Spark jobs: distinct stage ids of the tasks)
    for the model of each of ``kinds``."""
    out = []
    tasks = [e for e in events if e["event"] == "task"]
    by_pid: dict[int, set] = {}
    for e in events:
        if e.get("gpus"):
            by_pid.setdefault(e["pid"], set()).add(tuple(e["gpus"]))
    moved = {p: sorted(g) for p, g in by_pid.items() if len(g) != 1}
    if moved:
        out.append(f"multi-gpu: Python workers changed GPU: {moved}")
    life = {}
    for e in events:
        if e.get("gpus"):
            a, b = life.get(e["pid"], (e["t"], e["t"]))
            life[e["pid"]] = (min(a, e["t"]), max(b, e["t"]))
    shared = [(p, q) for p in life for q in life if p < q and by_pid[p] == by_pid[q]
              and life[p][0] <= life[q][1] and life[q][0] <= life[p][1]]
    if shared:
        out.append(f"multi-gpu: workers held the same GPU at once: {shared}")
    gpus_used = sorted({g for s in by_pid.values() for t in s for g in t})
    if len(gpus_used) < 2:
        out.append(f"multi-gpu: only gpu {gpus_used} was used (the executor has 2)")
    reloads, last = 0, {}
    for e in events:
        if e["event"] == "load":
            reloads += last.get(e["pid"]) == e["key"]
            last[e["pid"]] = e["key"]
    gpu_evictions = [e for e in events if e["event"] == "evict" and "gpu" in e.get("reason", "")]
    if reloads or gpu_evictions:
        out.append(f"multi-gpu: {reloads} reloads of a worker's own model, "
                   f"{len(gpu_evictions)} evictions for a GPU change")
    chunks = {k: len({e["stage"] for e in tasks if e["kind"] == k}) for k in kinds}
    for k, n in chunks.items():
        if n < min_chunks:
            out.append(f"multi-gpu: the {k} ran in {n} chunks, fewer than {min_chunks}")
    differ = sum(1 for e in tasks if e.get("task_gpus") and e["task_gpus"] != e["gpus"])
    loads = sum(e["event"] == "load" for e in events)
    line = (f"1 executor x 2 gpus: {len(by_pid)} Python workers, each on one gpu for life "
            f"({', '.join(f'{p}: {sorted(g)[0]}' for p, g in sorted(by_pid.items()))}); chunks "
            f"{chunks}; {loads} loads, 0 reloads of a worker's own model; {differ} of "
            f"{len(tasks)} tasks ran on the worker's gpu, not the address Spark named")
    return out, line


def check_serving(events: list[dict], rows: list[dict], server_log: str, log_text: str,
                  model_label: str) -> tuple[list[str], str]:
    """The serving scenario's facts: run 2's genericizations rows came from the served model
    (``model_label``), the server answered that many chat requests, and the stage ran no model in
    the executors' GPU pool."""
    out = []
    served = [r for r in rows if r.get("model_id") == model_label]
    requests = len(re.findall(r'"POST /v1/chat/completions HTTP/1\.\d" 200', server_log))
    if not served:
        out.append(f"serving: no genericizations row from {model_label}")
    if requests < len(served):
        out.append(f"serving: the server logged {requests} chat requests for {len(served)} rows")
    if not re.search(r"genericize: default scheduling", log_text):
        out.append("serving: genericize did not run with default (CPU) scheduling")
    statuses: dict[str, int] = {}
    for r in served:
        statuses[str(r.get("status"))] = statuses.get(str(r.get("status")), 0) + 1
    line = (f"genericize through the openai backend: {len(served)} rows {statuses} from "
            f"{model_label}, {requests} chat requests answered by vLLM's OpenAI server on the "
            f"worker host; no GPU task, no engine in the executors")
    return out, line


