"""``finelake validate --models``: each model's small files checked against what its stage needs.

The released models meet finelake for the first time on a user's paid GPU run; what can be known
about them without their weights is in a few small files, read here on the driver (issue 25
item 1). For every model a profile names (:func:`finelake.validate.model_configs`, plus the
``tokenizer``):

* **where**: an ``embedded:`` model's package folder or GGUF file (:mod:`finelake.models.resolve`),
  a local folder or ``.gguf`` file, or a hub id, whose files are fetched one by one at the pinned
  ``revision`` with ``huggingface_hub.hf_hub_download`` (into the hub cache; ``HF_HUB_OFFLINE=1``
  reads that cache only). Weights are never read: a GGUF's header is (its metadata stands in for
  ``config.json`` and ``tokenizer_config.json``: ``<arch>.context_length``,
  ``tokenizer.chat_template``);
* **files**: ``config.json``, ``tokenizer_config.json``, ``chat_template.jinja`` /
  ``chat_template.json`` (transformers >= 4.43 saves the template there),
  ``generation_config.json``; for sentence-transformers models also ``modules.json``,
  ``sentence_bert_config.json`` and the Pooling module's ``config.json`` (``1_Pooling/...``,
  wherever ``modules.json`` puts it);
* **checks** (each problem names the profile key, the model, the file and what is wrong):

  ============================  ==============================================================
  model                         needs
  ============================  ==============================================================
  chat-prompted generator       a chat template (unless ``options.chat_template`` gives one);
  (vllm, transformers,          its context (``options.max_model_len`` / ``n_ctx``) within
  llama_cpp; llm judges)        ``max_position_embeddings``; ``max_tokens`` below the context
  the instantiate model         also ``instantiate.max_document_tokens`` + ``max_tokens`` within
                                the context (the document cut is counted in ``tokenizer.model``
                                tokens, the training tokenizer)
  sentence_transformers         a Transformer as its first module (Gaussian pooling needs token
  embedder (and relevance       embeddings); its own pooling mean, or ``options.pooling: mean``
  judge)                        (§3.2: the global vector is the masked mean); ``max_seq_length``
                                (option, else ``sentence_bert_config.json``) within
                                ``max_position_embeddings``
  tokenizer                     ``tokenizer_config.json`` (or a GGUF's tokenizer)
  ============================  ==============================================================

  ``generation_config.json`` is read and its end-of-sequence ids shown; nothing in the profile
  is compared with it. A file that cannot be fetched is a problem (the model was not checked).
* **warnings** (do not fail): a hub model without ``revision``, or with an abbreviated one (the
  hub resolves a commit prefix online, but a cache read offline finds snapshots by their full
  40-digit hash only).

Models served by the ``openai`` backend (names on a server) and the synthetic ``load`` backend are
skipped.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    from finelake.config import FinelakeConfig, ModelConfig

COMMON_FILES = ("config.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
ST_FILES = ("modules.json", "sentence_bert_config.json")
EMBEDDER_BACKENDS = ("sentence_transformers",)
SKIPPED_BACKENDS = ("openai", "load")
FULL_COMMIT = re.compile(r"^[0-9a-f]{40}$")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class ModelFilesError(Exception):
    """A model's small files could not be read (missing folder, hub unreachable, not in cache)."""


@dataclass
class ModelFiles:
    """The small files of one model.

    Attributes:
        model: the configured name (``embedded:...``, a path or a hub id).
        where: what was read: a folder, a GGUF file, or ``hub <id>@<revision>``.
        files: file name (relative to the model's root) -> parsed JSON, or text for ``.jinja``;
            files the model does not have are absent.
        origin: for a GGUF, the header field each stand-in file comes from.
        unconfirmed: optional files neither found nor known to be missing (a hub model read
            offline whose cache has no trace of them); treated as absent.
    """

    model: str
    where: str
    files: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    unconfirmed: list[str] = field(default_factory=list)

    def get(self, name: str, default: Any = None) -> Any:
        return self.files.get(name, default)

    def name(self, file: str) -> str:
        """How to name ``file`` in a message (a GGUF's header field for its stand-in files)."""
        return self.origin.get(file, file)


# ----------------------------------------------------------------------------- reading


