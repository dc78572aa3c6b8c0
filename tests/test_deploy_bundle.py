"""The Databricks Asset Bundle (databricks.yml + resources/*.yml), checked offline with the
Databricks SDK's own job types (``JobSettings.from_dict``), databricks-bundles' strict resource
types (an unknown field is an error there) and finelake's own command line and profile loader.

What this cannot check: that the workspace accepts it (node types, runtime versions, the catalog,
the secret scope): that needs ``databricks bundle validate`` against a workspace.
"""

from __future__ import annotations

import copy
import glob
import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml

jobs_sdk = pytest.importorskip("databricks.sdk.service.jobs")
bundles_jobs = pytest.importorskip("databricks.bundles.jobs")
from databricks.bundles.schemas import Schema  # noqa: E402
from databricks.bundles.volumes import Volume  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402

from finelake.cli import cli  # noqa: E402
from finelake.config import load_config  # noqa: E402
from finelake.jobs.pipeline import run_order  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_ORDER = [s.name for s in run_order()]  # the one pipeline definition
MODEL_STAGES = {"genericize", "instantiate", "judge"}  # the issue's minimum set of GPU stages
_REF = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")


def _merge(into: dict, other: dict) -> dict:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)
    return into


def _override(resources: dict, target_resources: dict) -> None:
    """A target's ``resources`` over the bundle's, as the Databricks CLI merges them: a job's
    ``job_clusters`` and ``tasks`` by their key (a new key is appended, a known one merged),
    everything else key by key."""
    for kind, items in target_resources.items():
        for name, over in items.items():
            base = resources.setdefault(kind, {}).setdefault(name, {})
            for field, value in over.items():
                key = {"job_clusters": "job_cluster_key", "tasks": "task_key"}.get(field)
                if key is None:
                    base[field] = _merge(base.get(field, {}), value) if isinstance(value, dict) \
                        else copy.deepcopy(value)
                    continue
                by_key = {item[key]: item for item in base.setdefault(field, [])}
                for item in value:
                    if item[key] in by_key:
                        _merge(by_key[item[key]], item)
                    else:
                        base[field].append(copy.deepcopy(item))


def load_bundle(target: str) -> dict:
    """databricks.yml with its includes merged and every ``${...}`` reference resolved the way
    the Databricks CLI does for ``target`` (variable defaults, then the target's variables;
    ``${resources.schemas.<k>.name}`` to the schema's name; ``${bundle.*}``). An unresolvable
    reference fails the test, so a typo in a variable name is caught here."""
    root = yaml.safe_load((ROOT / "databricks.yml").read_text())
    for pattern in root.get("include", []):
        files = sorted(glob.glob(str(ROOT / pattern)))
        assert files, f"include {pattern} matches no file"
        for f in files:
            _merge(root, yaml.safe_load(Path(f).read_text()))
    tgt = root["targets"][target]
    variables = {k: v.get("default") for k, v in root.get("variables", {}).items()}
    variables.update(tgt.get("variables", {}))
    values = {f"var.{k}": v for k, v in variables.items()}
    values.update({"bundle.name": root["bundle"]["name"], "bundle.target": target,
                   "workspace.file_path": f"/Workspace/Users/me/.bundle/{root['bundle']['name']}/"
                                          f"{target}/files"})
    _override(root["resources"], tgt.get("resources", {}))

    def resolve(node):
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        if not isinstance(node, str):
            return node
        whole = _REF.fullmatch(node)
        if whole and whole.group(1) in values and not isinstance(values[whole.group(1)], str):
            return values[whole.group(1)]  # a complete reference keeps its type (int, ...)

        def one(m):
            key = m.group(1)
            if key in values:
                return str(resolve(values[key]))
            parts = key.split(".")
            if parts[0] == "resources" and parts[-1] == "name":
                res = root["resources"][parts[1]][parts[2]]
                return str(resolve(res["name"]))
            raise AssertionError(f"unresolvable reference ${{{key}}} in {node!r}")

        return _REF.sub(one, node)

    out = resolve({k: v for k, v in root.items() if k != "variables"})
    out["bundle"]["target"] = target  # what ${bundle.target} says (the tests read it)
    return out


