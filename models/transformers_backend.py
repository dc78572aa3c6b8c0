"""Hugging Face transformers generation (``backend: transformers``), CPU or GPU.

Loads a local folder, a hub id, or a GGUF file / ``embedded:`` model (converted once to a
transformers folder by :func:`finelake.models.resolve.hf_path`). Requests are rendered with the
tokenizer's chat template, sorted by prompt length, and generated ``batch_size`` at a time with left
padding. JSON-schema and regex constraints go through xgrammar (``xgrammar.GrammarCompiler``):
a per-row token bitmask, so constrained and free rows share one batch. lm-format-enforcer 0.11 was
the other candidate, but it imports ``transformers.tokenization_utils``, which transformers 5
removed, so it cannot be used with transformers 5.x.

Options: ``device`` (``auto``: cuda when available, else cpu), ``dtype`` (``auto``, ``float32``,
``bfloat16``, ``float16``; default float32 on CPU, bfloat16 on GPU), ``batch_size`` (default 8),
``torch_threads`` (``torch.set_num_threads``; default unchanged), ``revision``,
``trust_remote_code`` (default false), ``attn_implementation``.

Sampling within one batch shares one torch generator: ``seed`` is honoured per batch (the first
seeded request's seed), not per request.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Optional

from finelake.models.base import (GenerationBackend, GenerationRequest, GenerationResult,
                                  register_generator)
from finelake.models.generation import check_request, error_result, require, run_isolated
from finelake.models.resolve import hf_path

PIP_HINT = "pip install 'finelake[models]' (torch, transformers)"
# xgrammar requires triton (CUDA kernels, 1 GB): on GPU machines `pip install 'finelake[gpu]'`,
# on CPU-only ones install it without dependencies, as `make setup` does.
XGRAMMAR_HINT = ("pip install xgrammar (GPU), or on CPU: "
                 "pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2")


def _xgrammar_processor_class():
    import transformers

    class XGrammarRows(transformers.LogitsProcessor):
        """Masks the logits of the rows that have a grammar matcher; other rows pass unchanged.

        One instance serves one ``generate`` call (matchers hold per-row state).
        """

        def __init__(self, xgr, matchers: list, vocab_size: int):
            self.xgr = xgr
            self.matchers = matchers
            self.rows = [i for i, m in enumerate(matchers) if m is not None]
            self.bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
            self.vocab_size = vocab_size
            self.started = False

        def __call__(self, input_ids, scores):
            if self.started:
                for i in self.rows:
                    m = self.matchers[i]
                    if not m.is_terminated():
                        m.accept_token(int(input_ids[i, -1]))
            self.started = True
            live = []
            for i in self.rows:
                m = self.matchers[i]
                if not m.is_terminated():
                    m.fill_next_token_bitmask(self.bitmask, i)
                    live.append(i)
            if live:
                dev = scores.device
                cpu = scores if dev.type == "cpu" else scores.to("cpu")
                self.xgr.apply_token_bitmask_inplace(cpu, self.bitmask, indices=live,
                                                     vocab_size=self.vocab_size)
                scores = cpu if dev.type == "cpu" else cpu.to(dev)
            return scores

    return XGrammarRows


@register_generator("transformers")
class TransformersGenerator(GenerationBackend):
    """Batched chat generation with ``AutoModelForCausalLM.generate``.

    Args:
        model: folder, hub id, ``.gguf`` path or ``embedded:<name>``.
        **options: see the module docstring.

    Raises:
        ImportError: torch / transformers / xgrammar missing (pip hint in the message).
        ValueError: unknown option or bad dtype/device.
        OSError: the model cannot be found (offline and not cached, bad path).
    """

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 8, torch_threads: Optional[int] = None,
                 revision: Optional[str] = None, trust_remote_code: bool = False,
                 attn_implementation: Optional[str] = None, **unknown: Any):
        if unknown:
            raise ValueError(f"transformers backend: unknown options {sorted(unknown)}")
        super().__init__(model, device=device, dtype=dtype, batch_size=batch_size)
        torch = require("torch", PIP_HINT, "transformers")
        transformers = require("transformers", PIP_HINT, "transformers")
        self._torch = torch
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype == "auto":
            dtype = "float32" if self.device.type == "cpu" else "bfloat16"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"transformers backend: dtype must be auto/float32/bfloat16/float16, "
                             f"not {dtype!r}")
        self.batch_size = max(1, int(batch_size))
        path = hf_path(model)
        kw: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kw)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        mkw = dict(kw, dtype=getattr(torch, dtype))
        if attn_implementation:
            mkw["attn_implementation"] = attn_implementation
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, **mkw)
        self.model.to(self.device).eval()
        gen_eos = self.model.generation_config.eos_token_id
        eos = gen_eos if gen_eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        if self.tokenizer.eos_token_id is not None:  # the tokenizer's too, if the config has others
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self._gen_config_cls = transformers.GenerationConfig
        self._xgr = None
        self._compiled: dict[str, Any] = {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------- constraints

    def _compiler(self):
        if self._xgr is None:
            xgr = require("xgrammar", XGRAMMAR_HINT, "transformers")
            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=vocab,
                                                      stop_token_ids=sorted(self.eos_ids))
            self._xgr = (xgr, xgr.GrammarCompiler(info), vocab, _xgrammar_processor_class())
        return self._xgr

    def _compiled_grammar(self, r: GenerationRequest):
        if r.json_schema is None and r.regex is None:
            return None
        xgr, compiler, _, _ = self._compiler()
        key = json.dumps({"s": r.json_schema, "r": r.regex}, sort_keys=True)
        g = self._compiled.get(key)
        if g is None:
            if r.json_schema is not None:
                g = compiler.compile_json_schema(json.dumps(r.json_schema), any_whitespace=False)
            else:
                g = compiler.compile_regex(r.regex)
            if len(self._compiled) > 256:
                self._compiled.clear()
            self._compiled[key] = g
        return g

    # -------------------------------------------------------------- generation

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate one completion per request, ``batch_size`` rows per ``model.generate`` call.

        Returns:
            One result per request, same order. ``prompt_tokens`` counts the templated prompt,
            ``completion_tokens`` the generated tokens before the end-of-sequence token;
            ``finish_reason`` ``"stop"`` or ``"length"``. A request that fails (bad messages, bad
            schema, too long for the model) gets ``error``; this method does not raise for it.
        """
        results: list[Optional[GenerationResult]] = [None] * len(requests)
        prepared = []
        for i, r in enumerate(requests):
            try:
                check_request(r)
                text = self.tokenizer.apply_chat_template(r.messages, tokenize=False,
                                                          add_generation_prompt=True)
                n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                if self.max_positions and n + int(r.max_tokens) > self.max_positions:
                    raise ValueError(f"prompt ({n} tokens) + max_tokens ({r.max_tokens}) exceeds "
                                     f"the model's {self.max_positions} positions")
                prepared.append((n, i, r, text))
            except Exception as exc:  # noqa: BLE001
                results[i] = error_result(r, exc)
        # Same sampling mode in a batch; similar lengths together (less padding).
        prepared.sort(key=lambda p: (float(p[2].temperature or 0.0), p[0]))
        with self._lock:
            for start in range(0, len(prepared), self.batch_size):
                chunk = prepared[start:start + self.batch_size]
                temps = {float(p[2].temperature or 0.0) for p in chunk}
                groups = [chunk] if len(temps) == 1 else [[p] for p in chunk]
                for group in groups:
                    text_of = {id(p[2]): p[3] for p in group}
                    outs = run_isolated(
                        lambda rs, t=text_of: self._batch(rs, [t[id(r)] for r in rs]),
                        [p[2] for p in group])
                    for p, res in zip(group, outs):
                        results[p[1]] = res
        return results  # type: ignore[return-value]

    def _batch(self, reqs: list[GenerationRequest], texts: list[str]) -> list[GenerationResult]:
        torch = self._torch
        grammars = [self._compiled_grammar(r) for r in reqs]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        temp = float(reqs[0].temperature or 0.0)
        max_new = max(int(r.max_tokens) for r in reqs)
        cfg = self._gen_config_cls(
            max_new_tokens=max_new, do_sample=temp > 0, temperature=temp if temp > 0 else None,
            top_p=None, top_k=None, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids))
        kwargs: dict[str, Any] = {"generation_config": cfg}
        if any(g is not None for g in grammars):
            xgr, _, vocab, proc_cls = self._compiler()
            matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
            kwargs["logits_processor"] = [proc_cls(xgr, matchers, vocab)]
        seeds = [r.seed for r in reqs if r.seed is not None]
        if temp > 0 and seeds:
            torch.manual_seed(int(seeds[0]))
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        n_prompt = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, r in enumerate(reqs):
            gen = out[row, prompt_len:].tolist()
            finish, cut = "length", len(gen)
            for j, t in enumerate(gen):
                if t in self.eos_ids:
                    finish, cut = "stop", j
                    break
            if cut > int(r.max_tokens):
                finish, cut = "length", int(r.max_tokens)
            toks = gen[:cut]
            results.append(GenerationResult(
                text=self.tokenizer.decode(toks, skip_special_tokens=True),
                prompt_tokens=int(n_prompt[row]), completion_tokens=len(toks),
                finish_reason=finish, request_id=r.request_id))
        return results

    # -------------------------------------------------------------- token-level access

    def generate_tokens(self, prompts: list[list[int]], max_new_tokens: int,
                        batch_size: Optional[int] = None) -> list[list[int]]:
        """Greedy continuations of prompts given as token ids: no chat template is applied, so a
        caller can use its own prompt format (``finelake evaluate`` prompts models trained on the
        §4.2 template with that template), and the generated ids come back (its token-shift
        measure needs them).

        Prompts are sorted by length (stable) and run ``batch_size`` at a time, left-padded with
        the pad token, greedy, under the model's own generation config otherwise.

        Args:
            prompts: the token ids of each prompt, special tokens included as the caller wants.
            max_new_tokens: generation limit per prompt, in tokens (>= 1).
            batch_size: prompts per ``model.generate`` call (default: the backend's ``batch_size``).

        Returns:
            One list of generated token ids per prompt, same order: up to the first
            end-of-sequence token (excluded), at most ``max_new_tokens`` long.

        Raises:
            ValueError: ``max_new_tokens`` or ``batch_size`` < 1, or an empty prompt.
        """
        torch = self._torch
        size = int(batch_size or self.batch_size)
        if int(max_new_tokens) < 1 or size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, "
                             f"{size}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: nothing to continue")
        cfg = self._gen_config_cls(
            max_new_tokens=int(max_new_tokens), do_sample=False, temperature=None, top_p=None,
            top_k=None, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_ids))
        out: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), size):
                batch = order[start:start + size]
                width = max(len(prompts[i]) for i in batch)
                ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                    mask[row, width - len(prompts[i]):] = 1
                gen = self.model.generate(input_ids=ids.to(self.device),
                                          attention_mask=mask.to(self.device),
                                          generation_config=cfg)
                for row, i in enumerate(batch):
                    new = gen[row, width:].tolist()
                    cut = next((k for k, t in enumerate(new) if t in self.eos_ids), len(new))
                    out[i] = new[:cut]
        return out

    def next_token_logits(self, prompt_ids: list[int], output_ids: list[int]):
        """The logits with which the model predicts each of ``output_ids`` after ``prompt_ids``,
        teacher-forced in one forward pass (the token-shift measure compares two models' rows).

        Args:
            prompt_ids: the prompt's token ids (non-empty).
            output_ids: the continuation's token ids.

        Returns:
            A float32 CPU ``torch.Tensor`` ``[len(output_ids), vocab]``: row t holds the logits of
            the next token after ``prompt_ids + output_ids[:t]`` (not normalized).

        Raises:
            ValueError: ``prompt_ids`` is empty.
        """
        torch = self._torch
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: the first output token has no context")
        seq = torch.tensor([list(prompt_ids) + list(output_ids)], device=self.device)
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=seq).logits[0]
        p = len(prompt_ids)
        return logits[p - 1:p - 1 + len(output_ids)].float().cpu()

    def close(self) -> None:
        """Drop the model (and free GPU memory)."""
        self.model = None
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()
