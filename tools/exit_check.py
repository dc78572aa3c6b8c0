"""make exit-check: read-only finelake commands exit with their own status, every time.

A process that read Delta through ``DeltaTable.to_pyarrow_table()`` used to finish its work and then
die at interpreter exit with SIGABRT (``terminate called without an active exception``, exit 134):
``finelake tables`` 4-7 times in 40-50 runs on the 2-core machine (issue 23 item 9; the cause and
the fix are in :func:`finelake.lake.rs.read_delta`). One run proves nothing, so this runs each
command many times as a real subprocess and counts the runs that did not exit 0.

Commands checked (``--commands NAME[:RUNS],...``; ``--runs`` is the default count):

* ``tables``: ``finelake tables --lake L``
* ``report``: ``finelake report --lake L --out <tmp>``
* ``sql``: ``finelake sql --lake L "SELECT count(*) FROM finelake.pairs"`` (the local engine)
* ``validate``: ``finelake validate --lake L`` (it reads Delta's file statistics and the budget
  ledger through delta-rs: 4 of 6 runs died at exit with SIGSEGV while that read went through
  ``to_pyarrow_dataset()``, 2026-12-07)
* ``read``: a bare ``python -c`` reading every table through ``Lake(L, None).read_arrow`` (the
  reads of ``tables`` and ``report`` without the CLI's start-up: many runs per second of CPU)

Without ``--lake`` a lake is built in a temporary folder: every declared table, ``--rows`` rows in
``--commits`` commits each (several data files per table, as a real lake has), written by delta-rs.

    python tools/exit_check.py                          # CI: tables and report 50 runs each, validate 20
    python tools/exit_check.py --commands read:200      # the bare read, 200 runs
    python tools/exit_check.py --lake /path/to/lake --json exit-check.json

Prints one line per command, ``exit-check <name>: runs=N failures=F seconds=S``, then each failed
run's exit status and last stderr line. Exit status 0 when every run of every command exited 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

READ_SNIPPET = (
    "import sys\n"
    "from finelake.lake import Lake\n"
    "from finelake.tables import ALL_TABLES\n"
    "lake = Lake(sys.argv[1], None)\n"
    "n = sum(lake.read_arrow(t).num_rows for t in ALL_TABLES.values())\n"
    "print(n)\n"
)


def build_lake(root: str, rows: int, commits: int, seed: int = 0) -> str:
    """Every declared table under ``root``: ``rows`` synthetic rows per commit, ``commits`` merges
    each (one data file per commit), through delta-rs. Returns ``root``."""
    import pyarrow as pa

    from finelake.lake import Lake
    from finelake.tables import ALL_TABLES

    lake, rnd = Lake(root, None), random.Random(seed)
    for t in ALL_TABLES.values():
        for c in range(commits):
            cols = {}
            for f in t.schema:
                if pa.types.is_string(f.type):
                    cols[f.name] = pa.array([f"{f.name}-{c}-{i}-" + "x" * rnd.randint(5, 200)
                                             for i in range(rows)])
                elif pa.types.is_integer(f.type):
                    cols[f.name] = pa.array([rnd.randint(1, 5) for _ in range(rows)], f.type)
                elif pa.types.is_floating(f.type):
                    cols[f.name] = pa.array([rnd.random() for _ in range(rows)], f.type)
                elif pa.types.is_boolean(f.type):
                    cols[f.name] = pa.array([rnd.random() < 0.5 for _ in range(rows)])
            lake.merge(t, pa.table(cols), f"exit-check-{c}")
    return root


def command(name: str, lake: str, work: str) -> list[str]:
    """The argv of one run of ``name``."""
    cli = [sys.executable, "-m", "finelake.cli"]
    if name == "tables":
        return cli + ["tables", "--lake", lake]
    if name == "report":
        return cli + ["report", "--lake", lake, "--out", os.path.join(work, "report")]
    if name == "sql":
        return cli + ["sql", "--lake", lake, "--engine", "local", "SELECT count(*) FROM finelake.pairs"]
    if name == "validate":
        return cli + ["validate", "--lake", lake]
    if name == "read":
        return [sys.executable, "-c", READ_SNIPPET, lake]
    raise SystemExit(f"unknown command {name!r} (tables, report, sql, validate, read)")


def check(name: str, runs: int, lake: str, work: str, timeout_s: float) -> dict:
    """Run ``name`` ``runs`` times; the figures and every failed run."""
    argv, failed, t0 = command(name, lake, work), [], time.perf_counter()
    for i in range(1, runs + 1):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired as exc:
            rc, err = "timeout", str(exc)
        if rc != 0:
            last = (err.strip().splitlines() or [""])[-1][:300]
            sig = signal.Signals(-rc).name if isinstance(rc, int) and rc < 0 else ""
            failed.append({"run": i, "exit": rc, "signal": sig, "stderr": last})
    secs = time.perf_counter() - t0
    return {"command": name, "runs": runs, "failures": len(failed), "seconds": round(secs, 1),
            "seconds_per_run": round(secs / max(1, runs), 2), "failed": failed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50, help="runs per command (default 50)")
    ap.add_argument("--commands", default="tables,report,validate:20",
                    help="NAME[:RUNS],... of tables, report, sql, validate, read (default "
                         "tables,report,validate:20)")
    ap.add_argument("--lake", default=None, help="an existing lake (default: build one)")
    ap.add_argument("--rows", type=int, default=500, help="rows per commit of a built lake")
    ap.add_argument("--commits", type=int, default=4, help="commits per table of a built lake")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one run may take")
    ap.add_argument("--json", default=None, help="write the figures here too")
    a = ap.parse_args(argv)

    plan = []
    for item in filter(None, (s.strip() for s in a.commands.split(","))):
        name, _, n = item.partition(":")
        plan.append((name, int(n) if n else a.runs))
    with tempfile.TemporaryDirectory(prefix="finelake-exit-check-") as work:
        lake = a.lake
        if lake is None:
            t0 = time.perf_counter()
            lake = build_lake(os.path.join(work, "lake"), a.rows, a.commits)
            print(f"exit-check: built a lake of every table, {a.commits} x {a.rows} rows each, in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        results = []
        for name, n in plan:
            r = check(name, n, lake, work, a.timeout)
            results.append(r)
            print(f"exit-check {name}: runs={r['runs']} failures={r['failures']} "
                  f"seconds={r['seconds']} ({r['seconds_per_run']} s/run)", flush=True)
            for f in r["failed"]:
                print(f"  run {f['run']}: exit {f['exit']}{' ' + f['signal'] if f['signal'] else ''}: "
                      f"{f['stderr']}", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"results": results, "load": os.getloadavg()}, fh, indent=2)
    bad = sum(r["failures"] for r in results)
    total = sum(r["runs"] for r in results)
    print(f"exit-check {'passed' if not bad else 'FAILED'}: {bad} non-zero exits in {total} runs "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
