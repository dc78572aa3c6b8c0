"""Judges: score an (instruction, answer) pair 1-5 with the §3.4 rubric.

* ``llm`` — a generative judge (Flow Judge on clusters) prompted with the rubric through any
  generation backend (``options.inner_backend``: vllm, transformers, llama_cpp, openai), its reply
  parsed by :func:`finelake.method.judging.parse_judge_output`.
* ``relevance`` — for the embedded profile, where SmolLM2-135M judging under a one-digit grammar
  is noise: the cosine between instruction and answer under a sentence embedding model, mapped to
  1-5 by :func:`finelake.method.judging.relevance_to_likert`. It measures topical relevance only,
  not helpfulness; its reason says so.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from finelake.method import judging
from finelake.models.base import GenerationRequest

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                   "reason": {"type": "string", "maxLength": 300}},
    "required": ["score", "reason"],
}


class RelevanceJudge:
    """Embedding relevance mapped onto the 1-5 scale (named for what it is)."""

    name = "relevance"

    def __init__(self, embedder, cuts: Optional[Sequence[float]] = None):
        self.embedder = embedder
        self.cuts = tuple(cuts) if cuts else judging.DEFAULT_LIKERT_CUTS
        self.model_id = f"relevance:{embedder.model_id}"

    def score(self, instructions: list[str], answers: list[str]) -> list[tuple[Optional[int], str]]:
        """One (score 1-5, reason) per pair; cosine of unit embeddings."""
        if not instructions:
            return []
        a = self.embedder.embed(list(instructions))
        b = self.embedder.embed(list(answers))
        cos = np.sum(a * b, axis=1)
        return [(judging.relevance_to_likert(float(c), self.cuts),
                 f"relevance cosine {float(c):.3f} (embedding relevance, not an LLM judgment)")
                for c in cos]


class LLMJudge:
    """A generative judge prompted with the rubric; replies parsed, unparseable ones get None."""

    name = "llm"

    def __init__(self, generator, max_tokens: int = 256, constrained: bool = True):
        self.generator = generator
        self.max_tokens = max_tokens
        self.constrained = constrained
        self.model_id = f"llm:{generator.model_id}"

    def score(self, instructions: list[str], answers: list[str]) -> list[tuple[Optional[int], str]]:
        reqs = [GenerationRequest([{"role": "user", "content": judging.judge_prompt(i, a)}],
                                  max_tokens=self.max_tokens, temperature=0.0,
                                  json_schema=JUDGE_SCHEMA if self.constrained else None)
                for i, a in zip(instructions, answers)]
        out = []
        for r in self.generator.generate(reqs):
            if r.error:
                out.append((None, f"judge_error: {r.error}"))
            else:
                out.append(judging.parse_judge_output(r.text))
        return out


def create_judge(spec: dict[str, Any]):
    """Build the judge for a ``models.judge`` config dict.

    Raises:
        ValueError: unknown judge backend.
    """
    backend = spec["backend"]
    opts = dict(spec.get("options") or {})
    if backend == "relevance":
        from finelake.models.embedding import create_embedder

        emb = create_embedder({**spec, "backend": opts.pop("embedder_backend", "sentence_transformers"),
                               "options": {k: v for k, v in opts.items() if k != "cuts"}})
        return RelevanceJudge(emb, opts.get("cuts"))
    if backend == "llm":
        from finelake.models.generation import create_generator

        inner = opts.pop("inner_backend", "vllm")
        constrained = bool(opts.pop("constrained", True))
        gen = create_generator({**spec, "backend": inner, "options": opts})
        return LLMJudge(gen, max_tokens=spec.get("max_tokens", 256), constrained=constrained)
    raise ValueError(f"unknown judge backend {backend!r}; use 'relevance' or 'llm'")
