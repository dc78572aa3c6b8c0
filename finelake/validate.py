"""Driver-side checks of a profile: every model's backend settings, and the Spark settings against
the running session (``finelake validate``); with ``--models`` also every model's small files
(:mod:`finelake.model_contracts`).

:func:`check_backends` runs inside :func:`load_checked`, which every command and job loads its
profile with, so every job checks its
models' options on the driver before any executor builds a model: an unknown or misspelled option
(``models.generator.options.enable_prefix_cachng``) or a value of the wrong type is a
:class:`~finelake.config.ConfigError` naming the key and the profile file. Nothing is loaded:
each backend class's ``check_options`` compares names and types (vLLM options against
``vllm.EngineArgs``, :mod:`finelake.models.vllm_engine_args`).

:func:`session_mismatches` compares the profile's ``spark.conf`` with a session that already
runs (Databricks notebooks and jobs, ``spark-submit``): settings Spark fixes when the application
starts (``spark.executor.cores``, ``spark.task.resource.gpu.amount``, ...) cannot be changed by
the profile there and are silently ignored, so they must be the cluster's own settings.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Optional

from finelake.model_checks import MODEL_KEYS, check_model, model_configs  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from finelake.config import FinelakeConfig, ModelConfig


def load_checked(profile="local", overrides: Optional[list[str]] = None, **fields: Any) -> "FinelakeConfig":
    """Load a profile (:func:`finelake.config.load_config`) and check, on this (driver) process and
    without loading anything, every model's backend and options (:func:`check_backends`) and
    ingest's document filters: what every command and job does before it starts a stage.

    Raises:
        ConfigError: the profile does not load, or a backend, option or filter is bad (the
            message names the key and the file).
    """
    from finelake.config import load_config

    cfg = load_config(profile, overrides, **fields)
    _checked_models(cfg)
    return cfg


def _checked_models(cfg: "FinelakeConfig") -> dict[str, dict[str, Any]]:
    """:func:`check_backends` plus the document filters, problems as one :class:`ConfigError`."""
    from finelake.errors import ConfigError
    from finelake.method.document_filters import check_filters, filter_specs

    try:
        models = check_backends(cfg)
        check_filters(filter_specs(cfg.ingest.filters))
    except ConfigError as exc:
        raise ConfigError(f"{cfg.source_file}: {exc}") from None
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"{cfg.source_file}: invalid model settings: {exc}") from None
    return models


def check_backends(cfg: "FinelakeConfig") -> dict[str, dict[str, Any]]:
    """Check every model of the profile (:func:`check_model`); all problems are reported together.

    Returns:
        dotted key -> checked settings.

    Raises:
        ValueError: one or more bad backends or options, ``"; "``-separated, each naming its key.
    """
    out, problems = {}, []
    for key, mc, kind in model_configs(cfg):
        if not cfg.load_test:
            problems.extend(load_backend_problems(key, mc))
        try:
            out[key] = check_model(key, mc, kind)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return out


LOAD_BACKEND = "load"


def load_backend_problems(key: str, mc: "ModelConfig") -> list[str]:
    """Why ``mc`` may not run in a real profile: it names the synthetic ``load`` backend
    (:mod:`finelake.models.load_backend`), directly or as a judge's inner model.

    Returns:
        One message per use, each naming the key; empty when the model is a real one.
    """
    uses = []
    if mc.backend == LOAD_BACKEND:
        uses.append(f"{key}.backend")
    for opt in ("inner_backend", "embedder_backend"):
        if mc.options.get(opt) == LOAD_BACKEND:
            uses.append(f"{key}.options.{opt}")
    return [f"{u}: 'load' is the synthetic plumbing backend of benchmarks and fault tests (its "
            "outputs are not model outputs); only a profile with load_test: true may use it "
            "(conf/load-test.yaml)" for u in uses]


def session_mismatches(cfg: "FinelakeConfig", spark) -> list[str]:
    """Profile settings a running session does not have and cannot take at runtime.

    For each ``spark.conf`` key of the profile that the session reports as not modifiable
    (``spark.conf.isModifiable``: core settings such as ``spark.executor.cores``,
    ``spark.task.resource.gpu.amount``, static SQL settings such as ``spark.sql.extensions``),
    the session's value is compared with the profile's; so is ``spark.master`` when the profile
    sets one. Runtime SQL settings are left out: :func:`finelake.spark.get_spark` applies them to
    an existing session.

    Args:
        cfg: the profile.
        spark: the running ``SparkSession``.

    Returns:
        One line per difference, ``"spark.conf.<key>: profile '<v>', running session '<v>'"``;
        empty when the session matches.
    """
    def live(key: str) -> Optional[str]:
        try:
            v = spark.sparkContext.getConf().get(key)
        except Exception:  # noqa: BLE001 - Spark Connect has no SparkContext
            v = None
        if v is None:
            try:
                v = spark.conf.get(key, None)
            except Exception:  # noqa: BLE001
                v = None
        return v

    out = []
    for key, want in sorted(cfg.spark.conf.items()):
        try:
            modifiable = bool(spark.conf.isModifiable(key))
        except Exception:  # noqa: BLE001
            modifiable = False
        if modifiable:
            continue
        have = live(key)
        if have != want:
            out.append(f"spark.conf.{key}: profile {want!r}, running session {have!r} (fixed when "
                       "the cluster starts: set it in the cluster's Spark config)")
    if cfg.spark.master:
        have = live("spark.master")
        if have is not None and have != cfg.spark.master:
            out.append(f"spark.master: profile {cfg.spark.master!r}, running session {have!r}")
    return out


def active_session():
    """The running ``SparkSession`` of this process, or None (never starts one; None when pyspark
    is not installed)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        return None
    return SparkSession.getActiveSession()


