"""The ``load`` backends: deterministic, cheap stand-ins for the models, for measuring plumbing.

**Not a model.** These backends exist to measure and fault-test the Spark/Delta plumbing at sizes
no CPU could run real models at (``benchmarks/bench_scale.py``, ``make fault-test``). Their
outputs are synthetic: never train on a lake they wrote. :func:`finelake.validate.check_backends`
refuses them in any profile that does not say ``load_test: true`` (``conf/load-test.yaml`` is the
one packaged profile that does).

* ``load`` generator: for a request with a JSON schema it returns a schema-valid JSON document
  chosen by a hash of the prompt (the same prompt always gets the same reply), so finelake's own
  prompts get well-formed answers: genericize picks a phrase and names a kind, instantiate fills
  the blanks with listed phrases and answers with a range of the numbered sentences (grounded by
  construction; ``null_rate`` of the pairs answer ``{"compatible": false}``, the §3.3 ``null``),
  the ``json`` judge scores 1-5 (``score_weights``). A request without a schema gets a short
  fixed-shape text. Token counts are whitespace words, a cheap proxy.
* ``load`` embedder: vectors of the production width (``dim``, default 1024, BGE-M3's) with
  structure: a text's topic is a hash of it modulo ``topics``; its vector is the topic's centroid
  plus Gaussian noise of scale ``noise`` (per text, seeded by its hash), unit-normalized, so two
  texts of one topic have cosine about ``1 / (1 + noise**2)`` (0.8 at the default 0.5) and of
  different topics about 0 (± ``1/sqrt(dim)``). Templates and documents land in topics
  independently, so with ``topics = templates / c`` a document clears a threshold of 0.5 against
  about ``c`` templates. Gaussian pooling (Appendix B) is imitated by shape only: K+1 vectors of
  the document's topic with independent noise.

Wrong shapes (generator): ``rename_keys`` renames keys of every JSON reply's top-level object
(``{"instruction": "question"}``), as a released model trained on other key names would answer;
the canary (:mod:`finelake.method.canary`) must stop such a run after its first small chunk.

Fault injection (generator): ``error_rate`` of the requests fail with a transient-looking error
(HTTP 429 or a timeout, worded as the openai SDK words them); ``engine_error_rate`` of the
``generate`` calls raise :class:`LoadEngineDeadError` (named after vLLM's ``EngineDeadError``: the
engine is gone). Draws come from one ``random.Random(seed)`` per loaded backend, so a retry in a
later run draws again.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any, Optional, Sequence

import numpy as np

from finelake.models.base import (EmbeddingBackend, GenerationBackend, GenerationRequest,
                                  GenerationResult, register_embedder, register_generator)

__all__ = ["LoadGenerator", "LoadEmbedder", "LoadEngineDeadError", "schema_instance", "text_hash"]


class LoadEngineDeadError(RuntimeError):
    """Raised by the ``load`` generator's injected engine failures (like vLLM's EngineDeadError)."""


def text_hash(text: str) -> int:
    """A stable 64-bit hash of ``text`` (BLAKE2b; unlike Python's ``hash()``, the same in every
    process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _pick(h: int, salt: str, n: int) -> int:
    """A deterministic index in ``range(n)`` from hash ``h`` and a salt."""
    return text_hash(f"{h}:{salt}") % max(1, n)


def schema_instance(schema: dict, h: int, *, null_rate: float = 0.0,
                    score_weights: Sequence[float] = (0.05, 0.1, 0.15, 0.35, 0.35),
                    path: str = "") -> Any:
    """A JSON value valid under ``schema`` (the subset finelake's prompts use), chosen by ``h``.

    Supported keywords: ``type`` (object, array, string, integer, number, boolean), ``properties``,
    ``required``, ``enum``, ``const``, ``anyOf``, ``minItems``/``maxItems``,
    ``minLength``/``maxLength``. Choices that shape a grounded answer:

    * ``anyOf``: the branch with one property that is a ``const`` (the "incompatible" answer) is
      taken for ``null_rate`` of the hashes, else the branch with the most properties;
    * an object with ``first`` and ``last`` integer enums (a sentence range): ``last`` is
      ``first`` or the next sentence, never before it;
    * an integer enum named ``score``: drawn with ``score_weights`` over the enum in order.

    Args:
        schema: a JSON schema (dict).
        h: the 64-bit hash the choices derive from.
        null_rate: share of ``anyOf`` choices that take the const branch, in [0, 1].
        score_weights: relative weights of the ``score`` enum's values.
        path: where in the document this value sits (salts the hash; callers leave it empty).

    Raises:
        ValueError: a keyword combination this generator does not support.
    """
    if "const" in schema:
        return schema["const"]
    if "anyOf" in schema:
        branches = schema["anyOf"]
        const_branches = [b for b in branches if len(b.get("properties", {})) == 1
                          and all("const" in p for p in b["properties"].values())]
        rich = max(branches, key=lambda b: len(b.get("properties", {})))
        roll = _pick(h, path + "/anyOf", 10_000) / 10_000
        chosen = const_branches[0] if const_branches and roll < null_rate else rich
        return schema_instance(chosen, h, null_rate=null_rate, score_weights=score_weights, path=path)
    if "enum" in schema:
        values = list(schema["enum"])
        if path.endswith("/score") and len(score_weights) == len(values):
            roll = _pick(h, path, 10_000) / 10_000 * sum(score_weights)
            acc = 0.0
            for v, w in zip(values, score_weights):
                acc += w
                if roll < acc:
                    return v
            return values[-1]
        return values[_pick(h, path, len(values))]
    kind = schema.get("type", "object")
    if kind == "object":
        props = schema.get("properties", {})
        out = {name: schema_instance(sub, h, null_rate=null_rate, score_weights=score_weights,
                                     path=f"{path}/{name}") for name, sub in props.items()}
        if "first" in out and "last" in out and "enum" in props.get("last", {}):
            nums = list(props["last"]["enum"])
            i = nums.index(out["first"]) if out["first"] in nums else 0
            out["last"] = nums[min(i + _pick(h, path + "/span", 2), len(nums) - 1)]
        return out
    if kind == "array":
        lo = int(schema.get("minItems", 0))
        hi = int(schema.get("maxItems", max(lo, 1)))
        n = lo + _pick(h, path + "/n", hi - lo + 1)
        return [schema_instance(schema.get("items", {"type": "string"}), h, null_rate=null_rate,
                                score_weights=score_weights, path=f"{path}/{i}") for i in range(n)]
    if kind == "string":
        lo, hi = int(schema.get("minLength", 0)), int(schema.get("maxLength", 64))
        s = f"kind {_pick(h, path, 997)}"
        s = s + "x" * max(0, lo - len(s))
        return s[:hi]
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 0.5))
    if kind == "boolean":
        return bool(_pick(h, path, 2))
    raise ValueError(f"load backend: unsupported schema type {kind!r} at {path or '/'}")


