"""Small-scale comparison grid (``finelake compare``): train and evaluate, then write Markdown + plots.

FineInstructions §4.1 compares training sets token-for-token ("all compared models are trained on
the same number of tokens"); the limitations-of-instruction-tuning paper compares LoRA with full
fine-tuning. This job runs both comparisons at the scale of the shipped sample:

1. the training-token count of every table in ``compare.runs`` is measured with the training
   tokenizer and the **equal budget** is the smallest (optionally capped by
   ``compare.token_budget``); every run trains on at most that many tokens of its table, in key
   order, for ``compare.epochs`` epochs (no step limit, so each run sees its whole budget);
2. each ``table:method`` in ``compare.runs`` is trained (:func:`finelake.jobs.train.run_train`) and
   evaluated (:func:`finelake.jobs.evaluate.run_evaluate`), and so is the untrained base model;
3. ``<out>/compare.md`` gets one table row per model, the loss curves, a bar chart of the main
   metrics, the token-shift profile of every fine-tuned model, and a paragraph on what the numbers
   do and do not show. The same files are logged to an MLflow run named ``compare``.

Everything stays in MLflow and in the ``evaluations`` table, so a later SQL query can compare
across runs.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from finelake import storage
from finelake.method.training import equal_budget
from finelake.runtime import FinelakeError, StageContext

log = logging.getLogger(__name__)

HEADLINE = [
    ("ifeval.prompt_level_strict_acc", "IFEval prompt strict"),
    ("ifeval.inst_level_loose_acc", "IFEval inst. loose"),
    ("alpacaeval.win_rate", "AlpacaEval win"),
    ("alpacaeval.lc_win_rate", "AlpacaEval LC win"),
    ("aspects.mean", "aspects mean (1-5)"),
    ("token_shift.kl_mean", "KL to base (nats/token)"),
    ("token_shift.shifted_share", "shifted tokens"),
]


def parse_runs(runs: list[str]) -> list[tuple[str, str]]:
    """``["pairs:lora", ...]`` -> ``[("pairs", "lora"), ...]``.

    Raises:
        FinelakeError: an entry without ``:`` or with an unknown method.
    """
    out = []
    for r in runs:
        table, _, method = r.partition(":")
        if not table or method not in ("lora", "full", "scratch"):
            raise FinelakeError(f"compare.runs entry {r!r} must be 'table:lora|full|scratch'")
        out.append((table, method))
    return out


def run_compare(ctx: StageContext, out: Optional[str] = None) -> str:
    """Train and evaluate the ``compare.runs`` grid at an equal token count; returns the path of
    ``compare.md``.

    Raises:
        FinelakeError: a table in the grid is missing (run ``finelake run`` first) or empty.
    """
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    from finelake.jobs.evaluate import run_evaluate
    from finelake.jobs.train import setup_mlflow, table_tokens, run_train
    from finelake.models.resolve import hf_path

    cfg = ctx.cfg
    cc = cfg.compare
    grid = parse_runs(cc.runs)
    dest = out or storage.join(storage.root(cfg.lake), "_reports", f"compare-{ctx.run_id}")
    out = storage.work_dir(dest, "reports")  # local; copied to an object-store dest at the end

    tok = AutoTokenizer.from_pretrained(hf_path(cfg.tokenizer.model))
    totals, versions = {}, {}
    for table in dict.fromkeys(t for t, _ in grid):
        totals[table], versions[table] = table_tokens(ctx, table, None, tok, cfg.train.max_seq_len)
    budget = equal_budget(totals, cc.token_budget)
    log.info("compare: tokens per table %s -> equal budget %d", totals, budget)

    trained, evals = [], []
    for table, method in grid:
        st = run_train(ctx, table=table, version=versions[table], method=method, token_budget=budget,
                       max_steps=0, epochs=cc.epochs, run_name=f"compare-{table}-{method}",
                       budget_note="equal budget: min of " + ", ".join(
                           f"{t}@v{versions[t]}={n}" for t, n in totals.items())
                       + (f", capped at {cc.token_budget}" if cc.token_budget else ""))
        print(st.summary(), flush=True)
        trained.append((table, method, st))
    if cc.include_base:
        ev = run_evaluate(ctx, model=cfg.train.base_model, label="base")
        print(ev.summary(), flush=True)
        evals.append(("base", "-", "-", None, ev))
    for table, method, st in trained:
        ev = run_evaluate(ctx, model=st.extra["model_uri"] or st.extra["model_dir"],
                          label=f"{table}:{method}")
        print(ev.summary(), flush=True)
        evals.append((f"{table}:{method}", table, method, st, ev))

    setup_mlflow(cfg)
    client = MlflowClient()
    curves = {f"{t}:{m}": [(h.step, h.value) for h in
                           client.get_metric_history(st.extra["mlflow_run_id"], "loss")]
              for t, m, st in trained if st.extra.get("mlflow_run_id")}
    files = _plots(out, curves, evals)
    text = _markdown(cfg, totals, versions, budget, evals, files)
    path = os.path.join(out, "compare.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    with mlflow.start_run(run_name="compare"):
        mlflow.set_tags({"finelake.kind": "compare", "finelake.run_id": ctx.run_id})
        mlflow.log_params({"budget_tokens": budget, "runs": ",".join(cc.runs),
                           **{f"tokens_available.{t}": n for t, n in totals.items()}})
        mlflow.log_artifacts(out, artifact_path="compare")
    if storage.is_uri(dest):
        storage.put_dir(ctx.spark, out, dest, last="compare.md")
        path = storage.join(dest, "compare.md")
    return path


def _plots(out: str, curves: dict, evals: list) -> dict[str, str]:
    from finelake.plots import saved_figure

    files = {}
    if curves:
        files["loss"] = "loss_curves.png"
        with saved_figure(os.path.join(out, files["loss"])) as (fig, ax):
            for name, pts in curves.items():
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss")
            ax.set_title("Loss curves (equal token budget)")
            ax.legend(fontsize=8)
    keys = [(k, n) for k, n in HEADLINE[:4] if any(k in e[4].metrics for e in evals)]
    if keys:
        files["metrics"] = "metrics.png"
        with saved_figure(os.path.join(out, files["metrics"]), figsize=(7, 3.5)) as (fig, ax):
            width = 0.8 / max(len(evals), 1)
            for j, e in enumerate(evals):
                vals = [e[4].metrics.get(k, float("nan")) for k, _ in keys]
                ax.bar([i + j * width for i in range(len(keys))], vals, width, label=e[0])
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
            ax.set_xticklabels([n for _, n in keys], fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel("score (0-1)")
            ax.legend(fontsize=8)
    shifts = [(e[0], e[4].shift) for e in evals if e[4].shift]
    if shifts:
        files["shift"] = "token_shift.png"
        with saved_figure(os.path.join(out, files["shift"])) as (fig, ax):
            for name, s in shifts:
                ax.plot(s["kl_by_position"], label=f"{name} (shifted {s['shifted_share']:.0%})")
            ax.set_xlabel("position in the tuned model's response (tokens)")
            ax.set_ylabel("mean KL(tuned || base), nats")
            ax.set_title("Token distribution shift from the base model")
            ax.legend(fontsize=8)
    return files


def _fmt(v, pct: bool = False) -> str:
    if v is None or v != v:  # None or NaN
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.3g}"


def _markdown(cfg, totals, versions, budget, evals, files) -> str:
    pct = {"ifeval.prompt_level_strict_acc", "ifeval.inst_level_loose_acc", "alpacaeval.win_rate",
           "alpacaeval.lc_win_rate", "token_shift.shifted_share"}
    lines = ["# finelake compare", "",
             f"Profile `{cfg.profile}`, base model `{cfg.train.base_model}`, judge "
             f"`{(cfg.evaluate.judge or cfg.models.generator).model}` "
             f"({(cfg.evaluate.judge or cfg.models.generator).backend}), "
             f"{cfg.evaluate.limit or 'all'} items per benchmark, greedy, at most "
             f"{cfg.evaluate.max_new_tokens} new tokens.", "",
             "Training tokens available: " + ", ".join(
                 f"`{t}`@v{versions[t]} = {n:,}" for t, n in totals.items())
             + f"; **equal budget = {budget:,} tokens** per run "
               f"({cfg.compare.epochs:g} epoch(s), sequences ≤ {cfg.train.max_seq_len} tokens).", "",
             "| model | tokens trained on | steps | final loss | tokens/s | "
             + " | ".join(n for _, n in HEADLINE) + " |",
             "|" + "---|" * (5 + len(HEADLINE))]
    for name, table, method, st, ev in evals:
        m = ev.metrics
        if st is not None:
            tr = (f"{st.extra.get('data_tokens', 0):,} | {int(st.extra.get('train_steps', 0)) or '–'} | "
                  f"{st.extra['train_loss']:.3f} | {st.extra['tokens_per_s']:.0f}")
        else:
            tr = "– | – | – | –"
        fmt = ev.extra.get("prompt_format")
        lines.append(f"| {name}{f' ({fmt} prompt)' if fmt else ''} | {tr} | " + " | ".join(_fmt(m.get(k), k in pct) for k, _ in HEADLINE) + " |")
    lines.append("")
    for key, title in (("loss", "Loss curves"), ("metrics", "Headline metrics"),
                       ("shift", "Token distribution shift")):
        if key in files:
            lines += [f"![{title}]({files[key]})", ""]
    lines += ["## What these numbers show, and what they do not", "", _paragraph(cfg, evals, budget), ""]
    return "\n".join(lines)


def _paragraph(cfg, evals, budget) -> str:
    by = {e[0]: e[4].metrics for e in evals}
    n_if = next((int(m["ifeval.n_prompts"]) for m in by.values() if "ifeval.n_prompts" in m), 0)
    parts = [f"Each trained model saw about {budget:,} training tokens ({budget / 23e9:.0e} of the "
             "paper's smallest corpus, 23B tokens), starting from a 135M-parameter model that was "
             "already instruction-tuned (or, for scratch runs, from random weights); the comparisons "
             "below are about the plumbing and the direction of tiny effects, not about the "
             "paper's claims."]
    if "pairs:lora" in by and "documents:lora" in by:
        a, b = by["pairs:lora"], by["documents:lora"]
        k = "ifeval.prompt_level_strict_acc"
        if k in a and k in b:
            step = 100.0 / n_if if n_if else float("nan")
            parts.append(f"Pairs vs documents (LoRA, equal tokens): IFEval prompt-level strict "
                         f"accuracy {100 * a[k]:.1f}% vs {100 * b[k]:.1f}% on {n_if} prompts, where "
                         f"one prompt is {step:.1f} points, so a difference below a few prompts is "
                         "noise.")
    for table in dict.fromkeys(name.split(":")[0] for name in by if ":" in name):
        a, b = by.get(f"{table}:lora"), by.get(f"{table}:full")
        k = "token_shift.shifted_share"
        if a and b and k in a and k in b:
            more = "more" if b[k] > a[k] else "fewer"
            agree = "agrees" if b[k] > a[k] else "does not agree"
            parts.append(f"LoRA vs full fine-tuning on `{table}`: full fine-tuning shifted {more} of "
                         f"the tuned model's tokens away from the base model's first choice "
                         f"({100 * b[k]:.1f}% vs {100 * a[k]:.1f}%; mean KL "
                         f"{b['token_shift.kl_mean']:.3f} vs {a['token_shift.kl_mean']:.3f} "
                         f"nats/token), which {agree} in direction with the limitations paper "
                         "(LoRA mostly changes style tokens, full fine-tuning changes more); "
                         f"measured over {int(a.get('token_shift.n_tokens', 0))} (LoRA) and "
                         f"{int(b.get('token_shift.n_tokens', 0))} (full) generated tokens.")
            if a["token_shift.kl_mean"] < 1e-3:
                parts.append(f"The LoRA model barely moved at all (KL {a['token_shift.kl_mean']:.1e} "
                             "nats/token): with adapters that start at zero, this learning rate and "
                             "this few steps, that says more about the step count than about LoRA.")
    if not any(name.startswith("pairs:") for name in by):
        parts.append("Pairs vs documents is not in this grid (no `pairs` run).")
    judge = cfg.evaluate.judge or cfg.models.generator
    firsts = [m["alpacaeval.judge_first_position_share"] for m in by.values()
              if "alpacaeval.judge_first_position_share" in m]
    if "smollm2" in judge.model.lower():
        bias = (f"it named response 1 in {100 * sum(firsts) / len(firsts):.0f}% of its verdicts, "
                if firsts else "")
        parts.append(f"The judge here is SmolLM2-135M-Instruct: {bias}so judging both orders "
                     "pulls win rates towards 50%, and its 1-5 aspect scores are as weak; those "
                     "columns check that the wiring works and measure little. Point "
                     "`evaluate.judge` at a strong model (the paper: GPT-4-turbo) for AlpacaEval "
                     "numbers that mean something.")
    parts.append("Not shown at all: pre-training from scratch at scale (§4.2), MixEval, "
                 "MT-Bench-101, or any significance test; rerun with the databricks profile for "
                 "those.")
    return " ".join(parts)
