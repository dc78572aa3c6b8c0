"""Scheduled lakehouse jobs: the steps of one pipeline run on Amazon EMR.

The Databricks side is declarative (``databricks.yml`` and ``resources/*.yml`` at the repository
root, a Databricks Asset Bundle); EMR has no such format, so this module writes what ``aws emr
add-steps --steps file://steps.json`` (the ``Steps`` member of the EMR ``AddJobFlowSteps`` call)
takes: one ``command-runner.jar`` step per pipeline task, each a ``spark-submit`` of the launcher
that ``deploy/emr/bootstrap.sh`` installed on every node, in the order ``finelake run`` runs them,
with ``ActionOnFailure: CANCEL_AND_WAIT`` so that a failed stage cancels the later ones and leaves
the cluster up (a rerun with the same run id resumes: stages skip finished work).

Everything here is a pure function of a loaded profile (:class:`~finelake.config.FinelakeConfig`):
no AWS call, no Spark session. ``finelake emr-steps`` prints :func:`emr_steps` as JSON.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from finelake.config import ConfigError, FinelakeConfig
from finelake.jobs.pipeline import STAGES, run_order

#: The tasks of one pipeline run, in the order ``finelake run`` (``run_pipeline``) runs them:
#: :data:`finelake.jobs.pipeline.PIPELINE`'s stages with ``in_run``.
PIPELINE_TASKS: tuple[str, ...] = tuple(s.name for s in run_order())

#: Tasks that run a model on the executors (generator, embedder or judge) and so want GPU nodes.
GPU_TASKS: frozenset[str] = frozenset(s.name for s in run_order() if s.uses_model)

#: The EMR release the steps are for: the Spark 4 line of EMR (Spark 4.0.2-amzn-0, Delta
#: 4.0.0-amzn-1-spark, Python 3.11-3.13, Amazon Linux 2023; EMR release guide, "Amazon EMR release
#: 8.0.0"). EMR 7.x ships Spark 3.5, which ``finelake validate`` refuses.
EMR_RELEASE_LABEL = "emr-spark-8.0.0"

#: The cluster configuration that goes with the steps (``aws emr create-cluster --configurations
#: file://...``): YARN GPU scheduling and isolation, the capacity scheduler's
#: ``DominantResourceCalculator``, Delta enabled. Relative to the repository root.
EMR_CONFIGURATIONS = "deploy/emr/configurations.json"

#: The Delta Lake jars EMR 7.0 and later ship (Delta 3.0 renamed delta-core.jar to
#: delta-spark.jar); ``delta-spark.jar`` also carries the ``delta`` Python package, so it goes on
#: ``--py-files`` as well (finelake's delta-spark engine imports ``delta.tables``).
EMR_DELTA_JARS: tuple[str, ...] = (
    "/usr/share/aws/delta/lib/delta-spark.jar",
    "/usr/share/aws/delta/lib/delta-storage.jar",
)

#: Where ``deploy/emr/bootstrap.sh`` puts the virtualenv (the wheel and its dependencies) and the
#: launcher script (``from finelake.cli import main; main()``) on every node.
EMR_PYTHON = "/opt/finelake/venv/bin/python"
EMR_LAUNCHER = "/opt/finelake/finelake_job.py"

#: Environment of the executors (``spark.executorEnv.*``; a profile's own entries win): the Hugging
#: Face cache and token folder the bootstrap action made (``HF_HOME``, token from Secrets Manager),
#: and hub downloads allowed (the finelake command line defaults to ``HF_HUB_OFFLINE=1``; the
#: launcher sets the same two for the driver).
EMR_EXECUTOR_ENV = {"HF_HOME": "/opt/finelake/hf", "HF_HUB_OFFLINE": "0"}

#: EMR's ``ActionOnFailure`` values for a pipeline step (the API also knows ``TERMINATE_JOB_FLOW``).
ACTIONS_ON_FAILURE = ("CANCEL_AND_WAIT", "CONTINUE", "TERMINATE_CLUSTER", "TERMINATE_JOB_FLOW")


def task_args(task: str, *, profile: str, run_id: str, lake: Optional[str] = None,
              overrides: Sequence[str] = (), queries: Optional[str] = None,
              documents: Optional[str] = None, max_queries: Optional[int] = None,
              max_documents: Optional[int] = None) -> list[str]:
    """The ``finelake`` command line of one pipeline task (what follows the launcher script).

    Args:
        task: one of :data:`PIPELINE_TASKS`.
        profile: ``--conf`` value as the cluster will read it (a packaged name such as ``emr``, or
            a path on the node that runs the driver).
        run_id: the run id every task of the run records.
        lake: ``--lake`` (None: the profile's).
        overrides: ``--set key=value`` items, passed to every task.
        queries, documents: ingest's inputs (paths or URIs the cluster reads); other tasks
            ignore them.
        max_queries, max_documents: limits for the tasks that take them (genericize .. budget);
            ingest and report take none.

    Returns:
        ``[task, "--conf", profile, "--run-id", run_id, ...]``.

    Raises:
        ValueError: ``task`` is not a pipeline task, or it is ingest and names neither input.
    """
    if task not in PIPELINE_TASKS:
        raise ValueError(f"unknown pipeline task {task!r}; the tasks are {', '.join(PIPELINE_TASKS)}")
    args = [task, "--conf", profile, "--run-id", run_id]
    if lake:
        args += ["--lake", lake]
    for item in overrides:
        args += ["--set", item]
    options = STAGES[task].options
    if "inputs" in options:
        if queries is None and documents is None:
            raise ValueError("the ingest task needs its input: --queries and/or --documents")
        args += ["--queries", queries] if queries is not None else []
        args += ["--documents", documents] if documents is not None else []
    if max_queries is not None and "max_queries" in options:
        args += ["--max-queries", str(max_queries)]
    if max_documents is not None and "max_documents" in options:
        args += ["--max-documents", str(max_documents)]
    return args


def spark_submit_args(cfg: FinelakeConfig, *, python: str = EMR_PYTHON,
                      delta_jars: Sequence[str] = EMR_DELTA_JARS, wheel: Optional[str] = None,
                      deploy_mode: str = "client", name: Optional[str] = None,
                      master: str = "yarn",
                      executor_env: Optional[Mapping[str, str]] = None) -> list[str]:
    """``spark-submit`` options (up to, not including, the application file) for a YARN cluster.

    * ``--jars`` and ``--py-files``: the cluster's Delta jars (the JVM classes and the ``delta``
      Python package); with ``wheel``, that wheel also goes on ``--py-files``, so its finelake code
      comes first on the driver's and the executors' ``PYTHONPATH`` (its dependencies must be in
      the bootstrap virtualenv already).
    * ``spark.pyspark.python`` / ``spark.pyspark.driver.python``: the bootstrap virtualenv.
    * ``executor_env`` as ``spark.executorEnv.*`` (the profile's ``spark.conf`` overrides them).
    * every ``spark.conf`` entry of the profile as ``--conf k=v`` (sorted): the GPU resource
      settings (``spark.executor.resource.gpu.amount``, ``spark.task.resource.gpu.amount``, the
      discovery script), the Delta SQL extension and catalog, Arrow batch sizes. finelake's session
      sets them again when it starts; on the command line they are visible in the step and apply
      before the first executor is requested.

    Args:
        cfg: the loaded profile.
        python: interpreter of the bootstrap virtualenv on every node.
        delta_jars: the Delta jars present on the nodes (default: EMR's, :data:`EMR_DELTA_JARS`).
        wheel: optional wheel URI (``s3://...whl``) to put first on ``--py-files``.
        deploy_mode: ``client`` (driver on the primary node; the stage summary lines land in the
            step's stdout log) or ``cluster``.
        name: ``--name`` of the Spark application.
        master: ``--master`` (``yarn`` on EMR; ``local[2]`` runs the same step on one machine).
        executor_env: environment variables of the executors (default none; :func:`emr_steps`
            passes :data:`EMR_EXECUTOR_ENV`).

    Returns:
        The argument list, starting with ``spark-submit``.

    Raises:
        ConfigError: ``spark.conf`` sets ``spark.pyspark.python`` or ``spark.pyspark.driver.python``
            to another interpreter than ``python`` (the key is named), or ``deploy_mode`` is neither
            ``client`` nor ``cluster``.
    """
    if deploy_mode not in ("client", "cluster"):
        raise ConfigError(f"deploy mode must be client or cluster, not {deploy_mode!r}")
    conf = {f"spark.executorEnv.{k}": v for k, v in (executor_env or {}).items()}
    conf.update(cfg.spark.conf)
    for key in ("spark.pyspark.python", "spark.pyspark.driver.python"):
        if conf.get(key, python) != python:
            raise ConfigError(f"spark.conf.{key} is {conf[key]!r} but the EMR steps run the "
                              f"bootstrap virtualenv's {python}")
        conf[key] = python
    args = ["spark-submit", "--master", master, "--deploy-mode", deploy_mode]
    if name:
        args += ["--name", name]
    if delta_jars:
        args += ["--jars", ",".join(delta_jars)]
    py_files = ([wheel] if wheel else []) + [j for j in delta_jars if "delta-spark" in j]
    if py_files:
        args += ["--py-files", ",".join(py_files)]
    for k in sorted(conf):
        args += ["--conf", f"{k}={conf[k]}"]
    return args


def emr_steps(cfg: FinelakeConfig, *, profile: str, run_id: str, wheel: Optional[str] = None,
              tasks: Sequence[str] = PIPELINE_TASKS, lake: Optional[str] = None,
              overrides: Sequence[str] = (), queries: Optional[str] = None,
              documents: Optional[str] = None, max_queries: Optional[int] = None,
              max_documents: Optional[int] = None, python: str = EMR_PYTHON,
              launcher: str = EMR_LAUNCHER, delta_jars: Sequence[str] = EMR_DELTA_JARS,
              deploy_mode: str = "client", master: str = "yarn",
              executor_env: Optional[Mapping[str, str]] = None,
              action_on_failure: str = "CANCEL_AND_WAIT") -> list[dict]:
    """The steps of one pipeline run, as the ``Steps`` list of EMR's ``AddJobFlowSteps``.

    Each step is ``{"Name", "ActionOnFailure", "HadoopJarStep": {"Jar": "command-runner.jar",
    "Args": [spark-submit ... <launcher> <task> --conf <profile> --run-id <run_id> ...]}}``
    (:func:`spark_submit_args` + :func:`task_args`); EMR runs a cluster's steps one after the
    other, so list order is stage order.

    Args:
        cfg: the profile, loaded here (its ``spark.conf`` goes on every spark-submit).
        profile: the ``--conf`` value the tasks get on the cluster (e.g. ``emr``).
        run_id: one run id for every step (stages record it on rows and commits; rerunning the
            same steps resumes the run).
        wheel: optional ``s3://`` URI of the finelake wheel for ``--py-files``.
        tasks: which pipeline tasks, a subsequence of :data:`PIPELINE_TASKS` in its order.
        lake, overrides, queries, documents, max_queries, max_documents: see :func:`task_args`.
        python, launcher: the bootstrap virtualenv's interpreter and launcher script.
        delta_jars, deploy_mode, master: see :func:`spark_submit_args`.
        executor_env: executors' environment (None: :data:`EMR_EXECUTOR_ENV`).
        action_on_failure: one of :data:`ACTIONS_ON_FAILURE`.

    Returns:
        A list of step dicts (JSON-serializable).

    Raises:
        ValueError: an unknown task, tasks out of pipeline order or repeated, no task, ingest
            without an input, or an unknown ``action_on_failure``.
        ConfigError: see :func:`spark_submit_args`.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no pipeline task to run")
    unknown = [t for t in tasks if t not in PIPELINE_TASKS]
    if unknown:
        raise ValueError(f"unknown pipeline task(s) {', '.join(unknown)}; the tasks are "
                         f"{', '.join(PIPELINE_TASKS)}")
    order = [PIPELINE_TASKS.index(t) for t in tasks]
    if order != sorted(set(order)):
        raise ValueError(f"tasks {', '.join(tasks)} must follow the pipeline order "
                         f"{', '.join(PIPELINE_TASKS)}, each once")
    if action_on_failure not in ACTIONS_ON_FAILURE:
        raise ValueError(f"action on failure must be one of {', '.join(ACTIONS_ON_FAILURE)}, "
                         f"not {action_on_failure!r}")
    steps = []
    for i, task in enumerate(tasks, 1):
        name = f"finelake {run_id} {i}/{len(tasks)} {task}"
        submit = spark_submit_args(cfg, python=python, delta_jars=delta_jars, wheel=wheel,
                                   deploy_mode=deploy_mode, name=f"finelake-{task}-{run_id}",
                                   master=master,
                                   executor_env=EMR_EXECUTOR_ENV if executor_env is None else executor_env)
        args = task_args(task, profile=profile, run_id=run_id, lake=lake, overrides=overrides,
                         queries=queries, documents=documents, max_queries=max_queries,
                         max_documents=max_documents)
        steps.append({
            "Name": name[:256],  # the API's limit for a step name
            "ActionOnFailure": action_on_failure,
            "HadoopJarStep": {"Jar": "command-runner.jar", "Args": [*submit, launcher, *args]},
        })
    return steps
