"""OpenAI-compatible chat completions on the official ``openai`` SDK (``backend: openai``).

For api.openai.com (GPT-class teachers and judges, as the papers use), a ``vllm serve`` fleet, or
Databricks model serving. Requests of a batch are sent concurrently (a thread pool of
``concurrency`` workers sharing one ``openai.OpenAI`` client). Retries are the SDK's own
(``max_retries``: connection errors, 408, 409, 429 and 5xx, exponential backoff honouring the
server's ``retry-after``); a request that still fails, or gets another 4xx, yields a result with
``error`` set (``"HTTP 400: ..."``).

What a request carries depends on ``options.provider`` (:func:`request_kwargs`):

``openai`` (default; OpenAI's API proper)
    only fields of OpenAI's chat-completions API. A JSON schema goes as Structured Outputs,
    ``response_format={"type": "json_schema", "json_schema": {"name", "strict": true, "schema"}}``,
    the schema made strict-valid first (:func:`strict_schema`: ``additionalProperties: false`` on
    every object, every property required, optional ones nullable, keywords OpenAI does not
    support dropped). OpenAI has no regex constraint: a regex request is sent unconstrained and
    the reply must then match the regex in full (after stripping whitespace), else the result is
    an error saying so.
``vllm`` (a ``vllm serve`` endpoint, vLLM >= 0.10; checked against vLLM 0.32's
``ChatCompletionRequest``)
    constraints in vLLM's own request field, ``extra_body={"structured_outputs": {"json": schema}}``
    or ``{"regex": pattern}`` (the ``guided_*`` fields were removed in vLLM 0.32 and are ignored
    there, unconstrained, so they are never sent).

Options: ``base_url`` (required, e.g. ``http://host:8000/v1``), ``provider`` (``openai`` |
``vllm``), ``api_key_env`` (environment variable holding the key; default ``OPENAI_API_KEY``;
required for provider ``openai``, ``EMPTY`` is sent to a vLLM server without one),
``concurrency`` (default 8), ``timeout`` (seconds per attempt, default 120), ``max_retries``
(SDK retries after the first attempt, default 5), ``served_model`` (the ``model`` field sent;
default the configured model), ``extra_body`` (dict merged into every request body; for provider
``openai`` only OpenAI API fields), ``headers`` (extra HTTP headers).
"""

from __future__ import annotations

import copy
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Mapping, Optional

from finelake.models.base import (GenerationBackend, GenerationRequest, GenerationResult,
                                  OptionError, check_signature_options, register_generator)
from finelake.models.generation import check_request, error_result, require

PIP_HINT = "pip install 'openai>=2.25,<4'"
PROVIDERS = ("openai", "vllm")

#: JSON Schema keywords OpenAI's strict Structured Outputs accept (OpenAI's "Supported schemas":
#: types, enum/const, anyOf, $ref/$defs, string pattern/format, number bounds and multipleOf,
#: array minItems/maxItems, descriptions). Others (minLength, maxLength, ...) are dropped by
#: :func:`strict_schema`, since OpenAI rejects the request with them.
OPENAI_SCHEMA_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
    "$ref", "$defs", "definitions", "description", "title", "pattern", "format", "minimum",
    "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems",
})

