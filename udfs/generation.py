"""Spark glue for text generation.

:func:`generate_frame` is the pure function (pandas in, pandas out) that a Spark UDF calls on each
Arrow batch; :func:`generation_udf` wraps it as a pandas UDF and :func:`with_generation` adds its
output to a DataFrame. The model comes from :func:`finelake.udfs.cache.get_or_load`, so it is loaded
once per Python worker and reused by every batch, task and job that worker runs.

Input columns: ``messages`` (JSON string of ``[{"role", "content"}, ...]``), optional
``json_schema`` (JSON string or null) and ``max_tokens`` (int or null: the configuration's
``max_tokens``). Output columns (:data:`OUTPUT_COLUMNS`): ``text`` (string, null on error),
``prompt_tokens`` / ``completion_tokens`` (int, 0 on error), ``finish_reason`` (string),
``error`` (string, null on success). A row that cannot be parsed or fails in the model gets
``error``; it never fails the Spark task. Only a model that cannot be loaded raises.

When ``generate()`` raises an engine-level error (:func:`finelake.faults.is_engine_fault`: a dead
engine, out of memory), every row of the batch gets that error (transient, so the stages mark the
rows ``retry``) and the cached generator is evicted (:func:`finelake.udfs.cache.evict`): the next
batch loads a fresh engine.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from finelake.faults import is_engine_fault
from finelake.models.base import GenerationBackend, GenerationRequest, GenerationResult
from finelake.models.spec import ModelSpec
from finelake.udfs.cache import evict, get_or_load, model_call

OUTPUT_COLUMNS = ["text", "prompt_tokens", "completion_tokens", "finish_reason", "error"]
OUTPUT_DDL = ("text string, prompt_tokens int, completion_tokens int, finish_reason string, "
              "error string")
"""Spark schema of the output struct, in column order of :data:`OUTPUT_COLUMNS`."""


def load_generator(model_cfg: Any) -> GenerationBackend:
    """The generator for ``model_cfg``, loaded at most once per process (per distinct config).

    Raises:
        ImportError / ValueError / ModelNotFound: from :func:`create_generator` on first load.
    """
    spec = ModelSpec.of(model_cfg, "generator").as_dict()

    def _load():
        from finelake.models.generation import create_generator

        return create_generator(spec)

    return get_or_load("generator", spec, _load)


def _is_null(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v)) if not isinstance(v, (list, dict, np.ndarray)) else False
    except (TypeError, ValueError):
        return False


def _messages(v: Any) -> list[dict[str, str]]:
    if _is_null(v):
        raise ValueError("messages is null")
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8")
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as exc:
            raise ValueError(f"messages is not JSON: {exc}") from None
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, list):
        raise ValueError(f"messages must be a JSON list, got {type(v).__name__}")
    return [dict(m) if isinstance(m, Mapping) else m for m in v]


def _schema(v: Any) -> Optional[dict]:
    if _is_null(v):
        return None
    if isinstance(v, str):
        if not v.strip():
            return None
        try:
            v = json.loads(v)
        except json.JSONDecodeError as exc:
            raise ValueError(f"json_schema is not JSON: {exc}") from None
    if not isinstance(v, dict):
        raise ValueError(f"json_schema must be a JSON object, got {type(v).__name__}")
    return v


def generate_frame(model_cfg: Mapping[str, Any], pdf: pd.DataFrame) -> pd.DataFrame:
    """Generate one completion per row.

    Args:
        model_cfg: the model configuration (``backend``, ``model``, ``options``, ``batch_size``,
            ``max_tokens``, ``temperature``) as a dict or ``ModelConfig``.
        pdf: rows with ``messages`` and optionally ``json_schema`` and ``max_tokens``
            (see the module docstring).

    Returns:
        A DataFrame with :data:`OUTPUT_COLUMNS`, same length and index order as ``pdf``.

    Raises:
        KeyError: ``pdf`` has no ``messages`` column.
        ImportError / ValueError: the model cannot be loaded (not a row's fault).
    """
    spec = ModelSpec.of(model_cfg, "generator")
    if "messages" not in pdf.columns:
        raise KeyError(f"generate_frame needs a 'messages' column; got {list(pdf.columns)}")
    n = len(pdf)
    default_max = int(spec.get("max_tokens") or 256)
    temperature = float(spec.get("temperature") or 0.0)
    schemas = pdf["json_schema"].tolist() if "json_schema" in pdf.columns else [None] * n
    maxes = pdf["max_tokens"].tolist() if "max_tokens" in pdf.columns else [None] * n
    results: list[Optional[GenerationResult]] = [None] * n
    todo: list[tuple[int, GenerationRequest]] = []
    for i, (msgs, schema, mt) in enumerate(zip(pdf["messages"].tolist(), schemas, maxes)):
        try:
            req = GenerationRequest(messages=_messages(msgs),
                                    max_tokens=default_max if _is_null(mt) else int(mt),
                                    temperature=temperature, json_schema=_schema(schema),
                                    request_id=str(i))
            todo.append((i, req))
        except Exception as exc:  # noqa: BLE001 - a bad row is that row's error
            results[i] = GenerationResult(text=None, error=f"{type(exc).__name__}: {exc}")
    if todo:
        gen = load_generator(spec)
        reqs = [r for _, r in todo]
        try:
            with model_call("generator", spec, len(reqs)):
                outs = gen.generate(reqs)
            if len(outs) != len(reqs):
                raise RuntimeError(f"{len(outs)} results for {len(reqs)} requests")
        except Exception as exc:  # noqa: BLE001 - backends should not raise; never fail the task
            outs = [GenerationResult(text=None, error=f"{type(exc).__name__}: {exc}")
                    for _ in reqs]
            if is_engine_fault(exc):  # the engine is gone (or out of memory): reload next batch
                evict("generator", spec, reason=f"{type(exc).__name__}: {exc}"[:200])
        for (i, _), res in zip(todo, outs):
            results[i] = res
    return pd.DataFrame({
        "text": pd.Series([r.text for r in results], dtype=object),
        "prompt_tokens": pd.Series([int(r.prompt_tokens or 0) for r in results], dtype="int32"),
        "completion_tokens": pd.Series([int(r.completion_tokens or 0) for r in results],
                                       dtype="int32"),
        "finish_reason": pd.Series([r.finish_reason for r in results], dtype=object),
        "error": pd.Series([r.error for r in results], dtype=object),
    })


def generation_udf(model_cfg: Any):
    """A pandas UDF: one struct column in (fields ``messages`` and optionally ``json_schema``,
    ``max_tokens``), a struct ``OUTPUT_DDL`` out.

    Example::

        gen = generation_udf(cfg.models.generator)
        df = df.withColumn("gen", gen(F.struct("messages", "json_schema")))

    Each call of the UDF on an Arrow batch runs :func:`generate_frame`; the model is loaded once
    per Python worker (:func:`load_generator`).
    """
    from pyspark.sql.functions import pandas_udf

    spec = ModelSpec.of(model_cfg, "generator")

    @pandas_udf(OUTPUT_DDL)
    def generate(rows: pd.DataFrame) -> pd.DataFrame:
        return generate_frame(spec, rows)

    return generate


def with_generation(df, model_cfg: Any, out_col: str = "generation",
                    messages_col: str = "messages", json_schema_col: Optional[str] = "json_schema",
                    max_tokens_col: Optional[str] = "max_tokens"):
    """``df`` plus a struct column ``out_col`` (:data:`OUTPUT_DDL`) generated from its columns.

    ``json_schema_col`` / ``max_tokens_col`` are used when ``df`` has them (None: never).
    """
    from pyspark.sql import functions as F

    fields = [F.col(messages_col).alias("messages")]
    if json_schema_col and json_schema_col in df.columns:
        fields.append(F.col(json_schema_col).cast("string").alias("json_schema"))
    if max_tokens_col and max_tokens_col in df.columns:
        fields.append(F.col(max_tokens_col).cast("int").alias("max_tokens"))
    return df.withColumn(out_col, generation_udf(model_cfg)(F.struct(*fields)))
