import pytest

from finelake.config import ConfigError, available_profiles, load_config


def test_packaged_profiles_load_and_differ():
    assert {"local", "databricks", "emr"} <= set(available_profiles())
    local, dbx, emr = (load_config(p) for p in ("local", "databricks", "emr"))
    assert local.models.generator.backend == "llama_cpp"
    assert dbx.models.generator.backend == "vllm" and dbx.spark.delta == "delta-spark"
    assert dbx.spark.conf["spark.task.resource.gpu.amount"] == "0.125"  # CPU stages share the GPU
    assert emr.spark.conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert dbx.genericize.model.model == "fineinstructions/query_templatizer"


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(open(load_config("local").source_file).read() + "\nmatch:\n  chunkz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "match.chunkz: unknown key" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_and_override_origin():
    with pytest.raises(ConfigError, match=r"match.chunks \(from --set\)"):
        load_config("local", ["match.chunks=many"])
    cfg = load_config("local", ["match.chunks=3", "match.sigma=0.1"], lake="/tmp/x")
    assert (cfg.match.chunks, cfg.match.sigma, cfg.lake) == (3, 0.1, "/tmp/x")


def test_missing_profile_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-profile")
    p = tmp_path / "x.yaml"
    p.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))


# ----------------------------------------------------------------------------- extends

FLAT = __import__("pathlib").Path(__file__).parent / "data" / "flat_profiles"


@pytest.mark.parametrize("name", ["databricks", "emr"])
def test_cluster_profiles_resolve_to_their_flat_versions(name):
    """databricks/emr extend conf/_cluster.yaml; resolved, every key equals the flat profile kept in
    tests/data/flat_profiles (the pre-inheritance file; update it with any intended change)."""
    inherited = load_config(name).model_dump(exclude={"source_file"})
    flat = load_config(str(FLAT / f"{name}.yaml")).model_dump(exclude={"source_file"})

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    a, b = dict(leaves(inherited)), dict(leaves(flat))
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
    assert not differ, (f"conf/{name}.yaml (with conf/_cluster.yaml) and "
                        f"tests/data/flat_profiles/{name}.yaml differ at {differ}; an intended "
                        "change to a cluster profile must be mirrored in the flat copy")
    assert inherited["profile"] == name


def test_cluster_profiles_keep_their_differences():
    dbx, emr = load_config("databricks"), load_config("emr")
    assert (dbx.catalog.catalog, emr.catalog.catalog) == ("main", None)
    assert dbx.spark.conf["spark.sql.shuffle.partitions"] == "auto"
    assert emr.spark.conf["spark.sql.shuffle.partitions"] == "200"
    assert "spark.sql.extensions" not in dbx.spark.conf
    assert dbx.index.path == "/Volumes/main/finelake/work/_index" and emr.index.path is None
    assert (dbx.train.mlflow.registry_uri, emr.train.mlflow.registry_uri) == ("databricks-uc", None)
    # shared values come from the base
    assert dbx.models.generator == emr.models.generator
    assert dbx.spark.conf["spark.task.resource.gpu.amount"] == emr.spark.conf["spark.task.resource.gpu.amount"]


def test_cluster_sim_overrides_only_the_laptop_parts():
    dbx, sim = load_config("databricks"), load_config("cluster-sim")
    assert sim.profile == "cluster-sim"
    assert sim.spark.master.startswith("spark://") and sim.catalog.catalog is None
    assert sim.spark.delta == dbx.spark.delta == "delta-spark"
    for role in ("generator", "embedder", "judge"):
        assert getattr(sim.models, role).backend == getattr(dbx.models, role).backend
        assert getattr(sim.models, role).model.startswith("embedded:")
    assert sim.models.judge.options["inner_backend"] == "vllm"
    assert sim.genericize.model.backend == "vllm"
    assert sim.models.generator.options["dtype"] == "float32"
    assert (sim.genericize.mode, sim.instantiate.mode) == ("decomposed", "decomposed")
    assert sim.index.path is None and not sim.lake.startswith(("dbfs:", "s3:"))
    # untouched keys inherited from databricks
    assert sim.models.generator.options["tensor_parallel_size"] == 1
    assert sim.models.generator.options["enable_prefix_caching"] is True
    assert sim.train.lora == dbx.train.lora


def test_shared_bases_are_not_listed_as_profiles():
    names = available_profiles()
    assert "cluster-sim" in names and not any(n.startswith("_") for n in names)


