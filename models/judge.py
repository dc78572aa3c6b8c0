"""Judges: score an (instruction, answer) pair 1-5 with the §3.4 rubric.

* ``llm`` — a generative judge through any generation backend (``options.inner_backend``: vllm,
  transformers, llama_cpp, openai). With ``options.format: flow_judge`` (the default) it is spoken
  to as Flow Judge (``flowaicom/Flow-Judge-v0.1``, the paper's judge) was trained:
  :func:`finelake.method.judging.flow_judge_prompt` in, ``<feedback>…</feedback><score>N</score>``
  out, read by :func:`finelake.method.judging.parse_flow_judge_output`, with no grammar forced on
  it. ``options.constrained: true`` enforces that reply format with a regular expression
  (:func:`finelake.method.judging.flow_judge_regex`), for models too small to keep to it
  (``conf/cluster-sim.yaml``'s SmolLM2-135M). ``format: json`` is the JSON-reply prompt
  (:func:`finelake.method.judging.judge_prompt`), under a JSON schema unless ``constrained:
  false``, for general chat models as judges.
* ``relevance`` — for the embedded profile, where SmolLM2-135M judging under a one-digit grammar
  is noise: the cosine between instruction and answer under a sentence embedding model, mapped to
  1-5 by :func:`finelake.method.judging.relevance_to_likert`, combined with the text-quality rules
  of :mod:`finelake.method.quality` (:func:`finelake.method.judging.composite_judgment`: a pair
  that fails a rule scores 1); each part is in ``judgments.judge_parts``. It measures topical
  relevance and text quality, not helpfulness; its reason says so. Options: ``embedder_backend``
  (default ``sentence_transformers``), ``cuts`` (four increasing cosines), ``quality`` (default
  true; false: relevance alone), ``quality_rules`` (the rules' thresholds; the judge stage passes
  ``instantiate.quality``), the embedder's own options.

A reply without a valid score gives ``(None, "judge_error: …")``: the pair is an error row with
the reason in ``judgments``, never dropped silently.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from finelake.method import judging
from finelake.models.base import GenerationRequest, OptionError

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                   "reason": {"type": "string", "maxLength": 300}},
    "required": ["score", "reason"],
}

JUDGE_FORMATS = ("flow_judge", "json")
"""Prompt and reply formats of the ``llm`` judge."""

_TAGS_TOKENS = 24  # tokens left for "<feedback>", "</feedback>", "<score>N</score>" under the regex


def _close(model) -> None:
    close = getattr(model, "close", None)
    if callable(close):
        close()


class RelevanceJudge:
    """The embedded judge, named for what it is: embedding relevance mapped onto the 1-5 scale,
    combined with the text-quality rules (:func:`finelake.method.judging.composite_judgment`)
    unless ``quality`` is off.

    Args:
        embedder: a loaded embedding backend (unit vectors).
        cuts: four increasing cosines (:func:`finelake.method.judging.relevance_to_likert`).
        quality: combine with the quality rules (model id ``relevance+quality:<embedder>``);
            False: relevance alone (``relevance:<embedder>``).
        quality_rules: the rules' thresholds (``instantiate.quality`` as a dict; None: defaults).
    """

    name = "relevance"

    def __init__(self, embedder, cuts: Optional[Sequence[float]] = None, quality: bool = True,
                 quality_rules: Optional[Mapping[str, Any]] = None):
        from finelake.method.quality import QualityRules

        self.embedder = embedder
        self.cuts = tuple(cuts) if cuts else judging.DEFAULT_LIKERT_CUTS
        self.quality = bool(quality)
        self.rules = QualityRules.from_dict(dict(quality_rules or {}))
        self.model_id = f"relevance{'+quality' if self.quality else ''}:{embedder.model_id}"

    def close(self) -> None:
        """Release the embedder (:func:`finelake.udfs.cache.close_model` calls this on eviction)."""
        _close(self.embedder)

    #: :func:`finelake.udfs.judge.judge_frame` passes each pair's template when it has them.
    takes_templates = True

    def score(self, instructions: list[str], answers: list[str],
              templates: Optional[Sequence[Optional[str]]] = None) -> list[tuple]:
        """One ``(score 1-5, reason, parts JSON)`` per pair, relevance being the cosine of unit
        embeddings; without ``quality``, ``(score, reason)``.

        ``templates`` (one per pair, or None) let the instruction rules look at the slot fills
        (:func:`finelake.method.quality.check_instruction`), as instantiate does: without them
        only the repetition rule applies, to the whole instruction, and a template that repeats
        its own words (a long real query) fails it."""
        if not instructions:
            return []
        a = self.embedder.embed(list(instructions))
        b = self.embedder.embed(list(answers))
        cos = np.sum(a * b, axis=1)
        if not self.quality:
            return [(judging.relevance_to_likert(float(c), self.cuts),
                     f"relevance cosine {float(c):.3f} (embedding relevance, not an LLM judgment)")
                    for c in cos]
        from finelake.method import quality

        out = []
        tpls = list(templates) if templates is not None else [None] * len(instructions)
        for c, ins, ans, tpl in zip(cos, instructions, answers, tpls):
            score, reason, parts = judging.composite_judgment(
                float(c), quality.check_answer(ans, self.rules),
                quality.check_instruction(ins, self.rules, tpl), quality.answer_measures(ans),
                self.cuts)
            out.append((score, reason, json.dumps(parts, sort_keys=True)))
        return out


class LLMJudge:
    """A generative judge: Flow Judge's prompt and reply format by default (see the module doc).

    Args:
        generator: a loaded :class:`~finelake.models.base.GenerationBackend`.
        max_tokens: reply limit in tokens (Flow Judge's feedback runs to a few hundred).
        format: ``flow_judge`` or ``json``.
        constrained: force the reply format (``flow_judge``: a regex; ``json``: a JSON schema);
            default off for ``flow_judge``, on for ``json``.

    Raises:
        ValueError: unknown format, or ``max_tokens`` too small to hold a constrained reply.
    """

    name = "llm"

    def __init__(self, generator, max_tokens: int = 512, format: str = "flow_judge",
                 constrained: Optional[bool] = None):
        if format not in JUDGE_FORMATS:
            raise ValueError(f"llm judge: format must be one of {JUDGE_FORMATS}, not {format!r}")
        self.generator = generator
        self.max_tokens = int(max_tokens)
        self.format = format
        self.constrained = (format == "json") if constrained is None else bool(constrained)
        if self.format == "flow_judge" and self.constrained and self.max_tokens <= _TAGS_TOKENS:
            raise ValueError(f"llm judge: max_tokens {self.max_tokens} leaves no room for feedback "
                             f"under the Flow Judge regex (needs > {_TAGS_TOKENS})")
        self.model_id = f"llm:{generator.model_id}"

    def close(self) -> None:
        """Release the generator: a vLLM engine shuts its processes down now, not whenever the
        garbage collector gets to it (:func:`finelake.udfs.cache.close_model` calls this)."""
        _close(self.generator)

    def request(self, instruction: str, answer: str) -> GenerationRequest:
        """The generation request for one pair (one user message, as flow-judge sends it)."""
        if self.format == "flow_judge":
            regex = (judging.flow_judge_regex(self.max_tokens - _TAGS_TOKENS)
                     if self.constrained else None)
            return GenerationRequest([{"role": "user",
                                       "content": judging.flow_judge_prompt(instruction, answer)}],
                                     max_tokens=self.max_tokens, temperature=0.0, regex=regex)
        return GenerationRequest([{"role": "user", "content": judging.judge_prompt(instruction, answer)}],
                                 max_tokens=self.max_tokens, temperature=0.0,
                                 json_schema=JUDGE_SCHEMA if self.constrained else None)

    def parse(self, text: Optional[str]) -> tuple[Optional[int], str]:
        """``(score 1-5, reason)`` or ``(None, "judge_error: …")`` for one reply."""
        if self.format == "flow_judge":
            return judging.parse_flow_judge_output(text)
        score, reason = judging.parse_judge_output(text)
        return (score, reason) if score is not None else (None, f"judge_error: {reason}")

    def score(self, instructions: list[str], answers: list[str]) -> list[tuple[Optional[int], str]]:
        """One ``(score, reason)`` per pair, in order; a failed request or a reply without a valid
        score gives ``(None, "judge_error: …")`` (a cut reply says it hit ``max_tokens``)."""
        reqs = [self.request(i, a) for i, a in zip(instructions, answers)]
        out = []
        for r in self.generator.generate(reqs):
            if r.error:
                out.append((None, f"judge_error: {r.error}"))
                continue
            score, reason = self.parse(r.text)
            if score is None and r.finish_reason == "length":
                reason += f" (reply cut at max_tokens={self.max_tokens})"
            out.append((score, reason))
        return out


def judge_parts(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Split a ``models.judge`` spec into ``(kind, inner model spec, judge settings)``.

    ``kind`` is ``relevance`` (inner: an embedder spec; settings: ``cuts``) or ``llm`` (inner: a
    generator spec; settings: ``inner_backend``, ``format``, ``constrained``); the inner spec
    carries the remaining options.

    Raises:
        ValueError: unknown judge backend.
    """
    backend = spec["backend"]
    opts = dict(spec.get("options") or {})
    if backend == "relevance":
        settings = {"embedder_backend": opts.pop("embedder_backend", "sentence_transformers"),
                    "cuts": opts.pop("cuts", None), "quality": opts.pop("quality", True),
                    "quality_rules": opts.pop("quality_rules", None)}
        return "relevance", {**spec, "backend": settings["embedder_backend"], "options": opts}, settings
    if backend == "llm":
        settings = {"inner_backend": opts.pop("inner_backend", "vllm"),
                    "format": opts.pop("format", "flow_judge"),
                    "constrained": opts.pop("constrained", None)}
        return "llm", {**spec, "backend": settings["inner_backend"], "options": opts}, settings
    raise ValueError(f"unknown judge backend {backend!r}; use 'relevance' or 'llm'")


def check_judge_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a ``models.judge`` spec on the driver without loading a model.

    The judge's own options (``format``, ``constrained``, ``cuts``...) are checked here, the rest
    by the inner backend's ``check_options``.

    Returns:
        ``{"judge": kind, **settings, "backend": inner backend, "options": checked options}``.

    Raises:
        ValueError: unknown judge backend or inner backend.
        OptionError: a bad option (``.key`` names it).
    """
    kind, inner, settings = judge_parts(spec)
    if kind == "llm":
        from finelake.models.generation import backend_class

        if settings["format"] not in JUDGE_FORMATS:
            raise OptionError("llm", "format", f"{settings['format']!r}: must be one of {JUDGE_FORMATS}")
        if settings["constrained"] is not None and not isinstance(settings["constrained"], bool):
            raise OptionError("llm", "constrained", f"{settings['constrained']!r}: must be true or false")
        cls = backend_class(inner["backend"])
    else:
        from finelake.models.base import get_embedder_class
        from finelake.models.embedding import SentenceTransformersEmbedder  # noqa: F401 (registers)

        cuts = settings["cuts"]
        if cuts is not None:
            ok = (isinstance(cuts, (list, tuple)) and len(cuts) == 4
                  and all(isinstance(c, (int, float)) and math.isfinite(c) for c in cuts)
                  and all(b > a for a, b in zip(cuts, cuts[1:])))
            if not ok:
                raise OptionError("relevance", "cuts", f"{cuts!r}: must be 4 increasing numbers")
        if not isinstance(settings["quality"], bool):
            raise OptionError("relevance", "quality", f"{settings['quality']!r}: must be true or false")
        if settings["quality_rules"] is not None:
            from finelake.method.quality import QualityRules

            try:
                QualityRules.from_dict(dict(settings["quality_rules"]))
            except (TypeError, ValueError) as exc:
                raise OptionError("relevance", "quality_rules", str(exc)) from None
        cls = get_embedder_class(inner["backend"])
    checked = cls.check_options(inner.get("options") or {})
    return {"judge": kind, **settings, "backend": inner["backend"], "options": checked}


def create_judge(spec: dict[str, Any]):
    """Build the judge for a ``models.judge`` config dict (see the module docstring).

    Raises:
        ValueError: unknown judge backend or format.
    """
    kind, inner, settings = judge_parts(spec)
    if kind == "relevance":
        from finelake.models.embedding import create_embedder

        return RelevanceJudge(create_embedder(inner), settings["cuts"], settings["quality"],
                              settings["quality_rules"])
    from finelake.models.generation import create_generator

    return LLMJudge(create_generator(inner), max_tokens=spec.get("max_tokens", 512),
                    format=settings["format"], constrained=settings["constrained"])