def _parse(name: str, text: str, where: str) -> Any:
    if name.endswith(".jinja"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFilesError(f"{where}/{name}: not valid JSON ({exc})") from None


def _pooling_file(modules: Any) -> Optional[str]:
    """``<path>/config.json`` of the Pooling module ``modules.json`` lists, or None."""
    if not isinstance(modules, list):
        return None
    for m in modules:
        if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling"):
            return f"{m.get('path') or ''}/config.json".lstrip("/")
    return None


REQUIRED = ("config.json", "tokenizer_config.json")
"""Files a hub model read offline must have in the cache; the others may be unconfirmed."""


class _Unconfirmed(Exception):
    """An optional hub file that is neither in the cache nor known to be missing (offline)."""


def _read_with(reader: Callable[[str], Optional[str]], model: str, where: str,
               sentence_transformers: bool) -> ModelFiles:
    """Read the files through ``reader`` (name -> text, None when the model has no such file)."""
    out = ModelFiles(model, where)
    names = COMMON_FILES + (ST_FILES if sentence_transformers else ())

    def read(name: str) -> None:
        try:
            text = reader(name)
        except _Unconfirmed:
            out.unconfirmed.append(name)
            return
        if text is not None:
            out.files[name] = _parse(name, text, where)

    for name in names:
        read(name)
    pool = _pooling_file(out.files.get("modules.json"))
    if pool:
        read(pool)
    return out


def _folder_reader(root: Path) -> Callable[[str], Optional[str]]:
    def read(name: str) -> Optional[str]:
        p = root / name
        return p.read_text(encoding="utf-8") if p.is_file() else None
    return read


def _hub_reader(repo: str, revision: Optional[str]) -> Callable[[str], Optional[str]]:
    def read(name: str) -> Optional[str]:
        from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        at = f"hub {repo}@{revision or 'main'}"
        cached = try_to_load_from_cache(repo, name, revision=revision)
        if cached is _CACHED_NO_EXIST:  # the cache knows the file does not exist there
            return None
        if isinstance(cached, str):
            return Path(cached).read_text(encoding="utf-8")
        try:
            path = hf_hub_download(repo, name, revision=revision)
        except LocalEntryNotFoundError as exc:  # offline, or the hub is unreachable
            if name not in REQUIRED:
                raise _Unconfirmed(name) from None
            raise ModelFilesError(f"{at}: {name} is not in the local hub cache and the hub was "
                                  f"not reached ({str(exc).splitlines()[0]})") from None
        except EntryNotFoundError:  # the hub says the file does not exist at that revision
            return None
        except Exception as exc:  # noqa: BLE001 - repo/revision missing, gated, HTTP errors
            raise ModelFilesError(f"{at}: {name}: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0]}") from None
        return Path(path).read_text(encoding="utf-8")
    return read


def gguf_files(model: str, path: str) -> ModelFiles:
    """A GGUF file's header metadata in the shape of the files above: ``config.json`` gets
    ``model_type`` (``general.architecture``) and ``max_position_embeddings``
    (``<arch>.context_length``), ``tokenizer_config.json`` gets ``chat_template``
    (``tokenizer.chat_template``) when the file has one. The tensors are not read."""
    from gguf import GGUFReader  # lazy: only GGUF models need it (a transformers extra)

    fields = GGUFReader(path).fields

    def value(key: str) -> Any:
        f = fields.get(key)
        return None if f is None else f.contents()

    arch = value("general.architecture")
    config: dict[str, Any] = {"model_type": arch}
    ctx = value(f"{arch}.context_length") if arch else None
    if ctx is not None:
        config["max_position_embeddings"] = int(ctx)
    tok: dict[str, Any] = {"tokenizer_class": "gguf"}
    template = value("tokenizer.chat_template")
    if template:
        tok["chat_template"] = template
    return ModelFiles(model, path, {"config.json": config, "tokenizer_config.json": tok},
                      origin={"config.json": f"the GGUF header ({arch}.context_length)",
                              "tokenizer_config.json": "the GGUF header (tokenizer.chat_template)"})


def read_model_files(model: str, revision: Optional[str] = None,
                     sentence_transformers: bool = False) -> ModelFiles:
    """The small files of ``model`` (see the module docstring for where they come from).

    Args:
        model: ``embedded:<name>``, a local folder or ``.gguf`` file, or a hub id.
        revision: the hub revision to fetch (hub ids only).
        sentence_transformers: also read ``modules.json``, ``sentence_bert_config.json`` and the
            Pooling module's config.

    Raises:
        ModelFilesError: a local path that does not exist, an embedded model whose package is
            missing, a hub file that cannot be fetched, or a file that is not valid JSON.
    """
    from finelake.models.resolve import ModelNotFound, embedded_file, is_embedded

    if is_embedded(model):
        try:
            path = embedded_file(model)
        except ModelNotFound as exc:
            raise ModelFilesError(str(exc)) from None
    else:
        local = Path(os.path.expanduser(model))
        if model.startswith(("/", "./", "~")) or local.exists():
            if not local.exists():
                raise ModelFilesError(f"no such path: {local}")
            path = local
        else:
            return _read_with(_hub_reader(model, revision), model,
                              f"hub {model}@{revision or 'main'}", sentence_transformers)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_files(model, str(path))
    return _read_with(_folder_reader(path), model, str(path), sentence_transformers)


# ----------------------------------------------------------------------------- checks


def chat_template_source(mf: ModelFiles) -> Optional[str]:
    """The file that gives the model a chat template, or None."""
    tok = mf.get("tokenizer_config.json") or {}
    if tok.get("chat_template"):
        return "tokenizer_config.json"
    if (mf.get("chat_template.jinja") or "").strip():
        return "chat_template.jinja"
    if (mf.get("chat_template.json") or {}).get("chat_template"):
        return "chat_template.json"
    return None


def max_positions(mf: ModelFiles) -> Optional[int]:
    """The model's position limit from ``config.json`` (None when it states none)."""
    cfg = mf.get("config.json") or {}
    for k in POSITION_KEYS:
        if isinstance(cfg.get(k), int):
            return int(cfg[k])
    return None


def _context(options: dict) -> tuple[Optional[int], Optional[str]]:
    """``(tokens, option name)`` of a generator's context setting, when the profile sets one."""
    for name in ("max_model_len", "n_ctx"):
        v = options.get(name)
        if v is None and isinstance(options.get("engine_args"), dict):
            v = options["engine_args"].get(name)
        if isinstance(v, int):
            return v, name
    return None, None


def generator_problems(key: str, mc: "ModelConfig", options: dict, mf: ModelFiles,
                       document_tokens: Optional[int] = None) -> list[str]:
    """What a chat-prompted generator lacks (see the module docstring's table).

    Args:
        key: the profile key (``models.generator``), for messages.
        mc: its configuration (``max_tokens``).
        options: its checked backend options (a judge's inner backend's).
        mf: its files.
        document_tokens: ``instantiate.max_document_tokens`` when this model instantiates.

    Returns:
        One message per problem, each naming the key, the model and the file.
    """
    out = []
    head = f"{key} ({mf.model})"
    if not options.get("chat_template") and chat_template_source(mf) is None:
        if mf.origin:
            where = f"{mf.name('tokenizer_config.json')} of {mf.where} has none"
        else:
            where = (f"{mf.where}: tokenizer_config.json has no chat_template and there is no "
                     "chat_template.jinja / chat_template.json")
        unsure = [f for f in mf.unconfirmed if f.startswith("chat_template")]
        if unsure:
            where += f" ({', '.join(unsure)} not in the hub cache: offline, not confirmed)"
        out.append(f"{head}: no chat template ({where}); the stage sends chat messages: use a "
                   f"chat model or set {key}.options.chat_template")
    positions = max_positions(mf)
    ctx, ctx_key = _context(options)
    if ctx is not None and positions is not None and ctx > positions:
        out.append(f"{head}: {key}.options.{ctx_key} {ctx} exceeds the model's "
                   f"max_position_embeddings {positions} ({mf.name('config.json')} in {mf.where})")
    limit = ctx if ctx is not None else positions
    where = (f"{key}.options.{ctx_key}" if ctx is not None
             else f"max_position_embeddings ({mf.name('config.json')})")
    if limit is not None and mc.max_tokens >= limit:
        out.append(f"{head}: {key}.max_tokens {mc.max_tokens} leaves no room for a prompt in "
                   f"{where} {limit}")
    if limit is not None and document_tokens is not None and document_tokens + mc.max_tokens > limit:
        out.append(f"{head}: instantiate.max_document_tokens {document_tokens} + {key}.max_tokens "
                   f"{mc.max_tokens} exceed {where} {limit}: the documents' prompts cannot fit")
    return out


def embedder_problems(key: str, options: dict, mf: ModelFiles) -> list[str]:
    """What a sentence-transformers embedder lacks for Gaussian pooling (module docstring).

    Returns:
        One message per problem, each naming the key, the model and the file.
    """
    from finelake.models.embedding import pooling_mode_of

    out = []
    head = f"{key} ({mf.model})"
    modules = mf.get("modules.json")
    if isinstance(modules, list) and modules:
        first = str((modules[0] or {}).get("type", ""))
        if not first.endswith(".Transformer"):
            out.append(f"{head}: modules.json in {mf.where}: the first module is {first!r}, not a "
                       "Transformer; Gaussian pooling needs token embeddings")
    pool = _pooling_file(modules)
    if pool and isinstance(mf.get(pool), dict):
        mode = pooling_mode_of(mf.get(pool))
        if mode != "mean" and options.get("pooling") != "mean":
            out.append(f"{head}: {pool} in {mf.where} declares {mode!r} pooling, but finelake "
                       "embeds with mean (Gaussian) pooling (§3.2, Appendix B), so the vectors "
                       "would not be the model's own; set "
                       f"{key}.options.pooling: mean if the model was trained with mean pooling "
                       "(then check match.thresholds with finelake calibrate)")
    elif pool:
        out.append(f"{head}: modules.json in {mf.where} lists a Pooling module, but {pool} is "
                   "missing")
    positions = max_positions(mf)
    seq = options.get("max_seq_length")
    source = f"{key}.options.max_seq_length"
    if seq is None:
        seq = (mf.get("sentence_bert_config.json") or {}).get("max_seq_length")
        source = "max_seq_length (sentence_bert_config.json)"
    if isinstance(seq, int) and positions is not None and seq > positions:
        out.append(f"{head}: {source} {seq} exceeds the model's max_position_embeddings "
                   f"{positions} (config.json in {mf.where})")
    return out


def revision_warnings(key: str, mc: "ModelConfig") -> list[str]:
    """Warnings for a hub model that is not pinned to a full commit."""
    from finelake.models.resolve import is_embedded

    local = mc.model.startswith(("/", "./", "~")) or os.path.exists(os.path.expanduser(mc.model))
    if is_embedded(mc.model) or local:
        return []
    if not mc.revision:
        return [f"{key} ({mc.model}): unpinned hub model: set {key}.revision to a commit, so "
                "every executor and every rerun loads the same files"]
    if not FULL_COMMIT.match(mc.revision):
        return [f"{key} ({mc.model}): revision {mc.revision!r} is not a full 40-digit commit "
                "hash: the hub resolves a commit prefix online, but a cache read with "
                "HF_HUB_OFFLINE=1 finds snapshots by their full hash only"]
    return []


def _eos(mf: ModelFiles) -> str:
    gc = mf.get("generation_config.json")
    if not isinstance(gc, dict):
        return "no generation_config.json"
    return f"generation_config eos_token_id={gc.get('eos_token_id')!r}"


def check_model_files(cfg: "FinelakeConfig",
                      read: Callable[..., ModelFiles] = read_model_files
                      ) -> tuple[list[str], list[str], list[str]]:
    """Every model of the profile against its stage's needs (module docstring).

    Args:
        cfg: the profile.
        read: the file reader (:func:`read_model_files`).

    Returns:
        ``(report lines, problems, warnings)``: one line per model checked or skipped; problems
        make ``finelake validate --models`` fail, warnings do not.

    Raises:
        ValueError: a model's backend or options are invalid (:func:`finelake.model_checks.check_model`).
    """
    from finelake.model_checks import check_model, model_configs

    lines: list[str] = []
    problems: list[str] = []
    warnings: list[str] = []
    seen: dict[tuple, Any] = {}

    def cached(model: str, revision: Optional[str], st: bool = False) -> ModelFiles:
        """One read per (model, revision, kind) in a check (a GGUF header takes seconds)."""
        k = (model, revision, st)
        if k not in seen:
            try:
                seen[k] = read(model, revision, sentence_transformers=st)
            except ModelFilesError as exc:
                seen[k] = exc
        if isinstance(seen[k], ModelFilesError):
            raise seen[k]
        return seen[k]

    inst_key = "instantiate.model" if cfg.instantiate.model is not None else "models.generator"
    for key, mc, kind in model_configs(cfg):
        s = check_model(key, mc, kind)
        backend, options = s["backend"], s["options"]
        if backend in SKIPPED_BACKENDS:
            lines.append(f"models: {key}: {backend} {mc.model}: skipped (not a model file)")
            continue
        embedder = backend in EMBEDDER_BACKENDS
        warnings += revision_warnings(key, mc)
        try:
            mf = cached(mc.model, mc.revision, embedder)
        except ModelFilesError as exc:
            problems.append(f"{key} ({mc.model}): files not read: {exc}")
            continue
        if embedder:
            found = embedder_problems(key, options, mf)
            what = f"pooling config {_pooling_file(mf.get('modules.json')) or 'none (mean)'}"
        else:
            docs = cfg.instantiate.max_document_tokens if key == inst_key else None
            found = generator_problems(key, mc, options, mf, docs)
            src = chat_template_source(mf)
            what = f"chat template {mf.name(src) if src else 'none'}, {_eos(mf)}"
        problems += found
        lines.append(f"models: {key}: {mf.where}: max_position_embeddings "
                     f"{max_positions(mf)}, {what}: {'ok' if not found else 'PROBLEM'}")
    try:
        tf = cached(cfg.tokenizer.model, None)
    except ModelFilesError as exc:
        problems.append(f"tokenizer.model ({cfg.tokenizer.model}): files not read: {exc}")
    else:
        if tf.get("tokenizer_config.json") is None:
            problems.append(f"tokenizer.model ({cfg.tokenizer.model}): no tokenizer_config.json in "
                            f"{tf.where}: budgets are counted in this tokenizer's tokens")
        lines.append(f"models: tokenizer.model: {tf.where}: "
                     f"{'ok' if tf.get('tokenizer_config.json') is not None else 'PROBLEM'}")
    return lines, problems, warnings
