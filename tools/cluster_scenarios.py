"""The cluster behaviours of issue 24 that ``make cluster-test`` (tools/cluster.py) reproduces on its
standalone cluster, and their checks. Each scenario prints ``scenario <name>: ok <figures>`` or
fails the test with what went wrong:

* ``idle-gap``: run 1's driver pauses between two judge chunks (``FINELAKE_PAUSE_AT``) longer
  than Spark's idle-worker timeout; :class:`EngineWatch` reads the process table every second.
  Spark must stop the idle model workers, no vLLM engine process may outlive its worker, and the
  next chunk loads the judge again and finishes.
* ``engine-kill``: :class:`EngineKiller` SIGKILLs the engine-core process of the worker that
  starts run 2's first judge call, a second into it. That call's rows end ``retry``, the engine is
  evicted, the worker loads a new one, and a rerun (judge and budget) gives the same ``pairs`` as
  run 1, which was not interrupted.
* ``multi-gpu``: a third worker advertising two GPUs runs genericize and judge (the synthetic
  ``load`` backends) in three or more chunks each with executor GPU amount 2, task amount 1:
  every Python worker keeps one GPU for life, never shares it, and loads each model once.
* ``dynamic-allocation``: ``finelake validate`` and ``spark-submit bin/finelake_job.py run`` with
  dynamic allocation (and shuffle tracking) on are refused, naming the setting, before any stage.
* ``serving``: run 2's genericize goes through the ``openai`` backend to vLLM's OpenAI-compatible
  server started on the worker host.

Their checks are pure functions in tools/cluster_checks.py; this module holds what acts on the
cluster: the process-table watch, the engine killer, the scenario profiles, the vLLM server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

SLICE = dict(queries=200, documents=40)
"""Lines of the shipped sample that every run ingests."""
PAUSE_S = 80
"""run 1's pause between judge chunks: past the idle timeout and the monitor's 10 s tick."""
JUDGE_SETS = ["--set", "judge.chunk_rows=3", "--set", "models.judge.batch_size=1"]
"""Judge chunks of ~3 pairs (two chunks for the pause and the kill), the same in every run so
the rerun's batches equal the uninterrupted run's."""
SCENARIOS = ("idle-gap", "engine-kill", "multi-gpu", "dynamic-allocation", "serving")


# ----------------------------------------------------------------------------- runs and lakes


def sample_slice(workdir: Path) -> tuple[Path, Path]:
    """The first lines of the shipped sample (:data:`SLICE`) as JSONL files in ``workdir``, so
    that ingest (which reads every input row) stays short; both runs ingest these."""
    out = []
    for name, n in (("queries", SLICE["queries"]), ("documents", SLICE["documents"])):
        src = Path(__file__).resolve().parent.parent / "sample" / f"{name}.jsonl"
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        dst = workdir / f"{name}.jsonl"
        dst.write_text("".join(lines), encoding="utf-8")
        out.append(dst)
    return out[0], out[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(cmd: list[str], log_path: Path, env: dict, on_line=None, show=True) -> int:
    """Run ``cmd`` with its output shown (``show``) and saved to ``log_path``; ``on_line(line)``
    sees each line as it comes; its exit status."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=Path(__file__).resolve().parent.parent)
        for line in p.stdout:
            log.write(line)
            log.flush()
            if on_line is not None:
                on_line(line)
            if show and not line.startswith(("WARNING", "INFO", "(EngineCore", "(Worker",
                                              "(MainProcess", "(APIServer")):
                sys.stdout.write(line)
        return p.wait()


def copy_lake(src: Path, dst: Path) -> None:
    """``dst``: a copy of the lake ``src`` without the judge's and budget's tables (what a rerun of
    judge and budget rebuilds); taken while no job writes to ``src``."""
    shutil.copytree(src, dst, ignore=lambda d, names: [
        n for n in names if Path(d) == src and n in ("judgments", "pairs", "budget_ledger")])


# ----------------------------------------------------------------------------- processes


def process_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, command line, session id) of every live (non-zombie) process, from
    ``/proc``."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="utf-8", errors="replace") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            if rest[0] in ("Z", "X"):
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            out[int(d)] = (int(rest[1]), cmd, int(rest[3]))
        except (OSError, IndexError, ValueError):
            pass
    return out