TARGET_PROFILE = {"dev": "databricks", "prod": "databricks", "serving": "databricks-serving"}


@pytest.fixture(scope="module", params=sorted(TARGET_PROFILE))
def bundle(request):
    return load_bundle(request.param)


def _wheel_task_args(task: dict) -> list[str]:
    wt = task["python_wheel_task"]
    return list(wt["parameters"])


def _job_parameter_defaults(job: dict) -> dict[str, str]:
    return {p["name"]: p["default"] for p in job.get("parameters", [])}


def _substitute_job_parameters(args: list[str], defaults: dict[str, str]) -> list[str]:
    """``{{job.parameters.x}}`` -> the job parameter's default, as Databricks does at run time
    (other dynamic values such as ``{{job.run_id}}`` stay as they are)."""
    return [re.sub(r"\{\{job\.parameters\.([a-z_]+)\}\}", lambda m: defaults[m.group(1)], a)
            for a in args]


def _check_command_line(job: dict, task: dict, profile: str) -> None:
    """The task's arguments parse with finelake's own command line, and its profile, --lake and
    --set overrides load with finelake's own config validation (unknown keys are errors)."""
    args = _substitute_job_parameters(_wheel_task_args(task), _job_parameter_defaults(job))
    command = cli.commands[args[0]]
    ctx = command.make_context(args[0], args[1:])
    p = ctx.params
    cfg = load_config(p["profile"], list(p["overrides"]), lake=p["lake"])
    assert cfg.profile == profile
    assert p["run_id"], "every task records the run id"


def test_every_job_loads_as_sdk_job_settings_and_strict_bundle_job(bundle):
    jobs = bundle["resources"]["jobs"]
    assert set(jobs) == {"finelake_pipeline", "finelake_train"}
    for key, job in jobs.items():
        settings = jobs_sdk.JobSettings.from_dict(job)
        assert settings.name and settings.tasks, key
        # databricks-bundles raises on any field its Job type does not know (the SDK ignores them)
        strict = bundles_jobs.Job.from_dict(job)
        assert [t.task_key for t in strict.tasks] == [t.task_key for t in settings.tasks]
        # round trip: every field of the YAML is one the SDK's types know and keep, with its value
        assert settings.as_dict() == job


def test_pipeline_tasks_are_the_stages_chained_in_order(bundle):
    settings = jobs_sdk.JobSettings.from_dict(bundle["resources"]["jobs"]["finelake_pipeline"])
    keys = [t.task_key for t in settings.tasks]
    assert keys == PIPELINE_ORDER
    for prev, task in zip([None, *keys], settings.tasks):
        deps = [d.task_key for d in (task.depends_on or [])]
        assert deps == ([prev] if prev else []), f"{task.task_key} depends on {deps}"
        wt = task.python_wheel_task
        assert wt is not None, f"{task.task_key} is not a python_wheel_task"
        assert wt.parameters[0] == task.task_key  # `finelake <stage> ...`


def test_wheel_task_entry_point_is_the_finelake_console_script(bundle):
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")
               if ep.dist is not None and ep.dist.metadata["Name"] == "finelake"}
    for job in bundle["resources"]["jobs"].values():
        for task in jobs_sdk.JobSettings.from_dict(job).tasks:
            wt = task.python_wheel_task
            assert wt.package_name == "finelake"
            assert wt.entry_point in scripts, (task.task_key, wt.entry_point, scripts)
            assert any(lib.whl and lib.whl.endswith(".whl") for lib in task.libraries), task.task_key


