"""finelake train registers into Unity Catalog: MLflow's own ``databricks-uc`` client, its REST
calls answered by a local server (tests/uc_registry_server.py), so the client's checks run for
real (an ``MLmodel`` and a signature with inputs and outputs, before any version is created)."""

from __future__ import annotations

import json

import pytest
import yaml

from test_train import PAIRS_ROWS, _tiny_cfg, _write
from uc_registry_server import UnityCatalogServer

UC_NAME = "main.finelake.finelake_pairs_scratch"


@pytest.fixture
def uc(monkeypatch):
    """A Unity Catalog registry on localhost; MLflow's client finds it as the default profile."""
    with UnityCatalogServer() as server:
        monkeypatch.setenv("DATABRICKS_HOST", server.url)
        monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-local-test")
        monkeypatch.delenv("DATABRICKS_CONFIG_PROFILE", raising=False)
        monkeypatch.setenv("DATABRICKS_CONFIG_FILE", "/nonexistent/.databrickscfg")
        yield server


def _uc_cfg(lake_dir, *extra):
    return _tiny_cfg(lake_dir, "train.max_steps=1", "train.mlflow.registry_uri=databricks-uc",
                     "train.mlflow.registered_model_prefix=main.finelake.finelake", *extra)


def test_train_registers_an_mlflow_model_with_a_signature_in_unity_catalog(lake_dir, uc):
    from finelake.jobs.train import run_train
    from finelake.runtime import StageContext
    from finelake.tables import PAIRS

    version = _write(lake_dir, PAIRS, PAIRS_ROWS, "pipeline-run-1")
    st = run_train(StageContext(_uc_cfg(lake_dir)), table="pairs", method="scratch")

    assert st.extra["model_uri"] == f"models:/{UC_NAME}/1"
    assert uc.unanswered == []
    mv = uc.models[UC_NAME]["versions"]["1"]
    assert mv["status"] == "READY" and mv["run_id"] == st.extra["mlflow_run_id"]
    assert {t["key"]: t["value"] for t in mv["tags"]}["table_version"] == str(version)
    files = uc.version_files(UC_NAME, "1")
    mlmodel = yaml.safe_load(files["MLmodel"])
    assert mlmodel["flavors"]["transformers"]["task"] == "text-generation"
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.transformers"
    sig = mlmodel["signature"]
    assert json.loads(sig["inputs"])[0]["type"] == "string"
    assert json.loads(sig["outputs"])[0]["type"] == "string"
    assert {p["name"] for p in json.loads(sig["params"])} == {"max_new_tokens", "temperature"}
    assert "Instruction:" in files[mlmodel["saved_input_example_info"]["artifact_path"]].decode()
    assert {"model/config.json", "model/model.safetensors", "model/finelake_train.json",
            "requirements.txt"} <= set(files)
    assert json.loads(files["model/finelake_train.json"])["method"] == "scratch"

    # evaluate reads the registered version back through the same client (presigned downloads)
    from finelake.jobs.evaluate import resolve_model_path

    folder = resolve_model_path(StageContext(_uc_cfg(lake_dir)), st.extra["model_uri"])
    assert json.loads(open(f"{folder}/finelake_train.json").read())["method"] == "scratch"
    assert open(f"{folder}/config.json", "rb").read() == files["model/config.json"]
    assert uc.unanswered == []


@pytest.mark.parametrize("logged_as", ["plain folder", "MLmodel without a signature"])
def test_unity_catalog_refuses_a_model_without_a_signature(lake_dir, uc, tmp_path, logged_as):
    """What train logged before (a save_pretrained folder), or an MLflow model with no signature:
    MLflow's UC client refuses it before any model version is created."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from finelake.jobs.tracking import register_logged_model, setup_mlflow

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    setup_mlflow(_uc_cfg(lake_dir))

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):  # no type hints: no signature
            return model_input

    with mlflow.start_run() as run:
        if logged_as == "plain folder":
            mlflow.log_artifacts(str(folder), artifact_path="model")
        else:
            uri = mlflow.pyfunc.log_model(name="model", python_model=Echo(),
                                          pip_requirements=[]).model_uri
    with pytest.raises(MlflowException, match="signature"):
        if logged_as == "plain folder":  # how train registered it before (MLflow 3's
            # register_model takes no runs:/ URI without a logged model, so a version from the
            # artifact location)
            client = mlflow.MlflowClient()
            client.create_registered_model(UC_NAME)
            client.create_model_version(UC_NAME, source=f"{run.info.artifact_uri}/model",
                                        run_id=run.info.run_id)
        else:
            register_logged_model(uri, UC_NAME, tags={})
    assert uc.models.get(UC_NAME, {"versions": {}})["versions"] == {}  # no version created
    assert uc.unanswered == []


def test_unmerged_lora_with_registration_is_refused_before_training(lake_dir):
    from finelake.jobs.train import run_train
    from finelake.runtime import FinelakeError, StageContext

    ctx = StageContext(_tiny_cfg(lake_dir, "train.lora.merge=false"))
    with pytest.raises(FinelakeError, match="train.lora.merge.*train.mlflow.register_model"):
        run_train(ctx, table="pairs", method="lora")  # no pairs table: it stops before reading
