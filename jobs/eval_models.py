"""The model under test of ``finelake evaluate``: resolved, loaded, prompted in its own format, and
run greedily (the run is in :mod:`finelake.jobs.evaluate`).

The model runs on the ``transformers`` generation backend
(:class:`finelake.models.transformers_backend.TransformersGenerator`, fp32 on CPU, bf16 on GPU):
evaluation renders its prompts to token ids itself and uses the backend's token-level methods,
:meth:`~finelake.models.transformers_backend.TransformersGenerator.generate_tokens` (the generated
ids are needed for the token-shift measure) and
:meth:`~finelake.models.transformers_backend.TransformersGenerator.next_token_logits`.

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
from finelake.jobs.tracking import transformers_folder
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
        generator: the loaded ``transformers`` backend
            (:class:`~finelake.models.transformers_backend.TransformersGenerator`).
        prompt_format: ``chat`` or ``instruction``.
        meta: ``finelake_train.json`` of a finelake-trained model ({} otherwise).
    """

    label: str
    uri: str
    path: str
    generator: Any
    prompt_format: str
    meta: dict = field(default_factory=dict)

    @property
    def model(self):
        """The transformers model (``AutoModelForCausalLM``) the backend holds."""
        return self.generator.model

    @property
    def tokenizer(self):
        """The model's tokenizer (left padding, a pad token set)."""
        return self.generator.tokenizer

    def close(self) -> None:
        """Release the model (and GPU memory)."""
        self.generator.close()


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
    """Load a model for evaluation on the ``transformers`` backend (device and dtype ``auto``: fp32
    on CPU, bf16 on GPU; left padding for batched generation).

    Raises:
        FinelakeError: an MLflow URI that does not resolve.
        OSError: the folder holds no transformers model.
        ImportError: torch or transformers is missing (the message has the pip line).
    """
    from finelake.models.generation import create_generator

    path = resolve_model_path(ctx, uri)
    meta_file = Path(path, TRAIN_META)
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
    generator = create_generator({"backend": "transformers", "model": path})
    fmt = prompt_format or ctx.cfg.evaluate.prompt_format
    if fmt == "auto":
        chat = bool(generator.tokenizer.chat_template)
        fmt = meta.get("prompt_format") or ("chat" if chat else "instruction")
    return ModelUnderTest(label or _label(uri), uri, path, generator, fmt, meta)


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
    """Greedy responses, same order as ``prompts``: rendered in the model's format
    (:func:`render_prompts`) and generated by the backend's
    :meth:`~finelake.models.transformers_backend.TransformersGenerator.generate_tokens` (batches
    of similar length, left-padded).

    Returns:
        One :class:`Generation` per prompt; ``output_ids`` stop at the first end-of-sequence token
        (excluded); ``text`` is cut at the first of :data:`STOP_STRINGS` and stripped.
    """
    ids = render_prompts(m, prompts)
    outputs = m.generator.generate_tokens(ids, max_new_tokens, batch_size=batch_size)
    out = []
    for prompt_ids, new in zip(ids, outputs):
        text = m.tokenizer.decode(new, skip_special_tokens=True)
        for stop in STOP_STRINGS:
            text = text.split(stop)[0]
        out.append(Generation(prompt_ids, new, text.strip()))
    return out

