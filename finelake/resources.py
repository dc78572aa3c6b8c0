"""What a model stage needs from the cluster, and how Spark is asked for it.

A model stage declares its needs once, as a :class:`Resources` (in the spirit of NeMo Curator's
``stages/resources.py``): GPUs and CPUs per task, and, where executors are started for the stage
(dynamic allocation), their memory and Python memory. :func:`plan_stage` turns that into a
:class:`StagePlan` for the running session:

* On a cluster whose executors have GPUs (``spark.executor.resource.gpu.amount`` > 0) the stage
  runs with Spark's **stage-level scheduling**: a ``pyspark.resource.ResourceProfile`` asking for
  one GPU (and the executor's CPUs per GPU) per task. CPU stages (ingest, joins, merges) keep the
  default profile and use every core; model tasks get one GPU each, so an executor runs one model
  task per GPU at a time. With dynamic allocation off (standalone, Databricks, YARN/K8s on Spark
  >= 3.5) the profile holds task requests only (a ``TaskResourceProfile``: tasks run on the
  default executors); with dynamic allocation on it also asks for executors
  (``ExecutorResourceRequests``: cores, memory, ``pysparkMemory``, GPUs).
* Elsewhere (``local[*]``, a CPU cluster) there is no profile and the stage spreads over
  ``defaultParallelism`` tasks as before.

A stage's needs follow its model (:func:`model_resources`): a vLLM engine with
``tensor_parallel_size: N`` spans N GPUs, so its task asks for N; a model behind an endpoint
(``backend: openai``) needs none. Settings with which the model stages could never get their
GPUs (dynamic allocation with GPU executors, a tensor-parallel size larger than or not dividing
the executor's GPUs) are refused, naming the setting (:func:`gpu_settings_problems`): by
``finelake validate``, before ``finelake run`` starts its first stage, and by :func:`plan_stage`.

``StagePlan.tasks`` is how many tasks of the stage run at once (GPUs in the cluster / GPUs per
task): the number of partitions a chunk of model work is spread over, so each task's engine call
sees ``batch_size`` prompts rather than a handful (:func:`chunk_size`).

Model stages also run their Python functions in a worker pool of their own
(:func:`model_worker_pool`): Spark keys Python worker pools by environment, so the workers that
hold models are only those that ran model tasks, at most one per GPU at a time, and the one model
each holds (:mod:`finelake.udfs.cache`) is the one its current stage needs.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)

MODEL_POOL_ENV = "FINELAKE_WORKER_POOL"
"""Environment variable that puts a Python function in the model-stage worker pool."""


@dataclass(frozen=True)
class Resources:
    """A stage's needs per task (and per executor, where Spark starts executors for it).

    Attributes:
        gpus: GPUs per task: 0 (CPU stage), a fraction < 1 (tasks share a GPU), or a whole number.
        cpus: CPUs per task; None: the executor's cores divided by its GPUs (all of a GPU's
            share of the host: tokenization, Arrow, the engine's scheduler).
        executor_memory: executor JVM heap for executors started for this stage (``"16g"``);
            applied only with dynamic allocation.
        python_memory: memory for the Python workers that hold the model
            (``spark.executor.pyspark.memory`` of executors started for this stage; on YARN it
            is added to the container); applied only with dynamic allocation.

    Raises:
        ValueError: negative amounts, or more than one GPU per task that is not a whole number
            (Spark accepts fractions only below 1).
    """

    gpus: float = 0.0
    cpus: Optional[int] = None
    executor_memory: Optional[str] = None
    python_memory: Optional[str] = None

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, not {self.gpus}")
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"gpus per task above 1 must be a whole number, not {self.gpus}")
        if self.cpus is not None and self.cpus < 1:
            raise ValueError(f"cpus must be >= 1, not {self.cpus}")

    @property
    def uses_gpu(self) -> bool:
        return self.gpus > 0


MODEL_STAGE = Resources(gpus=1)
"""What genericize, match, instantiate and judge declare: one GPU per task (its model)."""

ENDPOINT_BACKENDS = ("openai",)
"""Backends whose model runs behind an endpoint (a server), not in the Spark task: no GPU."""


def tensor_parallel_size(model_cfg: Any) -> int:
    """GPUs one copy of the model spans: vLLM's ``tensor_parallel_size`` option (of the model, or
    of a judge whose ``inner_backend`` is vLLM); 1 otherwise.

    Args:
        model_cfg: a :class:`~finelake.config.ModelConfig` or its dict (``backend``, ``options``).

    Raises:
        ValueError: ``tensor_parallel_size`` is not a whole number >= 1.
    """
    d = model_cfg.model_dump() if hasattr(model_cfg, "model_dump") else dict(model_cfg)
    opts = d.get("options") or {}
    if d.get("backend") != "vllm" and opts.get("inner_backend") != "vllm":
        return 1
    tp = opts.get("tensor_parallel_size", 1)
    if isinstance(tp, bool) or not str(tp).strip().isdigit() or int(tp) < 1:
        raise ValueError(f"tensor_parallel_size must be a whole number >= 1, not {tp!r}")
    return int(tp)


def model_resources(model_cfg: Any) -> Resources:
    """What a model stage's task needs for this model: ``Resources(gpus=tensor_parallel_size)``
    (vLLM: one engine spans that many GPUs, so Spark must give its task that many addresses),
    ``Resources(gpus=0)`` for a model behind an endpoint (``backend: openai``: the task only sends
    requests), :data:`MODEL_STAGE` otherwise.

    Raises:
        ValueError: a bad ``tensor_parallel_size`` (:func:`tensor_parallel_size`).
    """
    d = model_cfg.model_dump() if hasattr(model_cfg, "model_dump") else dict(model_cfg)
    if d.get("backend") in ENDPOINT_BACKENDS or (d.get("options") or {}).get("inner_backend") \
            in ENDPOINT_BACKENDS:
        return Resources(gpus=0)
    tp = tensor_parallel_size(d)
    return MODEL_STAGE if tp == 1 else Resources(gpus=tp)


def _truthy(v: Optional[str]) -> bool:
    return str(v).strip().lower() == "true"


def gpu_settings_problems(conf: dict, gpu_models: Optional[dict] = None) -> list[str]:
    """Spark settings with which the model stages cannot run on GPU executors, each naming the
    setting and what to set instead.

    * ``spark.dynamicAllocation.enabled=true`` with GPU executors: model stages ask for GPU
      executors through stage-level scheduling while the default profile's executors hold every
      GPU and, holding cached data, are never released
      (``spark.dynamicAllocation.cachedExecutorIdleTimeout`` defaults to infinity), so the stage
      waits forever. Refused (EMR turns dynamic allocation on by default).
    * A model whose ``tensor_parallel_size`` exceeds ``spark.executor.resource.gpu.amount`` (no
      executor can run its task) or does not divide it (GPUs left idle).

    Args:
        conf: Spark settings (key -> string value): the profile's ``spark.conf`` or a session's.
        gpu_models: dotted key -> tensor-parallel size of each model stage's model (None: none).

    Returns:
        One line per problem; empty when the settings work.
    """
    out: list[str] = []
    try:
        exec_gpus = float(conf.get("spark.executor.resource.gpu.amount") or 0)
    except ValueError:
        return out  # reported elsewhere as not a number
    if exec_gpus <= 0:
        return out
    if _truthy(conf.get("spark.dynamicAllocation.enabled")):
        out.append(
            "spark.dynamicAllocation.enabled=true with GPU executors (spark.executor.resource.gpu."
            f"amount={exec_gpus:g}): the model stages ask for GPU executors by stage-level "
            "scheduling while the default executors hold the GPUs and, holding cached data, are "
            "never released (spark.dynamicAllocation.cachedExecutorIdleTimeout is infinite), so a "
            "model stage would wait forever. Set spark.dynamicAllocation.enabled=false and a fixed "
            "spark.executor.instances (EMR enables dynamic allocation by default)")
    for key, tp in sorted((gpu_models or {}).items()):
        if tp > exec_gpus:
            out.append(f"{key}.options.tensor_parallel_size={tp} needs {tp} GPUs per task but an "
                       f"executor has {exec_gpus:g} (spark.executor.resource.gpu.amount): give "
                       f"executors a multiple of {tp} GPUs (one executor per node) or lower it")
        elif exec_gpus % tp:
            out.append(f"{key}.options.tensor_parallel_size={tp} does not divide the executor's "
                       f"{exec_gpus:g} GPUs (spark.executor.resource.gpu.amount): "
                       f"{exec_gpus % tp:g} would stay idle")
    return out


def stage_models(cfg: Any) -> dict[str, int]:
    """Dotted key -> tensor-parallel size of the model each GPU model stage runs (genericize,
    instantiate: their own model or ``models.generator``; judge: ``models.judge``), for
    :func:`gpu_settings_problems`. Models behind an endpoint are left out.

    Raises:
        ValueError: a bad ``tensor_parallel_size``.
    """
    out = {}
    for key, mc in (("genericize.model", cfg.genericize.model),
                    ("instantiate.model", cfg.instantiate.model),
                    ("models.generator", cfg.models.generator), ("models.judge", cfg.models.judge)):
        if mc is not None and model_resources(mc).uses_gpu:
            out[key] = tensor_parallel_size(mc)
    return out


def refuse_gpu_settings(cfg: Any, spark) -> None:
    """Stop before any stage when the running session's settings would leave the model stages
    without GPUs (:func:`gpu_settings_problems` on :func:`session_conf`): a run that would hang
    fails at once instead.

    Raises:
        ConfigError: naming each setting and what to set.
    """
    problems = gpu_settings_problems(session_conf(spark), stage_models(cfg))
    if problems:
        from finelake.errors import ConfigError

        raise ConfigError("this Spark session cannot run the model stages: " + "; ".join(problems))


def session_conf(spark, keys=("spark.executor.resource.gpu.amount",
                              "spark.dynamicAllocation.enabled")) -> dict:
    """The running session's values of ``keys`` (absent keys left out; {} under Spark Connect)."""
    out = {}
    for k in keys:
        v = _conf(spark, k)
        if v is not None:
            out[k] = v
    return out


