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

Generation is greedy (``transformers`` ``generate``) with the model's own template: the
``Instruction: {prompt}\\n\\nAnswer:`` training template for models finelake trained (and models
with no chat template, as §4.3 does for standard pre-training), the tokenizer's chat template
otherwise (``evaluate.prompt_format`` forces one).

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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from finelake import storage
from finelake.jobs.common import arrow_from_rows, model_label
from finelake.jobs.tracking import transformers_folder
from finelake.jobs.train import TRAIN_META, data_lake, read_table, setup_mlflow
from finelake.method import ifeval as ifm
from finelake.method import token_shift as tsm
from finelake.method import winrate as wr
from finelake.method.training import format_prompt
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.tables import EVAL_SETS, EVALUATIONS

log = logging.getLogger(__name__)

BENCHMARK_FILES = {
    "ifeval": "eval_ifeval.jsonl",
    "alpacaeval": "eval_alpacaeval.jsonl",
    "mt_bench": "eval_mt_bench.jsonl",
}
STOP_STRINGS = ("\n\nInstruction:",)
"""A model trained on the §4.2 template may start a new pair after its answer: cut it there."""


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


# ----------------------------------------------------------------------------- models


@dataclass
class ModelUnderTest:
    """A loaded causal LM and how to prompt it.

    Attributes:
        label: short name for tables and plots.
        uri: what the user passed (``models:/...``, ``runs:/...``, a folder, ``embedded:...``).
        path: the local transformers folder loaded.
        prompt_format: ``chat`` or ``instruction``.
        meta: ``finelake_train.json`` of a finelake-trained model ({} otherwise).
    """

    label: str
    uri: str
    path: str
    model: Any
    tokenizer: Any
    prompt_format: str
    meta: dict = field(default_factory=dict)


def resolve_model_path(ctx: StageContext, uri: str) -> str:
    """A local transformers folder for ``uri``.

    ``models:/name/version`` and ``runs:/id/path`` resolve through MLflow (a local artifact store is
    used in place; a remote one is downloaded under ``<lake>/_mlflow/downloads``); ``embedded:``
    names and GGUF files go through :func:`finelake.models.resolve.hf_path`; folders and hub ids
    pass through.

    Raises:
        FinelakeError: an MLflow URI that does not resolve.
    """
    from finelake.models.resolve import hf_path

    if not (uri.startswith("models:/") or uri.startswith("runs:/")):
        return hf_path(uri)
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    setup_mlflow(ctx.cfg)
    try:
        if uri.startswith("models:/"):
            name, _, ver = uri[len("models:/"):].partition("/")
            src = (MlflowClient().get_model_version_download_uri(name, ver) if ver  # registered
                   else mlflow.get_logged_model(name).artifact_location)  # models:/<model id>
        else:
            rid, _, sub = uri[len("runs:/"):].partition("/")
            src = f"{mlflow.get_run(rid).info.artifact_uri}/{sub}"
    except MlflowException as exc:
        raise FinelakeError(f"cannot resolve {uri}: {exc.message}") from None
    local = src[len("file://"):] if src.startswith("file://") else src
    if os.path.isdir(local) and Path(transformers_folder(local), "config.json").exists():
        return transformers_folder(local)  # an MLflow model keeps the folder under model/
    root = storage.root(ctx.cfg.lake)
    dst = Path("/tmp" if storage.is_uri(root) else root, "_mlflow", "downloads", uri.replace(":/", "_").replace("/", "_"))
    dst.mkdir(parents=True, exist_ok=True)
    # a models:/ URI downloads through the registry's own artifact repository (Unity Catalog:
    # temporary credentials or presigned URLs; its storage location is not readable directly)
    return transformers_folder(mlflow.artifacts.download_artifacts(
        artifact_uri=uri if uri.startswith("models:/") else src, dst_path=str(dst)))


def _label(uri: str) -> str:
    if uri.startswith("models:/"):
        return uri[len("models:/"):]
    if uri.startswith("embedded:"):
        return uri[len("embedded:"):]
    return Path(uri.rstrip("/")).name or uri