def engine_processes(table: dict, sessions: set[int]) -> dict[int, tuple]:
    """The vLLM engine processes (title ``VLLM::...``) of a process table that belong to
    ``sessions`` (the cluster's workers each lead one: other users' engines are left out)."""
    return {p: v for p, v in table.items() if v[1].startswith("VLLM::") and v[2] in sessions}


class EngineWatch(threading.Thread):
    """Reads the process table each second until stopped: every vLLM engine process of the
    cluster's ``sessions``, the parent it had when first seen, and how long it lived after that
    parent was gone (an orphan)."""

    def __init__(self, sessions: set[int], period: float = 1.0):
        super().__init__(daemon=True)
        self.sessions, self.period, self._halt = sessions, period, threading.Event()
        self.parent: dict[int, int] = {}
        self.title: dict[int, str] = {}
        self.orphaned: dict[int, list[float]] = {}  # pid -> [first, last] time seen orphaned
        self.alive_at_end: dict[int, tuple[int, str]] = {}
        self.last_table: dict[int, tuple[int, str]] = {}

    def run(self) -> None:
        while True:
            table, now = process_table(), time.time()
            for pid, (ppid, cmd, _) in engine_processes(table, self.sessions).items():
                self.parent.setdefault(pid, ppid)
                self.title.setdefault(pid, cmd.split()[0])
                if self.parent[pid] not in table:
                    self.orphaned.setdefault(pid, [now, now])[1] = now
            self.last_table = table
            if self._halt.wait(self.period):
                break
        self.alive_at_end = engine_processes(process_table(), self.sessions)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def report(self, grace_s: float = 10.0) -> tuple[list[str], dict]:
        """Failures: an engine that outlived its parent by more than ``grace_s`` or still ran
        without it when the watch stopped; facts: engines seen, orphans, longest orphan life."""
        out = []
        lives = {p: round(last - first, 1) for p, (first, last) in self.orphaned.items()}
        stuck = [p for p in self.orphaned if p in self.alive_at_end]
        long = {p: s for p, s in lives.items() if s > grace_s}
        if long or stuck:
            out.append(f"vLLM engine processes outlived their Python worker: "
                       f"{ {p: (self.title[p], lives[p]) for p in set(long) | set(stuck)} }")
        return out, {"engines_seen": len(self.parent), "outlived_parent": len(lives),
                     "longest_orphan_s": max(lives.values(), default=0.0)}


class EngineKiller(threading.Thread):
    """SIGKILLs the engine core of the Python worker that starts the first ``kind`` model call
    logged at or after ``since`` (Unix time), ``delay`` seconds into that call."""

    def __init__(self, load_log: Path, since: float, kind: str = "judge", delay: float = 1.0,
                 timeout: float = 1800.0):
        super().__init__(daemon=True)
        self.load_log, self.since, self.kind = load_log, since, kind
        self.delay, self.timeout, self._halt = delay, timeout, threading.Event()
        self.killed: dict = {}

    def run(self) -> None:
        end, offset = time.monotonic() + self.timeout, 0
        while time.monotonic() < end and not self._halt.is_set():
            if self.load_log.exists():
                with open(self.load_log, encoding="utf-8") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk.encode("utf-8"))
                for line in chunk.splitlines():
                    e = json.loads(line) if line.strip() else {}
                    if (e.get("event") == "call_start" and e.get("kind") == self.kind
                            and e.get("t", 0) >= self.since):
                        time.sleep(self.delay)
                        cores = [p for p, (pp, cmd, _) in process_table().items()
                                 if pp == e["pid"] and cmd.startswith("VLLM::EngineCore")]
                        for core in cores:
                            os.kill(core, signal.SIGKILL)
                        self.killed = {"pid": e["pid"], "cores": cores, "t_call": e["t"],
                                       "t_kill": time.time(), "executor": e["executor"],
                                       "prompts": e.get("prompts")}
                        return
            time.sleep(0.2)

    def stop(self) -> None:
        self._halt.set()


# ----------------------------------------------------------------------------- profiles


def write_profile(path: Path, base: str, edit) -> Path:
    """``base`` resolved (``finelake validate --print``), changed by ``edit(dict)``, written to
    ``path`` as a standalone profile (no ``extends``: a model's options are replaced whole)."""
    import yaml

    from finelake.config import load_config
    from finelake.validate import resolved_yaml

    data = yaml.safe_load(resolved_yaml(load_config(base)))
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def serving_profile(path: Path, base_url: str) -> Path:
    def edit(d):
        d["genericize"]["model"] = {
            "backend": "openai", "model": "smollm2", "batch_size": 64, "max_tokens": 96,
            "temperature": 0.0,
            "options": {"base_url": base_url, "provider": "vllm", "concurrency": 4,
                        "max_retries": 2}}
    return write_profile(path, "cluster-sim", edit)