@dataclass(frozen=True)
class StagePlan:
    """How a stage runs on this session.

    Attributes:
        profile: the ``ResourceProfile`` for ``mapInPandas`` / ``mapInArrow`` (None: default).
        tasks: tasks of the stage that run at once: partitions per chunk of model work.
        gpus_per_task: GPUs each task holds (0 without a profile).
        cpus_per_task: CPUs each task holds.
        note: one line for the log (``gpu tasks=2 (2 executors x 1 gpu) cpus/task=2``).
    """

    profile: Any
    tasks: int
    gpus_per_task: float = 0.0
    cpus_per_task: int = 1
    note: str = ""


def _conf(spark, key: str, default: Optional[str] = None) -> Optional[str]:
    try:
        return spark.sparkContext.getConf().get(key, default)
    except Exception:  # noqa: BLE001 - Spark Connect has no SparkContext
        return default


def executor_count(spark) -> int:
    """Executors registered with the driver now (0 in local mode or when unknown)."""
    try:
        master = spark.sparkContext.master or ""
        if master.startswith("local"):
            return 0
        return max(0, int(spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size()) - 1)  # noqa: SLF001
    except Exception:  # noqa: BLE001 - Spark Connect
        return 0


def gpu_tasks(executors: int, executor_gpus: float, task_gpus: float) -> int:
    """Tasks that hold GPUs at once: ``executors * floor(executor_gpus / task_gpus)`` (>= 1).

    Raises:
        ValueError: ``task_gpus`` <= 0.
    """
    if task_gpus <= 0:
        raise ValueError(f"task_gpus must be > 0, not {task_gpus}")
    return max(1, int(executors) * int(math.floor(executor_gpus / task_gpus + 1e-9)))


