"""One model spec (issue 23 item 2): the driver checks a model's options with its backend, freezes
them into a ModelSpec and ships that object unchanged to the executors, where it keys the worker's
model cache and builds the backend."""

from __future__ import annotations

import dataclasses
import pickle

import cloudpickle
import pytest

from finelake.config import load_config
from finelake.errors import ConfigError
from finelake.models.spec import ModelSpec
from finelake.udfs.cache import cache_key


@pytest.mark.parametrize("kind", ["generator", "embedder", "judge"])
def test_a_spec_crosses_to_executors_unchanged_and_keys_the_cache(kind):
    cfg = load_config("local")
    model = {"generator": cfg.models.generator, "embedder": cfg.models.embedder,
             "judge": cfg.models.judge}[kind]
    spec = ModelSpec.of(model, kind)
    back = pickle.loads(cloudpickle.dumps(spec))  # what a Spark task receives
    assert isinstance(back, ModelSpec) and back == spec and back.key == spec.key
    assert cache_key(kind, back) == cache_key(kind, spec.as_dict()) == spec.key
    assert ModelSpec.of(spec, kind) is spec  # never converted twice
    assert spec["backend"] == model.backend and spec.get("batch_size") == model.batch_size
    assert spec.label == f"{model.backend}:{model.model}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.backend = "other"


@pytest.mark.parametrize("model, kind, message", [
    ({"backend": "llama_cpp", "model": "m", "options": {"n_ctxx": 5}}, "generator",
     "models.generator.options.n_ctxx: unknown option (did you mean n_ctx?)"),
    ({"backend": "sentence_transformers", "model": "m", "options": {"normalise": True}},
     "embedder", "models.embedder.options.normalise: unknown option"),
    ({"backend": "no_such_backend", "model": "m"}, "generator", "models.generator.backend"),
    ({"backend": "vllm", "model": ""}, "generator", "models.generator.model: required"),
])
def test_a_bad_option_is_refused_on_the_driver_naming_the_key(model, kind, message):
    with pytest.raises(ConfigError) as exc:
        ModelSpec.of(model, kind, key=f"models.{kind}")
    assert str(exc.value).startswith(message)


def test_a_stage_passes_the_spec_object_to_its_row_function():
    """The row arguments carry the driver's ModelSpec itself (no second conversion)."""
    from finelake.jobs.genericize import GENERICIZE
    from finelake.runtime import StageContext

    cfg = load_config("local")
    spec = ModelSpec.of(GENERICIZE.settings(cfg).model, GENERICIZE.settings(cfg).kind)
    args = GENERICIZE.row_args(StageContext(cfg, spark=None), spec)
    assert args["spec"] is spec