def multi_gpu_profile(path: Path) -> Path:
    def edit(d):
        d["load_test"] = True
        d["spark"]["conf"].update({"spark.executor.resource.gpu.amount": "2",
                                   "spark.task.resource.gpu.amount": "1",
                                   "spark.executor.cores": "2", "spark.cores.max": "2"})
        d["genericize"]["model"] = {"backend": "load", "model": "load", "batch_size": 8,
                                    "max_tokens": 96, "options": {"null_rate": 0.0}}
        d["genericize"]["chunk_rows"] = 40   # 120 queries in scope: 4 chunks
        d["models"]["judge"] = {"backend": "llm", "model": "load", "batch_size": 1,
                                "max_tokens": 64, "options": {"inner_backend": "load",
                                                              "format": "json"}}
        d["judge"]["chunk_rows"] = 2         # ~6 pairs: 4 chunks
    return write_profile(path, "cluster-sim", edit)


def dynamic_profile(path: Path) -> Path:
    def edit(d):
        d["spark"]["conf"].update({"spark.dynamicAllocation.enabled": "true",
                                   "spark.dynamicAllocation.shuffleTracking.enabled": "true"})
    return write_profile(path, "cluster-sim", edit)


# ----------------------------------------------------------------------------- dynamic allocation


def dynamic_allocation(wd: Path, scratch: Path, submit: list[str], env: dict,
                       submit_env: dict) -> tuple[list[str], str]:
    """``finelake validate`` on the cluster profile with dynamic allocation and shuffle tracking
    on, then ``submit`` (spark-submit of bin/finelake_job.py run with those settings, lake ``scratch``):
    both must exit non-zero naming ``spark.dynamicAllocation.enabled``, the run before writing
    any table, and neither may hang (timeouts: 5 and 10 minutes)."""
    prof = dynamic_profile(wd / "dynamic.yaml")
    v = subprocess.run([str(Path(sys.executable).parent / "finelake"), "validate", "--conf",
                        str(prof)], capture_output=True, text=True, timeout=300, env=env)
    t0 = time.monotonic()
    try:
        r = subprocess.run(submit, capture_output=True, text=True, timeout=600, env=submit_env)
        out, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired:
        out, rc = "", "timeout"
    secs = time.monotonic() - t0
    (wd / "dynamic.log").write_text(v.stdout + v.stderr + "\n----\n" + out)
    tables = sorted(d.parent.name for d in scratch.glob("*/_delta_log"))
    bad = []
    if v.returncode == 0 or "spark.dynamicAllocation.enabled" not in v.stdout + v.stderr:
        bad.append(f"dynamic-allocation: finelake validate exited {v.returncode} without naming "
                   "spark.dynamicAllocation.enabled")
    if rc in (0, "timeout") or "spark.dynamicAllocation.enabled" not in out or tables:
        bad.append(f"dynamic-allocation: spark-submit bin/finelake_job.py run exited {rc} after "
                   f"{secs:.0f} s, tables written {tables} (must be refused before any stage, "
                   "naming the setting)")
    return bad, (f"refused by finelake validate (exit {v.returncode}) and by spark-submit "
                 f"bin/finelake_job.py run before ingest (exit {rc} in {secs:.0f} s, no table written), "
                 "both naming spark.dynamicAllocation.enabled")


# ----------------------------------------------------------------------------- vLLM server


def start_server(port: int, log: Path) -> subprocess.Popen:
    """vLLM's OpenAI-compatible server (what ``vllm serve`` runs) for SmolLM2-135M on 127.0.0.1,
    as tests/test_openai_vllm_server.py starts it."""
    from finelake.models.resolve import hf_path

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", hf_path("embedded:smollm2-135m-instruct"), "--served-model-name", "smollm2",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "2048", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.15",
           "--kv-cache-memory-bytes", "268435456"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", VLLM_REGEX_COMPILATION_TIMEOUT_S="120")
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def wait_server(proc: subprocess.Popen, port: int, timeout: float = 900) -> Optional[float]:
    """Seconds until ``/v1/models`` answered (None: the server exited or never answered)."""
    import urllib.request

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(2)
    return None


def stop_process_group(proc: Optional[subprocess.Popen], timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
