"""The vLLM backend's context guard (models.vllm_backend.fit_request): a request is kept, has its
max_tokens cut to what the context leaves, or is refused with the reason."""

from __future__ import annotations

from finelake.models.base import GenerationRequest
from finelake.models.vllm_backend import fit_request


def test_fit_request():
    r = GenerationRequest(messages=[{"role": "user", "content": "x"}], max_tokens=100)
    assert fit_request(r, prompt_tokens=900, max_model_len=1024) is r
    cut = fit_request(r, prompt_tokens=1000, max_model_len=1024)
    assert cut.max_tokens == 24 and r.max_tokens == 100 and cut.messages == r.messages
    why = fit_request(r, prompt_tokens=1024, max_model_len=1024)
    assert isinstance(why, str) and why.startswith("prompt_too_long: 1024 tokens")
