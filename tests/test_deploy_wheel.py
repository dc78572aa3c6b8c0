"""The wheel alone runs a stage under spark-submit.

The wheel is built with ``python -m build``; ``deploy/emr/bootstrap.sh`` (the EMR bootstrap action)
installs it, with nothing but its declared requirements, into a fresh virtualenv and writes the
launcher; the ingest step that :func:`finelake.deploy.emr_steps` generates is then run as is, with
``--master local[2]`` and this machine's Delta jars in place of YARN and EMR's; the interpreter is the
one the step's ``spark.pyspark.python`` settings name. pyspark is not in
that virtualenv (as on a cluster): spark-submit puts its own pyspark and py4j on the driver's and the
executors' PYTHONPATH, and the Delta Python API comes from the delta-spark jar on ``--py-files``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finelake import deploy
from finelake.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "wheel-only-test"


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``; on a non-zero exit fail with the end of its output."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert res.returncode == 0, f"{cmd[:2]} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _main_venv_tools():
    """spark-submit and SPARK_HOME of this environment's pyspark, the Delta jars `make setup`
    fetched, and a tokenizer folder (tokenizer.json) to count tokens with."""
    import pyspark

    from finelake import delta_jars
    from finelake.models.resolve import ModelNotFound, embedded_file

    jars = delta_jars.installed_jars()
    if not jars:
        pytest.skip("no Delta jars: run `finelake delta-jars` (make setup does)")
    try:
        tok = embedded_file("embedded:all-minilm-l6-v2")
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    spark_home = Path(pyspark.__file__).parent
    return spark_home, Path(sys.executable).parent / "spark-submit", jars, tok


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_alone_runs_the_emr_ingest_step_under_spark_submit(tmp_path):
    spark_home, spark_submit, jars, tok = _main_venv_tools()

    # 1. the wheel
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, ROOT])
    (wheel,) = dist.glob("finelake-*.whl")

    # 2. the EMR bootstrap action, into a temporary home: a fresh virtualenv with the wheel and
    #    its install_requires only (extras ""), and the launcher
    home = tmp_path / "finelake"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "VIRTUAL_ENV")}
    # --no-yarn-gpu: no cgroup mount (an EMR node's YARN GPU isolation) on this machine
    _run(["bash", ROOT / "deploy" / "emr" / "bootstrap.sh", "--no-yarn-gpu", wheel, ""],
         env={**env, "FINELAKE_HOME": str(home), "FINELAKE_PYTHON": sys.executable,
              "PIP_NO_COMPILE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, cwd=tmp_path)
    python = home / "venv" / "bin" / "python"
    launcher = home / Path(deploy.EMR_LAUNCHER).name
    probe = _run([python, "-I", "-c", "import importlib.util as u, finelake; "
                                "print(finelake.__file__); print(u.find_spec('pyspark') is None)"],
                 env=env, cwd=tmp_path).stdout.split()
    assert probe[0].startswith(str(home / "venv")), "finelake must come from the wheel"
    assert probe[1] == "True", "pyspark is not installed in the wheel's virtualenv"

    # 3. a tiny input
    docs = tmp_path / "documents.jsonl"
    lines = (ROOT / "sample" / "documents.jsonl").read_text(encoding="utf-8").splitlines()[:12]
    docs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    lake = tmp_path / "lake"

    # 4. the ingest step as emr_steps writes it, with local stand-ins for YARN and EMR's paths
    overrides = [f"tokenizer.model={tok}", "spark.delta=delta-spark"]
    cfg = load_config("local", overrides, lake=str(lake))
    (step,) = deploy.emr_steps(cfg, profile="local", run_id=RUN_ID, tasks=["ingest"],
                               lake=str(lake), overrides=overrides, documents=str(docs),
                               python=str(python), launcher=str(launcher), delta_jars=jars,
                               master="local[2]",
                               executor_env={"HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "0"})
    args = step["HadoopJarStep"]["Args"]
    assert args[0] == "spark-submit"
    # No PYSPARK_PYTHON / PYSPARK_DRIVER_PYTHON: the step's own spark.pyspark.* settings must pick
    # the wheel's virtualenv (any other python3 here has no finelake and would fail the step).
    run_env = {**env, "SPARK_HOME": str(spark_home)}
    res = _run([spark_submit, *args[1:]], env=run_env, cwd=tmp_path, timeout=540)

    # 5. what it wrote: the summary line's count is the Delta table's, written by Spark's Delta
    #    (the jars), with the run id on every row and in the commit
    m = re.search(r"^\[ingest:documents\] in=(\d+) out=(\d+)", res.stdout, re.M)
    assert m, res.stdout[-2000:]
    assert int(m.group(1)) == len(lines)
    from deltalake import DeltaTable

    table = DeltaTable(str(lake / "documents"))
    rows = table.to_pyarrow_table(columns=["doc_id", "num_tokens", "run_id"]).to_pylist()
    assert len(rows) == int(m.group(2)) > 0
    assert {r["run_id"] for r in rows} == {RUN_ID}
    assert all(r["num_tokens"] > 0 for r in rows)
    commits = [json.loads(line) for f in sorted((lake / "documents" / "_delta_log").glob("*.json"))
               for line in f.read_text().splitlines() if '"commitInfo"' in line]
    merge = [c["commitInfo"] for c in commits if c["commitInfo"].get("operation") == "MERGE"]
    assert merge and "Delta-Lake" in merge[-1]["engineInfo"] and merge[-1]["userMetadata"] == RUN_ID
