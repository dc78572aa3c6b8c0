"""The judge on executors: loaded once per Python worker, scoring a batch of pairs at a time."""

from __future__ import annotations

import pandas as pd

from finelake.faults import is_engine_fault
from finelake.models.spec import ModelSpec
from finelake.udfs.cache import evict, get_or_load, model_call


def load_judge(spec):
    """The judge of ``spec`` (a :class:`~finelake.models.spec.ModelSpec`, or a model config or
    dict, checked here), loaded at most once per Python worker."""
    from finelake.models.judge import create_judge

    d = ModelSpec.of(spec, "judge").as_dict()
    return get_or_load("judge", d, lambda: create_judge(d))


def judge_frame(spec, pdf: pd.DataFrame) -> pd.DataFrame:
    """``pdf`` (columns instruction, answer, optional template) -> columns judge_score (int or None), judge_reason,
    judge_model, judge_parts (the embedded judge's parts as JSON; None for a judge that gives
    only a score and a reason). A failing batch gives None scores with the error as reason, not a failed task;
    after an engine-level error (:func:`finelake.faults.is_engine_fault`) the cached judge is
    evicted (:func:`finelake.udfs.cache.evict`) so the next batch loads a fresh one."""
    spec = ModelSpec.of(spec, "judge")  # a driver's spec as is; a config or dict checked once
    judge = load_judge(spec)
    try:
        with model_call("judge", spec, len(pdf)):
            extra = ({"templates": list(pdf["template"])}
                     if "template" in pdf and getattr(judge, "takes_templates", False) else {})
            scored = judge.score(list(pdf["instruction"]), list(pdf["answer"]), **extra)
    except Exception as exc:  # noqa: BLE001 - reported per row
        scored = [(None, f"judge_error: {type(exc).__name__}: {exc}")] * len(pdf)
        if is_engine_fault(exc):  # the engine is gone (or out of memory): reload next batch
            evict("judge", spec, reason=f"{type(exc).__name__}: {exc}"[:200])
    return pd.DataFrame({"judge_score": [t[0] for t in scored],
                         "judge_reason": [t[1] for t in scored],
                         "judge_model": [judge.model_id] * len(pdf),
                         "judge_parts": [t[2] if len(t) > 2 else None for t in scored]})
