"""``finelake validate --models`` (issue 25 item 1): each model's small files against its stage.

The model folders are saved by transformers and sentence-transformers themselves from tiny random
configs (one per failure); hub ids are read from a local hub cache laid out as huggingface_hub
lays it out (``models--org--name/snapshots/<commit>/...``) with the hub switched off
(``HF_HUB_OFFLINE``): huggingface_hub's own resolution code runs, nothing is faked above it.
"""

from __future__ import annotations

import shutil

import pytest
import yaml
from click.testing import CliRunner

from finelake.cli import cli
from finelake.config import load_config
from finelake.model_contracts import check_model_files, read_model_files

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "hello", "world", "the", "a"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _tokenizer(chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", cls_token="[CLS]",
                                   sep_token="[SEP]")
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny models saved by their libraries: a Llama without / with a chat template, a BERT
    sentence-transformers model with CLS pooling."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    llama = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                        max_position_embeddings=256)
    out = {}
    for name, template in (("plain", None), ("chat", "{% for m in messages %}{{ m['content'] }}"
                                                     "{% endfor %}")):
        d = root / name
        LlamaForCausalLM(llama).save_pretrained(d)
        _tokenizer(template).save_pretrained(d)
        out[name] = d
    bert = root / "bert"
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=64)).save_pretrained(bert)
    _tokenizer().save_pretrained(bert)
    tr = Transformer(str(bert), max_seq_length=32)
    pool = Pooling(tr.get_embedding_dimension(), pooling_mode="cls")
    SentenceTransformer(modules=[tr, pool], device="cpu").save(str(root / "st_cls"))
    out["st_cls"] = root / "st_cls"
    return out


def _profile(tmp_path, generator, embedder, **extra):
    data = {"profile": "models-test",
            "tokenizer": {"model": str(generator)},
            "models": {
                "generator": {"backend": "vllm", "model": str(generator), "max_tokens": 64,
                              "options": {"max_model_len": 128}},
                "embedder": {"backend": "sentence_transformers", "model": str(embedder),
                             "options": {"max_seq_length": 32}},
                "judge": {"backend": "relevance", "model": "embedded:all-minilm-l6-v2"}},
            "instantiate": {"max_document_tokens": 64}}
    for k, v in extra.items():
        node = data
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def _validate(path, *args):
    return CliRunner().invoke(cli, ["validate", "--conf", path, "--models", *args])


@pytest.fixture
def no_session(monkeypatch):
    import finelake.validate

    monkeypatch.setattr(finelake.validate, "active_session", lambda: None)


def test_files_as_the_libraries_save_them(folders):
    chat = read_model_files(str(folders["chat"]))
    assert chat.get("config.json")["max_position_embeddings"] == 256
    # transformers 5 writes the template to chat_template.jinja, not tokenizer_config.json
    assert "chat_template.jinja" in chat.files or chat.get("tokenizer_config.json").get("chat_template")
    st = read_model_files(str(folders["st_cls"]), sentence_transformers=True)
    from finelake.models.embedding import pooling_mode_of

    pool = [f for f in st.files if f.endswith("/config.json")]
    assert len(pool) == 1 and pooling_mode_of(st.get(pool[0])) == "cls"


def test_a_generator_without_chat_template_fails_naming_model_and_file(folders, tmp_path, no_session):
    r = _validate(_profile(tmp_path, folders["plain"], folders["st_cls"],
                           **{"models.embedder.options.pooling": "mean"}))
    assert r.exit_code != 0, r.output
    line = next(ln for ln in r.output.splitlines() if "no chat template" in ln)
    assert "models.generator" in line and str(folders["plain"]) in line
    assert "tokenizer_config.json" in line


