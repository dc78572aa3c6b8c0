"""llama.cpp generation (``backend: llama_cpp``): the embedded default, GGUF models on CPU.

Two engines over the same GGUF file:

* ``mode: batched`` (default): continuous batching on llama.cpp's low-level API. Up to
  ``n_parallel`` sequences decode together in one ``llama_decode`` call per step (a matrix-matrix
  product instead of one matrix-vector product per sequence, which is what makes a small model fast
  on a CPU); a finished sequence's slot is refilled from the queue at once. The longest token prefix
  shared by the prompts of a call (system prompt, few-shot examples) is evaluated once into a
  dedicated cache sequence and copied into every slot, and is kept for the next call when that call
  shares exactly the same prefix (a different prefix is evaluated afresh, so a prompt's output does
  not depend on what the process generated before). JSON-schema and regex constraints are llama.cpp grammars; the grammar is
  checked against the token the model prefers first and applied to the whole vocabulary only when it
  rejects that token (the same result, much cheaper).
* ``mode: simple``: ``llama_cpp.Llama.create_chat_completion`` one request at a time (the reference
  implementation; ``response_format={"type": "json_object", "schema": ...}``).

Both use the chat template stored in the GGUF (``tokenizer.chat_template``) unless ``chat_template``
is given.

Options (``models.generator.options``): ``n_ctx`` (tokens per sequence, prompt + completion;
default 2048), ``n_threads`` / ``n_threads_batch`` (default 1: llama.cpp's threads meet at spin
barriers after every operation, so on a machine whose other work leaves fewer free cores than
threads a process with 2 threads ran 10-20x slower than with 1 (measured: 2-5 against 30-40 tok/s);
Spark runs one single-threaded worker per core; give a process more threads only when it owns
that many idle cores),
``n_parallel`` (sequences decoded together; default ``batch_size``, else 8), ``n_batch`` (tokens per
``llama_decode`` call, default 512), ``mode``, ``prefix_cache`` (default true),
``min_prefix_tokens`` (default 16), ``kv_unified`` (one KV buffer shared by all sequences; default
false: one stream per sequence, so attention reads only that sequence's cells),
``chat_template``, ``seed`` (default sampling seed), ``verbose``, ``flash_attn`` (default true:
on this CPU backend it cut the CPU time per generated token by up to a fifth),
``requantize`` (``auto`` (default), ``q8_0``, ``q4_0``, ``f16`` or null).

``requantize: auto`` converts Q4_1 / Q5_0 / Q5_1 files (the embedded SmolLM2 is Q4_1) once to Q8_0
(:func:`requantized_gguf`): llama.cpp's CPU backend has batched matrix kernels for Q8_0 and Q4_0
but multiplies Q4_1 row by row, so batching barely helps it. Measured on the 2-core EPYC at 32
sequences: 77 generated tokens per CPU-second for Q8_0 against 54 for Q4_1; greedy output of Q8_0
kept the same first ~20 of 32 tokens as Q4_1 on average (Q4_0: 3.5, lossy, hence opt-in only).
"""

from __future__ import annotations

import ctypes
import json
import math
import threading
from collections import deque
from typing import Any, Optional

import numpy as np

from finelake.models.base import (GenerationBackend, GenerationRequest, GenerationResult,
                                  register_generator)
from finelake.models.generation import check_request, error_result, run_isolated
from finelake.models.llama_cpp_grammar import regex_to_gbnf, schema_to_gbnf
from finelake.models.llama_cpp_load import PIP_HINT  # noqa: F401 (importable from here, as before)
from finelake.models.llama_cpp_load import ROW_BY_ROW_FTYPES, load_llama_cpp, requantized_gguf
from finelake.models.resolve import gguf_path


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Seq:
    """One request inside the batched engine."""

    __slots__ = ("index", "request", "tokens", "grammar", "temperature", "max_tokens", "rng",
                 "n_past", "prefilled", "out", "last", "finish", "error")

    def __init__(self, index: int, request: GenerationRequest, tokens: list[int], grammar):
        self.index = index
        self.request = request
        self.tokens = tokens
        self.grammar = grammar
        self.temperature = float(request.temperature or 0.0)
        self.max_tokens = int(request.max_tokens)
        self.rng = np.random.default_rng(request.seed) if self.temperature > 0 else None
        self.n_past = 0
        self.prefilled = False
        self.out: list[int] = []
        self.last = -1
        self.finish: Optional[str] = None
        self.error: Optional[str] = None


