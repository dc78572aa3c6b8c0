import pytest

from finelake.config import ConfigError, available_profiles, load_config


def test_packaged_profiles_load_and_differ():
    assert {"local", "databricks", "emr"} <= set(available_profiles())
    local, dbx, emr = (load_config(p) for p in ("local", "databricks", "emr"))
    assert local.models.generator.backend == "llama_cpp"
    assert dbx.models.generator.backend == "vllm" and dbx.spark.delta == "delta-spark"
    assert dbx.spark.conf["spark.task.resource.gpu.amount"] == "1"
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