def _num(conf: dict[str, str], key: str) -> Optional[float]:
    v = conf.get(key)
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def spark_conf_problems(cfg: "FinelakeConfig") -> list[str]:
    """Contradictions inside the profile's own ``spark.conf`` (no session needed): a task asking
    for more GPUs or CPUs than an executor has, non-numeric resource amounts, and GPU settings the
    model stages cannot run with (:func:`gpu_problems`).

    Returns:
        One line per problem, naming the ``spark.conf.<key>``.
    """
    conf, out = cfg.spark.conf, []
    for key in ("spark.task.resource.gpu.amount", "spark.executor.resource.gpu.amount",
                "spark.executor.cores", "spark.task.cpus"):
        if key in conf and _num(conf, key) is None:
            out.append(f"spark.conf.{key}: {conf[key]!r} is not a number")
    task_gpu = _num(conf, "spark.task.resource.gpu.amount")
    exec_gpu = _num(conf, "spark.executor.resource.gpu.amount")
    if task_gpu and not exec_gpu:
        out.append("spark.conf.spark.task.resource.gpu.amount: set, but executors ask for no GPU "
                   "(spark.executor.resource.gpu.amount)")
    elif task_gpu and exec_gpu and task_gpu > exec_gpu:
        out.append(f"spark.conf.spark.task.resource.gpu.amount: {task_gpu:g} GPUs per task, more "
                   f"than an executor's {exec_gpu:g}")
    cores, cpus = _num(conf, "spark.executor.cores"), _num(conf, "spark.task.cpus")
    if cores and cpus and cpus > cores:
        out.append(f"spark.conf.spark.task.cpus: {cpus:g} CPUs per task, more than an executor's "
                   f"{cores:g} cores (spark.executor.cores)")
    out += gpu_problems(cfg, conf, "spark.conf.")
    return out


MIN_SPARK = (4, 0)
"""The oldest Spark finelake runs on (see :func:`spark_version_problem` for why)."""


def spark_version_problem(version: str) -> Optional[str]:
    """Why finelake cannot run on Spark ``version``, or None when it can (>= :data:`MIN_SPARK`).

    Spark 4.0 is needed for stage-level scheduling of the model stages through
    ``mapInArrow``/``mapInPandas(..., profile=)``, ``DataFrame.toArrow`` and Python data sources;
    EMR 7.x ships Spark 3.5 (the Spark 4 release of EMR is ``emr-spark-8.0.0``, Spark 4.0.2), and
    Databricks Runtime 17.3 LTS is the first LTS with Spark 4.0.0.

    Args:
        version: Spark's version string (``spark.version``, ``pyspark.__version__``), vendor
            suffixes allowed (``4.0.2-amzn-0``).

    Returns:
        One line naming the version and the reason, or None.
    """
    m = re.match(r"^\s*(\d+)\.(\d+)", version or "")
    if m is None:
        return f"spark: cannot read a version from {version!r}"
    if (int(m.group(1)), int(m.group(2))) >= MIN_SPARK:
        return None
    return (f"spark: version {version} is older than {MIN_SPARK[0]}.{MIN_SPARK[1]}: finelake needs "
            "Spark 4 (model stages pass profile= to mapInArrow/mapInPandas, tables are read with "
            "DataFrame.toArrow); on EMR use release emr-spark-8.0.0 (EMR 7.x ships Spark 3.5), on "
            "Databricks Runtime 17.3 LTS or later")


