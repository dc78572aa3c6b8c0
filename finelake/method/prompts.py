"""Prompts, output schemas and output parsing for genericization and instantiation (§3.1, §3.3).

Two modes per stage, chosen in the profile:

* ``direct`` — the contracts of the released models, so a GPU profile only changes the model id:
  ``fineinstructions/query_templatizer`` takes the bare query as the user message and answers
  ``{"template", "compatible_document_description"}``; ``fineinstructions/template_instantiator``
  takes ``{"instruction_template", "document"}`` as JSON, template first, and answers
  ``{"instruction", "answer"}``
  (answer with ``<excerpt>`` pointers) or ``null`` for an incompatible pair. No public source
  shows the instantiator's own reply keys; the released dataset names the column
  ``instantiated_instruction``, so that key is read as well as ``instruction``.
* ``decomposed`` — for a model as small as the embedded SmolLM2-135M: it picks from numbered lists
  under constrained decoding (spans of the query and a generic description of each; slot fills and
  a sentence range of the document), and code assembles the template, the instruction and the
  excerpt pointer. The expansion, ratio and validation code is the same in both modes.

Genericize sends its JSON schema as a decoding constraint only when ``constrained`` (the
``genericize.constrained`` setting); unconstrained replies are read leniently (the first JSON
object of the reply, extra keys tolerated: :func:`finelake.method.replies.read_json_reply`).
Every parsed reply carries flags (``constrained``, ``lenient_parse``, ``unknown_keys:...``; see
:mod:`finelake.method.replies`) that the stages write to their rows.

Every function here is pure: messages in, parsed records out.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from finelake.method import excerpts, furniture, quality, replies, templates
from finelake.method.spans import Span, candidate_spans, split_sentences

GENERICIZE_PROMPT_VERSION = "genericize-v1"
INSTANTIATE_PROMPT_VERSION = "instantiate-v1"

# ----------------------------------------------------------------------------- genericize

DIRECT_GENERICIZE_SCHEMA = {
    "type": "object",
    "properties": {
        "template": {"type": "string"},
        "compatible_document_description": {"type": "string"},
    },
    "required": ["template", "compatible_document_description"],
}

_GENERICIZE_SYSTEM = ("Pick the specific phrases of the request (numbered) and name the general "
                      "category of each in a few words.")
# Few-shot turns (multi-turn, so the model learns the format rather than copying one answer).
_GENERICIZE_SHOTS = (
    ("How do I bake sourdough bread in a Dutch oven?", "1. bake sourdough bread 2. Dutch oven",
     '{"picks":[{"n":2,"kind":"kitchen tool"}]}'),
    ("explain the causes of World War I", "1. causes 2. World War I",
     '{"picks":[{"n":2,"kind":"historical event"}]}'),
    ("write a python function that sorts a list", "1. python function 2. sorts 3. list",
     '{"picks":[{"n":1,"kind":"programming language"},{"n":3,"kind":"data structure"}]}'),
)
EXAMPLE_KINDS = frozenset({"kitchen tool", "historical event", "programming language", "data structure"})
"""Slot descriptions that appear in the few-shot turns; the report counts how often the model
copies them (a quality signal for small models)."""


@dataclass
class GenericizeRequest:
    """Messages and schema for one query, plus what parsing needs (the candidate spans).
    ``json_schema`` is None when the request is unconstrained."""

    messages: list[dict]
    json_schema: Optional[dict]
    candidates: list[Span] = field(default_factory=list)


def genericize_request(query: str, mode: str, max_slots: int = 3,
                       constrained: bool = True) -> Optional[GenericizeRequest]:
    """Build the generation request for one query.

    Args:
        query: the real user query.
        mode: ``direct`` or ``decomposed`` (module docstring).
        max_slots: most spans a decomposed reply may pick.
        constrained: send the reply's JSON schema as a decoding constraint; False leaves the
            model free (the released query_templatizer was trained on free-text JSON replies).

    Returns:
        The request, or None in decomposed mode when the query has no candidate span (the stage
        records that query as ``no_candidate_span``).
    """
    if mode == "direct":
        return GenericizeRequest([{"role": "user", "content": query}],
                                 DIRECT_GENERICIZE_SCHEMA if constrained else None)
    cands = candidate_spans(query)
    if not cands:
        return None
    listing = " ".join(f"{i}. {c.text}" for i, c in enumerate(cands, 1))
    schema = {
        "type": "object",
        "properties": {"picks": {
            "type": "array", "minItems": 1, "maxItems": max(1, min(max_slots, len(cands))),
            "items": {"type": "object",
                      "properties": {"n": {"type": "integer", "enum": list(range(1, len(cands) + 1))},
                                     "kind": {"type": "string", "minLength": 3, "maxLength": 40}},
                      "required": ["n", "kind"]}}},
        "required": ["picks"],
    }
    messages = [{"role": "system", "content": _GENERICIZE_SYSTEM}]
    for q, phrases, answer in _GENERICIZE_SHOTS:
        messages += [{"role": "user", "content": f"Request: {q}\nPhrases: {phrases}"},
                     {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": f"Request: {query[:600]}\nPhrases: {listing}"})
    return GenericizeRequest(messages, schema if constrained else None, cands)


@dataclass
class GenericizeOutcome:
    """Parsed result for one query: a template, or the reason there is none, and the reply's
    flags (:mod:`finelake.method.replies`)."""

    template: Optional[str]
    compatible_document_description: Optional[str]
    reason: Optional[str]
    flags: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reason is None


GENERICIZE_KEYS = {"direct": ("template", "compatible_document_description"), "decomposed": ("picks",)}
"""Reply keys each genericize mode reads; others are tolerated and flagged ``unknown_keys``."""


def _read_reply(output: Optional[str], constrained: bool,
                known: tuple[str, ...]) -> tuple[Any, list[str]]:
    """The decoded reply and its flags; ``ValueError`` when it holds no JSON (strictly read
    under a constraint, leniently without)."""
    reply = replies.read_json_reply(output, lenient=not constrained)
    flags = [replies.FLAG_CONSTRAINED] if constrained else []
    if reply.lenient:
        flags.append(replies.FLAG_LENIENT)
    unknown = replies.unknown_keys_flag(reply.data, known)
    if unknown:
        flags.append(unknown)
    return reply.data, flags


def describe_documents(template: str, kinds: list[str]) -> str:
    """The compatible document description code writes in decomposed mode (§3.1): what a
    document must contain to fill the slots and answer the instruction."""
    shown = templates.SLOT_RE.sub(lambda m: m.group(1).strip(), template)
    about = " and ".join(dict.fromkeys(k.strip() for k in kinds if k.strip()))
    return (f"A document about a specific {about} that gives enough detail to answer a request "
            f"such as: {shown}")


def parse_genericize(query: str, req: GenericizeRequest, output: Optional[str], mode: str,
                     constrained: Optional[bool] = None) -> GenericizeOutcome:
    """Turn model output into a validated template.

    Direct mode reads the query_templatizer JSON: ``template`` and
    ``compatible_document_description`` are required, other keys are tolerated (flagged
    ``unknown_keys:...``). Decomposed mode reads ``{"picks": [{"n", "kind"}]}``, replaces each
    picked span of the query by ``<fi>kind</fi>`` and writes the compatible document description.
    Either way the template is checked by :func:`templates.validate_template`.

    A constrained reply must be one JSON value (a code fence allowed); an unconstrained one is
    read leniently, its first JSON object (flag ``lenient_parse`` when that was needed).

    Args:
        constrained: whether the request was decoded under its schema; default: whether
            ``req`` carries one.

    Returns:
        :class:`GenericizeOutcome`; ``reason`` is one of ``unparseable_output``, ``bad_pick``,
        or the validation reasons joined by ``;``; ``flags`` as in :mod:`finelake.method.replies`.
    """
    if constrained is None:
        constrained = req.json_schema is not None
    try:
        data, flags = _read_reply(output, constrained, GENERICIZE_KEYS[mode])
    except ValueError:
        return GenericizeOutcome(None, None, "unparseable_output",
                                 [replies.FLAG_CONSTRAINED] if constrained else [])

    def fail(reason: str, tpl: Optional[str] = None, desc: Optional[str] = None) -> GenericizeOutcome:
        return GenericizeOutcome(tpl, desc, reason, flags)

    if mode == "direct":
        if not isinstance(data, dict):
            return fail("unparseable_output")
        tpl = str(data.get("template") or "").strip()
        desc = str(data.get("compatible_document_description") or "").strip()
    else:
        picks = data.get("picks") if isinstance(data, dict) else None
        if not isinstance(picks, list) or not picks:
            return fail("unparseable_output")
        chosen: dict[int, str] = {}
        for p in picks:
            try:
                n = int(p["n"])
                kind = re.sub(r"\s+", " ", str(p["kind"])).strip().strip(".")
            except (KeyError, TypeError, ValueError):
                return fail("unparseable_output")
            if not 1 <= n <= len(req.candidates):
                return fail("bad_pick")
            if kind and n not in chosen:
                chosen[n] = kind
        if not chosen:
            return fail("empty_slot_description")
        spans = [(req.candidates[n - 1].text, kind) for n, kind in sorted(chosen.items())]
        try:
            tpl = templates.assemble_template(query, spans)
        except ValueError as exc:
            return fail(f"bad_pick: {exc}")
        desc = describe_documents(tpl, list(chosen.values()))
    problems = templates.validate_template(tpl, desc, query)
    if problems:
        return fail(";".join(problems), tpl or None, desc or None)
    return GenericizeOutcome(tpl, desc, None, flags)


# ----------------------------------------------------------------------------- instantiate

DIRECT_INSTANTIATE_SCHEMA = {
    "anyOf": [
        {"type": "null"},
        {"type": "object",
         "properties": {"instruction": {"type": "string"}, "answer": {"type": "string"}},
         "required": ["instruction", "answer"]},
    ]
}

_INSTANTIATE_SYSTEM = (
    "You write a realistic request about the document below by filling each blank of a template "
    "with one of the numbered phrases of the document, and you choose the sentences of the "
    'document that answer the request. If the document cannot answer it, reply {"compatible":false}.'
)
MAX_FILL_PHRASES = 40


@dataclass
class InstantiateRequest:
    """Messages and schema for one (document, template) pair plus the numbered sentences and
    the numbered phrases the slots are filled from (decomposed mode)."""

    messages: list[dict]
    json_schema: Optional[dict]
    sentences: list[Span] = field(default_factory=list)
    slots: list[str] = field(default_factory=list)
    phrases: list[Span] = field(default_factory=list)


@functools.lru_cache(maxsize=16)
def _document_lists(doc: str, max_document_chars: int, min_sentence_chars: int,
                    prefer_body: bool = False) -> tuple[list[Span], list[Span]]:
    """The numbered sentences and the fill phrases of a (cut) document, decomposed mode; with
    ``prefer_body`` only the sentences of the document's body (:func:`quality.body_units`) and
    no phrase from a heading, running head or markup line (:func:`furniture.in_furniture`).

    Cached for the last few documents: requests come grouped by document (six templates each,
    §3.2), and both lists cost O(len) Python steps. Callers must not mutate the lists."""
    sents = split_sentences(doc, max_chars=max_document_chars, min_chars=min_sentence_chars) or [Span(doc, 0, len(doc))]
    phrases = candidate_spans(doc, max_spans=MAX_FILL_PHRASES, max_words=3, scan_chars=len(doc))
    if prefer_body:
        sents = quality.body_units(doc, sents) or sents
        phrases = [p for p in phrases if not furniture.in_furniture(doc, p)] or phrases
    if not phrases:
        phrases = [Span(doc[:40], 0, min(40, len(doc)))]
    return sents, phrases


def instantiate_request(document: str, template: str, mode: str, max_document_chars: int,
                        max_answer_sentences: int = 4,
                        min_sentence_chars: int = 40,
                        prefer_body: bool = False) -> InstantiateRequest:
    """Build the request for one pair.

    Direct mode is the released template_instantiator contract: one user message
    ``{"instruction_template": …, "document": …}`` as JSON, the template *first*, so requests for
    the same document share no prefix beyond the chat template's own. Decomposed mode puts the
    numbered document in the system message and the template in the user message, so requests
    for the same document share the document as a prefix (vLLM prefix caching, llama.cpp KV
    reuse; ``benchmarks/bench_prefix_cache.py`` measures the hit rate).

    Decomposed mode numbers the document's sentences (:func:`split_sentences`), fragments of
    fewer than ``min_sentence_chars`` non-whitespace characters joined to their neighbours, so
    the model never picks a heading or an option name as the whole answer. With
    ``prefer_body`` the list leaves out the document's leading header block and the headings
    and running heads at the edges of each sentence (:func:`quality.body_units`, issue 26), so
    an answer comes from the document's substance (§1).

    Raises:
        ValueError: the template has no slot (it would have been rejected by genericize).
    """
    slots = templates.parse_slots(template)
    if not slots:
        raise ValueError("template has no <fi> slot")
    doc = document[:max_document_chars]
    if mode == "direct":
        payload = json.dumps({"instruction_template": template, "document": doc}, ensure_ascii=False)
        return InstantiateRequest([{"role": "user", "content": payload}], None, [], slots)
    sents, phrases = _document_lists(doc, max_document_chars, min_sentence_chars, prefer_body)
    numbered = "\n".join(f"[{i}] {s.text}" for i, s in enumerate(sents, 1))
    listing = " ".join(f"{i}. {p.text}" for i, p in enumerate(phrases, 1))
    blanks = "\n".join(f"{i}. {d}" for i, d in enumerate(slots, 1))
    nums = list(range(1, len(sents) + 1))
    schema = {"anyOf": [
        {"type": "object", "properties": {"compatible": {"const": False}}, "required": ["compatible"]},
        {"type": "object", "properties": {
            "fills": {"type": "array", "minItems": len(slots), "maxItems": len(slots),
                      "items": {"type": "integer", "enum": list(range(1, len(phrases) + 1))}},
            "first": {"type": "integer", "enum": nums},
            "last": {"type": "integer", "enum": nums}},
         "required": ["fills", "first", "last"]},
    ]}
    messages = [
        {"role": "system", "content": _INSTANTIATE_SYSTEM + "\n\nDocument:\n" + numbered
                                      + "\n\nPhrases: " + listing},
        {"role": "user", "content": f"Template: {template}\nBlanks:\n{blanks}\n"
                                    f"For each blank give the number of the phrase that fills it, then "
                                    f"the first and last sentence of the answer."},
    ]
    return InstantiateRequest(messages, schema, sents, slots, phrases)


@dataclass
class InstantiateOutcome:
    """One pair's result. ``status``: ``ok``, ``null`` (incompatible, §3.3), ``excerpt_rejected``
    (excerpted share below the minimum) or ``invalid`` (unusable output; ``reason`` says why)."""

    status: str
    instruction: Optional[str] = None
    answer: Optional[str] = None
    excerpt_ratio: Optional[float] = None
    reason: Optional[str] = None
    raw_answer: Optional[str] = None
    flags: list[str] = field(default_factory=list)


INSTANTIATE_KEYS = {"direct": ("instruction", "instantiated_instruction", "answer"),
                    "decomposed": ("fills", "first", "last", "compatible")}
"""Reply keys each instantiate mode reads; others are tolerated and flagged ``unknown_keys``."""

EXCERPT_MARKUP = re.compile(r"<excerpt|</excerpt>|<\.\.\.>")
"""Excerpt markup that must never reach an instruction (it belongs in answers only)."""


def parse_instantiate(document: str, template: str, req: InstantiateRequest, output: Optional[str],
                      mode: str, min_excerpt_ratio: float, max_answer_sentences: int = 4,
                      min_run_chars: int = excerpts.GROUNDING_MIN_RUN_CHARS) -> InstantiateOutcome:
    """Turn model output into an instruction and an expanded, excerpt-checked answer.

    The answer's ``<excerpt>`` pointers are expanded against the document (only a pointer that
    matches exactly one span expands, :func:`excerpts.expand_excerpts`), its excerpted share is
    computed, and a share below ``min_excerpt_ratio`` gives ``excerpt_rejected`` (§3.3). In
    decomposed mode the pointer is built by code from the chosen sentence range. An answer
    that passes the tag accounting must also pass the tag-blind check
    :func:`excerpts.grounding_failure` (copied runs of ``min_run_chars`` or more), else it is
    ``excerpt_rejected`` with that reason (``answer_too_short`` / ``ungrounded``).

    Direct mode reads the instruction from ``instruction`` or, failing that,
    ``instantiated_instruction`` (the released dataset's column name), and ``answer``; other keys
    are tolerated and flagged ``unknown_keys:...``. Its replies are decoded without a schema, so
    they are read leniently (the first JSON object; flag ``lenient_parse``). An instruction that
    holds excerpt markup (``<excerpt``, ``</excerpt>``, ``<...>``) is ``invalid`` with reason
    ``excerpt_markup_in_instruction``. Every outcome of a reply carries its flags.
    """
    constrained = req.json_schema is not None
    try:
        data, flags = _read_reply(output, constrained, INSTANTIATE_KEYS[mode])
    except ValueError:
        return InstantiateOutcome("invalid", reason="unparseable_output",
                                  flags=[replies.FLAG_CONSTRAINED] if constrained else [])
    o = _parse_instantiate_data(document, template, req, data, mode, min_excerpt_ratio,
                                max_answer_sentences, min_run_chars)
    o.flags = flags
    return o


def _parse_instantiate_data(document: str, template: str, req: InstantiateRequest, data: Any,
                            mode: str, min_excerpt_ratio: float, max_answer_sentences: int,
                            min_run_chars: int) -> InstantiateOutcome:
    """:func:`parse_instantiate` after the reply was decoded (``data``)."""
    if data is None or (isinstance(data, dict) and data.get("compatible") is False):
        return InstantiateOutcome("null", reason="incompatible_template")
    if not isinstance(data, dict):
        return InstantiateOutcome("invalid", reason="unparseable_output")
    if mode == "direct":
        instruction = str(data.get("instruction") or data.get("instantiated_instruction") or "").strip()
        raw_answer = str(data.get("answer") or "").strip()
    else:
        fills = data.get("fills")
        try:
            first, last = int(data["first"]), int(data["last"])
        except (KeyError, TypeError, ValueError):
            return InstantiateOutcome("invalid", reason="unparseable_output")
        if not isinstance(fills, list) or len(fills) != len(req.slots):
            return InstantiateOutcome("invalid", reason="wrong_number_of_fills")
        try:
            picks = [int(f) for f in fills]
        except (TypeError, ValueError):
            return InstantiateOutcome("invalid", reason="unparseable_output")
        if any(not 1 <= p <= len(req.phrases) for p in picks):
            return InstantiateOutcome("invalid", reason="fill_out_of_range")
        fills = [req.phrases[p - 1].text for p in picks]
        if not (1 <= first <= len(req.sentences) and 1 <= last <= len(req.sentences)):
            return InstantiateOutcome("invalid", reason="sentence_out_of_range")
        first, last = min(first, last), max(first, last)
        last = min(last, first + max_answer_sentences - 1)
        instruction = templates.fill_template(template, fills)
        span = document[req.sentences[first - 1].start:req.sentences[last - 1].end]
        try:
            raw_answer = excerpts.make_excerpt_pointer(span, document=document)
        except ValueError as exc:  # e.g. the span itself holds "<...>" or excerpt tags
            return InstantiateOutcome("invalid", instruction=instruction, reason=f"unpointable_span: {exc}")
    if not instruction or not raw_answer:
        return InstantiateOutcome("invalid", reason="empty_instruction_or_answer")
    if templates.unfilled_slots(instruction):
        return InstantiateOutcome("invalid", instruction=instruction, reason="unfilled_slot")
    if EXCERPT_MARKUP.search(instruction):
        return InstantiateOutcome("invalid", instruction=instruction,
                                  reason="excerpt_markup_in_instruction")
    expanded = excerpts.expand_excerpts(raw_answer, document)
    answer = expanded.text.strip()
    if expanded.failures:
        reasons = sorted({f.reason if hasattr(f, "reason") else str(f) for f in expanded.failures})
        return InstantiateOutcome("excerpt_rejected", instruction, answer, expanded.excerpt_ratio,
                                  "excerpt_pointer_" + "+".join(reasons), raw_answer)
    if expanded.excerpt_ratio < min_excerpt_ratio:
        return InstantiateOutcome("excerpt_rejected", instruction, answer, expanded.excerpt_ratio,
                                  f"excerpt_ratio<{min_excerpt_ratio}", raw_answer)
    why = excerpts.grounding_failure(answer, document, min_excerpt_ratio, min_run_chars)
    if why:
        return InstantiateOutcome("excerpt_rejected", instruction, answer, expanded.excerpt_ratio,
                                  why, raw_answer)
    return InstantiateOutcome("ok", instruction, answer, expanded.excerpt_ratio, None, raw_answer)
