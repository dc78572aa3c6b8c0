"""Evaluate a model on the shipped benchmarks, tracked in MLflow and in Delta (``finelake evaluate``).

What it implements (seed papers):

* **IFEval** (non-instructional fine-tuning §5): Google's rule-based checkers via ``if-verifiable``
  (:mod:`finelake.method.ifeval`): prompt- and instruction-level accuracy, strict and loose.
* **AlpacaEval** (FineInstructions §4.3): pairwise win rate of the model against the shipped
  GPT-4-turbo reference outputs, judged by ``evaluate.judge`` in both orders, and a length-controlled
  win rate (:mod:`finelake.method.winrate`).
* **Multi-aspect scores** (limitations of instruction tuning §3): helpfulness, clarity, factuality,
  depth, engagement, 1-5, by the same judge, on the AlpacaEval responses.
* **MT-Bench** first turns, 1-10 single-answer grades (FineInstructions evaluates MT-Bench-101
  single-turn).
* **Token distribution shift** (limitations of instruction tuning, token distribution analysis):
  per-position KL(tuned || base) along the tuned model's greedy AlpacaEval responses, the share of
  its tokens the base model ranks below first (shifted), and the most frequent shifted tokens
  (:mod:`finelake.method.token_shift`).

Generation is greedy, on the ``transformers`` backend (:mod:`finelake.jobs.eval_models`),
with the model's own template: the ``Instruction: {prompt}\\n\\nAnswer:`` training template for
models finelake trained (and models with no chat template, as §4.3 does for standard
pre-training), the tokenizer's chat template otherwise (``evaluate.prompt_format`` forces one).

The evaluation items are loaded from the files shipped in :mod:`finelake.sample` into the
``eval_sets`` Delta table; results go to MLflow (params, ``<benchmark>.<metric>`` metrics, per-item
outputs as tables, the token-shift profile as a figure) and one row per metric to the
``evaluations`` Delta table (model, run, benchmark, metric, value, n, eval_sets version), so runs
compare with SQL::

    finelake sql "SELECT model, benchmark, metric, value, n FROM finelake.evaluations ORDER BY 2, 3"

The embedded profile's judge is SmolLM2-135M-Instruct: its pairwise and aspect numbers are a wiring
check, not a measurement (``conf/local.yaml`` says so too).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from importlib import resources
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from finelake.jobs.common import arrow_from_rows, model_label
# The model and the scoring live in their own modules; their names are importable from here too.
from finelake.jobs.eval_models import (STOP_STRINGS, Generation, ModelUnderTest,  # noqa: F401
                                       generate, load_model, render_prompts, resolve_model_path)
from finelake.jobs.eval_scoring import (score_alpacaeval, score_aspects,  # noqa: F401
                                        score_ifeval, score_mt_bench, token_shift)
from finelake.jobs.train import data_lake, read_table, setup_mlflow
from finelake.method import ifeval as ifm
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.tables import EVAL_SETS, EVALUATIONS

log = logging.getLogger(__name__)

BENCHMARK_FILES = {
    "ifeval": "eval_ifeval.jsonl",
    "alpacaeval": "eval_alpacaeval.jsonl",
    "mt_bench": "eval_mt_bench.jsonl",
}


# ----------------------------------------------------------------------------- eval sets


def eval_set_rows(benchmark: str, lines: list[str], source_file: str) -> list[dict]:
    """Rows of ``eval_sets`` from one shipped JSONL file (item ids keep the file order).

    Raises:
        ValueError: an unknown benchmark or a line that is not JSON.
    """
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        d = json.loads(line)
        if benchmark == "ifeval":
            rows.append({"item_id": f"{int(d['key']):06d}", "prompt": d["prompt"],
                         "instruction_id_list": list(d["instruction_id_list"]),
                         "kwargs": json.dumps(d["kwargs"])})
        elif benchmark == "alpacaeval":
            rows.append({"item_id": f"{i:05d}", "prompt": d["instruction"], "reference": d["output"],
                         "reference_generator": d.get("generator"), "category": d.get("dataset")})
        elif benchmark == "mt_bench":
            rows.append({"item_id": f"{int(d['question_id']):04d}", "prompt": d["turns"][0],
                         "turns": list(d["turns"]), "category": d.get("category")})
        else:
            raise ValueError(f"unknown benchmark {benchmark!r}")
        rows[-1].update({"benchmark": benchmark, "source_file": source_file})
    return rows


def load_eval_sets(ctx: StageContext, lake=None) -> int:
    """Merge the shipped evaluation files into ``eval_sets`` (rows whose content changed are
    updated, unchanged reruns commit nothing); returns the table version to evaluate against."""
    lake = lake or data_lake(ctx)
    rows: list[dict] = []
    pkg = resources.files("finelake.sample")
    for bench, name in BENCHMARK_FILES.items():
        text = pkg.joinpath(name).read_text(encoding="utf-8")
        rows.extend(eval_set_rows(bench, text.splitlines(), f"finelake.sample/{name}"))
    changed = " OR ".join(f"(t.`{c}` IS DISTINCT FROM s.`{c}`)" for c in ("prompt", "kwargs", "reference"))
    lake.merge(EVAL_SETS, arrow_from_rows(rows, EVAL_SETS), run_id=ctx.run_id, update=True,
               update_when=changed)
    return lake.version(EVAL_SETS)



# ----------------------------------------------------------------------------- the job


def _items(rows: pa.Table, bench: str, limit: Optional[int]) -> list[dict]:
    d = rows.filter(pc.equal(rows.column("benchmark"), bench)).sort_by("item_id").to_pylist()
    return d[:limit] if limit else d


def _judge(cfg):
    from finelake.models.generation import create_generator

    jc = cfg.evaluate.judge or cfg.models.generator
    return create_generator(jc), model_label(jc), jc.max_tokens


def _base_uri(cfg, mut: ModelUnderTest, base: Optional[str]) -> Optional[str]:
    if base:
        return base
    if mut.meta:
        return mut.meta.get("base_model")  # None for models trained from scratch
    return cfg.evaluate.base_model


def run_evaluate(ctx: StageContext, model: Optional[str] = None, base: Optional[str] = None,
                 limit: Optional[int] = None, benchmarks: Optional[list[str]] = None,
                 label: Optional[str] = None) -> StageStats:
    """Evaluate one model; metrics to MLflow and to the ``evaluations`` table.

    Args:
        model: ``models:/name/version``, ``runs:/id/model``, a transformers folder, a hub id or
            ``embedded:<name>`` (default: ``train.base_model``).
        base: base model for ``token_shift`` (default: the base recorded with a finelake-trained
            model, else ``evaluate.base_model``); skipped when there is none or it is the model.
        limit: first N items of each benchmark (default ``evaluate.limit``).
        benchmarks: subset of ``evaluate.benchmarks``.
        label: name in tables and plots (default: derived from ``model``).

    Returns:
        :class:`StageStats` with two more attributes: ``metrics`` (every ``benchmark.metric`` ->
        value) and ``shift`` (the token-shift summary or None); ``extra`` holds the evaluation's
        ``mlflow_run_id``, ``eval_version`` and the headline metrics.

    Raises:
        FinelakeError: an unknown benchmark, an unresolvable model URI, or mismatched tokenizers.
    """
    import mlflow
    import pandas as pd
    import torch
    from mlflow.data.delta_dataset_source import DeltaDatasetSource

    cfg = ctx.cfg
    ec = cfg.evaluate
    benches = list(benchmarks or ec.benchmarks)
    unknown = set(benches) - {"ifeval", "alpacaeval", "aspects", "mt_bench", "token_shift"}
    if unknown:
        raise FinelakeError(f"unknown benchmarks {sorted(unknown)}")
    limit = limit or ec.limit
    if ec.torch_threads:
        torch.set_num_threads(ec.torch_threads)
    stats = StageStats("evaluate")
    lake = data_lake(ctx)
    eval_version = load_eval_sets(ctx, lake)
    rows, eval_path, _ = read_table(ctx, EVAL_SETS.name, eval_version)

    uri = model or cfg.train.base_model
    mut = load_model(ctx, uri, label)
    log.info("evaluate %s (%s, prompt format %s) on %s, limit %s", mut.label, mut.path,
             mut.prompt_format, benches, limit)
    metrics: dict[str, float] = {}
    outputs: dict[str, list[dict]] = {}
    counts: dict[str, dict[str, float]] = {}
    shift: Optional[dict] = None
    judge = judge_label = None
    judge_tokens = 64

    def need_judge():
        nonlocal judge, judge_label, judge_tokens
        if judge is None:
            judge, judge_label, judge_tokens = _judge(cfg)
        return judge

    t0 = time.monotonic()
    if "ifeval" in benches:
        items = _items(rows, "ifeval", limit)
        gens = generate(mut, [i["prompt"] for i in items], ec.max_new_tokens, ec.batch_size)
        m, outputs["ifeval"] = score_ifeval(items, gens)
        counts["ifeval"] = {"prompt": m["n_prompts"], "inst": m["n_instructions"]}
        metrics.update({f"ifeval.{k}": v for k, v in m.items()})
        stats.rows_in += len(items)
    alpaca_needed = {"alpacaeval", "aspects", "token_shift"} & set(benches)
    if alpaca_needed:
        a_items = _items(rows, "alpacaeval", limit)
        a_gens = generate(mut, [i["prompt"] for i in a_items], ec.max_new_tokens, ec.batch_size)
        stats.rows_in += len(a_items)
        if "alpacaeval" in benches:
            m, outputs["alpacaeval"] = score_alpacaeval(need_judge(), a_items, a_gens, ec.judge_both_orders)
            metrics.update({f"alpacaeval.{k}": v for k, v in m.items()})
        if "aspects" in benches:
            m, outputs["aspects"] = score_aspects(need_judge(), a_items, a_gens, judge_tokens)
            metrics.update({f"aspects.{k}": v for k, v in m.items()})
        if "token_shift" in benches:
            base_uri = _base_uri(cfg, mut, base)
            base_path = resolve_model_path(ctx, base_uri) if base_uri else None
            if base_path is None:
                log.info("token_shift skipped: no base model for %s (%s)", mut.label,
                         "trained from scratch" if mut.meta else "pass --base or set evaluate.base_model")
            elif os.path.realpath(base_path) == os.path.realpath(mut.path) and not base:
                log.info("token_shift skipped: the model is its own base")
            else:
                bm = load_model(ctx, base_uri, prompt_format=mut.prompt_format)
                shift = token_shift(mut, bm, a_gens, ec.shift_top_k)
                bm.close()
                if shift is None:
                    log.warning("token_shift skipped: %s generated no tokens", mut.label)
                else:
                    metrics.update({f"token_shift.{k}": float(v) for k, v in shift.items()
                                    if isinstance(v, (int, float))})
    if "mt_bench" in benches:
        items = _items(rows, "mt_bench", limit)
        gens = generate(mut, [i["prompt"] for i in items], ec.max_new_tokens, ec.batch_size)
        m, outputs["mt_bench"] = score_mt_bench(need_judge(), items, gens)
        metrics.update({f"mt_bench.{k}": v for k, v in m.items()})
        stats.rows_in += len(items)
    seconds = time.monotonic() - t0

    setup_mlflow(cfg)
    with mlflow.start_run(run_name=f"eval-{mut.label}") as run:
        mlflow.log_params({"model": mut.label, "model_uri": uri, "model_path": mut.path,
                           "prompt_format": mut.prompt_format, "benchmarks": ",".join(benches),
                           "limit": limit or "", "max_new_tokens": ec.max_new_tokens,
                           "judge": judge_label or "", "judge_both_orders": ec.judge_both_orders,
                           "eval_sets.version": eval_version, "eval_sets.path": eval_path,
                           "ifeval.sentence_splitter": ifm.sentence_splitter()
                           if "ifeval" in benches else "", "finelake.run_id": ctx.run_id})
        mlflow.set_tags({"finelake.kind": "evaluation", "finelake.model_uri": uri,
                         "finelake.train_mlflow_run": mut.meta.get("mlflow_run_id") or "",
                         "finelake.eval_sets_version": str(eval_version)})
        used = pd.DataFrame([{k: v for k, v in r.items() if k in ("benchmark", "item_id", "prompt")}
                             for r in rows.to_pylist()])
        mlflow.log_input(mlflow.data.from_pandas(used, source=DeltaDatasetSource(
            path=eval_path, delta_table_version=eval_version), name=f"eval_sets@v{eval_version}"),
            context="evaluation")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_metric("eval_seconds", seconds)
        for bench, out in outputs.items():
            mlflow.log_table(pd.DataFrame(out).astype(str), f"outputs/{bench}.json")
        if shift is not None:
            mlflow.log_dict({"top_shifted": shift["top_shifted"],
                             "kl_by_position": shift["kl_by_position"]}, "token_shift.json")
            fig = _kl_figure(shift, mut.label)
            mlflow.log_figure(fig, "token_shift_kl.png")
            fig.clear()
        run_id = run.info.run_id

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    eval_rows = []
    for key, value in metrics.items():
        bench, metric = key.split(".", 1)
        n = _metric_n(bench, metric, metrics, counts)
        eval_rows.append({"model": mut.label, "benchmark": bench, "metric": metric,
                          "value": float(value), "n": n, "eval_version": eval_version,
                          "model_uri": uri, "train_run": mut.meta.get("mlflow_run_id"),
                          "mlflow_run_id": run_id, "judge": judge_label
                          if bench in ("alpacaeval", "aspects", "mt_bench") else None,
                          "prompt_format": mut.prompt_format, "created_at": now,
                          "run_id": ctx.run_id})
    if eval_rows:
        lake.merge(EVALUATIONS, arrow_from_rows(eval_rows, EVALUATIONS), run_id=ctx.run_id, update=True)
    stats.rows_out = len(eval_rows)
    stats.extra.update({"model": mut.label, "prompt_format": mut.prompt_format,
                        "mlflow_run_id": run_id, "eval_version": eval_version,
                        **{k: round(v, 3) for k, v in metrics.items() if k in _SUMMARY}})
    stats.metrics = metrics  # every metric, for callers (compare); the summary line keeps a few
    stats.shift = shift
    return stats.finish()


_SUMMARY = ("ifeval.prompt_level_strict_acc", "ifeval.inst_level_loose_acc", "alpacaeval.win_rate",
            "alpacaeval.lc_win_rate", "aspects.mean", "mt_bench.score", "token_shift.kl_mean",
            "token_shift.shifted_share")


def _metric_n(bench: str, metric: str, metrics: dict, counts: dict) -> Optional[int]:
    if bench == "ifeval":
        return int(counts["ifeval"]["inst" if metric.startswith("inst") else "prompt"])
    if bench == "alpacaeval":
        return int(metrics.get("alpacaeval.n", 0))
    if bench == "aspects":
        return int(metrics.get(f"aspects.n_{metric}", metrics.get("aspects.n_helpfulness", 0)))
    if bench == "mt_bench":
        return int(metrics.get("mt_bench.n", 0))
    if bench == "token_shift":
        return int(metrics.get("token_shift.n_tokens", 0))
    return None


def _kl_figure(shift: dict, label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(len(shift["kl_by_position"])), shift["kl_by_position"])
    ax.set_xlabel("position in the tuned model's response (tokens)")
    ax.set_ylabel("mean KL(tuned || base), nats")
    ax.set_title(f"{label}: token distribution shift")
    fig.tight_layout()
    return fig