@register_generator("load")
class LoadGenerator(GenerationBackend):
    """The deterministic plumbing generator (see the module docstring; not a model).

    Args:
        model: a label for lineage columns (e.g. ``"load"``).
        batch_size: accepted like every backend's; the load backend has no batch limit.
        null_rate: share of instantiations answered ``{"compatible": false}`` (0.05).
        score_weights: weights of judge scores 1..5 (keeps about 70% at min_score 4).
        error_rate: share of requests failing with a transient error (0 = none).
        engine_error_rate: share of ``generate`` calls raising :class:`LoadEngineDeadError`.
        seed: seed of the fault-injection draws.
        rename_keys: ``{key: new name}`` applied to the top-level object of every JSON reply (a
            reply in another shape than finelake's prompts ask for); None: none.

    Raises:
        ValueError: a rate outside [0, 1].
    """

    def __init__(self, model: str, *, batch_size: int = 64, null_rate: float = 0.05,
                 score_weights: Optional[list[float]] = None, error_rate: float = 0.0,
                 engine_error_rate: float = 0.0, seed: int = 0,
                 rename_keys: Optional[dict[str, str]] = None):
        for name, v in (("null_rate", null_rate), ("error_rate", error_rate),
                        ("engine_error_rate", engine_error_rate)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"load backend: {name} must be in [0, 1], got {v}")
        super().__init__(model, batch_size=batch_size, null_rate=null_rate, error_rate=error_rate,
                         engine_error_rate=engine_error_rate, seed=seed)
        self.null_rate = float(null_rate)
        self.score_weights = tuple(score_weights or (0.05, 0.1, 0.15, 0.35, 0.35))
        self.error_rate = float(error_rate)
        self.engine_error_rate = float(engine_error_rate)
        self._rng = random.Random(seed)
        self.rename_keys = dict(rename_keys or {})
        self.injected = {"request_errors": 0, "engine_errors": 0}

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order (see the module docstring for what each holds).

        Raises:
            LoadEngineDeadError: for ``engine_error_rate`` of the calls (injected).
        """
        if self.engine_error_rate and self._rng.random() < self.engine_error_rate:
            self.injected["engine_errors"] += 1
            raise LoadEngineDeadError("EngineDeadError: engine core died (injected by the load "
                                      "backend)")
        out = []
        for r in requests:
            prompt = json.dumps(r.messages, ensure_ascii=False, sort_keys=True)
            if self.error_rate and self._rng.random() < self.error_rate:
                self.injected["request_errors"] += 1
                msg = ("RateLimitError: Error code: 429 - injected by the load backend"
                       if self._rng.random() < 0.5 else
                       "APITimeoutError: Request timed out. (injected by the load backend)")
                out.append(GenerationResult(text=None, error=msg, request_id=r.request_id))
                continue
            h = text_hash(prompt)
            if r.json_schema is not None:
                reply = schema_instance(r.json_schema, h, null_rate=self.null_rate,
                                        score_weights=self.score_weights)
                if self.rename_keys and isinstance(reply, dict):
                    reply = {self.rename_keys.get(k, k): v for k, v in reply.items()}
                text = json.dumps(reply)
            else:
                text = f"load backend reply {h % 100_000}"
            out.append(GenerationResult(text=text, prompt_tokens=len(prompt.split()),
                                        completion_tokens=len(text.split()), finish_reason="stop",
                                        request_id=r.request_id))
        return out


@register_embedder("load")
class LoadEmbedder(EmbeddingBackend):
    """Deterministic topic-structured vectors of the production width (see the module docstring;
    not a model).

    Args:
        model: a label (the index records it; match thresholds are keyed by it).
        dim: vector width d (1024 = BGE-M3's).
        topics: number of topics T (> 0); a topic's centroid is seeded by its number.
        noise: scale of the per-text Gaussian noise around the centroid (> 0).
        batch_size: accepted like every backend's; unused.

    Raises:
        ValueError: ``dim``, ``topics`` or ``noise`` not positive.
    """

    def __init__(self, model: str, *, dim: int = 1024, topics: int = 50_000, noise: float = 0.5,
                 batch_size: int = 64, threads: Optional[int] = None):
        if dim < 1 or topics < 1 or noise <= 0:
            raise ValueError(f"load embedder: dim, topics and noise must be positive, got "
                             f"{dim}, {topics}, {noise}")
        super().__init__(model, dim=dim, topics=topics, noise=noise)
        self.dim = int(dim)
        self.topics = int(topics)
        self.noise = float(noise)

    def _vectors(self, text: str, count: int) -> np.ndarray:
        h = text_hash(text)
        topic = h % self.topics
        centroid = np.random.default_rng(topic).standard_normal(self.dim)
        centroid /= np.linalg.norm(centroid)
        noise = np.random.default_rng(h).standard_normal((count, self.dim)) / np.sqrt(self.dim)
        v = centroid[None, :] + self.noise * noise
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 ``[n, dim]``, unit rows; the same text always gives the same vector."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = self._vectors(str(t), 1)[0]
        return out

    def embed_pooled(self, texts: list[str], chunks: int = 5, sigma: float = 0.05,
                     alpha: float = 1.0) -> np.ndarray:
        """float32 ``[n, chunks + 1, dim]``, unit rows: index 0 equals :meth:`embed`'s vector, 1..K
        further vectors of the text's topic (shape of Appendix B's output, not its computation)."""
        out = np.empty((len(texts), chunks + 1, self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = self._vectors(str(t), chunks + 1)
        return out

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Whitespace words per text (a cheap proxy for tokens)."""
        return [len(str(t).split()) for t in texts]
