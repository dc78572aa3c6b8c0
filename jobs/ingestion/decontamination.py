"""Decontamination of queries against evaluation sets (FineInstructions §3.1, Tulu 3 procedure).

The rule itself is pure (:class:`finelake.method.text.ContaminationIndex`); this module reads the
evaluation prompts (:func:`load_eval_texts`) and applies the index to a DataFrame column
(:func:`contamination_udf`).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Sequence

from finelake import storage
from finelake.errors import FinelakeError

_EVAL_FIELDS = ("prompt", "instruction", "turns", "question", "query", "text")
_EVAL_KEYS = ("key", "question_id", "id")


def load_eval_texts(specs: Sequence[str], spark=None) -> tuple[list[str], list[str]]:
    """Evaluation prompts for decontamination.

    Args:
        specs: JSONL paths or URIs, or ``"package:eval"`` for the shipped sets
            (``eval_ifeval``, ``eval_alpacaeval``, ``eval_mt_bench``). Each line's text is the
            first present of ``prompt``, ``instruction``, ``turns`` (every turn), ``question``,
            ``query``, ``text``.
        spark: used to read URIs (``scheme://``); local files are read directly.

    Returns:
        ``(texts, names)``: one entry per prompt or turn; names look like ``ifeval:1000`` or
        ``mt_bench:81/turn2``.

    Raises:
        FinelakeError: a file is missing, or a line is not JSON or has none of the fields.
    """
    files: list[str] = []
    for s in specs:
        if s == "package:eval":
            root = resources.files("finelake.sample")
            files += sorted(str(root.joinpath(f.name)) for f in root.iterdir()
                            if f.name.startswith("eval_") and f.name.endswith(".jsonl"))
        else:
            files.append(s)
    texts, names = [], []
    for f in files:
        if storage.is_uri(f):
            lines = spark.sparkContext.textFile(f).collect()
        else:
            if not os.path.isfile(f):
                raise FinelakeError(f"evaluation set not found: {f} (ingest.eval_sets)")
            with open(f, encoding="utf-8") as fh:
                lines = fh.read().split("\n")
        label = os.path.basename(f).rsplit(".", 1)[0]
        label = label[5:] if label.startswith("eval_") else label
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise FinelakeError(f"evaluation set {f} line {i}: not JSON") from None
            fld = next((k for k in _EVAL_FIELDS if isinstance(obj, dict) and obj.get(k)), None)
            if fld is None:
                raise FinelakeError(f"evaluation set {f} line {i}: none of the fields "
                                    f"{', '.join(_EVAL_FIELDS)}")
            key = next((obj[k] for k in _EVAL_KEYS if obj.get(k) is not None), i)
            vals = obj[fld] if isinstance(obj[fld], list) else [obj[fld]]
            for t, v in enumerate(vals, 1):
                if isinstance(v, str) and v.strip():
                    texts.append(v)
                    names.append(f"{label}:{key}" + (f"/turn{t}" if len(vals) > 1 else ""))
    return texts, names


def contamination_udf(bc, threshold: float):
    """A string UDF over a query's text: None when clean, else the drop reason
    ``"contaminated: <rule> with <eval set>:<key>"``.

    Args:
        bc: a broadcast :class:`~finelake.method.text.ContaminationIndex` (built once on the
            driver, shipped once per executor).
        threshold: ``ingest.decontamination_threshold``.
    """
    from pyspark.sql import functions as F

    def why(text):
        m = bc.value.match(text)
        if not m.contaminated(threshold):
            return None
        rule = "exact match" if m.exact else f"ngram share {m.share:.2f}, coverage {m.coverage:.2f}"
        return f"contaminated: {rule} with {m.eval_name}"

    return F.udf(why, "string")