def test_task_arguments_parse_with_the_cli_and_the_profile(bundle):
    profile = TARGET_PROFILE[bundle["bundle"]["target"]]
    for key, job in bundle["resources"]["jobs"].items():
        for task in job["tasks"]:
            _check_command_line(job, task, profile if key == "finelake_pipeline" else "databricks")


def test_every_task_of_a_run_shares_the_run_id_parameter(bundle):
    for job in bundle["resources"]["jobs"].values():
        assert "run_id" in _job_parameter_defaults(job)
        for task in job["tasks"]:
            args = _wheel_task_args(task)
            assert args[args.index("--run-id") + 1] == "{{job.parameters.run_id}}", task["task_key"]


def test_pipeline_has_a_schedule_and_limits(bundle):
    job = bundle["resources"]["jobs"]["finelake_pipeline"]
    settings = jobs_sdk.JobSettings.from_dict(job)
    cron = settings.schedule.quartz_cron_expression.split()
    assert len(cron) in (6, 7), "Quartz cron: seconds minutes hours day-of-month month day-of-week [year]"
    assert settings.schedule.timezone_id
    assert settings.schedule.pause_status in (jobs_sdk.PauseStatus.PAUSED, jobs_sdk.PauseStatus.UNPAUSED)
    names = {p.name for p in settings.parameters}
    assert {"run_id", "max_documents", "max_queries"} <= names
    # the limits' defaults mean "no limit" once they reach the profile
    defaults = _job_parameter_defaults(job)
    match = next(t for t in job["tasks"] if t["task_key"] == "match")
    args = _substitute_job_parameters(_wheel_task_args(match), defaults)
    ctx = cli.commands["match"].make_context("match", args[1:])
    cfg = load_config("databricks", list(ctx.params["overrides"]))
    assert cfg.run.max_documents is None and cfg.run.max_queries is None


def _job_clusters(settings) -> dict:
    return {jc.job_cluster_key: jc.new_cluster for jc in settings.job_clusters}


def test_model_stages_run_on_gpu_job_clusters_with_the_profile_gpu_settings(bundle):
    settings = jobs_sdk.JobSettings.from_dict(bundle["resources"]["jobs"]["finelake_pipeline"])
    clusters = _job_clusters(settings)
    profile_gpu = {k: v for k, v in load_config("databricks").spark.conf.items() if ".resource.gpu." in k}
    assert profile_gpu, "the databricks profile sets the Spark GPU resource settings"
    by_task = {t.task_key: t for t in settings.tasks}
    served = MODEL_STAGES if bundle["bundle"]["target"] == "serving" else set()
    for stage in served:  # the servers hold the GPUs: Spark schedules none (see the test below)
        spec = clusters[by_task[stage].job_cluster_key]
        assert by_task[stage].job_cluster_key == "gpu_serving" and "gpu-ml" in spec.spark_version
        assert not any(".resource.gpu." in k for k in spec.spark_conf), stage
    for stage in (MODEL_STAGES - served) | {"index", "match"}:
        spec = clusters[by_task[stage].job_cluster_key]
        assert spec is not None and by_task[stage].new_cluster is None
        assert "gpu-ml" in spec.spark_version, (stage, spec.spark_version)
        assert re.match(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5|p5e|p5en)\.", spec.node_type_id), spec.node_type_id
        for k, v in profile_gpu.items():
            assert spec.spark_conf.get(k) == v, (stage, k)
        # no RLIMIT_AS on Python workers that load CUDA (see resources/finelake_pipeline.yml)
        assert "spark.executor.pyspark.memory" not in (spec.spark_conf or {})
    for stage in ("ingest", "budget", "report"):
        spec = clusters[by_task[stage].job_cluster_key]
        assert "gpu" not in spec.spark_version, stage
        assert not any(".resource.gpu." in k for k in (spec.spark_conf or {})), stage


