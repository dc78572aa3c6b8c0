"""`finelake emr-steps` against botocore's own EMR service model (AddJobFlowSteps), offline, and
the bootstrap action script that the steps rely on.

What this cannot check: that a real EMR cluster runs the steps (its Spark and Delta versions, the
YARN GPU scheduling, the S3 paths); see README "Deploy".
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

botocore_session = pytest.importorskip("botocore.session")
from botocore.validate import ParamValidator  # noqa: E402

from finelake import deploy  # noqa: E402
from finelake.cli import cli  # noqa: E402
from finelake.config import ConfigError, load_config  # noqa: E402
from finelake.jobs.pipeline import run_order  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = ROOT / "deploy" / "emr" / "bootstrap.sh"
PIPELINE_ORDER = [s.name for s in run_order()]  # the one pipeline definition


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test: the validation is the service model, not AWS."""
    def refuse(*args, **kwargs):
        raise AssertionError("network call during an offline check")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def add_steps_shape(no_network):
    client = botocore_session.get_session().create_client(
        "emr", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    return client.meta.service_model.operation_model("AddJobFlowSteps").input_shape


def validate_add_steps(shape, steps: list) -> None:
    """botocore's parameter validation of an AddJobFlowSteps call (required members, types,
    lengths); raises with botocore's report on errors. Enums are checked too, since botocore's
    validator does not."""
    report = ParamValidator().validate({"JobFlowId": "j-1ABCDEFGHIJKL", "Steps": steps}, shape)
    if report.has_errors():
        raise AssertionError(report.generate_report())
    step_shape = shape.members["Steps"].member
    for step in steps:
        assert step["ActionOnFailure"] in step_shape.members["ActionOnFailure"].enum


def _cli_steps(*args: str) -> list:
    res = CliRunner().invoke(cli, ["emr-steps", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def _finelake_args(step: dict) -> list[str]:
    args = step["HadoopJarStep"]["Args"]
    return args[args.index(deploy.EMR_LAUNCHER) + 1:]


def _submit_confs(step: dict) -> dict[str, str]:
    args = step["HadoopJarStep"]["Args"]
    launcher = args.index(deploy.EMR_LAUNCHER)
    return dict(args[i + 1].split("=", 1) for i in range(launcher) if args[i] == "--conf")


def test_cli_output_passes_botocore_validation_for_add_job_flow_steps(add_steps_shape):
    steps = _cli_steps("--conf", "emr", "--run-id", "20261204T000000Z-test",
                       "--wheel", "s3://bucket/finelake/finelake-0.1.0-py3-none-any.whl",
                       "--queries", "s3://bucket/in/queries/", "--documents", "s3://bucket/in/docs/",
                       "--max-documents", "1000")
    validate_add_steps(add_steps_shape, steps)
    # and a broken step is caught by the same validation (the check has teeth)
    broken = json.loads(json.dumps(steps))
    del broken[0]["HadoopJarStep"]["Jar"]
    broken[1]["HadoopJarStep"]["Args"] = "spark-submit"  # a string, not a list
    with pytest.raises(AssertionError, match="Jar|Args"):
        validate_add_steps(add_steps_shape, broken)


def test_one_step_per_stage_in_pipeline_order_sharing_the_run_id(add_steps_shape):
    steps = _cli_steps("--conf", "emr", "--run-id", "r-42", "--documents", "s3://b/docs/")
    validate_add_steps(add_steps_shape, steps)
    tasks = [_finelake_args(s)[0] for s in steps]
    assert tasks == PIPELINE_ORDER
    for s in steps:
        assert s["ActionOnFailure"] == "CANCEL_AND_WAIT"
        assert s["HadoopJarStep"]["Jar"] == "command-runner.jar"
        assert s["HadoopJarStep"]["Args"][0] == "spark-submit"
        args = _finelake_args(s)
        assert args[args.index("--run-id") + 1] == "r-42"


def test_step_arguments_parse_with_the_finelake_cli():
    """What follows the launcher is a finelake command line: it parses with the real CLI and its
    profile and overrides load (unknown keys would be errors)."""
    steps = _cli_steps("--conf", "emr", "--run-id", "r1", "--lake", "s3://b/lake",
                       "--set", "match.default_threshold=0.8", "--queries", "s3://b/q.jsonl",
                       "--documents", "s3://b/d/", "--max-queries", "50", "--max-documents", "20")
    for s in steps:
        args = _finelake_args(s)
        ctx = cli.commands[args[0]].make_context(args[0], args[1:])
        p = ctx.params
        cfg = load_config(p["profile"], list(p["overrides"]), lake=p["lake"])
        assert cfg.lake == "s3://b/lake" and cfg.match.default_threshold == 0.8
        if args[0] == "ingest":
            assert (p["queries"], p["documents"]) == ("s3://b/q.jsonl", "s3://b/d/")
        # each stage takes the limit its scope reads (genericize: queries; match, instantiate:
        # documents), with the value given
        assert p.get("max_queries", 50) == 50 and p.get("max_documents", 20) == 20
        if args[0] == "genericize":
            assert p["max_queries"] == 50
        if args[0] in ("match", "instantiate"):
            assert p["max_documents"] == 20


def test_steps_carry_the_profile_spark_conf_delta_jars_and_the_wheel():
    cfg = load_config("emr")
    wheel = "s3://bucket/finelake-0.1.0-py3-none-any.whl"
    steps = _cli_steps("--conf", "emr", "--wheel", wheel, "--documents", "s3://b/d/")
    gpu = {k: v for k, v in cfg.spark.conf.items() if ".resource.gpu." in k}
    assert gpu, "the emr profile sets the Spark GPU resource settings"
    for s in steps:
        confs = _submit_confs(s)
        for k, v in cfg.spark.conf.items():
            assert confs[k] == v, k
        assert confs["spark.pyspark.python"] == deploy.EMR_PYTHON
        hf_home = str(Path(deploy.EMR_LAUNCHER).parent / "hf")  # made by the bootstrap action
        assert confs["spark.executorEnv.HF_HOME"] == hf_home
        assert confs["spark.executorEnv.HF_HUB_OFFLINE"] == "0"
        assert confs["spark.pyspark.driver.python"] == deploy.EMR_PYTHON
        args = s["HadoopJarStep"]["Args"]
        jars = args[args.index("--jars") + 1].split(",")
        assert any(j.startswith("/usr/share/aws/delta/lib/delta-spark") for j in jars)
        py_files = args[args.index("--py-files") + 1].split(",")
        assert py_files[0] == wheel and any("delta-spark" in p for p in py_files[1:])


def test_configuration_errors_name_the_problem():
    res = CliRunner().invoke(cli, ["emr-steps", "--conf", "emr"])
    assert res.exit_code == 1 and "--queries and/or --documents" in res.output
    res = CliRunner().invoke(cli, ["emr-steps", "--conf", "emr", "--documents", "d",
                                   "--set", "match.no_such_key=1"])
    assert res.exit_code == 1 and "match.no_such_key" in res.output
    cfg = load_config("emr", ["spark.conf={'spark.pyspark.python': '/usr/bin/python3'}"])
    with pytest.raises(ConfigError, match="spark.pyspark.python"):
        deploy.emr_steps(cfg, profile="emr", run_id="r", documents="d")
    with pytest.raises(ValueError, match="pipeline order"):
        deploy.emr_steps(load_config("emr"), profile="emr", run_id="r", tasks=["match", "index"])
    with pytest.raises(ValueError, match="unknown pipeline task"):
        deploy.emr_steps(load_config("emr"), profile="emr", run_id="r", tasks=["nope"])


def test_a_subsequence_of_tasks_resumes_a_run(add_steps_shape):
    steps = deploy.emr_steps(load_config("emr"), profile="emr", run_id="r7",
                             tasks=["instantiate", "judge", "budget", "report"])
    validate_add_steps(add_steps_shape, steps)
    assert [_finelake_args(s)[0] for s in steps] == ["instantiate", "judge", "budget", "report"]


def test_bootstrap_script_is_valid_bash_and_makes_what_the_steps_use():
    bash = shutil.which("bash")
    assert bash
    subprocess.run([bash, "-n", str(BOOTSTRAP)], check=True)
    text = BOOTSTRAP.read_text()
    home = str(Path(deploy.EMR_LAUNCHER).parent)
    assert f'HOME_DIR="${{FINELAKE_HOME:-{home}}}"' in text
    assert deploy.EMR_PYTHON == f"{home}/venv/bin/python" and '"$PY" -m venv "$HOME_DIR/venv"' in text
    assert f'cat > "$HOME_DIR/{Path(deploy.EMR_LAUNCHER).name}"' in text
    assert 'mkdir -p "$HOME_DIR/hf"' in text and 'os.environ.setdefault("HF_HOME", "$HOME_DIR/hf")' in text


@pytest.fixture
def run_job_flow_shape(no_network):
    client = botocore_session.get_session().create_client(
        "emr", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    return client.meta.service_model.operation_model("RunJobFlow").input_shape


def _run_job_flow(configurations: list) -> dict:
    """The RunJobFlow call README's `aws emr create-cluster` makes, with the shipped files."""
    return {
        "Name": "finelake", "ReleaseLabel": deploy.EMR_RELEASE_LABEL,
        "Applications": [{"Name": "Spark"}], "Configurations": configurations,
        "Instances": {"InstanceGroups": [
            {"InstanceRole": "MASTER", "InstanceType": "m7i.2xlarge", "InstanceCount": 1},
            {"InstanceRole": "CORE", "InstanceType": "g6e.4xlarge", "InstanceCount": 4}],
            "KeepJobFlowAliveWhenNoSteps": True},
        "BootstrapActions": [{"Name": "finelake", "ScriptBootstrapAction": {
            "Path": "s3://bucket/finelake/bootstrap.sh",
            "Args": ["s3://bucket/finelake/finelake-0.1.0-py3-none-any.whl", "cluster"]}}],
        "JobFlowRole": "EMR_EC2_DefaultRole", "ServiceRole": "EMR_DefaultRole",
    }


def test_yarn_gpu_configurations_pass_botocore_validation_for_run_job_flow(run_job_flow_shape):
    configurations = json.loads((ROOT / deploy.EMR_CONFIGURATIONS).read_text())
    report = ParamValidator().validate(_run_job_flow(configurations), run_job_flow_shape)
    assert not report.has_errors(), report.generate_report()
    broken = json.loads(json.dumps(configurations))
    broken[0]["Properties"]["yarn.resource-types"] = 1         # not a string
    broken[1]["Configurations"][0]["Classificaton"] = "gpu"    # misspelled member
    report = ParamValidator().validate(_run_job_flow(broken), run_job_flow_shape)
    assert report.has_errors() and "Classificaton" in report.generate_report()


def test_yarn_gpu_configurations_agree_with_each_other_and_the_profile():
    """As EMR's release guide gives them for Amazon Linux 2023 releases (RAPIDS page): GPU resource
    plugin and type, LinuxContainerExecutor with cgroups under one root (mounted by the bootstrap
    action), the GPU module of container-executor, the DominantResourceCalculator; Delta on."""
    by = {c["Classification"]: c for c in json.loads((ROOT / deploy.EMR_CONFIGURATIONS).read_text())}
    site = by["yarn-site"]["Properties"]
    assert site["yarn.resource-types"] == site["yarn.nodemanager.resource-plugins"] == "yarn.io/gpu"
    assert site["yarn.nodemanager.container-executor.class"].endswith("LinuxContainerExecutor")
    inner = {c["Classification"]: c["Properties"] for c in by["container-executor"]["Configurations"]}
    assert inner["gpu"]["module.enabled"] == "true"
    root = site["yarn.nodemanager.linux-container-executor.cgroups.mount-path"]
    assert inner["cgroups"]["root"] == root
    assert inner["cgroups"]["yarn-hierarchy"] == site["yarn.nodemanager.linux-container-executor.cgroups.hierarchy"]
    assert f"{root}/devices" in BOOTSTRAP.read_text()
    assert by["capacity-scheduler"]["Properties"]["yarn.scheduler.capacity.resource-calculator"].endswith(
        "DominantResourceCalculator")
    assert by["delta-defaults"]["Properties"]["delta.enabled"] == "true"
    # the profile asks YARN for what the configuration offers: executors with GPUs, found by the
    # discovery script EMR ships
    conf = load_config("emr").spark.conf
    assert float(conf["spark.executor.resource.gpu.amount"]) >= 1
    assert conf["spark.executor.resource.gpu.discoveryScript"] == "/usr/lib/spark/scripts/gpu/getGpusResources.sh"


def test_emr_profile_turns_dynamic_allocation_off_and_sizes_the_engine_overhead(monkeypatch):
    import finelake.validate

    # as on the machine that prints the profile: no Spark session here to compare it with
    monkeypatch.setattr(finelake.validate, "active_session", lambda: None)
    res = CliRunner().invoke(cli, ["validate", "--conf", "emr", "--print"])
    assert res.exit_code == 0, res.output
    import yaml

    conf = yaml.safe_load(res.stdout)["spark"]["conf"]
    assert conf["spark.dynamicAllocation.enabled"] == "false"
    assert int(conf["spark.executor.instances"]) >= 1
    overhead = int(conf["spark.executor.memoryOverhead"].rstrip("g"))
    heap = int(conf["spark.executor.memory"].rstrip("g"))
    assert overhead >= 32 and heap + overhead <= 120  # the engine's room, within a 128 GiB node
    assert "spark.executor.pyspark.memory" not in conf  # RLIMIT_AS, which CUDA exceeds
    # and every step carries them
    for s in _cli_steps("--conf", "emr", "--documents", "s3://b/d/"):
        assert _submit_confs(s)["spark.dynamicAllocation.enabled"] == "false"


def test_the_emr_release_named_everywhere_is_the_spark_4_one():
    assert deploy.EMR_RELEASE_LABEL == "emr-spark-8.0.0"
    for path in (ROOT / "README.md", BOOTSTRAP, ROOT / "conf" / "emr.yaml"):
        text = path.read_text()
        assert deploy.EMR_RELEASE_LABEL in text, path
        assert "EMR 7.x ships Spark 3.5" in text or path.name == "bootstrap.sh", path
