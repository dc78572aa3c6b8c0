"""Train a causal LM on a Delta table with TRL, tracked in MLflow (``finelake train``).

What it implements:

* **FineInstructions §4.2** — pre-training a Llama-style model *from scratch* (``method: scratch``)
  on ``pairs`` formatted ``"Instruction: {instruction}\\n\\nAnswer: {answer}"`` or on the raw
  ``documents`` (standard pre-training), with the training tokenizer, token-for-token: a comparison
  truncates the larger training set to the smaller one's token count (``match_tokens_of``, or
  ``token_budget``), and both counts are recorded.
* **Non-instructional fine-tuning §4 / limitations of instruction tuning §3** — LoRA or full
  fine-tuning of a pre-trained model (3 epochs, lr 5e-5, batch 32 in the papers; ``method: lora``
  merges the adapters into the base at the end). ``continuations`` (``prompt``/``continuation``)
  train in the same template.

Training is TRL's :class:`~trl.SFTTrainer` (AdamW, linear warmup then decay, epochs or max steps,
loss on the answer only or on every token) with a PEFT :class:`~peft.LoraConfig` for LoRA; nothing
here loops over batches. Multi-GPU runs launch this same job under ``accelerate launch`` or
``torchrun``; only rank 0 talks to MLflow.

Recorded in MLflow (tracking URI ``train.mlflow.tracking_uri``, default
``sqlite:///<lake>/_mlflow/mlflow.db`` with artifacts under ``<lake>/_mlflow/artifacts``):
params (the train section flattened, ``data.*``), metrics (loss, learning rate, grad norm, tokens
per step as logged, then ``train_tokens``, ``tokens_per_s``, ``train_runtime_s``), the resolved
config (``config/resolved.yaml``), the dataset (``mlflow.log_input`` of the examples with a
:class:`~mlflow.data.delta_dataset_source.DeltaDatasetSource`: Delta path and version) plus
``finelake.*`` tags (table, path, version, rows, tokens, generating run ids), and the final model:
the ``save_pretrained`` folder logged as an MLflow ``transformers`` model with a signature and an
input example, registered as ``<prefix>_<table>_<method>`` (Unity Catalog requires both;
:mod:`finelake.jobs.tracking`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from finelake import storage
from finelake.jobs import tracking
from finelake.jobs.tracking import setup_mlflow, tracking_settings  # noqa: F401 - used by evaluate, compare, maintenance
from finelake.lake import read_delta
from finelake.method import training as tm
from finelake.runtime import FinelakeError, StageContext, StageStats
from finelake.tables import ALL_TABLES

log = logging.getLogger(__name__)

TRAIN_META = "finelake_train.json"
"""File written next to a trained model: how it was trained (evaluation reads prompt_format)."""


# ----------------------------------------------------------------------------- data


def data_lake(ctx: StageContext):
    """The lake to read and write through: the context's Spark lake where Spark is already up or
    Delta goes through delta-spark (clusters); otherwise a Spark-free delta-rs lake, so that
    training and evaluation on a laptop do not start a JVM."""
    from finelake.lake import Lake

    if ctx._spark is not None or ctx.cfg.spark.delta == "delta-spark":  # noqa: SLF001
        return ctx.lake
    return Lake(ctx.cfg.lake, None, engine="deltalake", database=ctx.cfg.catalog.database,
                catalog=ctx.cfg.catalog.catalog)


def read_table(ctx: StageContext, table: str, version: Optional[int] = None,
               columns: Optional[list[str]] = None) -> tuple[pa.Table, str, int]:
    """A lake table (declared or not, e.g. ``continuations``) pinned to a Delta version.

    Returns:
        (rows, Delta path, version read).

    Raises:
        FinelakeError: the table does not exist or the version is not there.
    """
    lake = data_lake(ctx)
    path = lake.path(table)
    if lake.spark is not None and lake.engine == "delta-spark":
        from delta.tables import DeltaTable as SparkDeltaTable

        if not SparkDeltaTable.isDeltaTable(lake.spark, path):
            raise FinelakeError(f"table {table} not found at {path}: run the stage that writes it")
        latest = SparkDeltaTable.forPath(lake.spark, path).history(1).collect()[0]["version"]
        v = latest if version is None else int(version)
        df = lake.spark.read.format("delta").option("versionAsOf", str(v)).load(path)
        return (df.select(*columns) if columns else df).toArrow(), path, v
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(path):
        raise FinelakeError(f"table {table} not found at {path}: run the stage that writes it")
    try:
        dt = DeltaTable(path, version=version)
    except Exception as exc:  # deltalake raises its own error types for a missing version
        raise FinelakeError(f"table {table}: cannot load version {version}: {exc}") from None
    return read_delta(dt, columns=columns), path, dt.version()


@dataclass
class TrainingSet:
    """Examples ready for TRL, and where they came from.

    Attributes:
        table, path, version: the Delta table read.
        kind, columns: layout (:func:`finelake.method.training.layout`).
        examples: prompt-completion or text dicts, in key order, after the budget.
        token_counts: tokens per kept example (full text + EOS, capped at max_seq_len).
        rows_read: rows in the table version (after ``status = 'ok'`` where there is a status).
        tokens_available: tokens of every usable example before the budget.
        budget: the token budget applied (None: none).
        generating_runs: distinct ``run_id`` values of the kept rows (the pipeline runs).
    """

    table: str
    path: str
    version: int
    kind: str
    columns: tuple[str, ...]
    examples: list[dict[str, str]]
    token_counts: list[int]
    rows_read: int
    tokens_available: int
    budget: Optional[int] = None
    generating_runs: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.token_counts)


def _sort_key(table: str, names: list[str]) -> list[str]:
    tdef = ALL_TABLES.get(table)
    if tdef is not None:
        return [k for k in tdef.key if k in names]
    return [n for n in names if n.endswith("_id")][:1]


def prepare_training_set(ctx: StageContext, table: str, version: Optional[int], tokenizer,
                         max_seq_len: int, token_budget: Optional[int] = None,
                         max_rows: Optional[int] = None) -> TrainingSet:
    """Read a table version and build its training examples within a token budget.

    Rows are ordered by the table key (content hashes: a fixed pseudo-random order), rows with
    ``status != 'ok'`` are skipped where the table has a status, and the kept prefix is the longest
    whose tokens fit ``token_budget`` (:func:`finelake.method.training.budget_prefix`).

    Raises:
        FinelakeError: missing table, no usable column layout, or no examples.
    """
    rows, path, v = read_table(ctx, table, version)
    try:
        kind, cols = tm.layout(rows.column_names)
    except ValueError as exc:
        raise FinelakeError(f"table {table}: {exc}") from None
    if "status" in rows.column_names:
        rows = rows.filter(pc.equal(rows.column("status"), "ok"))
    key = _sort_key(table, rows.column_names)
    if key:
        rows = rows.sort_by([(k, "ascending") for k in key])
    if max_rows:
        rows = rows.slice(0, max_rows)
    keep_cols = list(cols) + (["run_id"] if "run_id" in rows.column_names else [])
    data = rows.select(keep_cols).to_pydict()
    valid = [i for i in range(rows.num_rows) if all(data[c][i] for c in cols)]
    examples = tm.build_examples({c: [data[c][i] for i in valid] for c in cols}, kind, cols)
    if not examples:
        raise FinelakeError(f"table {table} v{v}: no usable rows for training")

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    counts = tm.count_example_tokens(examples, encode, max_seq_len)
    n = tm.budget_prefix(counts, token_budget)
    if n == 0:
        raise FinelakeError(f"token budget {token_budget} is smaller than the first example")
    runs = sorted({data["run_id"][i] for i in valid[:n] if data["run_id"][i]}) if "run_id" in data else []
    return TrainingSet(table, path, v, kind, cols, examples[:n], counts[:n], rows.num_rows,
                       sum(counts), token_budget, runs)


def table_tokens(ctx: StageContext, table: str, version: Optional[int], tokenizer,
                 max_seq_len: int) -> tuple[int, int]:
    """(training tokens of a whole table version, version read), counted as training counts them."""
    ts = prepare_training_set(ctx, table, version, tokenizer, max_seq_len)
    return ts.tokens_available, ts.version


# ----------------------------------------------------------------------------- models


def _precision(tc, torch) -> str:
    if tc.precision != "auto":
        return tc.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_model(tc, method: str, tokenizer_name: str):
    """(model, tokenizer) to train.

    ``lora`` / ``full``: the pre-trained ``train.base_model`` and its tokenizer. ``scratch``: a
    randomly initialised :class:`~transformers.LlamaForCausalLM` of ``train.scratch``'s size with
    the training tokenizer (``tokenizer.model``), seeded by ``train.seed``.
    """
    import torch
    import transformers

    from finelake.models.resolve import hf_path

    if method == "scratch":
        tok = transformers.AutoTokenizer.from_pretrained(hf_path(tokenizer_name))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        s = tc.scratch
        conf = transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
            num_key_value_heads=s.num_kv_heads, max_position_embeddings=tc.max_seq_len,
            rope_theta=s.rope_theta, tie_word_embeddings=s.tie_word_embeddings,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id)
        torch.manual_seed(tc.seed)
        model = transformers.LlamaForCausalLM(conf)
        return model, tok
    path = hf_path(tc.base_model)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if (method == "lora" and _precision(tc, torch) == "bf16") else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tok


def _metrics_callback(sink: dict):
    """A TrainerCallback that sends every numeric log (loss, learning_rate, grad_norm,
    num_tokens, ...) to the active MLflow run at the trainer's global step."""
    import transformers

    class MlflowMetrics(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            import mlflow

            vals = {k: float(v) for k, v in logs.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if "num_tokens" in vals:
                sink["num_tokens"] = vals["num_tokens"]
            sink.setdefault("history", []).append({"step": state.global_step, **vals})
            if vals and mlflow.active_run() is not None:
                mlflow.log_metrics({k.replace("/", "_"): v for k, v in vals.items()},
                                   step=state.global_step)

    return MlflowMetrics()


# ----------------------------------------------------------------------------- the job


def run_train(ctx: StageContext, table: Optional[str] = None, version: Optional[int] = None,
              method: Optional[str] = None, token_budget: Optional[int] = None,
              match_tokens_of: Optional[str] = None, max_steps: Optional[int] = None,
              epochs: Optional[float] = None, run_name: Optional[str] = None,
              budget_note: Optional[str] = None) -> StageStats:
    """Train on one table version and log everything to MLflow.

    Args:
        ctx: stage context (``ctx.cfg.train`` holds the defaults of every argument below).
        table: ``pairs``, ``documents``, ``continuations`` or any table with a text column.
        version: Delta version to read (None: latest; the version used is recorded).
        method: ``lora``, ``full`` or ``scratch``.
        token_budget: at most this many training tokens (whole examples, in key order).
        match_tokens_of: ``"table"`` or ``"table@version"``: cap the budget at that table's token
            count too, so two runs see the same number of tokens (§4.1); the smaller wins.
        max_steps, epochs: override ``train.max_steps`` / ``train.epochs`` (``max_steps=0``: no
            step limit, run the epochs; equal-token comparisons use it).
        run_name: MLflow run name (default ``<table>-<method>``).
        budget_note: why ``token_budget`` has its value (recorded as ``data.budget_reason``).

    Returns:
        :class:`StageStats` (rows_in: rows read, rows_out: examples trained on); ``extra`` holds
        ``mlflow_run_id``, ``model_uri`` (``models:/name/version``; ``models:/<model id>`` when not
        registered; None for unmerged LoRA adapters, logged as the ``adapters`` artifact),
        ``model_dir``, ``table_version``, ``train_tokens``, ``tokens_per_s``, ``train_loss``.

    Raises:
        FinelakeError: missing table/version, unusable columns, an empty training set, or
            unmerged LoRA adapters with registration on (:func:`tracking.check_registrable`,
            raised before training).
        ImportError: trl / peft / mlflow missing (``pip install 'finelake[train]'``).
    """
    import mlflow
    import torch
    import trl

    cfg = ctx.cfg
    tc = cfg.train
    table = table or tc.table
    method = method or tc.method
    if method not in ("lora", "full", "scratch"):
        raise FinelakeError(f"method must be lora, full or scratch, not {method!r}")
    tracking.check_registrable(tc, method)
    stats = StageStats("train")
    if tc.torch_threads:
        torch.set_num_threads(tc.torch_threads)
    rank0 = int(os.environ.get("RANK", "0")) == 0

    model, tok = build_model(tc, method, cfg.tokenizer.model)
    budget = token_budget if token_budget is not None else tc.token_budget
    budget_reason = (budget_note or "token_budget argument") if token_budget is not None else \
        ("train.token_budget" if budget else None)
    if match_tokens_of:
        other, _, ov = match_tokens_of.partition("@")
        other_tokens, other_v = table_tokens(ctx, other, int(ov) if ov else None, tok, tc.max_seq_len)
        if budget is None or other_tokens < budget:
            budget, budget_reason = other_tokens, f"equal to {other}@v{other_v}"
    ts = prepare_training_set(ctx, table, version, tok, tc.max_seq_len, budget, tc.max_rows)
    stats.rows_in = ts.rows_read
    stats.rows_out = len(ts.examples)
    log.info("train %s: %s@v%d, %d examples, %d tokens (of %d; budget %s)", method, table,
             ts.version, len(ts.examples), ts.tokens, ts.tokens_available, budget)

    # Checkpoints and the model are written locally; an object-store destination (dbfs:/, s3://)
    # gets the final model through the lake's storage layer.
    dest = storage.join(tc.output_dir or storage.join(storage.root(cfg.lake), "_models"),
                        f"{ctx.run_id}_{table}_{method}")
    out_dir = Path(storage.work_dir(dest, "train"))
    precision = _precision(tc, torch)
    n_steps = max_steps if max_steps is not None else tc.max_steps
    n_epochs = epochs if epochs is not None else tc.epochs
    lr = tc.scratch.learning_rate if (method == "scratch" and tc.scratch.learning_rate) else tc.learning_rate
    completion_only = ts.kind == "pair" and tc.loss_on == "answer"
    args = trl.SFTConfig(
        output_dir=str(out_dir / "checkpoints"), num_train_epochs=n_epochs,
        max_steps=n_steps or -1, learning_rate=lr, per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps, optim="adamw_torch",
        lr_scheduler_type=tc.lr_scheduler, warmup_steps=tc.warmup_ratio,
        weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm, seed=tc.seed,
        data_seed=tc.seed, logging_steps=tc.logging_steps, logging_first_step=True,
        save_strategy="no", report_to="none", disable_tqdm=True,
        bf16=precision == "bf16", fp16=precision == "fp16",
        gradient_checkpointing=tc.gradient_checkpointing, max_length=tc.max_seq_len,
        packing=tc.packing, completion_only_loss=completion_only if ts.kind == "pair" else None,
        dataset_text_field="text", dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available())
    peft_config = None
    if method == "lora":
        from peft import LoraConfig

        lc = tc.lora
        targets = lc.target_modules[0] if lc.target_modules == ["all-linear"] else lc.target_modules
        peft_config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")

    from datasets import Dataset

    dataset = Dataset.from_list(ts.examples)
    sink: dict = {}
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                             peft_config=peft_config, callbacks=[_metrics_callback(sink)])
    n_params = sum(p.numel() for p in trainer.model.parameters())
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    run = None
    if rank0:
        setup_mlflow(cfg)
        run = mlflow.start_run(run_name=run_name or f"{table}-{method}")
    try:
        if run is not None:
            tracking.log_run_inputs(cfg, ctx, ts, method, budget, budget_reason, lr, n_epochs,
                                    n_steps, precision, completion_only, n_params, n_trainable)
        t0 = time.monotonic()
        result = trainer.train()
        seconds = time.monotonic() - t0
        train_tokens = int(sink.get("num_tokens") or trainer._metrics["train"].get("num_tokens", [0])[-1])  # noqa: SLF001
        final = {"train_loss": float(result.training_loss), "train_runtime_s": seconds,
                 "train_tokens": float(train_tokens),
                 "tokens_per_s": train_tokens / seconds if seconds > 0 else 0.0,
                 "train_steps": float(result.global_step)}
        model_dir = out_dir / "model"
        final_model = trainer.model
        if method == "lora" and tc.lora.merge:
            final_model = final_model.merge_and_unload()
        if rank0:
            final_model.save_pretrained(str(model_dir), safe_serialization=True)
            tok.save_pretrained(str(model_dir))
            meta = {"prompt_format": "instruction", "table": table, "table_version": ts.version,
                    "table_path": ts.path, "method": method, "base_model": None if method == "scratch"
                    else tc.base_model, "tokenizer": cfg.tokenizer.model if method == "scratch"
                    else tc.base_model, "finelake_run_id": ctx.run_id,
                    "mlflow_run_id": run.info.run_id if run else None, "train_tokens": train_tokens,
                    "lora_merged": method == "lora" and tc.lora.merge}
            (model_dir / TRAIN_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            if storage.is_uri(dest):
                storage.put_dir(ctx.spark, str(model_dir), storage.join(dest, "model"),
                                last=TRAIN_META)
        model_uri = None
        if run is not None:
            mlflow.log_metrics(final)
            hist = Path(out_dir, "log_history.json")
            hist.write_text(json.dumps(sink.get("history", []), indent=1), encoding="utf-8")
            mlflow.log_artifact(str(hist))
            if method == "lora" and not tc.lora.merge:  # adapters only: no MLflow model to log
                mlflow.log_artifacts(str(model_dir), artifact_path="adapters")
            else:
                model_uri = tracking.log_trained_model(str(model_dir)).model_uri
            if model_uri and tc.mlflow.register_model:
                model_uri = tracking.register_logged_model(
                    model_uri, tracking.registered_name(tc, table, method),
                    tags={"table": table, "table_version": str(ts.version), "method": method,
                          "table_path": ts.path})
                mlflow.set_tag("finelake.registered_model", model_uri)
    finally:
        if run is not None:
            mlflow.end_run()
    stats.extra.update({"method": method, "table_version": ts.version, "data_tokens": ts.tokens,
                        "tokens_available": ts.tokens_available, "train_tokens": train_tokens,
                        "train_steps": int(final["train_steps"]),
                        "tokens_per_s": round(final["tokens_per_s"], 1),
                        "train_loss": round(final["train_loss"], 4),
                        "mlflow_run_id": run.info.run_id if run else None, "model_uri": model_uri,
                        "model_dir": str(model_dir), "model_dest": storage.join(dest, "model")})
    return stats.finish()


