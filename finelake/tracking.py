"""Where MLflow runs go: the tracking and registry settings of a profile, and pointing MLflow at them.

Core (below the jobs): ``finelake train``/``evaluate``/``compare`` log through it, and ``finelake
optimize`` reads the Delta versions training runs pinned from the same tracking store. How a
trained model is logged and registered is :mod:`finelake.jobs.tracking`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from finelake import storage
from finelake.errors import FinelakeError


def tracking_settings(cfg) -> dict[str, Optional[str]]:
    """Tracking URI, registry URI and artifact location for this profile.

    Returns:
        ``{"tracking_uri", "registry_uri", "artifact_location", "experiment"}``.

    Raises:
        FinelakeError: no tracking URI is configured and the lake is not a local folder
            (sqlite needs a local file).
    """
    t = cfg.train.mlflow
    uri, art = t.tracking_uri, t.artifact_location
    if uri is None:
        root = storage.root(cfg.lake)
        if storage.is_uri(root):
            raise FinelakeError(f"lake {root} is not a local folder: set train.mlflow.tracking_uri "
                                "(e.g. 'databricks' or your MLflow server)")
        os.makedirs(os.path.join(root, "_mlflow"), exist_ok=True)
        uri = f"sqlite:///{os.path.join(root, '_mlflow', 'mlflow.db')}"
        art = art or Path(root, "_mlflow", "artifacts").as_uri()
    return {"tracking_uri": uri, "registry_uri": t.registry_uri, "artifact_location": art,
            "experiment": t.experiment}


def setup_mlflow(cfg) -> str:
    """Point MLflow at the profile's tracking server and experiment; returns the experiment id."""
    import mlflow

    s = tracking_settings(cfg)
    mlflow.set_tracking_uri(s["tracking_uri"])
    if s["registry_uri"]:
        mlflow.set_registry_uri(s["registry_uri"])
    exp = mlflow.get_experiment_by_name(s["experiment"])
    if exp is None:
        exp_id = mlflow.create_experiment(s["experiment"], artifact_location=s["artifact_location"])
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