def test_cls_pooling_fails_unless_the_profile_says_mean(folders, tmp_path, no_session):
    r = _validate(_profile(tmp_path, folders["chat"], folders["st_cls"]))
    assert r.exit_code != 0, r.output
    assert "models.embedder" in r.output and str(folders["st_cls"]) in r.output
    assert "1_Pooling/config.json" in r.output and "'cls' pooling" in r.output
    ok = _validate(_profile(tmp_path, folders["chat"], folders["st_cls"],
                            **{"models.embedder.options.pooling": "mean"}))
    assert ok.exit_code == 0, ok.output
    assert "validate: profile models-test is valid" in ok.output


@pytest.mark.parametrize("overrides,expect", [
    ({"models.generator.options.max_model_len": 512},
     "models.generator.options.max_model_len 512 exceeds the model's max_position_embeddings 256"),
    ({"instantiate.max_document_tokens": 100},
     "instantiate.max_document_tokens 100 + models.generator.max_tokens 64 exceed "
     "models.generator.options.max_model_len 128"),
    ({"models.generator.max_tokens": 128, "instantiate.max_document_tokens": None},
     "models.generator.max_tokens 128 leaves no room"),
    ({"models.embedder.options.max_seq_length": 128},
     "models.embedder.options.max_seq_length 128 exceeds the model's max_position_embeddings 64"),
])
def test_lengths_beyond_the_models_positions_fail(folders, tmp_path, overrides, expect):
    path = _profile(tmp_path, folders["chat"], folders["st_cls"],
                    **{"models.embedder.options.pooling": "mean", **overrides})
    lines, problems, warnings = check_model_files(load_config(path))
    assert len(problems) == 1 and expect in problems[0], problems
    assert warnings == []  # local folders need no revision


def test_the_embedded_default_passes():
    lines, problems, warnings = check_model_files(load_config("local"))
    assert problems == [] and warnings == [], problems
    checked = [ln for ln in lines if ln.startswith("models: ")]
    assert any("models.generator" in ln and ".gguf" in ln and ln.endswith(": ok") for ln in checked)
    assert any("models.embedder" in ln and "1_Pooling/config.json" in ln for ln in checked)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, folders):
    """``org/tiny-chat`` at COMMIT in a hub cache, the hub off."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-chat"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in ("config.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.json"):
        if (folders["chat"] / f).exists():
            shutil.copy(folders["chat"] / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_models_are_read_at_their_pinned_revision(folders, tmp_path, hub_cache):
    path = _profile(tmp_path, folders["chat"], folders["st_cls"],
                    **{"models.embedder.options.pooling": "mean",
                       "models.generator.model": "org/tiny-chat",
                       "models.generator.revision": COMMIT})
    lines, problems, warnings = check_model_files(load_config(path))
    assert problems == [] and warnings == [], (problems, warnings)
    assert any(f"hub org/tiny-chat@{COMMIT}" in ln and ln.endswith(": ok") for ln in lines)

    other = "f" * 40  # a revision the cache does not hold: not checked is a problem
    lines, problems, warnings = check_model_files(load_config(path, [f"models.generator.revision={other}"]))
    assert len(problems) == 1 and "models.generator (org/tiny-chat): files not read" in problems[0]
    assert "not in the local hub cache" in problems[0]


def test_unpinned_and_abbreviated_revisions_warn(folders, tmp_path, hub_cache):
    base = {"models.embedder.options.pooling": "mean", "models.generator.model": "org/tiny-chat"}
    _, problems, warnings = check_model_files(load_config(_profile(tmp_path, folders["chat"],
                                                                   folders["st_cls"], **base)))
    assert problems == []  # refs/main of the cache
    assert len(warnings) == 1 and "unpinned hub model" in warnings[0] and "models.generator" in warnings[0]
    short = _profile(tmp_path, folders["chat"], folders["st_cls"],
                     **{**base, "models.generator.revision": COMMIT[:8]})
    _, problems, warnings = check_model_files(load_config(short))
    assert len(warnings) == 1 and "not a full 40-digit commit" in warnings[0]
    assert len(problems) == 1 and "not in the local hub cache" in problems[0]  # offline: no prefix lookup
