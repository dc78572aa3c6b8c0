"""The model under test of ``finelake evaluate``: resolved, loaded, prompted in its own format, and
run greedily (the run is in :mod:`finelake.jobs.evaluate`).

Generation is greedy with the model's own template: the ``Instruction: {prompt}\\n\\nAnswer:``
training template for models finelake trained (and models with no chat template, as §4.3 does for
standard pre-training), the tokenizer's chat template otherwise (``evaluate.prompt_format`` forces
one).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from finelake import storage
from finelake.jobs.train import TRAIN_META, setup_mlflow
from finelake.method.training import format_prompt
from finelake.runtime import FinelakeError, StageContext

STOP_STRINGS = ("\n\nInstruction:",)
"""A model trained on the §4.2 template may start a new pair after its answer: cut it there."""


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
            src = MlflowClient().get_model_version_download_uri(name, ver)
        else:
            rid, _, sub = uri[len("runs:/"):].partition("/")
            src = f"{mlflow.get_run(rid).info.artifact_uri}/{sub}"
    except MlflowException as exc:
        raise FinelakeError(f"cannot resolve {uri}: {exc.message}") from None
    if src.startswith("file://") and Path(src[len("file://"):], "config.json").exists():
        return src[len("file://"):]
    if os.path.isdir(src) and Path(src, "config.json").exists():
        return src
    root = storage.root(ctx.cfg.lake)
    dst = Path("/tmp" if storage.is_uri(root) else root, "_mlflow", "downloads", uri.replace(":/", "_").replace("/", "_"))
    dst.mkdir(parents=True, exist_ok=True)
    return mlflow.artifacts.download_artifacts(artifact_uri=src, dst_path=str(dst))


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

