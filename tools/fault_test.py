"""make fault-test: kill the pipeline with SIGKILL at seeded points in every stage, inject transient
backend errors, rerun until done, and check the result equals an uninterrupted run's.

Both lakes use the load-test profile (the synthetic ``load`` backends: cheap, deterministic, with
fault injection) on the first ``--queries`` queries and ``--documents`` documents of the shipped
sample, with small model batches and chunks so every model stage commits several chunks.

1. **Reference**: one ``finelake run`` into ``<work>/ref``, no faults. It must finish in one run.
2. **Faulted**: ``finelake run`` into ``<work>/killed`` again and again, each run with

   * transient errors injected by the load generator and the load judge's generator:
     ``error_rate`` of the requests fail (HTTP 429 / timeout, as the openai SDK words them) and
     ``engine_error_rate`` of the model calls raise ``LoadEngineDeadError`` (the worker's model is
     evicted and reloaded); the injection seed changes per run, as a real fault would not repeat;
   * at most one kill from the plan, a real SIGKILL: ``FINELAKE_KILL_AT=<stage>:<n>`` makes the
     driver kill itself at :func:`finelake.jobs.common.fail_point` (after the n-th committed chunk
     of genericize / match / instantiate / judge, between budget's ledger and ``pairs`` writes), or a seeded delay after a stage's summary line
     kills the whole process group (driver, JVM, Python workers) in the stage that follows
     (index, match, instantiate, judge, budget);

   until the plan is spent and a run completes (``finelake run`` stops before index / budget while
   rows are left to retry, :mod:`finelake.jobs.gates`).
3. **Checks**: ``pairs`` and ``budget_ledger`` equal the reference's exactly (all columns but
   ``run_id``); genericizations, templates, matches, match_log, instantiations and judgments equal
   it too (less lineage: ``run_id``, ``attempts``, ``index_version``; floats to 1e-9); no row
   lost: every query in scope has a final genericization, every match a final instantiation,
   every ok instantiation a final judgment, every ``error`` row a quarantine row, every matched
   document a ledger row, and ``pairs`` holds exactly the ledger's kept ids.

Figures: runs, kills (and in which stage they landed), rows retried, failed tries committed,
model evictions (engine errors seen, from ``$FINELAKE_LOAD_LOG``), seconds.

    python tools/fault_test.py --short            # CI: 6 kill points, 24 queries, 8 documents
    python tools/fault_test.py                    # 13 kill points, 80 queries, 24 documents
    python tools/fault_test.py --json out.json    # the figures as JSON too

Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FINELAKE = [str(Path(sys.executable).parent / "finelake")]

SHORT_PLAN = [("at", "genericize:1"), ("after", "[genericize]", "index"), ("at", "match:1"),
              ("at", "instantiate:1"), ("at", "judge:1"), ("at", "budget:1")]
FULL_PLAN = [("at", "genericize:1"), ("at", "genericize:2"), ("after", "[genericize]", "index"),
             ("after", "[index]", "match"), ("at", "match:1"), ("at", "instantiate:1"),
             ("after", "[match]", "instantiate"), ("at", "instantiate:3"), ("at", "judge:1"),
             ("after", "[instantiate]", "judge"), ("at", "judge:2"), ("at", "budget:1"),
             ("after", "[judge]", "budget")]
STAGES = ("ingest", "genericize", "index", "match", "instantiate", "judge", "budget")
LINEAGE = {"run_id", "attempts", "index_version"}


def _sample_slice(name: str, n: int, out: Path) -> str:
    from importlib import resources

    rows = resources.files("finelake.sample").joinpath(name).read_text(encoding="utf-8").split("\n")
    path = out / name
    path.write_text("\n".join(r for r in rows[:n] if r.strip()) + "\n", encoding="utf-8")
    return str(path)


def _settings(args, database: str) -> list[str]:
    """Profile overrides both lakes share (plus the catalog database, one per lake)."""
    s = [f"catalog.database={database}",
         "models.generator.batch_size=4", "models.judge.batch_size=4",
         f"genericize.chunk_rows={args.chunk_rows}",
         f"instantiate.chunk_documents={max(1, args.documents // (2 if args.short else 4))}",
         f"judge.chunk_rows={args.chunk_rows}",
         # match in two or more chunks as well (the embedder's batch raises the chunk size)
         "models.embedder.batch_size=2",
         f"match.chunk_documents={max(1, args.documents // (2 if args.short else 4))}",
         # about 4 templates per topic, so each document clears the threshold against a few
         f"models.embedder.options.topics={max(2, args.queries // 5)}"]
    for stage in ("genericize", "instantiate", "judge"):
        s.append(f"{stage}.max_attempts={args.max_attempts}")
    return s


def _faults(args, run: int) -> list[str]:
    out = []
    for m in ("generator", "judge"):
        out += [f"models.{m}.options.error_rate={args.error_rate}",
                f"models.{m}.options.engine_error_rate={args.engine_error_rate}",
                f"models.{m}.options.seed={args.seed * 1000 + run}"]
    return out


class Run:
    """One ``finelake run`` subprocess in its own process group, its output streamed to a log;
    optionally killed (SIGKILL to the group) ``delay`` seconds after a line starting with
    ``trigger`` appears."""

    def __init__(self, cmd: list[str], env: dict, log: Path, trigger=None, delay=0.0):
        self.lines: list[str] = []
        self.killed_by_timer = False
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(log.parent), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.trigger, self.delay = trigger, delay
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        with open(self.log, "w", encoding="utf-8") as f:
            for line in self.proc.stdout:
                f.write(line)
                f.flush()
                self.lines.append(line.rstrip("\n"))
                if self.trigger and line.startswith(self.trigger):
                    threading.Timer(self.delay, self._kill).start()
                    self.trigger = None

    def _kill(self):
        if self.proc.poll() is None:
            self.killed_by_timer = True
            self._killpg()

    def _killpg(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this tool started
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._killpg()
            rc = self.proc.wait()
            self.lines.append(f"fault_test: run exceeded {timeout:.0f}s")
        self._killpg()  # leftovers of a driver that killed itself (JVM, Python workers)
        self._reader.join(timeout=10)
        return rc

    @property
    def last_stage(self) -> str:
        """The stage running when the process ended: the one after the last summary line."""
        done = [ln[1:].split("]")[0].split(":")[0] for ln in self.lines
                if ln.startswith("[") and "]" in ln]
        done = [d for d in done if d in STAGES]
        if not done:
            return "genericize"  # the runs start after ingest (run_stages)
        i = STAGES.index(done[-1])
        return STAGES[i + 1] if i + 1 < len(STAGES) else "report"

    @property
    def complete(self) -> bool:
        return any(ln.startswith("[budget]") for ln in self.lines) and not any(
            ln.startswith("[run] stopped") for ln in self.lines)


def _run_cmd(lake: Path, settings: list[str], args) -> list[str]:
    """The stages of ``finelake run`` after ingest (:func:`finelake.jobs.pipeline.run_stages`,
    gates included) in a child process: the inputs are ingested once, not once per run."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(lake),
           "--queries", str(args.queries), "--documents", str(args.documents)]
    for s in settings:
        cmd += ["--set", s]
    return cmd


