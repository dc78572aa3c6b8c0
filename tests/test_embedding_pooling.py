"""The embedder refuses a model whose own pooling is not mean unless the profile says so."""

from __future__ import annotations

import json
import shutil

import pytest

from finelake.models.embedding import create_embedder, pooling_mode_of
from finelake.models.resolve import hf_path


@pytest.mark.parametrize("config,mode", [
    ({"pooling_mode": "cls"}, "cls"),
    ({"pooling_mode": "mean"}, "mean"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
    ({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}, "mean"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "cls+mean"),
    ({"pooling_mode_max_tokens": False}, "none"),
])
def test_pooling_mode_of_both_config_spellings(config, mode):
    assert pooling_mode_of(config) == mode


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory):
    """all-MiniLM-L6-v2 with its Pooling module switched to CLS (as BGE-M3's is)."""
    dst = tmp_path_factory.mktemp("cls") / "minilm-cls"
    shutil.copytree(hf_path("embedded:all-minilm-l6-v2"), dst)
    cfg = dst / "1_Pooling" / "config.json"
    data = json.loads(cfg.read_text())
    data.update({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    cfg.write_text(json.dumps(data))
    return str(dst)


def test_cls_model_refused_without_explicit_option(cls_model):
    with pytest.raises(ValueError, match=r"own pooling is 'cls'.*options\.pooling: mean"):
        create_embedder({"backend": "sentence_transformers", "model": cls_model,
                         "options": {"device": "cpu"}})


def test_cls_model_mean_pooled_when_the_profile_says_so(cls_model):
    import numpy as np

    e = create_embedder({"backend": "sentence_transformers", "model": cls_model,
                         "options": {"device": "cpu", "pooling": "mean"}})
    ref = create_embedder({"backend": "sentence_transformers", "model": "embedded:all-minilm-l6-v2",
                           "options": {"device": "cpu"}})
    texts = ["a short text", "another, somewhat longer text about pooling"]
    np.testing.assert_allclose(e.embed(texts), ref.embed(texts), atol=1e-5)  # same weights, mean
    with pytest.raises(ValueError, match="pooling must be 'mean'"):
        create_embedder({"backend": "sentence_transformers", "model": cls_model,
                         "options": {"device": "cpu", "pooling": "cls"}})
