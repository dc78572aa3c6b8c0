"""OpenAI-compatible HTTP chat completions (``backend: openai``).

For a ``vllm serve`` fleet, Databricks model serving, or any server that speaks
``POST {base_url}/chat/completions``. Requests of a batch are sent concurrently (a thread pool of
``concurrency`` workers sharing one ``httpx.Client``); each is retried with exponential backoff
(tenacity) on HTTP 429, 5xx and connection/timeouts errors. A request that still fails, or gets a
4xx answer, yields a result with ``error`` set.

Options: ``base_url`` (required, e.g. ``http://host:8000/v1``), ``api_key_env`` (name of the
environment variable holding the key; default ``OPENAI_API_KEY``; no ``Authorization`` header
when unset), ``concurrency`` (default 8), ``timeout`` (seconds per attempt, default 120),
``max_retries`` (attempts after the first, default 5), ``backoff_initial`` / ``backoff_max``
(seconds, default 0.5 / 30), ``served_model`` (the ``model`` field sent; default the configured
model), ``regex_style`` (how a regex constraint is sent: ``structured_outputs`` (vLLM >= 0.10,
default), ``guided_regex`` (older vLLM), or ``none`` (regex requests fail)), ``extra_body``
(dict merged into every request body), ``headers`` (extra HTTP headers).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from finelake.models.base import (GenerationBackend, GenerationRequest, GenerationResult,
                                  register_generator)
from finelake.models.generation import check_request, error_result, require

PIP_HINT = "pip install httpx tenacity"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class HTTPStatusError(RuntimeError):
    """The server answered with a non-2xx status. ``status`` is the code, ``body`` the text."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@register_generator("openai")
class OpenAIGenerator(GenerationBackend):
    """Chat completions against an OpenAI-compatible server.

    Args:
        model: the model name the server serves (sent as ``model`` unless ``served_model``).
        **options: see the module docstring.

    Raises:
        ImportError: httpx or tenacity is missing.
        ValueError: ``base_url`` missing, or an unknown option.
    """

    def __init__(self, model: str, *, base_url: Optional[str] = None,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, timeout: float = 120.0,
                 max_retries: int = 5, backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 served_model: Optional[str] = None, regex_style: str = "structured_outputs",
                 extra_body: Optional[dict] = None, headers: Optional[dict] = None,
                 batch_size: Optional[int] = None, revision: Optional[str] = None,
                 **unknown: Any):
        if unknown:
            raise ValueError(f"openai backend: unknown options {sorted(unknown)}")
        if not base_url:
            raise ValueError("openai backend needs options.base_url (e.g. http://host:8000/v1)")
        if regex_style not in ("structured_outputs", "guided_regex", "none"):
            raise ValueError(f"openai backend: bad regex_style {regex_style!r}")
        super().__init__(model, base_url=base_url, concurrency=concurrency)
        self._httpx = require("httpx", PIP_HINT, "openai")
        self._tenacity = require("tenacity", PIP_HINT, "openai")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.served_model = served_model or model
        self.concurrency = max(1, int(concurrency))
        self.max_retries = max(0, int(max_retries))
        self.backoff_initial = float(backoff_initial)
        self.backoff_max = float(backoff_max)
        self.regex_style = regex_style
        self.extra_body = dict(extra_body or {})
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            hdrs["Authorization"] = f"Bearer {key}"
        limits = self._httpx.Limits(max_connections=self.concurrency,
                                    max_keepalive_connections=self.concurrency)
        self._client = self._httpx.Client(headers=hdrs, timeout=float(timeout), limits=limits)
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency,
                                        thread_name_prefix="finelake-openai")
        self.attempts = 0  # HTTP requests sent, retries included (for tests and metrics)
        self._count_lock = threading.Lock()

    def body(self, r: GenerationRequest) -> dict[str, Any]:
        """The JSON body sent for ``r`` (OpenAI chat-completions format).

        Raises:
            ValueError: ``r.regex`` is set and ``regex_style`` is ``none``.
        """
        body: dict[str, Any] = {"model": self.served_model, "messages": r.messages,
                                "max_tokens": int(r.max_tokens),
                                "temperature": float(r.temperature or 0.0), **self.extra_body}
        if r.seed is not None:
            body["seed"] = int(r.seed)
        if r.json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": r.json_schema,
                                                       "strict": True}}
        elif r.regex is not None:
            if self.regex_style == "structured_outputs":
                body["structured_outputs"] = {"regex": r.regex}
            elif self.regex_style == "guided_regex":
                body["guided_regex"] = r.regex
            else:
                raise ValueError("regex constraints are off for this server (regex_style: none)")
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._count_lock:
            self.attempts += 1
        resp = self._client.post(self.url, json=body)
        if resp.status_code >= 300:
            raise HTTPStatusError(resp.status_code, resp.text)
        return resp.json()

    def _retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, HTTPStatusError):
            return exc.status in RETRY_STATUS
        return isinstance(exc, (self._httpx.TransportError, self._httpx.TimeoutException))

    def _one(self, r: GenerationRequest) -> GenerationResult:
        t = self._tenacity
        try:
            check_request(r)
            body = self.body(r)
            retrying = t.Retrying(
                retry=t.retry_if_exception(self._retryable),
                wait=t.wait_exponential(multiplier=self.backoff_initial, max=self.backoff_max),
                stop=t.stop_after_attempt(self.max_retries + 1),
                reraise=True)
            data = retrying(self._post, body)
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return GenerationResult(text=(choice.get("message") or {}).get("content") or "",
                                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                    completion_tokens=int(usage.get("completion_tokens") or 0),
                                    finish_reason=choice.get("finish_reason"),
                                    request_id=r.request_id)
        except Exception as exc:  # noqa: BLE001 - one request's failure is its result
            return error_result(r, exc)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Send the requests concurrently (``concurrency`` at a time).

        Returns:
            One result per request, same order; token counts are the server's ``usage``; a request
            that failed after retries (or with a non-retryable 4xx) has ``error`` set ("HTTP 400:
            ..."). Never raises for a request's failure.
        """
        return list(self._pool.map(self._one, requests))

    def close(self) -> None:
        """Close the connection pool and worker threads."""
        self._pool.shutdown(wait=True)
        self._client.close()
