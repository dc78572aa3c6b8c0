"""Spark glue for generation: the pure pandas function, then the UDF on local Spark."""

from __future__ import annotations

import json
import os
from collections import Counter

import pandas as pd
import pytest

from finelake.udfs import cache
from finelake.udfs.generation import OUTPUT_COLUMNS, generate_frame, load_generator, with_generation

MODEL_CFG = {"backend": "llama_cpp", "model": "embedded:smollm2-135m-instruct", "batch_size": 4,
             "max_tokens": 6, "temperature": 0.0, "options": {"n_ctx": 512, "n_threads": 1}}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}

pytest.importorskip("llama_cpp")


def _msgs(q):
    return json.dumps([{"role": "user", "content": q}])


def test_generate_frame_rows_errors_and_defaults():
    pdf = pd.DataFrame({
        "messages": [_msgs("Say hello."), "{not json", None, _msgs("Is water wet? JSON."),
                     _msgs("Count to ten."), json.dumps([{"role": "user"}]),
                     _msgs("Name a color.")],
        "json_schema": [None, None, None, json.dumps(SCHEMA), None, None, "{bad"],
        "max_tokens": [None, None, None, 20, 2, None, None],
    })
    out = generate_frame(MODEL_CFG, pdf)
    assert list(out.columns) == OUTPUT_COLUMNS and len(out) == len(pdf)
    assert str(out["prompt_tokens"].dtype) == "int32"
    ok = out["error"].isna().tolist()
    assert ok == [True, False, False, True, True, False, False]
    assert "not JSON" in out.loc[1, "error"] and "null" in out.loc[2, "error"]
    assert "content" in out.loc[5, "error"] and "json_schema" in out.loc[6, "error"]
    assert out.loc[1, "text"] is None and out.loc[1, "completion_tokens"] == 0
    assert json.loads(out.loc[3, "text"])["ok"] in (True, False)
    assert out.loc[0, "completion_tokens"] <= 6  # the configuration's max_tokens
    assert out.loc[4, "completion_tokens"] == 2 and out.loc[4, "finish_reason"] == "length"
    assert (out.loc[[0, 3, 4], "prompt_tokens"] > 5).all()


def test_model_loads_once_per_process():
    from finelake.models.spec import ModelSpec

    key = ModelSpec.of(MODEL_CFG, "generator").key  # the checked spec keys the cache
    assert key == cache.cache_key("generator", ModelSpec.of(dict(MODEL_CFG), "generator"))
    pdf = pd.DataFrame({"messages": [_msgs("Hi.")]})
    generate_frame(MODEL_CFG, pdf)
    generate_frame(dict(MODEL_CFG), pdf)
    assert cache.LOAD_COUNTS[key] == 1
    assert load_generator(MODEL_CFG) is load_generator(json.loads(json.dumps(MODEL_CFG)))


@pytest.mark.slow
def test_spark_udf_one_load_per_worker_and_bad_rows(spark, tmp_path):
    log = tmp_path / "loads.log"
    sc = spark.sparkContext
    old_env = sc.environment.get("FINELAKE_LOAD_LOG")
    old_batch = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    sc.environment["FINELAKE_LOAD_LOG"] = str(log)  # new env -> fresh Python workers
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "2")
    try:
        rows = [(i, _msgs(f"Give one word for the number {i}."), None, None) for i in range(10)]
        rows.append((10, "]]not json", None, None))
        rows.append((11, _msgs("Is fire hot? JSON."), json.dumps(SCHEMA), 24))
        df = spark.createDataFrame(
            rows, "id int, messages string, json_schema string, max_tokens int") \
            .repartition(4)
        out = with_generation(df, MODEL_CFG).select("id", "generation.*")
        first = {r["id"]: r.asDict() for r in out.collect()}  # job 1
        second = {r["id"]: r.asDict() for r in out.collect()}  # job 2, same workers
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", old_batch)
        if old_env is None:
            sc.environment.pop("FINELAKE_LOAD_LOG", None)
        else:
            sc.environment["FINELAKE_LOAD_LOG"] = old_env
    assert sorted(first) == list(range(12))
    for res in (first, second):
        assert res[10]["error"] and "not JSON" in res[10]["error"] and res[10]["text"] is None
        good = [res[i] for i in range(10)] + [res[11]]
        assert all(r["error"] is None and r["text"] for r in good)
        assert all(0 < r["completion_tokens"] <= 6 for r in good[:10])
        assert res[11]["finish_reason"] == "stop"
        assert json.loads(res[11]["text"])["ok"] in (True, False)
    # Greedy: the second job reproduces the first.
    assert [first[i]["text"] for i in range(12)] == [second[i]["text"] for i in range(12)]
    events = [json.loads(ln) for ln in log.read_text().splitlines()]
    pids = Counter(str(e["pid"]) for e in events if e["event"] == "load" and e["kind"] == "generator")
    # 12 rows in 2-row Arrow batches over 2 jobs: >= 12 UDF calls, each worker loaded once.
    assert pids and all(n == 1 for n in pids.values()), pids
    assert len(pids) <= 2, pids  # local[2]: at most two Python workers ran the UDF
    assert str(os.getpid()) not in pids  # loaded in the workers, not the driver