def test_extends_merges_deeply_relative_and_packaged(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "extends: local\nmatch:\n  chunks: 3\nspark:\n  conf:\n    spark.x: 'a'\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base\nmatch:\n  sigma: 0.2\nspark:\n  conf:\n    spark.y: 'b'\n"
                     "run:\n  max_queries: null\n")
    cfg = load_config(str(child))
    local = load_config("local")
    assert (cfg.match.chunks, cfg.match.sigma) == (3, 0.2)          # both levels kept
    assert cfg.spark.conf["spark.x"] == "a" and cfg.spark.conf["spark.y"] == "b"
    assert cfg.spark.conf["spark.driver.memory"] == local.spark.conf["spark.driver.memory"]
    assert cfg.run.max_queries is None and local.run.max_queries == 300   # null replaces
    assert cfg.models == local.models


def test_extends_lists_replace(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("extends: local\ncompare:\n  runs: ['pairs:lora']\n")
    assert load_config(str(p)).compare.runs == ["pairs:lora"]


def test_extends_cycle_and_missing_parent_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ConfigError, match="extends: cycle") as e:
        load_config(str(tmp_path / "a.yaml"))
    assert "a.yaml" in str(e.value) and "b.yaml" in str(e.value)
    (tmp_path / "c.yaml").write_text("extends: no-such-parent\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: extends: 'no-such-parent'"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("extends: [local]\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: extends:"):
        load_config(str(tmp_path / "d.yaml"))


def test_unknown_key_in_a_parent_names_the_parent(tmp_path):
    (tmp_path / "parent.yaml").write_text("extends: local\nmatch:\n  chunkz: 3\n")
    (tmp_path / "child.yaml").write_text("extends: parent\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "child.yaml"))
    msg = str(e.value)
    assert "match.chunkz (in " in msg and str(tmp_path / "parent.yaml") in msg and "unknown key" in msg


# ----------------------------------------------------------------------------- hub access


def test_hub_model_ids_only_for_profiles_that_name_hub_models():
    from finelake.config import hub_model_ids

    assert hub_model_ids(load_config("local")) == []
    assert hub_model_ids(load_config("cluster-sim")) == []
    ids = hub_model_ids(load_config("databricks"))
    assert "flowaicom/Flow-Judge-v0.1" in ids and "meta-llama/Llama-3.2-1B" in ids
    assert "gpt-4-turbo" not in ids  # served by the openai backend, not a hub id
    assert load_config("cluster-sim").spark.conf["spark.executorEnv.HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("profile,offline", [("local", "1"), ("databricks", None)])
def test_cli_forces_hub_offline_only_without_hub_models(profile, offline, tmp_path, monkeypatch):
    import os

    from click.testing import CliRunner

    from finelake.cli import cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    r = CliRunner().invoke(cli, ["tables", "--conf", profile, "--lake", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert os.environ.get("HF_HUB_OFFLINE") == offline


def test_a_unity_catalog_lake_inside_a_volume_is_refused_where_the_profile_loads():
    """UC allows no table inside a Volume; every stage registers its tables at <lake>/<name>."""
    for lake in ("dbfs:/Volumes/main/finelake/lake", "/Volumes/main/finelake/lake"):
        with pytest.raises(ConfigError, match=r"lake: .* inside a Unity Catalog Volume.*external location"):
            load_config("databricks", lake=lake)
    # the session catalog (no catalog.catalog) may use any path, and an external location is fine
    assert load_config("databricks", ["catalog.catalog=null"], lake="/Volumes/x/y/z").lake == "/Volumes/x/y/z"
    assert load_config("databricks", lake="abfss://c@a.dfs.core.windows.net/lake").catalog.catalog == "main"


def test_a_null_in_a_child_profile_unsets_the_parents_spark_conf_key_and_model_option(tmp_path):
    """conf/databricks-serving.yaml unsets the GPU settings and the vLLM engine options it
    inherits; deep_merge keeps mappings key by key, so null is how a child removes a key."""
    from finelake.config import load_config

    child = tmp_path / "child.yaml"
    child.write_text("extends: databricks\nprofile: child\n"
                     "spark:\n  conf:\n    spark.task.resource.gpu.amount: null\n"
                     "genericize:\n  model:\n    backend: openai\n"
                     "    options: {dtype: null, max_model_len: null, gpu_memory_utilization: null,\n"
                     "              enable_prefix_caching: null, base_url: 'http://h:1/v1', provider: vllm}\n")
    cfg = load_config(str(child))
    parent = load_config("databricks")
    assert "spark.task.resource.gpu.amount" in parent.spark.conf
    assert "spark.task.resource.gpu.amount" not in cfg.spark.conf
    assert cfg.spark.conf["spark.executor.cores"] == parent.spark.conf["spark.executor.cores"]
    assert cfg.genericize.model.options == {"base_url": "http://h:1/v1", "provider": "vllm"}
    served = load_config("databricks-serving")
    assert not any(".resource.gpu." in k for k in served.spark.conf)