_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` that OpenAI's strict Structured Outputs accept.

    Every object gets ``additionalProperties: false`` and ``required`` = all its properties; a
    property that was optional becomes nullable (``null`` added to its ``type``/``enum``, or an
    ``anyOf`` with ``{"type": "null"}``), so a reply may still leave it out in effect; keywords
    outside :data:`OPENAI_SCHEMA_KEYWORDS` are dropped. Any JSON the original schema accepts with
    all optional properties present is accepted by the result.

    Raises:
        ValueError: the root is not an object schema (OpenAI requires one).
    """
    if schema.get("type") != "object":
        raise ValueError("provider openai needs an object schema at the root, not "
                         f"type {schema.get('type')!r}")
    return _strict(copy.deepcopy(dict(schema)))


def _nullable(node: dict) -> dict:
    if "type" in node:
        t = node["type"]
        types = list(t) if isinstance(t, list) else [t]
        if "null" not in types:
            node["type"] = types + ["null"]
        if "enum" in node and None not in node["enum"]:
            node["enum"] = list(node["enum"]) + [None]
        return node
    return {"anyOf": [node, {"type": "null"}]}


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: v for k, v in node.items() if k in OPENAI_SCHEMA_KEYWORDS}
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            node[key] = {k: _strict(v) for k, v in node[key].items()}
    for key in ("items", "anyOf"):
        if key in node:
            node[key] = _strict(node[key])
    types = node.get("type")
    if types == "object" or (isinstance(types, list) and "object" in types) or "properties" in node:
        props = node.setdefault("properties", {})
        required = set(node.get("required") or [])
        for name in props:
            if name not in required:
                props[name] = _nullable(props[name])
        node["required"] = list(props)
        node["additionalProperties"] = False
    return node


def request_kwargs(r: GenerationRequest, *, provider: str, model: str,
                   extra_body: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The keyword arguments of ``client.chat.completions.create`` for one request.

    Args:
        r: the request (messages, max_tokens, temperature, seed, json_schema or regex).
        provider: ``openai`` or ``vllm`` (module docstring).
        model: the ``model`` field.
        extra_body: fields merged into the request body (``extra_body=``), under the request's
            own constraint fields.

    Returns:
        ``{"model", "messages", "max_completion_tokens", "temperature"[, "seed"]
        [, "response_format"][, "extra_body"]}``: every key a parameter of the SDK's
        ``create``; provider-specific fields only inside ``extra_body``.

    Raises:
        ValueError: unknown provider; provider ``openai`` with a schema whose root is not an
            object.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, not {provider!r}")
    kw: dict[str, Any] = {"model": model, "messages": r.messages,
                          "max_completion_tokens": int(r.max_tokens),
                          "temperature": float(r.temperature or 0.0)}
    if r.seed is not None:
        kw["seed"] = int(r.seed)
    body = dict(extra_body or {})
    if provider == "openai":
        if r.json_schema is not None:
            kw["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "strict": True, "schema": strict_schema(r.json_schema)}}
    elif r.json_schema is not None:
        body["structured_outputs"] = {"json": r.json_schema}
    elif r.regex is not None:
        body["structured_outputs"] = {"regex": r.regex}
    if body:
        kw["extra_body"] = body
    return kw


@register_generator("openai")
class OpenAIGenerator(GenerationBackend):
    """Chat completions against an OpenAI-compatible server through the ``openai`` SDK.

    Args:
        model: the model name the server serves (sent as ``model`` unless ``served_model``).
        **options: see the module docstring.

    Raises:
        ImportError: the ``openai`` package is missing (pip line in the message).
        OptionError: ``base_url`` missing, unknown provider or option, no API key for provider
            ``openai``.
    """

    def __init__(self, model: str, *, base_url: Optional[str] = None,
                 provider: Literal["openai", "vllm"] = "openai",
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, timeout: float = 120.0,
                 max_retries: int = 5, served_model: Optional[str] = None,
                 extra_body: Optional[dict] = None, headers: Optional[dict[str, str]] = None,
                 batch_size: Optional[int] = None, revision: Optional[str] = None):
        type(self).check_options({"base_url": base_url, "provider": provider})
        super().__init__(model, base_url=base_url, provider=provider, concurrency=concurrency)
        openai = require("openai", PIP_HINT, "openai")
        self._openai = openai
        self.provider = provider
        self.served_model = served_model or model
        self.concurrency = max(1, int(concurrency))
        self.extra_body = dict(extra_body or {})
        key = os.environ.get(api_key_env) if api_key_env else None
        if not key:
            if provider == "openai":
                raise OptionError("openai", "api_key_env", f"${api_key_env} is not set on this "
                                  "process; provider openai needs an API key")
            key = "EMPTY"  # a vLLM server started without --api-key ignores it
        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=int(max_retries),
                                    timeout=float(timeout), default_headers=dict(headers or {}))
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency,
                                        thread_name_prefix="finelake-openai")

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Names and types (see :meth:`GenerationBackend.check_options`), plus: ``base_url`` is
        required, ``provider`` is ``openai`` or ``vllm``.

        Raises:
            OptionError: the bad option named.
        """
        out = check_signature_options(cls, {k: v for k, v in options.items() if v is not None})
        if not options.get("base_url"):
            raise OptionError("openai", "base_url", "required (e.g. http://host:8000/v1)")
        return out

    def request_kwargs(self, r: GenerationRequest) -> dict[str, Any]:
        """:func:`request_kwargs` with this backend's provider, model and ``extra_body``."""
        return request_kwargs(r, provider=self.provider, model=self.served_model,
                              extra_body=self.extra_body)

    def _one(self, r: GenerationRequest) -> GenerationResult:
        try:
            check_request(r)
            resp = self.client.chat.completions.create(**self.request_kwargs(r))
        except self._openai.APIStatusError as exc:
            return error_result(r, f"HTTP {exc.status_code}: {exc.message}"[:1000])
        except Exception as exc:  # noqa: BLE001 - one request's failure is its result
            return error_result(r, exc)
        choice = resp.choices[0]
        usage = resp.usage
        msg = choice.message
        res = GenerationResult(text=msg.content or "",
                               prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                               completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                               finish_reason=choice.finish_reason, request_id=r.request_id)
        if getattr(msg, "refusal", None):
            res.text, res.error = None, f"refused: {msg.refusal}"
        elif self.provider == "openai" and r.regex is not None and r.json_schema is None \
                and not re.fullmatch(r.regex, res.text.strip()):
            res.error = (f"reply {res.text.strip()[:80]!r} does not match the regex {r.regex!r} "
                         "(provider openai cannot constrain to a regex)")
            res.text = None
        return res

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Send the requests concurrently (``concurrency`` at a time).

        Returns:
            One result per request, same order; token counts are the server's ``usage``; a request
            that failed after the SDK's retries (or with a non-retryable 4xx) has ``error`` set
            (``"HTTP 400: ..."``, ``"APIConnectionError: ..."``). Never raises for a request's
            failure.
        """
        return list(self._pool.map(self._one, requests))

    def close(self) -> None:
        """Close the worker threads and the SDK's connection pool."""
        self._pool.shutdown(wait=True)
        self.client.close()