def gpu_problems(cfg: "FinelakeConfig", conf: dict[str, str], where: str = "") -> list[str]:
    """GPU settings the model stages cannot run with (dynamic allocation with GPU executors, a
    ``tensor_parallel_size`` the executors' GPUs cannot hold:
    :func:`finelake.resources.gpu_settings_problems`), each line prefixed with ``where``
    (``spark.conf.`` for the profile, ``spark session: `` for a running one)."""
    from finelake.resources import gpu_settings_problems, stage_models

    try:
        models = stage_models(cfg)
    except ValueError as exc:
        return [f"{where}tensor_parallel_size: {exc}"]
    return [where + p for p in gpu_settings_problems(conf, models)]


def resolved_yaml(cfg: "FinelakeConfig") -> str:
    """The resolved profile (``extends`` merged, overrides applied, defaults filled in) as YAML
    that :func:`finelake.config.load_config` reads back to the same configuration."""
    import yaml

    data = cfg.model_dump(mode="json", by_alias=True, exclude={"source_file"})
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def run_validate(profile: str, overrides: Optional[list[str]] = None, lake: Optional[str] = None,
                 spark=None, model_files: bool = False) -> tuple["FinelakeConfig", list[str], list[str]]:
    """Everything ``finelake validate`` checks, on this (driver) process, loading no model.

    Args:
        profile: YAML path or packaged profile name.
        overrides: ``key=value`` overrides.
        lake: lake root override.
        spark: a running session to check against; default the active one, if any.
        model_files: also read every model's small files (config, tokenizer and pooling configs; no
            weights) and check them against their stages (:mod:`finelake.model_contracts`);
            hub models are fetched at their pinned revision. Warnings (unpinned hub models)
            become ``warning:`` lines, not problems.

    Returns:
        ``(cfg, report lines, problems)``: problems are empty when the profile is valid.

    Raises:
        ConfigError: the profile does not load: unknown key, wrong type, bad backend or option
            (the message names the key and file).
    """
    from finelake.config import load_config

    cfg = load_config(profile, overrides or [], lake=lake)
    lines = [f"profile {cfg.profile}: {cfg.source_file}"]
    models = _checked_models(cfg)
    for key, s in models.items():
        shown = dict(s["options"])
        if s.get("judge") == "llm":
            shown = {"format": s["format"], "constrained": s["constrained"], **shown}
        opts = ", ".join(f"{k}={v!r}" for k, v in shown.items()) or "no options"
        judge = f"{s['judge']} judge over " if "judge" in s else ""
        lines.append(f"{key}: {judge}{s['backend']} {s['model']} ({opts})")
    from finelake.config import hub_model_ids

    hub = hub_model_ids(cfg)
    lines.append("hub: " + (f"{len(hub)} model(s) fetched from the Hugging Face hub or its cache "
                            f"({', '.join(hub)})" if hub else "none needed (HF_HUB_OFFLINE=1 is set "
                            "by the CLI)"))
    problems = spark_conf_problems(cfg)
    if model_files:
        from finelake.model_contracts import check_model_files

        found, model_problems, warnings = check_model_files(cfg)
        lines += found + [f"warning: {w}" for w in warnings]
        problems += model_problems
    spark = spark if spark is not None else active_session()
    if spark is None:
        lines.append("spark: no running session in this process; the profile's static settings "
                     "(executor cores, task GPUs, ...) were not compared with a cluster's (run "
                     "validate where the session exists, e.g. a Databricks notebook)")
        try:
            import pyspark

            version, where = pyspark.__version__, "installed pyspark"
        except ImportError:
            version, where = None, None
    else:
        mism = session_mismatches(cfg, spark)
        from finelake.resources import session_conf

        mism += gpu_problems(cfg, session_conf(spark), "spark session: ")
        problems += mism
        lines.append(f"spark: running session checked ({len(mism)} static setting(s) differ)")
        version, where = spark.version, "running session"
    if version is not None:
        too_old = spark_version_problem(version)
        problems += [too_old] if too_old else []
        lines.append(f"spark: {where} is Spark {version}")
    too_few = _bucket_warning(cfg)
    if too_few:
        lines.append(f"warning: {too_few}")
    return cfg, lines, problems


def _bucket_warning(cfg: "FinelakeConfig") -> Optional[str]:
    """The budget bucket warning for the profile's lake when it already holds documents
    (:func:`finelake.jobs.budget.lake_bucket_warning`: Delta's file statistics, no Spark job);
    None when there is nothing to warn about or the lake cannot be read from here."""
    from finelake.jobs.budget import lake_bucket_warning
    from finelake.lake import Lake

    try:
        lake = Lake(cfg.lake, None)
    except Exception:  # noqa: BLE001 - a warning must never stop validate
        return None
    return lake_bucket_warning(lake, cfg.budget.buckets)
