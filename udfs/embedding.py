"""Spark glue for embeddings: pandas in, embedding column out, model loaded once per Python worker.

* :func:`embed_frame` is the pure function (pandas DataFrame in, DataFrame out) that every Spark path
  calls; it is tested without Spark.
* :func:`embedding_udf` wraps it as a scalar ``pandas_udf`` (``df.withColumn("e", udf("text"))``).
* :func:`map_embeddings` wraps it with ``mapInPandas`` (all columns kept, one added).

Column types: ``array<float>`` (d floats, the global embedding) when ``pooled`` is false,
``array<array<float>>`` (K+1 vectors of d floats; index 0 global, 1..K the Gaussian chunks of
§3.2 / Appendix B) when it is true. Every vector has unit L2 norm. A null text gives a null
embedding.

The model comes from :func:`finelake.udfs.cache.get_or_load` keyed by the model config, so a worker
process loads it once and reuses it across Arrow batches, tasks and jobs. Under Spark, when the
config sets no ``options.threads``, torch gets as many threads as the task has CPUs
(``spark.task.cpus``, default 1): N concurrent tasks on N cores, one thread each, instead of N x N
threads fighting for the cores. The Arrow batch size (``spark.sql.execution.arrow.maxRecordsPerBatch``)
bounds how many texts are length-sorted together; larger batches pad less.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Union

import numpy as np
import pandas as pd

from finelake.models.spec import ModelSpec
from finelake.udfs.cache import get_or_load

__all__ = ["embed_frame", "embedding_udf", "map_embeddings", "load_embedder", "embedding_type",
           ]


def _task_cpus() -> Optional[int]:
    try:
        from pyspark import TaskContext
    except ImportError:  # pragma: no cover - pyspark is a dependency of the Spark extra only
        return None
    tc = TaskContext.get()
    if tc is None:
        return None
    try:
        return int(tc.cpus())
    except Exception:  # pragma: no cover - very old pyspark
        return 1


def load_embedder(model_cfg: Union[dict, Any]):
    """The embedder for ``model_cfg``, loaded at most once per process (via ``udfs.cache``).

    Inside a Spark task and with no ``options.threads`` in the config, threads = the task's CPUs.

    Returns:
        An :class:`finelake.models.base.EmbeddingBackend`.
    """
    from finelake.models.embedding import create_embedder

    spec = ModelSpec.of(model_cfg, "embedder").as_dict()
    if spec["options"].get("threads") is None:
        cpus = _task_cpus()
        if cpus:
            spec["options"] = {**spec["options"], "threads": cpus}
    return get_or_load("embedder", spec, lambda: create_embedder(spec))


def embedding_type(pooled: bool):
    """Spark type of the embedding column: ``array<float>`` or ``array<array<float>>``."""
    from pyspark.sql.types import ArrayType, FloatType

    return ArrayType(ArrayType(FloatType())) if pooled else ArrayType(FloatType())


def _embed_series(emb, texts: pd.Series, pooled: bool, chunks: int, sigma: float,
                  alpha: float) -> pd.Series:
    out = pd.Series([None] * len(texts), index=texts.index, dtype=object)
    ok = texts.notna().to_numpy()
    if ok.any():
        batch = texts[ok].astype(str).tolist()
        if pooled:
            vecs = emb.embed_pooled(batch, chunks=chunks, sigma=sigma, alpha=alpha)
            values = [list(v) for v in vecs]  # K+1 1-D arrays: Arrow takes list<list<float>>
        else:
            values = list(emb.embed(batch))
        out.iloc[np.flatnonzero(ok)] = pd.Series(values, dtype=object).to_numpy()
    return out


def embed_frame(model_cfg: Union[dict, Any], pdf: pd.DataFrame, text_col: str, pooled: bool,
                chunks: int = 5, sigma: float = 0.05, alpha: float = 1.0,
                out_col: str = "embedding") -> pd.DataFrame:
    """Add an embedding column to a pandas DataFrame.

    Args:
        model_cfg: the embedder's ``ModelConfig`` (or dict); the model is loaded once per process.
        pdf: input rows.
        text_col: column holding the texts.
        pooled: False → one global vector per row; True → K+1 Gaussian-pooled vectors per row
            (Appendix B), index 0 the global one.
        chunks, sigma, alpha: K, σ, α of Appendix B (paper: 5, 0.05, 1.0); ignored unless pooled.
        out_col: name of the added column (replaced if present).

    Returns:
        A new DataFrame: ``pdf``'s columns plus ``out_col``; each cell a float32 array ``[d]``
        (global) or a list of K+1 float32 arrays ``[d]`` (pooled), unit L2 norm; None for a
        null text.

    Raises:
        KeyError: ``text_col`` missing. ValueError: invalid K, σ or α.
    """
    if text_col not in pdf.columns:
        raise KeyError(f"no column {text_col!r} in {list(pdf.columns)}")
    emb = load_embedder(model_cfg)
    out = pdf.copy()
    out[out_col] = _embed_series(emb, pdf[text_col], pooled, chunks, sigma, alpha)
    return out


def embedding_udf(model_cfg: Union[dict, Any], pooled: bool, chunks: int = 5, sigma: float = 0.05,
                  alpha: float = 1.0):
    """A scalar pandas UDF: text column in, embedding column out (types as :func:`embedding_type`).

    Usage: ``df.withColumn("embedding", embedding_udf(cfg.models.embedder, pooled=True)("text"))``.
    Only the plain config dict and the numbers travel to the workers; the model is loaded there.
    """
    from pyspark.sql.functions import pandas_udf

    spec = ModelSpec.of(model_cfg, "embedder")
    chunks, sigma, alpha = int(chunks), float(sigma), float(alpha)

    @pandas_udf(embedding_type(pooled))
    def embed(texts: pd.Series) -> pd.Series:
        emb = load_embedder(spec)
        return _embed_series(emb, texts, pooled, chunks, sigma, alpha)

    return embed


def map_embeddings(df, model_cfg: Union[dict, Any], text_col: str, pooled: bool, chunks: int = 5,
                   sigma: float = 0.05, alpha: float = 1.0, out_col: str = "embedding",
                   profile=None):
    """``df`` with ``out_col`` added by :func:`embed_frame`, through ``mapInPandas``.

    Args: as :func:`embed_frame`; ``df`` a Spark DataFrame with a string column ``text_col``;
    ``profile`` a ``pyspark.resource.ResourceProfile`` (stage-level scheduling, see
    :func:`finelake.resources.plan_stage`) or None.

    Returns:
        A Spark DataFrame with ``df``'s columns plus ``out_col`` (``array<float>`` or
        ``array<array<float>>``).

    Raises:
        ValueError: ``out_col`` already exists or ``text_col`` is missing.
    """
    from pyspark.sql.types import StructField, StructType

    if text_col not in df.columns:
        raise ValueError(f"no column {text_col!r} in {df.columns}")
    if out_col in df.columns:
        raise ValueError(f"column {out_col!r} already exists")
    spec = ModelSpec.of(model_cfg, "embedder")
    chunks, sigma, alpha = int(chunks), float(sigma), float(alpha)
    schema = StructType(list(df.schema.fields) + [StructField(out_col, embedding_type(pooled), True)])

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            yield embed_frame(spec, pdf, text_col, pooled, chunks, sigma, alpha, out_col)

    if profile is not None:
        return df.mapInPandas(run, schema=schema, profile=profile)
    return df.mapInPandas(run, schema=schema)
