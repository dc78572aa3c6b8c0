"""Driver-side profile checks: ``finelake validate``, backend option checks in load_checked, the
Spark settings against a running session. No model is loaded anywhere here."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from finelake.cli import cli
from finelake.config import ConfigError, available_profiles, load_config
from finelake.validate import load_checked
from finelake.models.base import OptionError
from finelake.validate import session_mismatches, spark_conf_problems


def _validate(*args):
    return CliRunner().invoke(cli, ["validate", *args])


@pytest.fixture
def no_session(monkeypatch):
    """As on a laptop or a fresh driver: no Spark session runs in this process. (Earlier tests of
    the suite leave the shared local[2] session running; the comparison with a live session has
    its own test below.)"""
    import finelake.validate

    monkeypatch.setattr(finelake.validate, "active_session", lambda: None)


@pytest.mark.parametrize("profile", available_profiles())
def test_every_packaged_profile_validates(profile, no_session):
    r = _validate("--conf", profile)
    assert r.exit_code == 0, r.output
    assert f"validate: profile {profile} is valid" in r.output
    assert "models.generator:" in r.output and "models.judge:" in r.output


def _profile_with(tmp_path, body: str) -> str:
    p = tmp_path / "p.yaml"
    p.write_text(body)
    return str(p)


def test_misspelled_generator_option_exits_nonzero_and_names_it(tmp_path):
    path = _profile_with(tmp_path, "extends: databricks\nmodels:\n  generator:\n    options:\n"
                                   "      enable_prefix_cachng: true\n")
    r = _validate("--conf", path)
    assert r.exit_code != 0
    assert "models.generator.options.enable_prefix_cachng" in r.output
    assert "did you mean enable_prefix_caching" in r.output and path in r.output


def test_every_job_rejects_the_same_profile_on_the_driver(tmp_path):
    """load_checked (every command's and job's first step) checks backend options; nothing reaches
    an executor. load_config alone checks keys and types only (it sits below the backends)."""
    path = _profile_with(tmp_path, "extends: databricks\ngenericize:\n  model:\n    options:\n"
                                   "      engine_args: {max_num_seq: 8}\n")
    with pytest.raises(ConfigError, match=r"genericize\.model\.options\.engine_args\.max_num_seq"):
        load_checked(path)
    assert load_config(path).genericize.model.options["engine_args"]


@pytest.mark.parametrize("override,key", [
    ("models.generator.options.max_model_len=lots", "models.generator.options.max_model_len"),
    ("models.embedder.options.max_batch_token=4096", "models.embedder.options.max_batch_token"),
    ("models.judge.options.format=yaml", "models.judge.options.format"),
    ("models.judge.options.constrained=maybe", "models.judge.options.constrained"),
    ("models.generator.backend=vllmm", "models.generator.backend"),
    ("evaluate.judge.options.regex_style=none", "evaluate.judge.options.regex_style"),
])
def test_bad_settings_are_named(override, key):
    r = _validate("--conf", "databricks", "--set", override)
    assert r.exit_code != 0 and key in r.output, r.output


def test_relevance_judge_cuts_and_embedder_options_checked():
    with pytest.raises(ConfigError, match=r"models\.judge\.options\.cuts"):
        load_checked("local", ["models.judge.options.cuts=[0.5, 0.2, 0.3, 0.9]"])
    with pytest.raises(ConfigError, match=r"models\.judge\.options\.devise"):
        load_checked("local", ["models.judge.options.devise=cpu"])
    load_checked("local", ["models.judge.options.cuts=[0.1, 0.2, 0.3, 0.4]"])


def test_vllm_accepts_engine_args_names_and_rejects_others():
    from finelake.models.vllm_backend import VLLMGenerator
    from finelake.models.vllm_engine_args import engine_arg_names

    names, _ = engine_arg_names()
    assert {"enable_prefix_caching", "max_num_seqs", "max_num_batched_tokens"} <= names
    out = VLLMGenerator.check_options({"max_num_seqs": 64, "engine_args": {"block_size": 16},
                                       "max_model_len": "4096"})
    assert out["max_model_len"] == 4096 and out["max_num_seqs"] == 64
    with pytest.raises(OptionError) as e:
        VLLMGenerator.check_options({"max_num_seq": 64})
    assert e.value.key == "max_num_seq" and "max_num_seqs" in str(e.value)


def test_print_gives_yaml_that_loads_back_to_the_same_profile(tmp_path, no_session):
    r = CliRunner().invoke(cli, ["validate", "--conf", "cluster-sim", "--print"])
    assert r.exit_code == 0, r.output
    text = r.stdout
    data = yaml.safe_load(text)
    assert "extends" not in data and data["spark"]["master"].startswith("spark://")
    p = tmp_path / "resolved.yaml"
    p.write_text(text)
    again, orig = load_config(str(p)), load_config("cluster-sim")
    assert again.model_dump(exclude={"source_file"}) == orig.model_dump(exclude={"source_file"})


def test_spark_conf_contradictions_are_reported():
    cfg = load_config("databricks")
    assert spark_conf_problems(cfg) == []
    cfg.spark.conf = {**cfg.spark.conf, "spark.task.cpus": "16",
                      "spark.executor.resource.gpu.amount": "0"}
    problems = spark_conf_problems(cfg)
    assert any(p.startswith("spark.conf.spark.task.cpus: 16") for p in problems)
    assert any("spark.task.resource.gpu.amount" in p for p in problems)


def test_static_settings_that_differ_in_the_running_session_are_reported(spark):
    cfg = load_config("local")
    cfg.spark.conf = {"spark.executor.cores": "8",                 # static, not in the session
                      "spark.task.resource.gpu.amount": "1",       # static, not in the session
                      "spark.sql.shuffle.partitions": "7",         # runtime: get_spark sets it
                      "spark.app.name": spark.sparkContext.appName}  # static, equal
    cfg.spark.master = "spark://elsewhere:7077"
    out = session_mismatches(cfg, spark)
    keys = sorted(line.split(":")[0] for line in out)
    assert keys == ["spark.conf.spark.executor.cores", "spark.conf.spark.task.resource.gpu.amount",
                    "spark.master"]
    cfg.spark.conf = {"spark.sql.shuffle.partitions": "7"}
    cfg.spark.master = spark.sparkContext.master
    assert session_mismatches(cfg, spark) == []


@pytest.mark.parametrize("version, ok", [("4.0.0", True), ("4.0.2-amzn-0", True), ("4.2.0", True),
                                         ("3.5.2", False), ("3.5.5-amzn-1", False), ("2.4.8", False)])
def test_spark_older_than_4_is_refused_with_the_reason(version, ok):
    from finelake.validate import spark_version_problem

    problem = spark_version_problem(version)
    if ok:
        assert problem is None
    else:
        assert version in problem and "Spark 4" in problem and "emr-spark-8.0.0" in problem
    assert "cannot read a version" in spark_version_problem("unknown")


def test_validate_on_a_running_spark_3_session_exits_nonzero_naming_the_version(spark, monkeypatch):
    """The live path: `finelake validate` in a process whose session reports Spark 3.5.2."""
    import finelake.validate

    monkeypatch.setattr(finelake.validate, "active_session", lambda: spark)
    r = _validate("--conf", "local", "--set", f"spark.master={spark.sparkContext.master}")
    assert f"running session is Spark {spark.version}" in r.output
    assert "is older than" not in r.output  # the test session's own Spark (4.x) passes
    monkeypatch.setattr(type(spark), "version", property(lambda self: "3.5.2"))
    r = _validate("--conf", "local", "--set", f"spark.master={spark.sparkContext.master}")
    assert r.exit_code == 1 and "version 3.5.2 is older than 4.0" in r.output


def test_dynamic_allocation_with_gpu_executors_is_refused_naming_the_setting(tmp_path, no_session):
    path = _profile_with(tmp_path, "extends: databricks\nspark:\n  conf:\n"
                                   "    spark.dynamicAllocation.enabled: 'true'\n"
                                   "    spark.dynamicAllocation.shuffleTracking.enabled: 'true'\n")
    r = _validate("--conf", path)
    assert r.exit_code != 0
    assert "spark.conf.spark.dynamicAllocation.enabled=true with GPU executors" in r.output
    assert "Set spark.dynamicAllocation.enabled=false" in r.output


def test_tensor_parallel_size_is_checked_against_the_executors_gpus(tmp_path, no_session):
    r = _validate("--conf", "databricks", "--set", "models.judge.options.tensor_parallel_size=2")
    assert r.exit_code != 0
    assert "models.judge.options.tensor_parallel_size=2 needs 2 GPUs per task" in r.output
    path = _profile_with(tmp_path, "extends: databricks\nspark:\n  conf:\n"
                                   "    spark.executor.resource.gpu.amount: '4'\n"
                                   "models:\n  judge:\n    options:\n      tensor_parallel_size: 2\n")
    r = _validate("--conf", path)
    assert r.exit_code == 0, r.output


def test_validate_warns_when_the_lakes_documents_outgrow_the_budget_buckets(tmp_path, no_session,
                                                                            monkeypatch):
    """issue 23 item 5: a lake whose document count is too much for budget.buckets gets the
    warning, with the fix, from `finelake validate` (not a failure)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from finelake.jobs import budget

    lake = tmp_path / "lake"
    write_deltalake(str(lake / "documents"), pa.table({"doc_id": ["a", "b", "c"]}))
    monkeypatch.setattr(budget, "MAX_DOCS_PER_BUCKET", 1)  # 3 documents: 4 buckets needed
    r = _validate("--conf", "local", "--lake", str(lake))
    assert r.exit_code == 0, r.output
    assert "warning: budget.buckets=1 for 3 documents" in r.output
    assert "set budget.buckets: 4 (or more)" in r.output
    r = _validate("--conf", "local", "--lake", str(lake), "--set", "budget.buckets=4")
    assert "budget.buckets=" not in r.output
    # once the ledger is walked, its bucket count (read through delta-rs) is what the warning names
    write_deltalake(str(lake / "budget_ledger"), pa.table({"doc_id": ["a"], "buckets": [2]}))
    r = _validate("--conf", "local", "--lake", str(lake))
    assert r.exit_code == 0, r.output
    assert "warning: budget.buckets=2 for 3 documents" in r.output
    assert "this lake's ledger is walked with 2 bucket(s)" in r.output