def chunk_size(configured: int, batch_size: int, tasks: int, prompts_per_key: float = 1.0) -> int:
    """Keys (queries, documents) per committed chunk so that each of ``tasks`` tasks gets about
    ``batch_size`` prompts: ``max(configured, ceil(batch_size * tasks / prompts_per_key))``.

    Args:
        configured: the profile's chunk size (``genericize.chunk_rows``,
            ``instantiate.chunk_documents``): a floor, so small clusters keep small commits.
        batch_size: prompts the model takes per call (``batch_size`` of its config).
        tasks: :attr:`StagePlan.tasks`.
        prompts_per_key: prompts one key makes (matches per document for instantiate).

    Raises:
        ValueError: a size or count below 1, or ``prompts_per_key`` <= 0.
    """
    if configured < 1 or batch_size < 1 or tasks < 1 or prompts_per_key <= 0:
        raise ValueError(f"chunk_size({configured}, {batch_size}, {tasks}, {prompts_per_key})")
    return max(int(configured), int(math.ceil(batch_size * tasks / prompts_per_key)))


def plan_stage(spark, res: Resources) -> StagePlan:
    """The :class:`StagePlan` for ``res`` on ``spark`` (see the module docstring).

    A profile is used only when ``res`` asks for GPUs, the master is not local and the executors
    were given GPUs (``spark.executor.resource.gpu.amount``). CPUs per task default to the
    executor's cores per GPU (``spark.executor.cores``; 1 when unset).
    """
    par = max(1, int(spark.sparkContext.defaultParallelism))
    exec_gpus = float(_conf(spark, "spark.executor.resource.gpu.amount", "0") or 0)
    master = (_conf(spark, "spark.master", "") or "")
    if not res.uses_gpu or exec_gpus <= 0 or master.startswith("local"):
        return StagePlan(profile=None, tasks=par, note=f"default scheduling, tasks={par}")
    problems = gpu_settings_problems(session_conf(spark))  # e.g. dynamic allocation: would hang
    if problems:
        from finelake.errors import ConfigError

        raise ConfigError("this Spark session cannot run the model stages: " + "; ".join(problems))
    from pyspark.resource import (ExecutorResourceRequests, ResourceProfileBuilder,
                                  TaskResourceRequests)

    cores = int(_conf(spark, "spark.executor.cores", "0") or 0)
    cpus = res.cpus or max(1, int(cores // max(1.0, exec_gpus)) if cores else 1)
    treq = TaskResourceRequests().cpus(cpus).resource("gpu", float(res.gpus))
    builder = ResourceProfileBuilder().require(treq)
    dynamic = (_conf(spark, "spark.dynamicAllocation.enabled", "false") or "").lower() == "true"
    if dynamic:
        ereq = ExecutorResourceRequests().resource(
            "gpu", int(math.ceil(exec_gpus)),
            _conf(spark, "spark.executor.resource.gpu.discoveryScript", "") or "")
        if cores:
            ereq = ereq.cores(cores)
        if res.executor_memory:
            ereq = ereq.memory(res.executor_memory)
        if res.python_memory:
            ereq = ereq.pysparkMemory(res.python_memory)
        builder = builder.require(ereq)
    profile = builder.build
    n_exec = executor_count(spark)
    if n_exec == 0:  # executors not registered yet: the conf's count, else the parallelism
        n_exec = int(_conf(spark, "spark.executor.instances", "0") or 0) or max(1, par // max(1, cpus))
    tasks = gpu_tasks(n_exec, exec_gpus, res.gpus)
    note = (f"stage-level scheduling: gpu tasks={tasks} ({n_exec} executors x "
            f"{exec_gpus:g} gpu / {res.gpus:g} per task) cpus/task={cpus}"
            f"{' + executor requests (dynamic allocation)' if dynamic else ''}")
    return StagePlan(profile=profile, tasks=tasks, gpus_per_task=float(res.gpus),
                     cpus_per_task=cpus, note=note)


@contextlib.contextmanager
def model_worker_pool(spark) -> Iterator[None]:
    """Python functions created inside this block run in the model-stage Python worker pool.

    Spark keeps one pool of Python workers per (interpreter, environment); this adds
    ``FINELAKE_WORKER_POOL=models`` to the environment the functions carry, so model tasks never
    reuse a worker that a CPU stage left behind, and a worker that holds a model is reused by the
    next model task rather than left idle with its model while another loads a second one.
    """
    env = spark.sparkContext.environment
    saved = env.get(MODEL_POOL_ENV)
    env[MODEL_POOL_ENV] = "models"
    try:
        yield
    finally:
        if saved is None:
            env.pop(MODEL_POOL_ENV, None)
        else:
            env[MODEL_POOL_ENV] = saved
