"""Spark glue for embeddings: embed_frame on its own, then mapInPandas / pandas_udf on local Spark."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finelake.udfs.embedding import embed_frame, embedding_udf, load_embedder, map_embeddings

DOCS = Path(__file__).resolve().parents[1] / "sample" / "documents.jsonl"
CFG = {"backend": "sentence_transformers", "model": "embedded:all-minilm-l6-v2", "batch_size": 16,
       "options": {"max_seq_length": 64}}


def _docs(n: int) -> list[str]:
    with open(DOCS, encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def test_embed_frame_pooled_and_global():
    texts = _docs(6)
    pdf = pd.DataFrame({"doc_id": [f"d{i}" for i in range(7)], "text": texts + [None]})
    pooled = embed_frame(CFG, pdf, "text", pooled=True, chunks=5, sigma=0.05, alpha=1.0)
    flat = embed_frame(CFG, pdf, "text", pooled=False, out_col="vec")
    assert list(pooled.columns) == ["doc_id", "text", "embedding"] and "embedding" not in pdf
    assert list(flat.columns) == ["doc_id", "text", "vec"]
    assert pooled["embedding"].iloc[6] is None and flat["vec"].iloc[6] is None
    direct = load_embedder(CFG).embed_pooled(texts, 5, 0.05, 1.0)
    for i in range(6):
        cell = np.stack(pooled["embedding"].iloc[i])
        assert cell.shape == (6, 384)
        np.testing.assert_allclose(cell, direct[i], atol=1e-6)
        np.testing.assert_allclose(flat["vec"].iloc[i], direct[i, 0], atol=1e-6)
    with pytest.raises(KeyError):
        embed_frame(CFG, pdf, "body", pooled=False)


@pytest.mark.slow
def test_spark_rows_and_one_load_per_worker(spark, tmp_path):
    """~50 real documents through mapInPandas (pooled) and a pandas UDF (global), two jobs in the
    same workers: every row has K+1 unit vectors, and each worker process loaded the model once."""
    log_path = tmp_path / "loads.log"
    env = spark.sparkContext.environment
    saved = env.get("FINELAKE_LOAD_LOG")
    # Python functions carry sc.environment to their workers; a new environment also means fresh
    # worker processes, so the log sees every load this test causes and nothing else.
    env["FINELAKE_LOAD_LOG"] = str(log_path)
    try:
        texts = _docs(50)
        df = spark.createDataFrame(pd.DataFrame({"doc_id": [f"d{i}" for i in range(50)],
                                                 "text": texts})).repartition(2)
        K = 5
        rows = map_embeddings(df, CFG, "text", pooled=True, chunks=K, sigma=0.05, alpha=1.0).collect()
        glob = df.withColumn("g", embedding_udf(CFG, pooled=False)("text")).collect()
    finally:
        if saved is None:
            env.pop("FINELAKE_LOAD_LOG", None)
        else:
            env["FINELAKE_LOAD_LOG"] = saved

    assert sorted(r["doc_id"] for r in rows) == sorted(f"d{i}" for i in range(50))
    by_id = {}
    for r in rows:
        e = np.asarray(r["embedding"], dtype=np.float32)
        assert e.shape == (K + 1, 384)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        by_id[r["doc_id"]] = e
    for r in glob:
        np.testing.assert_allclose(np.asarray(r["g"]), by_id[r["doc_id"]][0], atol=1e-5)

    # Same numbers as embedding in this process (workers run one torch thread each).
    direct = load_embedder(CFG).embed_pooled(texts[:5], K, 0.05, 1.0)
    for i in range(5):
        np.testing.assert_allclose(by_id[f"d{i}"], direct[i], atol=1e-5)

    loads = [e for e in map(json.loads, log_path.read_text().splitlines()) if e["event"] == "load"]
    pids = Counter(str(e["pid"]) for e in loads)
    assert loads, "no model load was logged by the workers"
    print("loads per worker pid:", dict(pids))
    assert str(os.getpid()) not in pids  # loads happened in the workers
    assert all(n == 1 for n in pids.values()), pids
    assert len({e["key"] for e in loads}) == 1  # one model key
