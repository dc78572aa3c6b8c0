"""The judge on executors: loaded once per Python worker, scoring a batch of pairs at a time."""

from __future__ import annotations

import pandas as pd

from finelake.faults import is_engine_fault
from finelake.udfs.cache import evict, get_or_load, model_call


def load_judge(spec: dict):
    from finelake.models.judge import create_judge

    return get_or_load("judge", spec, lambda: create_judge(spec))


def judge_frame(spec: dict, pdf: pd.DataFrame) -> pd.DataFrame:
    """``pdf`` (columns instruction, answer) -> columns judge_score (int or None), judge_reason,
    judge_model. A failing batch gives None scores with the error as reason, not a failed task;
    after an engine-level error (:func:`finelake.faults.is_engine_fault`) the cached judge is
    evicted (:func:`finelake.udfs.cache.evict`) so the next batch loads a fresh one."""
    judge = load_judge(spec)
    try:
        with model_call("judge", spec, len(pdf)):
            scored = judge.score(list(pdf["instruction"]), list(pdf["answer"]))
    except Exception as exc:  # noqa: BLE001 - reported per row
        scored = [(None, f"judge_error: {type(exc).__name__}: {exc}")] * len(pdf)
        if is_engine_fault(exc):  # the engine is gone (or out of memory): reload next batch
            evict("judge", spec, reason=f"{type(exc).__name__}: {exc}"[:200])
    return pd.DataFrame({"judge_score": [s for s, _ in scored],
                         "judge_reason": [r for _, r in scored],
                         "judge_model": [judge.model_id] * len(pdf)})