@register_generator("llama_cpp")
class LlamaCppGenerator(GenerationBackend):
    """Chat generation with llama.cpp on a GGUF model (see the module docstring for the engines).

    Args:
        model: ``embedded:<name>`` or a path to a ``.gguf`` file (see
            :func:`finelake.models.resolve.gguf_path`).
        **options: see the module docstring. ``revision`` is accepted and ignored (GGUF files have
            none).

    Raises:
        ImportError: llama-cpp-python is not installed (the message has the pip line).
        ModelNotFound: the GGUF file cannot be found.
        ValueError: an unknown option or a bad value; the model or context fails to load.
    """

    def __init__(self, model: str, *, n_ctx: int = 2048, n_threads: Optional[int] = None,
                 n_threads_batch: Optional[int] = None, batch_size: Optional[int] = None,
                 n_parallel: Optional[int] = None, n_batch: int = 512, mode: str = "batched",
                 prefix_cache: bool = True, min_prefix_tokens: int = 16, kv_unified: bool = False,
                 flash_attn: bool = True, requantize: Optional[str] = "auto",
                 chat_template: Optional[str] = None, seed: int = 0,
                 verbose: bool = False, revision: Optional[str] = None, **unknown: Any):
        if unknown:
            raise ValueError(f"llama_cpp backend: unknown options {sorted(unknown)}")
        if mode not in ("batched", "simple"):
            raise ValueError(f"llama_cpp backend: mode must be 'batched' or 'simple', not {mode!r}")
        super().__init__(model, n_ctx=n_ctx, n_threads=n_threads, n_parallel=n_parallel,
                         n_batch=n_batch, mode=mode)
        lc = load_llama_cpp()
        from llama_cpp import _internals, _logger
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        _logger.set_verbose(verbose)
        self._lc = lc
        self.source_path = self.path = gguf_path(model)
        if requantize == "auto":
            requantize = "q8_0" if self._file_type(self.path) in ROW_BY_ROW_FTYPES else None
        if requantize:
            self.path = requantized_gguf(self.source_path, requantize)
        self.requantize = requantize
        self.n_threads = int(n_threads or 1)
        self.n_threads_batch = int(n_threads_batch or self.n_threads)
        self.n_ctx = int(n_ctx)
        self.n_parallel = max(1, int(n_parallel or batch_size or 8))
        self.n_batch = max(int(n_batch), self.n_parallel)
        self.mode = mode
        self.prefix_cache = bool(prefix_cache) and mode == "batched"
        self.min_prefix_tokens = max(1, int(min_prefix_tokens))
        self.kv_unified = bool(kv_unified)
        self.seed = int(seed)
        self._lock = threading.Lock()
        self._grammars: dict[str, str] = {}
        self.stats = {"prefill_tokens": 0, "prefix_reused_tokens": 0, "decode_calls": 0}

        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self._model = _internals.LlamaModel(path_model=self.path, params=mparams, verbose=verbose)
        meta = self._model.metadata()
        template = chat_template or meta.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.path} has no tokenizer.chat_template; pass options.chat_template")
        eos_id, bos_id = self._model.token_eos(), self._model.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=self._model.token_get_text(bos_id) if bos_id != -1 else "",
        )
        self.n_vocab = self._model.n_vocab()

        if mode == "simple":
            self._llama = lc.Llama(model_path=self.path, n_ctx=self.n_ctx, n_batch=self.n_batch,
                                   n_threads=self.n_threads, n_threads_batch=self.n_threads_batch,
                                   seed=self.seed, flash_attn=flash_attn, verbose=verbose,
                                   chat_handler=None)
            return

        self._prefix_seq = self.n_parallel  # the extra sequence holding the shared prefix
        n_seq = self.n_parallel + (1 if self.prefix_cache else 0)
        cparams = lc.llama_context_default_params()
        cparams.n_seq_max = n_seq
        cparams.n_ctx = self.n_ctx * n_seq
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads_batch
        cparams.kv_unified = self.kv_unified
        cparams.no_perf = True
        cparams.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                   else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._ctx = _internals.LlamaContext(model=self._model, params=cparams, verbose=verbose)
        self._mem = self._ctx.memory
        self._batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1,
                                            verbose=verbose)
        self._cand = _internals.LlamaTokenDataArray(n_vocab=self.n_vocab)
        self._one = (lc.llama_token_data * 1)()
        self._one_arr = lc.llama_token_data_array(
            data=ctypes.cast(self._one, lc.llama_token_data_p), size=1, selected=-1, sorted=False)
        self._prefix: list[int] = []

    def _file_type(self, path: str) -> Optional[int]:
        from llama_cpp import _internals

        params = self._lc.llama_model_default_params()
        params.vocab_only = True
        m = _internals.LlamaModel(path_model=path, params=params, verbose=False)
        try:
            ft = m.metadata().get("general.file_type")
            return int(ft) if ft is not None else None
        finally:
            m.close()

    # ------------------------------------------------------------------ public API

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate one completion per chat request.

        Args:
            requests: chat requests; ``json_schema`` or ``regex`` constrain the output with a
                llama.cpp grammar; ``temperature`` 0 is greedy, otherwise ``seed`` seeds sampling.

        Returns:
            One result per request, same order. ``prompt_tokens`` / ``completion_tokens`` count
            tokens of this model (the end-of-generation token is not counted);
            ``finish_reason`` is ``"stop"`` (end-of-generation token) or ``"length"``
            (``max_tokens`` or ``n_ctx`` reached). A request that cannot run (bad messages,
            unsupported schema, prompt longer than ``n_ctx``) gets ``error`` set; this method
            does not raise for it.
        """
        with self._lock:
            if self.mode == "simple":
                return [self._generate_simple(r) for r in requests]
            return run_isolated(self._generate_batched, list(requests))

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template plus the assistant header."""
        fmt = self._formatter(messages=messages)
        return self._model.tokenize(fmt.prompt.encode("utf-8"), add_bos=not fmt.added_special,
                                    special=True)

    def close(self) -> None:
        """Free the llama.cpp context and model."""
        for attr in ("_batch", "_ctx", "_llama", "_model"):
            obj = getattr(self, attr, None)
            if obj is not None:
                obj.close()
                setattr(self, attr, None)

    # ------------------------------------------------------------------ simple engine

    def _generate_simple(self, r: GenerationRequest) -> GenerationResult:
        try:
            check_request(r)
            kwargs: dict[str, Any] = {}
            if r.json_schema is not None:
                kwargs["response_format"] = {"type": "json_object", "schema": r.json_schema}
            elif r.regex is not None:
                from llama_cpp.llama_grammar import LlamaGrammar

                kwargs["grammar"] = LlamaGrammar.from_string(self._grammar_text(None, r.regex))
            out = self._llama.create_chat_completion(
                messages=r.messages, max_tokens=int(r.max_tokens),
                temperature=float(r.temperature or 0.0),
                seed=r.seed if r.seed is not None else self.seed, **kwargs)
            usage = out.get("usage") or {}
            choice = out["choices"][0]
            return GenerationResult(text=choice["message"]["content"] or "",
                                    prompt_tokens=int(usage.get("prompt_tokens", 0)),
                                    completion_tokens=int(usage.get("completion_tokens", 0)),
                                    finish_reason=choice.get("finish_reason"),
                                    request_id=r.request_id)
        except Exception as exc:  # noqa: BLE001 - one request's failure is its result
            return error_result(r, exc)

    # ------------------------------------------------------------------ batched engine

    def _grammar_text(self, schema: Optional[dict], regex: Optional[str]) -> str:
        key = json.dumps({"s": schema, "r": regex}, sort_keys=True)
        g = self._grammars.get(key)
        if g is None:
            g = schema_to_gbnf(schema) if schema is not None else regex_to_gbnf(regex)
            if len(self._grammars) > 256:
                self._grammars.clear()
            self._grammars[key] = g
        return g

    def _new_grammar(self, r: GenerationRequest):
        if r.json_schema is None and r.regex is None:
            return None
        text = self._grammar_text(r.json_schema, r.regex)
        smpl = self._lc.llama_sampler_init_grammar(self._model.vocab, text.encode("utf-8"),
                                                   b"root")
        if not smpl:
            raise ValueError("llama.cpp could not parse the grammar built from the "
                             + ("json_schema" if r.json_schema is not None else "regex"))
        return smpl

    def _generate_batched(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results: list[Optional[GenerationResult]] = [None] * len(requests)
        seqs: list[_Seq] = []
        try:
            for i, r in enumerate(requests):
                try:
                    check_request(r)
                    toks = self.prompt_tokens(r.messages)
                    if len(toks) >= self.n_ctx:
                        raise ValueError(f"prompt has {len(toks)} tokens; n_ctx is {self.n_ctx}")
                    seqs.append(_Seq(i, r, toks, self._new_grammar(r)))
                except Exception as exc:  # noqa: BLE001
                    results[i] = error_result(r, exc)
            if seqs:
                try:
                    self._run(seqs)
                except BaseException:
                    self._reset_memory()
                    raise
        finally:
            for s in seqs:
                if s.grammar:
                    self._lc.llama_sampler_free(s.grammar)
                    s.grammar = None
        for s in seqs:
            if s.error is not None:
                results[s.index] = error_result(s.request, s.error)
            else:
                text = self._model.detokenize(s.out, special=False).decode("utf-8", errors="ignore")
                results[s.index] = GenerationResult(
                    text=text, prompt_tokens=len(s.tokens), completion_tokens=len(s.out),
                    finish_reason=s.finish, request_id=s.request.request_id)
        return results  # type: ignore[return-value]

    def _reset_memory(self) -> None:
        self._lc.llama_memory_clear(self._mem, True)
        self._prefix = []

    def _decode(self) -> None:
        rc = self._lc.llama_decode(self._ctx.ctx, self._batch.batch)
        self.stats["decode_calls"] += 1
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (KV cache full or bad batch)")

    def _add(self, j: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self._batch.batch
        b.token[j] = token
        b.pos[j] = pos
        b.n_seq_id[j] = 1
        b.seq_id[j][0] = seq
        b.logits[j] = logits

    def _prepare_prefix(self, seqs: list[_Seq]) -> int:
        """Make the prefix sequence hold the longest prefix shared by all prompts (kept from the
        previous call when it is exactly that prefix); returns how many leading tokens every slot
        may copy from it.

        A prefix that only partly matches is evaluated again from position 0, never extended:
        llama.cpp's results depend on how tokens were grouped into ``llama_decode`` calls, so
        extending a cached prefix would make a prompt's output depend on what this worker served
        before (and a resumed Spark job differ from an uninterrupted one).
        """
        if not self.prefix_cache:
            return 0
        first = seqs[0].tokens
        n = min(len(s.tokens) for s in seqs) - 1  # every slot evaluates >= 1 token itself
        for s in seqs[1:]:
            n = min(n, _common_prefix(first, s.tokens))
        target = first[:max(n, 0)]
        if self._prefix != target and self._prefix:
            self._lc.llama_memory_seq_rm(self._mem, self._prefix_seq, -1, -1)
            self._prefix = []
        if len(target) >= self.min_prefix_tokens and not self._prefix:
            pos = 0
            while pos < len(target):
                chunk = target[pos:pos + self.n_batch]
                self._batch.batch.n_tokens = len(chunk)
                for j, t in enumerate(chunk):
                    self._add(j, t, pos + j, self._prefix_seq, False)
                self._decode()
                self.stats["prefill_tokens"] += len(chunk)
                pos += len(chunk)
            self._prefix = list(target)
        return len(self._prefix) if len(self._prefix) >= self.min_prefix_tokens else 0

    def _admit(self, s: _Seq, slot: int, prefix_len: int) -> None:
        lc, mem = self._lc, self._mem
        lc.llama_memory_seq_rm(mem, slot, -1, -1)
        s.n_past = 0
        if prefix_len:
            if self.kv_unified:
                lc.llama_memory_seq_cp(mem, self._prefix_seq, slot, 0, prefix_len)
            else:  # separate streams: llama.cpp copies whole streams
                lc.llama_memory_seq_cp(mem, self._prefix_seq, slot, -1, -1)
            s.n_past = prefix_len
            self.stats["prefix_reused_tokens"] += prefix_len

    def _run(self, seqs: list[_Seq]) -> None:
        lc = self._lc
        prefix_len = self._prepare_prefix(seqs)
        pending = deque(seqs)
        width = min(self.n_parallel, len(seqs))
        free = list(range(width))
        active: dict[int, _Seq] = {}
        batch = self._batch.batch
        while pending or active:
            while free and pending:
                slot = free.pop(0)
                s = pending.popleft()
                self._admit(s, slot, prefix_len)
                active[slot] = s
            n = 0
            outputs: list[tuple[int, int, _Seq]] = []
            for slot, s in active.items():  # one new token per generating sequence
                if s.prefilled:
                    self._add(n, s.last, s.n_past, slot, True)
                    outputs.append((n, slot, s))
                    s.n_past += 1
                    n += 1
            for slot, s in active.items():  # then prompt chunks, as many as fit
                if s.prefilled or n >= self.n_batch:
                    continue
                chunk = s.tokens[s.n_past:s.n_past + self.n_batch - n]
                last = len(s.tokens) - 1
                for j, t in enumerate(chunk):
                    self._add(n + j, t, s.n_past + j, slot, s.n_past + j == last)
                n += len(chunk)
                s.n_past += len(chunk)
                self.stats["prefill_tokens"] += len(chunk)
                if s.n_past == len(s.tokens):
                    s.prefilled = True
                    outputs.append((n - 1, slot, s))
            batch.n_tokens = n
            self._decode()
            for idx, slot, s in outputs:
                try:
                    t = self._sample(s, idx)
                except Exception as exc:  # noqa: BLE001 - e.g. a grammar that allows no token
                    s.error, s.finish = f"{type(exc).__name__}: {exc}", "error"
                else:
                    if lc.llama_vocab_is_eog(self._model.vocab, t):
                        s.finish = "stop"
                    else:
                        s.out.append(t)
                        s.last = t
                        if len(s.out) >= s.max_tokens or s.n_past >= self.n_ctx:
                            s.finish = "length"
                if s.finish is not None:
                    del active[slot]
                    free.append(slot)
        for slot in range(width):
            lc.llama_memory_seq_rm(self._mem, slot, -1, -1)

    def _sample(self, s: _Seq, idx: int) -> int:
        ptr = self._lc.llama_get_logits_ith(self._ctx.ctx, idx)
        if not ptr:
            raise RuntimeError(f"no logits for batch position {idx}")
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        if s.temperature > 0:
            # Gumbel-max: argmax(logits / T + g) is a sample of softmax(logits / T); reusing g on
            # the grammar-masked logits samples the renormalized allowed distribution exactly.
            scores = logits / s.temperature + s.rng.gumbel(size=self.n_vocab).astype(np.float32)
        else:
            scores = logits
        t = int(np.argmax(scores))
        if s.grammar is not None:
            one = self._one[0]
            one.id, one.logit, one.p = t, float(logits[t]), 0.0
            self._one_arr.size, self._one_arr.selected, self._one_arr.sorted = 1, -1, False
            self._lc.llama_sampler_apply(s.grammar, ctypes.byref(self._one_arr))
            if math.isinf(self._one[0].logit):  # rejected: mask the whole vocabulary
                self._cand.copy_logits(logits)
                self._lc.llama_sampler_apply(s.grammar, ctypes.byref(self._cand.candidates))
                masked = self._cand.candidates_data.logit
                allowed = np.isfinite(masked)
                if not allowed.any():
                    raise RuntimeError("the grammar allows no token here")
                scores = np.where(allowed, scores, -np.inf)
                t = int(np.argmax(scores))
            self._lc.llama_sampler_accept(s.grammar, t)
        return t