def load_model(ctx: StageContext, uri: str, label: Optional[str] = None,
               prompt_format: Optional[str] = None) -> ModelUnderTest:
    """Load a model for evaluation (fp32 on CPU, bf16 on GPU), left padding for batched generation.

    Raises:
        FinelakeError: an MLflow URI that does not resolve.
        OSError: the folder holds no transformers model.
    """
    import torch
    import transformers

    path = resolve_model_path(ctx, uri)
    meta_file = Path(path, TRAIN_META)
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    fmt = prompt_format or ctx.cfg.evaluate.prompt_format
    if fmt == "auto":
        fmt = meta.get("prompt_format") or ("chat" if tok.chat_template else "instruction")
    return ModelUnderTest(label or _label(uri), uri, path, model, tok, fmt, meta)


def render_prompts(m: ModelUnderTest, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt in the model's format (chat template with the generation prompt,
    or ``Instruction: {prompt}\\n\\nAnswer:`` tokenized as training tokenized it)."""
    tok = m.tokenizer
    if m.prompt_format == "chat":
        return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
                for p in prompts]
    return [tok(format_prompt(p))["input_ids"] for p in prompts]


@dataclass
class Generation:
    """One greedy response: prompt and generated token ids, and the text (cut at a stop string)."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str


def generate(m: ModelUnderTest, prompts: list[str], max_new_tokens: int,
             batch_size: int) -> list[Generation]:
    """Greedy responses, same order as ``prompts``; batches of similar length, left-padded.

    Returns:
        One :class:`Generation` per prompt; ``output_ids`` stop at the first EOS (excluded).
    """
    import torch

    tok, model = m.tokenizer, m.model
    ids = render_prompts(m, prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[Optional[Generation]] = [None] * len(ids)
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id or tok.eos_token_id])
    eos.add(tok.eos_token_id)
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        width = max(len(ids[i]) for i in batch)
        inp = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            inp[r, width - len(ids[i]):] = torch.tensor(ids[i])
            att[r, width - len(ids[i]):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=inp.to(model.device), attention_mask=att.to(model.device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for r, i in enumerate(batch):
            new = gen[r, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in eos), len(new))
            new = new[:cut]
            text = tok.decode(new, skip_special_tokens=True)
            for stop in STOP_STRINGS:
                text = text.split(stop)[0]
            out[i] = Generation(ids[i], new, text.strip())
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- benchmarks


def score_ifeval(items: list[dict], gens: list[Generation]) -> tuple[dict, list[dict]]:
    """IFEval metrics and per-item rows (prompt-level and instruction-level, strict and loose)."""
    results, rows = [], []
    for it, g in zip(items, gens):
        r = ifm.check(it["prompt"], g.text, it["instruction_id_list"], it["kwargs"])
        results.append(r)
        rows.append({"item_id": it["item_id"], "response": g.text, "strict": r.strict,
                     "loose": r.loose, "instructions": r.instruction_ids})
    return ifm.aggregate(results), rows


def _judge_texts(judge, requests) -> list[Optional[str]]:
    if not requests:
        return []
    return [r.text if r.error is None else None for r in judge.generate(requests)]


def score_alpacaeval(judge, items: list[dict], gens: list[Generation],
                     both_orders: bool = True) -> tuple[dict, list[dict]]:
    """Win rate, win margin and length-controlled win rate against the reference outputs."""
    from finelake.models.base import GenerationRequest

    reqs = []
    for it, g in zip(items, gens):
        reqs.append(GenerationRequest(wr.pairwise_messages(it["prompt"], g.text, it["reference"]),
                                      max_tokens=2, regex=wr.PAIRWISE_REGEX))
        if both_orders:
            reqs.append(GenerationRequest(wr.pairwise_messages(it["prompt"], it["reference"], g.text),
                                          max_tokens=2, regex=wr.PAIRWISE_REGEX))
    texts = _judge_texts(judge, reqs)
    step = 2 if both_orders else 1
    prefs, rows = [], []
    for k, (it, g) in enumerate(zip(items, gens)):
        first = wr.parse_pairwise(texts[k * step])
        second = wr.parse_pairwise(texts[k * step + 1]) if both_orders else None
        p = wr.preference(first, second)
        prefs.append(p)
        rows.append({"item_id": it["item_id"], "response": g.text, "verdict_model_first": first,
                     "verdict_model_second": second, "preference": p,
                     "len_model": len(g.text), "len_reference": len(it["reference"] or "")})
    metrics = wr.win_rates(prefs)
    verdicts = [v for r in rows for v in (r["verdict_model_first"], r["verdict_model_second"])
                if v is not None]
    metrics["judge_first_position_share"] = sum(v == 1 for v in verdicts) / max(len(verdicts), 1)
    lc = wr.length_controlled_win_rate(prefs, [r["len_model"] for r in rows],
                                       [r["len_reference"] for r in rows])
    metrics.update({"lc_win_rate": lc["lc_win_rate"], "length_coef": lc["length_coef"],
                    "avg_len_model": sum(r["len_model"] for r in rows) / len(rows),
                    "avg_len_reference": sum(r["len_reference"] for r in rows) / len(rows)})
    return metrics, rows


def score_aspects(judge, items: list[dict], gens: list[Generation], max_tokens: int) -> tuple[dict, list[dict]]:
    """Mean 1-5 score per aspect (helpfulness, clarity, factuality, depth, engagement)."""
    from finelake.models.base import GenerationRequest

    reqs = [GenerationRequest(wr.aspect_messages(it["prompt"], g.text), max_tokens=max_tokens,
                              json_schema=wr.ASPECT_SCHEMA) for it, g in zip(items, gens)]
    texts = _judge_texts(judge, reqs)
    rows, metrics = [], {}
    for it, g, t in zip(items, gens, texts):
        rows.append({"item_id": it["item_id"], "response": g.text, **wr.parse_aspects(t), "raw": t})
    means = []
    for a in wr.ASPECTS:
        vals = [r[a] for r in rows if r[a] is not None]
        if vals:
            metrics[a] = sum(vals) / len(vals)
            metrics[f"n_{a}"] = float(len(vals))
            means.append(metrics[a])
    if means:
        metrics["mean"] = sum(means) / len(means)
    return metrics, rows


def score_mt_bench(judge, items: list[dict], gens: list[Generation]) -> tuple[dict, list[dict]]:
    """Mean 1-10 single-answer grade of the first turns."""
    from finelake.models.base import GenerationRequest

    reqs = [GenerationRequest(wr.grade_messages(it["prompt"], g.text), max_tokens=3,
                              regex=wr.GRADE_REGEX) for it, g in zip(items, gens)]
    texts = _judge_texts(judge, reqs)
    rows = [{"item_id": it["item_id"], "response": g.text, "grade": wr.parse_grade(t)}
            for it, g, t in zip(items, gens, texts)]
    grades = [r["grade"] for r in rows if r["grade"] is not None]
    metrics = {"score": sum(grades) / len(grades), "n": float(len(grades))} if grades else {}
    return metrics, rows


def next_token_logits(model, prompt_ids: list[int], output_ids: list[int]):
    """``[T, V]`` logits that predicted each of ``output_ids`` after ``prompt_ids`` (float32, CPU)."""
    import torch

    seq = torch.tensor([prompt_ids + output_ids], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0]
    p = len(prompt_ids)
    return logits[p - 1:p - 1 + len(output_ids)].float().cpu()


def token_shift(tuned: ModelUnderTest, base: ModelUnderTest, gens: list[Generation],
                top_k: int = 20) -> Optional[dict]:
    """Token distribution shift of ``tuned`` from ``base`` along ``tuned``'s greedy responses
    (:func:`finelake.method.token_shift.summarize`); None when every response was empty.

    Raises:
        FinelakeError: the two tokenizers differ (positions would not correspond).
    """
    if tuned.tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise FinelakeError(f"token_shift: {tuned.label} and {base.label} have different tokenizers")
    results = []
    for g in gens:
        if not g.output_ids:
            continue
        t = next_token_logits(tuned.model, g.prompt_ids, g.output_ids)
        b = next_token_logits(base.model, g.prompt_ids, g.output_ids)
        results.append(tsm.position_shift(t, b, g.output_ids))
    if not results:
        return None
    return tsm.summarize(results, decode=lambda i: tuned.tokenizer.decode([i]), top_k=top_k)


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
                del bm
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


if __name__ == "__main__":  # spark-submit jobs/evaluate.py --conf ... (same options as finelake evaluate)
    import sys

    from finelake.cli import main

    main(["evaluate", *sys.argv[1:]])