def test_pypi_libraries_are_requirements_finelake_declares():
    """Every pypi library a task adds is one of finelake's declared requirements (some extra), with
    the same version specifier: the bundle cannot drift from setup.py."""
    declared = {}
    for line in importlib.metadata.requires("finelake") or []:
        r = Requirement(line)
        declared.setdefault(r.name.lower(), set()).add(str(r.specifier))
    b = load_bundle("dev")
    seen = 0
    for job in b["resources"]["jobs"].values():
        for task in jobs_sdk.JobSettings.from_dict(job).tasks:
            for lib in task.libraries or []:
                if lib.pypi:
                    r = Requirement(lib.pypi.package)
                    assert str(r.specifier) in declared.get(r.name.lower(), set()), lib.pypi.package
                    seen += 1
    assert seen, "the GPU and training tasks add libraries the runtime lacks"


def test_unity_catalog_schema_volume_targets_and_wheel_artifact():
    for target, mode in (("dev", "development"), ("prod", "production")):
        b = load_bundle(target)
        assert b["targets"][target]["mode"] == mode
        schemas = b["resources"]["schemas"]
        assert len(schemas) == 1
        schema = Schema.from_dict(next(iter(schemas.values())))
        volumes = {k: Volume.from_dict(v) for k, v in b["resources"]["volumes"].items()}
        for volume in volumes.values():
            assert volume.schema_name == schema.name and volume.catalog_name == schema.catalog_name
        # the tasks' lake, tables and inputs live in that schema
        job = b["resources"]["jobs"]["finelake_pipeline"]
        args = _substitute_job_parameters(_wheel_task_args(job["tasks"][0]), _job_parameter_defaults(job))
        ctx = cli.commands["ingest"].make_context("ingest", args[1:])
        cfg = load_config("databricks", list(ctx.params["overrides"]), lake=ctx.params["lake"])
        assert cfg.catalog.catalog == schema.catalog_name and cfg.catalog.database == schema.name
        in_volume = f"/Volumes/{schema.catalog_name}/{schema.name}/"
        # tables at an external location, never in a Volume (UC refuses such tables); index on one
        assert "/Volumes/" not in cfg.lake and cfg.lake.startswith(("s3://", "abfss://", "gs://"))
        assert cfg.index.path.startswith(in_volume + volumes["work"].name + "/")
        for name in ("queries", "documents"):
            assert ctx.params[name].split(":", 1)[-1].startswith(in_volume + volumes["inputs"].name)
    art = load_bundle("dev")["artifacts"]
    (wheel,) = art.values()
    assert wheel["type"] == "whl" and "build" in wheel["build"] and "--wheel" in wheel["build"]


class _SessionOf:
    """Just enough of a SparkSession for plan_stage: a cluster's SparkConf (what Databricks puts
    there from a job cluster's spark_conf), a non-local master and the parallelism of its cores."""

    def __init__(self, conf: dict[str, str], workers: int):
        cores = int(conf.get("spark.executor.cores", "1"))
        self.sparkContext = type("SC", (), {
            "master": "spark://driver:7077", "defaultParallelism": workers * cores,
            "environment": {},
            "getConf": lambda _self: dict({"spark.master": "spark://driver:7077"}, **conf)})()


def test_gpu_cluster_executor_cores_reach_plan_stage(spark):
    """The bundle's spark.executor.cores is the profile's and what plan_stage gives a model task
    (cores per GPU: the embedder's torch threads), not the 1 CPU it assumed without it."""
    from finelake.resources import MODEL_STAGE, plan_stage

    job = load_bundle("dev")["resources"]["jobs"]["finelake_pipeline"]
    spec = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}["gpu_models"]
    conf = spec["spark_conf"]
    assert conf["spark.executor.cores"] == load_config("databricks").spark.conf["spark.executor.cores"]
    plan = plan_stage(_SessionOf(conf, spec["num_workers"]), MODEL_STAGE)
    assert plan.profile is not None and plan.cpus_per_task == int(conf["spark.executor.cores"])
    assert plan.tasks == spec["num_workers"]  # one model task per GPU, one GPU per worker