def child(lake: str, settings: list[str], queries: int, documents: int) -> int:
    """One faulted (or reference) run: what ``finelake run`` does after ingest."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from finelake.jobs.pipeline import run_stages
    from finelake.runtime import StageContext
    from finelake.stage import Limits

    from finelake.validate import load_checked

    ctx = StageContext(load_checked("load-test", settings, lake=lake))
    ctx.spark.sparkContext.setLogLevel("ERROR")
    run_stages(ctx, [], Limits(max_queries=queries, max_documents=documents))
    return 0


def _table(lake: Path, name: str):
    # finelake.lake.read_delta, not DeltaTable.to_pyarrow_table(): the latter's Arrow threads can
    # abort the process at interpreter exit (issue 23 item 9).
    from finelake.lake import read_delta

    p = lake / name
    if not (p / "_delta_log").is_dir():
        return []
    return read_delta(str(p)).to_pylist()


def _canon(rows, drop=LINEAGE, ndigits=None):
    def norm(v):
        if isinstance(v, float) and ndigits is not None:
            return round(v, ndigits)
        if isinstance(v, list):
            return tuple(v)
        return v

    # Sorted by repr: a column may hold None in one row and a string in another.
    return sorted((tuple(sorted((k, norm(v)) for k, v in r.items() if k not in drop)) for r in rows),
                  key=repr)


def check(ref: Path, lake: Path) -> list[str]:
    """Every failed check, in words (empty: all hold)."""
    bad = []
    for name in ("pairs", "budget_ledger"):
        a, b = _canon(_table(ref, name), {"run_id"}), _canon(_table(lake, name), {"run_id"})
        if a != b or not a:
            bad.append(f"{name}: {len(b)} rows differ from the reference's {len(a)}"
                       + (" (both empty)" if not a else ""))
    for name in ("genericizations", "templates", "matches", "match_log", "instantiations",
                 "judgments", "quarantine"):
        a, b = _canon(_table(ref, name), ndigits=9), _canon(_table(lake, name), ndigits=9)
        if a != b:
            bad.append(f"{name}: {len(b)} rows, reference {len(a)}: "
                       f"{len(set(a) - set(b))} missing, {len(set(b) - set(a))} extra")
    gen = _table(lake, "genericizations")
    inst = {r["pair_key"]: r for r in _table(lake, "instantiations")}
    judg = {r["pair_key"]: r for r in _table(lake, "judgments")}
    quar = {(r["target"], r["row_key"]) for r in _table(lake, "quarantine")}
    ledger = {r["doc_id"]: r for r in _table(lake, "budget_ledger")}
    pairs = {r["pair_id"] for r in _table(lake, "pairs")}
    from finelake.jobs.common import stable_hash

    if any(r["status"] == "retry" for r in [*gen, *inst.values(), *judg.values()]):
        bad.append("rows left with status retry")
    for m in _table(lake, "matches"):
        k = stable_hash(m["doc_id"], m["template_id"], n=20)
        if k not in inst:
            bad.append(f"match {k} has no instantiation")
    for k, r in inst.items():
        if r["status"] == "ok" and k not in judg:
            bad.append(f"ok instantiation {k} has no judgment")
    for t, rows in (("genericizations", [(r["query_id"], r) for r in gen]),
                    ("instantiations", inst.items()), ("judgments", judg.items())):
        for k, r in rows:
            if r["status"] == "error" and (t, k) not in quar:
                bad.append(f"{t} error row {k} not quarantined")
    for r in _table(lake, "match_log"):
        if r["doc_id"] not in ledger:
            bad.append(f"document {r['doc_id']} matched but not in budget_ledger")
    kept = {k for r in ledger.values() for k in (r["kept_pair_ids"] or [])}
    if kept != pairs:
        bad.append(f"pairs ({len(pairs)}) != the ledger's kept ids ({len(kept)})")
    return bad[:20]


def _figures(lake: Path, load_log: Path) -> dict:
    retried = failed = 0
    for name in ("genericizations", "instantiations", "judgments"):
        for r in _table(lake, name):
            a = r.get("attempts") or 1
            if a > 1:
                retried += 1
            failed += a - 1 + (1 if r["status"] == "error" and "gave up" in (r.get("reason") or r.get("judge_reason") or "") else 0)
    evictions = 0
    if load_log.exists():
        for line in load_log.read_text().splitlines():
            rec = json.loads(line)
            evictions += rec.get("event") == "evict" and "Dead" in str(rec.get("reason", ""))
    return {"rows_retried": retried, "failed_tries_committed": failed,
            "engine_errors_evicted": evictions}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="CI: 6 kill points, 24 queries, 8 documents.")
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--documents", type=int, default=None)
    ap.add_argument("--error-rate", type=float, default=0.1)
    ap.add_argument("--engine-error-rate", type=float, default=0.05)
    ap.add_argument("--max-attempts", type=int, default=10,
                    help="Per model stage; high enough that a row out of attempts is improbable "
                         "at these rates (0.1^10), so the outputs can equal the reference's.")
    ap.add_argument("--chunk-rows", type=int, default=None,
                    help="genericize.chunk_rows and judge.chunk_rows (default: a half (--short) or "
                         "a quarter of the queries, so each model stage commits several chunks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-runs", type=int, default=40)
    ap.add_argument("--run-timeout", type=float, default=900)
    ap.add_argument("--work", default=str(ROOT / "fault-test"))
    ap.add_argument("--json", default=None, help="Also write the figures here.")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--set", dest="sets", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.sets, args.queries, args.documents)
    args.queries = args.queries or (24 if args.short else 80)
    args.documents = args.documents or (8 if args.short else 24)
    args.chunk_rows = args.chunk_rows or max(1, args.queries // (2 if args.short else 4))
    plan = list(SHORT_PLAN if args.short else FULL_PLAN)
    rng = random.Random(args.seed)

    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "inputs").mkdir(parents=True)
    q = _sample_slice("queries.jsonl", args.queries, work / "inputs")
    d = _sample_slice("documents.jsonl", args.documents, work / "inputs")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FINELAKE_KILL_AT", None)
    env.pop("FINELAKE_FAIL_AFTER", None)
    t0 = time.monotonic()

    # 0. ingest once; the faulted lake starts as a copy of the ingested one
    ref, lake = work / "ref", work / "killed"
    print(f"fault-test: ingest ({args.queries} queries, {args.documents} documents)", flush=True)
    cmd = [*FINELAKE, "ingest", "--conf", "load-test", "--lake", str(ref), "--queries", q,
           "--documents", d, "--set", "catalog.database=fault_ref"]
    r = Run(cmd, env, work / "ingest.log")
    if r.wait(args.run_timeout) != 0:
        print("fault-test: ingest failed:\n" + "\n".join(r.lines[-15:]), flush=True)
        return 1
    shutil.copytree(ref, lake)

    # 1. the reference: no faults, one run
    print("fault-test: reference run", flush=True)
    r = Run(_run_cmd(ref, _settings(args, "fault_ref"), args), env, work / "ref.log")
    rc = r.wait(args.run_timeout)
    t_ref = time.monotonic() - t0
    if rc != 0 or not r.complete:
        print(f"fault-test: the reference run failed (rc {rc}); see {work / 'ref.log'}:\n"
              + "\n".join(r.lines[-15:]), flush=True)
        return 1
    print(f"fault-test: reference done in {t_ref:.0f}s", flush=True)

    # 2. the faulted lake: kills from the plan, transient errors every run, rerun until done
    load_log = work / "load-events.jsonl"
    runs, kills, not_reached, t1 = 0, [], [], time.monotonic()
    while runs < args.max_runs:
        item = plan[0] if plan else None
        run_env = {**env, "FINELAKE_LOAD_LOG": str(load_log)}
        trigger, delay = None, 0.0
        if item and item[0] == "at":
            run_env["FINELAKE_KILL_AT"] = item[1]
        elif item:
            trigger, delay = item[1], round(rng.uniform(0.5, 4.0), 2)
        settings = _settings(args, "fault_killed") + _faults(args, runs)
        runs += 1
        r = Run(_run_cmd(lake, settings, args), run_env, work / f"run{runs:02d}.log",
                trigger, delay)
        rc = r.wait(args.run_timeout)
        what = (f"FINELAKE_KILL_AT={item[1]}" if item and item[0] == "at" else
                f"kill {delay}s after {item[1]}" if item else "no kill")
        if rc == -signal.SIGKILL:
            kills.append({"run": runs, "plan": what, "stage": r.last_stage})
            print(f"fault-test: run {runs} ({what}): SIGKILL in {r.last_stage}", flush=True)
            plan.pop(0)
            continue
        if rc != 0:
            print(f"fault-test: run {runs} ({what}) failed with rc {rc}; see {r.log}:\n"
                  + "\n".join(r.lines[-15:]), flush=True)
            return 1
        stopped = [ln for ln in r.lines if ln.startswith("[run] stopped")]
        print(f"fault-test: run {runs} ({what}): "
              + (stopped[0] if stopped else "complete" if r.complete else "ended"), flush=True)
        passed = item and (r.complete or (
            item[0] == "at" and any(ln.startswith(f"[{item[1].split(':')[0]}]") for ln in r.lines))
            or (item[0] == "after" and any(ln.startswith(item[1]) for ln in r.lines)))
        if passed:  # the run went past the point without reaching it: note it, go on
            not_reached.append(what)
            plan.pop(0)
        if r.complete and not plan:
            break
    else:
        print(f"fault-test: not done after {args.max_runs} runs", flush=True)
        return 1
    t_faulted = time.monotonic() - t1

    bad = check(ref, lake)
    figures = {"queries": args.queries, "documents": args.documents,
               "error_rate": args.error_rate, "engine_error_rate": args.engine_error_rate,
               "max_attempts": args.max_attempts, "runs": runs, "kills": len(kills),
               "kill_stages": sorted({k["stage"] for k in kills}), "kill_points": kills,
               "not_reached": not_reached, **_figures(lake, load_log),
               "pairs": len(_table(lake, "pairs")),
               "budget_ledger_rows": len(_table(lake, "budget_ledger")),
               "seconds_reference": round(t_ref), "seconds_faulted": round(t_faulted),
               "seconds_total": round(time.monotonic() - t0), "ok": not bad, "failures": bad}
    print("fault-test figures: " + json.dumps({k: v for k, v in figures.items()
                                               if k != "kill_points"}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    if bad:
        print("fault-test FAILED:\n  " + "\n  ".join(bad), flush=True)
        return 1
    print(f"fault-test passed: {runs} runs, {len(kills)} SIGKILLs in "
          f"{', '.join(figures['kill_stages'])}; pairs ({figures['pairs']}) and budget_ledger "
          f"({figures['budget_ledger_rows']}) equal the uninterrupted run's", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
