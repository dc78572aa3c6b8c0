"""finelake.resources: declared stage resources, a model's GPUs (tensor parallelism), settings the
model stages cannot run with, GPU task counts, chunk sizes; and the Arrow regrouping that gives a
model whole batches (jobs.common.coalesce_batches)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from finelake.jobs.common import coalesce_batches
from finelake.resources import (MODEL_STAGE, Resources, chunk_size, gpu_settings_problems, gpu_tasks,
                                model_resources, plan_stage, refuse_gpu_settings, stage_models,
                                tensor_parallel_size)


def test_resources_reject_contradictions():
    assert MODEL_STAGE.uses_gpu and not Resources().uses_gpu
    assert Resources(gpus=0.5).uses_gpu
    with pytest.raises(ValueError, match="whole number"):
        Resources(gpus=1.5)
    with pytest.raises(ValueError, match="gpus"):
        Resources(gpus=-1)
    with pytest.raises(ValueError, match="cpus"):
        Resources(gpus=1, cpus=0)


def test_gpu_tasks_and_chunk_size():
    assert gpu_tasks(executors=4, executor_gpus=8, task_gpus=1) == 32
    assert gpu_tasks(executors=2, executor_gpus=1, task_gpus=0.5) == 4
    assert gpu_tasks(executors=0, executor_gpus=1, task_gpus=1) == 1
    with pytest.raises(ValueError):
        gpu_tasks(1, 1, 0)
    # 32 GPU tasks x 2048 prompts: chunks of 65,536 queries instead of 400 (164 per task).
    assert chunk_size(400, 2048, 32) == 65536
    # Documents with ~5 matches each: a fifth as many documents per chunk.
    assert chunk_size(32, 2048, 32, prompts_per_key=5.0) == 13108
    # Small clusters and batches keep the profile's chunk (commits stay small).
    assert chunk_size(400, 8, 2) == 400
    with pytest.raises(ValueError):
        chunk_size(0, 8, 2)


def test_plan_on_a_local_session_has_no_profile(spark):
    plan = plan_stage(spark, MODEL_STAGE)
    assert plan.profile is None
    assert plan.tasks == spark.sparkContext.defaultParallelism
    assert plan_stage(spark, Resources()).profile is None


def _batches(sizes):
    start = 0
    for n in sizes:
        yield pa.RecordBatch.from_pydict({"i": list(range(start, start + n))})
        start += n


def test_coalesce_batches_gives_whole_batches_in_order():
    groups = list(coalesce_batches(_batches([3, 3, 0, 3, 5, 1]), 6))
    assert [g.num_rows for g in groups] == [6, 8, 1]
    assert sum((g.column("i").to_pylist() for g in groups), []) == list(range(15))
    # Large batches pass through one by one; min_rows 0 never merges.
    assert [g.num_rows for g in coalesce_batches(_batches([256, 256, 7]), 8)] == [256, 256, 7]
    assert [g.num_rows for g in coalesce_batches(_batches([2, 2]), 0)] == [2, 2]


def test_served_models_ask_for_no_gpu():
    assert model_resources({"backend": "vllm"}) == MODEL_STAGE
    assert model_resources({"backend": "sentence_transformers"}) == MODEL_STAGE
    assert not model_resources({"backend": "openai"}).uses_gpu
    assert not model_resources({"backend": "llm", "options": {"inner_backend": "openai"}}).uses_gpu
    assert model_resources({"backend": "llm", "options": {"inner_backend": "vllm"}}) == MODEL_STAGE
    assert model_resources({"backend": "llm"}) == MODEL_STAGE  # the llm judge's default inner is vllm


@pytest.mark.parametrize("cfg,gpus", [
    ({"backend": "vllm", "options": {"tensor_parallel_size": 4}}, 4),
    ({"backend": "vllm", "options": {"tensor_parallel_size": "2"}}, 2),
    ({"backend": "vllm", "options": {}}, 1),
    ({"backend": "llm", "options": {"inner_backend": "vllm", "tensor_parallel_size": 2}}, 2),
    ({"backend": "transformers", "options": {"tensor_parallel_size": 8}}, 1),  # not a vLLM option
    ({"backend": "sentence_transformers", "options": {}}, 1),
    ({"backend": "openai", "options": {"concurrency": 16}}, 0),  # the engine runs behind a server
    ({"backend": "llm", "options": {"inner_backend": "openai"}}, 0),
])
def test_a_model_stage_asks_for_its_models_gpus(cfg, gpus):
    assert model_resources(cfg).gpus == gpus


@pytest.mark.parametrize("tp", [0, -1, "two", 1.5, True])
def test_a_bad_tensor_parallel_size_is_refused(tp):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        tensor_parallel_size({"backend": "vllm", "options": {"tensor_parallel_size": tp}})


def test_settings_the_model_stages_cannot_run_with_are_named():
    gpu = {"spark.executor.resource.gpu.amount": "4"}
    assert gpu_settings_problems(gpu, {"models.generator": 2, "models.judge": 4}) == []
    (p,) = gpu_settings_problems({**gpu, "spark.dynamicAllocation.enabled": "TRUE"})
    assert p.startswith("spark.dynamicAllocation.enabled=true with GPU executors")
    assert "spark.dynamicAllocation.enabled=false" in p and "spark.executor.instances" in p
    (odd, big) = gpu_settings_problems(gpu, {"models.judge": 8, "models.generator": 3})
    assert big.startswith("models.judge.options.tensor_parallel_size=8 needs 8 GPUs")
    assert odd.startswith("models.generator.options.tensor_parallel_size=3 does not divide")
    # no GPU executors (a CPU cluster calling a server, local mode): nothing to refuse
    assert gpu_settings_problems({"spark.dynamicAllocation.enabled": "true"}, {"m": 8}) == []


def test_a_session_with_dynamic_allocation_and_gpus_is_refused_before_any_stage():
    from types import SimpleNamespace

    from pyspark import SparkConf

    from finelake.config import ConfigError, load_config

    conf = SparkConf(loadDefaults=False).setAll([("spark.executor.resource.gpu.amount", "1"),
                                                 ("spark.dynamicAllocation.enabled", "true")])
    session = SimpleNamespace(sparkContext=SimpleNamespace(getConf=lambda: conf))
    cfg = load_config("databricks")
    with pytest.raises(ConfigError, match="spark.dynamicAllocation.enabled=true"):
        refuse_gpu_settings(cfg, session)
    conf.set("spark.dynamicAllocation.enabled", "false")
    refuse_gpu_settings(cfg, session)
    assert stage_models(cfg) == {"genericize.model": 1, "models.generator": 1, "models.judge": 1}
