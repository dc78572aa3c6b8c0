"""MLflow for ``finelake train`` and ``finelake evaluate``: where runs go, what a run records, and
how the trained model is logged and registered.

The trained model is logged as an **MLflow model** of the ``transformers`` flavour (an ``MLmodel``
file, a signature, an input example, pinned pip requirements; the ``save_pretrained`` folder is
copied under ``model/``), then registered from that logged model. A registry that is Unity Catalog
(``registry_uri: databricks-uc``) accepts nothing else: MLflow's UC client refuses a model without
an ``MLmodel`` or without a signature that has both inputs and outputs
(``mlflow/store/_unity_catalog/registry/rest_store.py``, ``_validate_model_signature``).
``tests/test_train_registry.py`` runs that client against a local server answering Unity
Catalog's REST calls, so MLflow's own checks run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from finelake.method import training as tm
from finelake.runtime import FinelakeError
from finelake.tracking import setup_mlflow, tracking_settings  # noqa: F401 - the jobs' names for them

log = logging.getLogger(__name__)

# Jobs run where only package registries are reachable: no MLflow usage pings (read at import).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

MODEL_SUBDIR = "model"
"""Where the ``transformers`` flavour keeps the ``save_pretrained`` folder inside an MLflow model
(``mlflow.transformers.model_io._MODEL_BINARY_FILE_NAME``)."""

INPUT_EXAMPLE = tm.pair_example("Name three prime numbers.", "")["prompt"]
"""The input example logged with a trained model: a prompt in the §4.2 format it was trained on."""


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": "[1, 2]"}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def registered_name(tc, table: str, method: str) -> str:
    """``<prefix>_<table>_<method>`` (Unity Catalog names allow letters, digits, underscores)."""
    return f"{tc.mlflow.registered_model_prefix}_{table}_{method}".replace("-", "_")


def check_registrable(tc, method: str) -> None:
    """Refuse, before training, a run whose model could not be registered.

    An unmerged LoRA run saves adapters only (no ``config.json``): neither MLflow's
    ``transformers`` flavour nor ``finelake evaluate`` loads such a folder.

    Raises:
        FinelakeError: ``method`` is ``lora``, ``train.lora.merge`` is false and
            ``train.mlflow.register_model`` is true (both keys named).
    """
    if method == "lora" and not tc.lora.merge and tc.mlflow.register_model:
        raise FinelakeError("train.lora.merge is false, so the run saves LoRA adapters only, which "
                            "cannot be registered as a model: set train.lora.merge: true or "
                            "train.mlflow.register_model: false")


def model_signature():
    """The signature of a trained causal LM: a prompt string in, the generated string out, with
    the generation settings a caller may pass (``max_new_tokens``, ``temperature``)."""
    from mlflow.models import infer_signature

    return infer_signature(model_input=[INPUT_EXAMPLE], model_output=["2, 3 and 5."],
                           params={"max_new_tokens": 256, "temperature": 0.0})


def pip_requirements() -> list[str]:
    """What loading the logged model needs, pinned to the versions that saved it (given, not
    inferred: MLflow infers requirements by loading the model in a subprocess)."""
    import importlib.metadata as md

    out = []
    for dist in ("transformers", "torch", "safetensors", "tokenizers", "accelerate"):
        try:
            out.append(f"{dist}=={md.version(dist).split('+')[0]}")
        except md.PackageNotFoundError:
            continue
    return out


def log_trained_model(model_dir: str) -> Any:
    """Log a ``save_pretrained`` folder (model and tokenizer) to the active run as an MLflow model.

    ``mlflow.transformers.log_model`` from the local checkpoint, task ``text-generation``: the
    folder is copied under ``model/`` (:data:`MODEL_SUBDIR`) with the tokenizer as a component,
    plus ``MLmodel``, the signature (:func:`model_signature`), the input example
    (:data:`INPUT_EXAMPLE`) and :func:`pip_requirements`. From a folder MLflow neither loads the
    weights nor runs the example through them (``finelake evaluate`` does).

    Args:
        model_dir: local folder with ``config.json``, the weights and the tokenizer.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` is ``models:/<model id>``).

    Raises:
        FinelakeError: ``model_dir`` holds no ``config.json`` (not a full model).
    """
    import mlflow

    if not Path(model_dir, "config.json").is_file():
        raise FinelakeError(f"{model_dir} holds no config.json: not a transformers model folder")
    return mlflow.transformers.log_model(
        transformers_model=str(model_dir), name=MODEL_SUBDIR, task="text-generation",
        signature=model_signature(),
        input_example=INPUT_EXAMPLE, pip_requirements=pip_requirements())


def register_logged_model(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register a logged MLflow model as a new version of ``name`` in the current registry
    (a local one, a tracking server's, or Unity Catalog with ``databricks-uc``).

    Args:
        model_uri: ``models:/<model id>`` or ``runs:/<run id>/<path>`` of an MLflow model.
        name: the registered model (``catalog.schema.model`` in Unity Catalog).
        tags: model-version tags.

    Returns:
        ``models:/<name>/<version>``.

    Raises:
        mlflow.exceptions.MlflowException: the registry refused it (in Unity Catalog: no
            ``MLmodel``, no signature, or a signature without outputs).
    """
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags=tags)
    return f"models:/{name}/{mv.version}"


def transformers_folder(path: str) -> str:
    """The ``save_pretrained`` folder inside a downloaded MLflow model (``<path>/model``), or
    ``path`` itself when it is one (models registered before they were MLflow models)."""
    inner = Path(path, MODEL_SUBDIR)
    if Path(path, "MLmodel").is_file() and Path(inner, "config.json").is_file():
        return str(inner)
    return path


def log_run_inputs(cfg, ctx, ts, method, budget, budget_reason, lr, epochs, steps, precision,
                   completion_only, n_params, n_trainable) -> None:
    """Params, tags, the resolved config and the dataset lineage of one training run
    (``ts``: :class:`finelake.jobs.train.TrainingSet`)."""
    import mlflow
    import pandas as pd
    import yaml
    from mlflow.data.delta_dataset_source import DeltaDatasetSource

    tc = cfg.train
    params = {f"train.{k}": v for k, v in flatten(tc.model_dump(exclude={"mlflow"})).items()}
    params.update({"train.method": method, "train.learning_rate": lr, "train.epochs": epochs,
                   "train.max_steps": steps, "train.precision": precision,
                   "train.completion_only_loss": completion_only, "tokenizer": cfg.tokenizer.model,
                   "data.table": ts.table, "data.path": ts.path, "data.version": ts.version,
                   "data.layout": ts.kind, "data.rows_read": ts.rows_read,
                   "data.examples": len(ts.examples), "data.tokens": ts.tokens,
                   "data.tokens_available": ts.tokens_available, "data.token_budget": budget,
                   "data.budget_reason": budget_reason, "model.parameters": n_params,
                   "model.trainable_parameters": n_trainable, "finelake.run_id": ctx.run_id})
    mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
    runs = ",".join(ts.generating_runs)
    tags = {"finelake.table": ts.table, "finelake.table_path": ts.path,
            "finelake.table_version": str(ts.version), "finelake.rows": str(len(ts.examples)),
            "finelake.tokens": str(ts.tokens), "finelake.generating_run_ids": runs[:5000],
            "finelake.run_id": ctx.run_id, "finelake.method": method,
            "finelake.profile": cfg.profile}
    mlflow.set_tags(tags)
    mlflow.log_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False),
                    "config/resolved.yaml")
    df = pd.DataFrame(ts.examples)
    df["num_tokens"] = ts.token_counts
    source = DeltaDatasetSource(path=ts.path, delta_table_version=ts.version)
    ds = mlflow.data.from_pandas(df, source=source, name=f"{ts.table}@v{ts.version}")
    mlflow.log_input(ds, context="training",
                     tags={"table": ts.table, "version": str(ts.version),
                           "rows": str(len(ts.examples)), "tokens": str(ts.tokens),
                           "generating_run_ids": runs[:250]})
