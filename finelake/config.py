"""Typed configuration: YAML profiles in ``conf/`` validated by pydantic.

A profile is a YAML file (``conf/local.yaml``, ``conf/databricks.yaml``, ``conf/emr.yaml``) or the
name of one of the packaged profiles. Every key is declared below; an unknown key or a value of the
wrong type raises :class:`ConfigError` naming the key and the file. Command-line overrides use
dotted keys (``--set match.default_threshold=0.5``) and are validated the same way.

Inheritance: a profile may start with ``extends: <parent>``; the parent is read first and the
child is merged over it (:func:`deep_merge`: mappings merge key by key, recursively; scalars,
lists and nulls replace). ``<parent>`` is a path relative to the child's own folder (``.yaml`` may
be left off) or, when no such file exists, a packaged profile name. Chains are allowed, cycles are
a :class:`ConfigError`. Files whose name starts with ``_`` (``conf/_cluster.yaml``) are shared bases,
not profiles: they load only through ``extends`` and are not listed by :func:`available_profiles`.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from finelake.errors import ConfigError  # noqa: F401 - re-exported: finelake.config.ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ----------------------------------------------------------------------------- infrastructure


def _without_nulls(value: Any) -> Any:
    """A mapping without its null-valued keys (how a child profile unsets a parent's key, since
    :func:`deep_merge` merges mappings key by key); anything else unchanged for pydantic to check."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return value


class SparkConfig(_Strict):
    master: Optional[str] = Field(
        "local[*]", description="Spark master; null on clusters where spark-submit sets it."
    )
    app_name: str = Field("finelake", description="Spark application name (shown in the Spark UI "
                          "and the cluster's job list).")
    delta: Literal["auto", "delta-spark", "deltalake"] = Field(
        "auto",
        description="How Delta tables are written: delta-spark where its jars are on the classpath "
        "(clusters), the deltalake (delta-rs) package from the driver otherwise. 'auto' picks "
        "delta-spark when its classes load.",
    )
    conf: dict[str, str] = Field(default_factory=dict, description="Extra spark.* settings; a "
                                 "null value removes a key that a parent profile (extends:) set.")

    @field_validator("conf", mode="before")
    @classmethod
    def _unset_nulls(cls, v: Any) -> Any:
        return _without_nulls(v)


class CatalogConfig(_Strict):
    catalog: Optional[str] = Field(None, description="Unity Catalog name; null for the session catalog.")
    database: str = Field("finelake", description="Schema (database) that holds the tables.")


class ModelConfig(_Strict):
    """One model: which backend serves it and how to load it."""

    backend: str = Field(..., description="Registered backend name (llama_cpp, transformers, vllm, "
                         "openai, sentence_transformers, relevance, llm).")
    model: str = Field(..., description="Local path, hub id, or 'embedded:<name>' for models that "
                       "ship inside registry packages.")
    revision: Optional[str] = Field(None, description="Hub revision (a full 40-digit commit) of a "
                                    "hub model; null: the latest. `finelake validate --models` "
                                    "warns about an unpinned hub model.")
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific settings "
                                    "(dtype, tensor_parallel_size, gpu_memory_utilization, n_ctx, "
                                    "...); a null value removes an option that a parent profile "
                                    "(extends:) set, e.g. when a child switches the backend.")
    batch_size: int = Field(16, ge=1, description="Requests (prompts, texts or pairs) per model "
                            "call; a GPU task's chunk is sized to give it whole batches.")
    max_tokens: int = Field(256, ge=1, description="Most tokens a generator or judge writes per "
                            "request.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature of a generator; 0: "
                               "greedy decoding (reproducible runs).")

    @field_validator("options", mode="before")
    @classmethod
    def _unset_nulls(cls, v: Any) -> Any:
        return _without_nulls(v)


class TokenizerConfig(_Strict):
    model: str = Field("embedded:smollm2-135m-instruct",
                       description="Tokenizer used for every token count (the training tokenizer).")


# ----------------------------------------------------------------------------- stages


class DocumentFilterConfig(_Strict):
    """One document quality filter of ``ingest.filters`` (datatrove's, see
    :mod:`finelake.method.document_filters`)."""

    name: Literal["gopher_repetition", "gopher_quality", "fineweb_quality", "c4_quality"] = Field(
        ..., description="gopher_repetition: repeated lines, paragraphs and n-grams; "
        "gopher_quality: word counts and lengths, symbols, bullets, alphabetic and stop words; "
        "fineweb_quality: line-level boilerplate (lines without end punctuation, short or "
        "duplicated lines); c4_quality: C4's rules (too few sentences after dropping lines "
        "without end punctuation, curly brackets, lorem ipsum).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the "
                                    "datatrove filter's constructor (its thresholds, language); "
                                    "empty: datatrove's defaults. Checked against the class on "
                                    "the driver before ingest reads anything.")


class IngestConfig(_Strict):
    min_chars: int = Field(1, ge=1, description="Shorter texts (after normalization) are "
                           "quarantined.")
    max_chars: int = Field(20000, ge=1, description="Longer texts are quarantined, not truncated.")
    near_dup: bool = Field(True, description="Remove near-duplicates (MinHash LSH on word 5-grams) "
                           "besides exact duplicates.")
    near_dup_threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of word "
                                      "5-gram shingles above which two texts are near-duplicates.")
    near_dup_hash_tables: int = Field(8, ge=1, description="MinHash LSH hash tables (Spark ML "
                                      "MinHashLSH numHashTables): more find more near-duplicate "
                                      "pairs and cost more.")
    decontaminate: bool = Field(True, description="Remove queries that overlap an evaluation set "
                                "(n-gram overlap, Tulu 3 style; §3.1).")
    decontamination_ngram: int = Field(8, ge=1, description="Tulu 3 style n-gram overlap size.")
    decontamination_threshold: float = Field(0.5, gt=0, le=1, description="Share of a query's "
                                             "n-grams found in an eval set above which it is removed.")
    eval_sets: list[str] = Field(default_factory=lambda: ["package:eval"],
                                 description="JSONL files (or 'package:eval' for the shipped sets).")
    filters: list[DocumentFilterConfig] = Field(
        default_factory=list, description="Document quality filters run at ingest, in this order "
        "(documents only, before dedup; the first rejection wins): a filter name, or "
        "{name: ..., options: {...}}. Rejected documents go to ingest_drops with the reason "
        "'<filter>:<datatrove reason>'. Needs the 'filters' extra (datatrove, spaCy).")

    @field_validator("filters", mode="before")
    @classmethod
    def _filter_names(cls, v: Any) -> Any:
        """A bare name stands for ``{name: <name>}`` (datatrove's defaults)."""
        if isinstance(v, list):
            return [{"name": f} if isinstance(f, str) else f for f in v]
        return v


class GenericizeConfig(_Strict):
    model: Optional[ModelConfig] = Field(None, description="Model for this stage; default models.generator.")
    chunk_rows: int = Field(400, ge=1, description="Queries per committed chunk (a killed run loses at most one).")
    max_attempts: int = Field(3, ge=1, description="Runs that may try a row whose model call "
                              "failed transiently (timeout, OOM, dead engine, HTTP 429/5xx: "
                              "finelake.faults); after the last one it is an error, quarantined.")
    mode: Literal["decomposed", "direct"] = Field(
        "decomposed",
        description="'direct': the query_templatizer contract (query in, JSON with template and "
        "compatible_document_description out). 'decomposed': a small model picks spans and "
        "describes them under constrained decoding, and code assembles the template.")
    prompt_version: str = Field("genericize-v1", description="Recorded on genericizations and "
                                "templates rows; change it when the prompts change.")
    max_slots: int = Field(4, ge=1, description="Decomposed mode: most spans of a query the model "
                           "may turn into <fi> slots.")
    constrained: bool = Field(
        True, description="Send the reply's JSON schema as a decoding constraint. false: the "
        "model answers freely and the first JSON object of its reply is read (extra keys "
        "tolerated; template and compatible_document_description required in direct mode). "
        "Each row's flags say which (constrained, lenient_parse, unknown_keys:...); the stage "
        "summary shows parse_rate.")


class IndexConfig(_Strict):
    path: Optional[str] = Field(None, description="Where the FAISS index is published: a local or "
                                "mounted path, or a URI the cluster's Hadoop file system writes "
                                "(s3://, dbfs:/, abfss://, file://); default <lake>/_index.")
    exact_below: int = Field(200000, ge=1, description="Flat inner-product index below this many "
                             "templates, IVF above.")
    compress_above: Optional[int] = Field(
        1000000, ge=1, description="At or above this many templates the IVF index is compressed "
        "(index.compression); null: never. Memory per executor is in the index's meta.json.")
    compression: Literal["sq8", "pq", "opq"] = Field(
        "sq8", description="sq8: IVF + 8-bit scalar quantizer (d bytes per vector, scores within "
        "~1e-3); pq: IVF-PQ (pq_m bytes per vector, approximate scores); opq: OPQ rotation + IVF-PQ.")
    pq_m: int = Field(64, ge=1, description="PQ sub-quantizers = bytes per vector (must divide d).")
    nlist: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="IVF lists; auto: 4*sqrt(n) rounded to a power of two (FAISS's "
        "guidance of 4-16*sqrt(n): 4,096 at 1M templates, 16,384 at 18M), so a query scans about "
        "nprobe*sqrt(n)/4 vectors. Capped at train_size // 39.")
    nprobe: int = Field(32, ge=1, description="IVF lists searched per query vector (more: better "
                        "recall at the threshold, slower match).")
    train_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Vectors the IVF kinds are trained on (a sample chosen by id hash); the "
        "rest are added in batches. auto: max(131072, 39 * nlist), FAISS's minimum per list.")
    add_batch: int = Field(65536, ge=1, description="Vectors read and added per batch on the driver.")
    recall_k: int = Field(10, ge=1, description="k of the recall@k the index build measures "
                          "against exact search (recorded in meta.json).")
    recall_documents: int = Field(200, ge=0, description="Documents sampled (first by id) and "
                                  "embedded like match (K+1 pooled vectors) to measure the recall at "
                                  "the threshold; 0: a sample of the indexed vectors instead.")


class MatchConfig(_Strict):
    chunks: int = Field(5, ge=0, description="K Gaussian-pooled chunk embeddings (Appendix B).")
    sigma: float = Field(0.05, gt=0, description="Width of each Gaussian pooling kernel, as a "
                         "fraction of the document's length (Appendix B; 0.05 in the paper).")
    alpha: float = Field(1.0, ge=0, le=1, description="Blend of each chunk embedding with the "
                         "global mean: 1.0 = the chunk's own Gaussian-pooled vector (Appendix B).")
    top_k: int = Field(20, ge=1, description="FAISS neighbours per document embedding for "
                       "'finelake calibrate' (match itself range-searches at the threshold).")
    max_candidates: Optional[int] = Field(
        2000, ge=1, description="Most candidate templates kept per document (the best); documents "
        "cut are counted in the stage summary. null: no cap.")
    search_batch: int = Field(256, ge=1, description="Documents per FAISS call (all their K+1 "
                              "vectors in one range search).")
    templates_per_doc: int = Field(6, ge=1, description="Templates sampled per document (§3.2: six).")
    chunk_documents: int = Field(2048, ge=1, description="Documents per committed chunk (raised so "
                                 "each GPU task embeds a whole batch); a killed run loses at most "
                                 "the chunks in flight.")
    thresholds: dict[str, float] = Field(
        default_factory=lambda: {"BAAI/bge-m3": 0.865,
                                 "fineinstructions/instruction_template_retrieval_embedding": 0.865},
        description="Cosine threshold per embedding model id (§3.2).")
    default_threshold: float = Field(0.865, ge=-1, le=1, description="Cosine threshold of an "
                                     "embedding model not in thresholds (the paper's, §3.2).")
    seed: int = Field(0, description="Seeds the weighted template sample of every document.")
    complexity_target: Optional[dict[int, int]] = Field(
        None, description="Target complexity distribution of the sampled templates (§3.2): "
        "number of slots -> relative frequency. null: the lake's genericized real queries per "
        "number of slots. Fixed per index version (weights.json) once computed.")

    def threshold_for(self, embedding_model: str) -> float:
        """The cosine threshold for ``embedding_model``: ``thresholds[model]``, else
        ``default_threshold`` (0.865, the paper's value for its fine-tuned BGE-M3, §3.2)."""
        return float(self.thresholds.get(embedding_model, self.default_threshold))


QUALITY_RULES = ("answer_short", "answer_header_block", "answer_navigation", "answer_markup",
                 "answer_headings", "answer_repetition", "answer_not_prose",
                 "instruction_section_number", "instruction_path", "instruction_repetition")
"""The rules of :mod:`finelake.method.quality` (its ``RULES``; a test keeps the two equal)."""


class InstantiateQualityConfig(_Strict):
    """Answer and instruction quality rules applied after an instantiation parses, before the
    judge (finelake.method.quality): a pair that fails one is ``filtered`` with the rule as its
    reason and is never judged."""

    enabled: bool = Field(True, description="Apply the rules, at instantiate and in the embedded "
                          "relevance judge's quality part; false: every parsed pair goes to the "
                          "judge and the embedded judge scores relevance alone, as before the "
                          "rules (answer_position is still recorded).")
    prefer_body: bool = Field(
        True, description="Decomposed mode: the numbered sentences the instantiator picks an "
        "answer from leave out the document's leading header block (title, NAME / SYNOPSIS "
        "blocks, labels) and the headings and running heads at the edges of each sentence, so "
        "answers come from the document's substance (§1, §3.2).")
    answer_min_words: int = Field(10, ge=1, description="Shortest answer in words (Gopher's count: "
                                  "words with a character that is not punctuation); about one "
                                  "sentence of prose. Rule answer_short.")
    answer_min_prose_share: float = Field(
        0.5, ge=0, le=1, description="Least share of the answer's characters in prose sentences "
        "(C4's rules per sentence: terminal punctuation and >= 3 words): 'mostly prose'. Rule "
        "answer_not_prose.")
    skip: list[Literal[QUALITY_RULES]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Rules not applied, by name: " + ", ".join(QUALITY_RULES)
        + " (reasons read quality:<rule>: <detail>).")


class InstantiateConfig(_Strict):
    model: Optional[ModelConfig] = Field(None, description="Model for this stage; default models.generator.")
    chunk_documents: int = Field(32, ge=1, description="Documents per committed chunk (a killed run loses at most one).")
    max_attempts: int = Field(3, ge=1, description="Runs that may try a row whose model call "
                              "failed transiently (timeout, OOM, dead engine, HTTP 429/5xx: "
                              "finelake.faults); after the last one it is an error, quarantined.")
    max_answer_sentences: int = Field(4, ge=1, description="Decomposed mode: longest answer, in sentences.")
    mode: Literal["decomposed", "direct"] = Field("decomposed", description="'direct': the "
                                                  "template_instantiator contract (template and "
                                                  "document in, JSON instruction and answer out). "
                                                  "'decomposed' (small models): the model picks "
                                                  "slot fills and a sentence range of the "
                                                  "document from numbered lists under constrained "
                                                  "decoding, and code assembles the instruction "
                                                  "and the excerpt pointer.")
    prompt_version: str = Field("instantiate-v1", description="Recorded on instantiations rows; "
                                "change it when the prompts change.")
    min_excerpt_ratio: float = Field(0.8, ge=0, le=1, description="Share of the answer that must "
                                     "be excerpted from the document (§3.3: 0.8); below it the "
                                     "pair is excerpt_rejected.")
    grounding_min_run_chars: int = Field(
        20, ge=1, description="The tag-blind grounding check (instantiate and budget) counts only "
        "runs of at least this many characters copied from the document; shorter answers fail.")
    min_sentence_chars: int = Field(
        40, ge=0, description="Decomposed mode: sentence fragments with fewer non-whitespace "
        "characters (headings, option names in manuals) are joined to their neighbours.")
    max_document_chars: int = Field(6000, ge=100, description="Documents are cut to this many "
                                    "characters before they go into the prompt.")
    quality: InstantiateQualityConfig = Field(
        default_factory=InstantiateQualityConfig, description="Answer and instruction quality "
        "rules between instantiation and judge (issue 26).")
    max_document_tokens: Optional[int] = Field(
        None, ge=64, description="Cut each document to this many tokens (tokenizer.model) before "
        "it goes into the prompt, so prompt + answer fit the generator's context (n_ctx / "
        "max_model_len); null: only max_document_chars applies.")


class JudgeConfig(_Strict):
    min_score: int = Field(4, ge=1, le=5, description="Pairs the judge scores below this (1–5 "
                           "Likert) are dropped (§3.4: 4).")
    chunk_rows: int = Field(2000, ge=1, description="Pairs per committed chunk (a killed run loses at most one).")
    max_attempts: int = Field(3, ge=1, description="Runs that may try a row whose model call "
                              "failed transiently (timeout, OOM, dead engine, HTTP 429/5xx: "
                              "finelake.faults); after the last one it is an error, quarantined.")
    prompt_version: str = Field("judge-v2", description="Recorded on judgments rows; v2: the llm "
                                "judge speaks Flow Judge's own prompt and reply format.")


class BudgetConfig(_Strict):
    seed: int = Field(0, description="Seeds the hashed document order and each document's random "
                      "subset of pairs (§4.2).")
    buckets: int = Field(1, ge=1, description="Independent budget walks (§4.2), a document's by "
                         "a hash of its id (finelake.method.budget.budget_bucket); each runs on an "
                         "executor with its own carry. 1 is the single walk of the paper. Fixed "
                         "for a lake: budget refuses a value other than the one its ledger was "
                         "walked with.")
    on_ungrounded: Literal["quarantine", "fail"] = Field(
        "quarantine", description="A judged pair whose answer fails the grounding check against "
        "its own document (instantiate.min_excerpt_ratio, grounding_min_run_chars) never reaches "
        "pairs: 'quarantine' records it in quarantine (target pairs) and goes on, 'fail' stops "
        "the stage before anything is written.")


class ContinueConfig(_Strict):
    """Non-instructional continuations (arXiv 2409.00096 §3): halve documents, a teacher continues."""

    model: Optional[ModelConfig] = Field(None, description="Teacher model; default models.generator "
                                         "(backend openai serves GPT-3.5/4-class teachers).")
    max_tokens: Optional[int] = Field(None, ge=1, description="Continuation length limit; default "
                                      "the model's max_tokens.")
    seed: int = Field(0, description="Seeds the document sample and every split point.")
    split_min: float = Field(0.25, gt=0, lt=1, description="Earliest split, fraction of the document.")
    split_max: float = Field(0.75, gt=0, lt=1, description="Latest split, fraction of the document.")
    chunk_documents: int = Field(64, ge=1, description="Documents per committed chunk.")
    max_attempts: int = Field(3, ge=1, description="Runs that may try a row whose model call "
                              "failed transiently (timeout, OOM, dead engine, HTTP 429/5xx); then "
                              "it is error and quarantined.")
    prompt_version: str = Field("continue-v1", description="Recorded on continuations rows; change "
                                "it when the prompt changes.")
    truncation: Literal["trim", "drop"] = Field(
        "trim", description="A continuation cut by the token limit mid-sentence: 'trim' it to its "
        "last sentence end (dropped when it has none), or 'drop' it.")
    min_words: int = Field(8, ge=0, description="Shorter continuations are dropped (too_short).")
    repeat_ngram: int = Field(3, ge=1, description="Words per n-gram of the repetition check.")
    max_repeat_share: float = Field(0.3, ge=0, le=1, description="Largest share of repeated word "
                                    "n-grams before a continuation is dropped (repetitive).")
    max_prompt_overlap: float = Field(0.5, ge=0, le=1, description="Largest share of word 6-grams "
                                      "copied from the prompt before it is dropped (echo).")
    instructional_threshold: float = Field(0.5, gt=0, lt=1, description="Instructional-content "
                                           "score at or above which a row is flagged instructional.")

    @field_validator("split_max")
    @classmethod
    def _split_order(cls, v: float, info) -> float:
        if v < info.data.get("split_min", 0.0):
            raise ValueError(f"split_max {v} is below split_min {info.data['split_min']}")
        return v


class ModelsConfig(_Strict):
    generator: ModelConfig = Field(..., description="Generator of genericize, instantiate and "
                                   "continue (unless a stage names its own model).")
    embedder: ModelConfig = Field(..., description="Embedder of index and match (template "
                                  "descriptions, Gaussian-pooled documents).")
    judge: ModelConfig = Field(..., description="Judge of judge: relevance (embedding cosine "
                               "mapped to 1–5) or llm (Flow Judge format).")


class RunConfig(_Strict):
    max_queries: Optional[int] = Field(None, ge=1, description="Genericize at most the first N "
                                       "queries by id (--max-queries overrides); null: all.")
    max_documents: Optional[int] = Field(None, ge=1, description="Match, instantiate and continue "
                                         "at most the first N documents by id (--max-documents "
                                         "overrides); null: all.")


class _Gates(_Strict):
    """Gates of one stage's canary: ``max_<metric>`` / ``min_<metric>`` limits on shares of the
    canary's rows (:mod:`finelake.method.canary` defines the metrics)."""


class GenericizeGates(_Gates):
    max_invalid_share: float = Field(0.5, ge=0, le=1, description="Most queries whose reply did "
                                     "not give a valid template (status invalid).")
    max_unknown_keys_share: float = Field(0.5, ge=0, le=1, description="Most replies with JSON "
                                          "keys finelake does not read (flag unknown_keys).")
    max_error_share: float = Field(0.5, ge=0, le=1, description="Most rows whose model call "
                                   "failed (status error or retry).")


class InstantiateGates(_Gates):
    max_invalid_share: float = Field(0.5, ge=0, le=1, description="Most pairs whose reply did not "
                                     "parse or broke a rule (status invalid).")
    max_null_share: float = Field(0.8, ge=0, le=1, description="Most pairs the instantiator "
                                  "called incompatible (status null).")
    max_unfilled_slot_share: float = Field(0.3, ge=0, le=1, description="Most instructions with a "
                                           "<fi> slot left unfilled.")
    max_excerpt_markup_share: float = Field(0.2, ge=0, le=1, description="Most instructions "
                                            "carrying excerpt markup (<excerpt>, <...>).")
    max_unknown_keys_share: float = Field(0.5, ge=0, le=1, description="Most replies with JSON "
                                          "keys finelake does not read (flag unknown_keys).")
    min_grounded_share: float = Field(0.3, ge=0, le=1, description="Fewest answers that pass the "
                                      "excerpt check (§3.3), among pairs with an answer.")
    max_error_share: float = Field(0.5, ge=0, le=1, description="Most rows whose model call "
                                   "failed (status error or retry).")


class JudgeGates(_Gates):
    min_pass_share: float = Field(0.02, ge=0, le=1, description="Fewest scored pairs the judge "
                                  "keeps (score >= judge.min_score, §3.4).")
    max_error_share: float = Field(0.5, ge=0, le=1, description="Most pairs without a score "
                                   "(no valid score in the reply, or a failed call).")


class QualityConfig(_Strict):
    """The canary: each model stage with gates first runs ``canary_rows`` rows and stops the run
    when they fail a gate (``finelake <stage> --no-canary`` overrides)."""

    canary: bool = Field(False, description="Run a canary chunk first in genericize, instantiate "
                         "and judge (on by default in the cluster profiles).")
    canary_rows: int = Field(64, ge=1, description="Rows of the canary chunk (chosen by a stable "
                             "hash of the stage's chunk key, so every run picks the same ones).")
    genericize: GenericizeGates = Field(default_factory=GenericizeGates, description="Gates of "
                                        "genericize's canary.")
    instantiate: InstantiateGates = Field(default_factory=InstantiateGates, description="Gates of "
                                          "instantiate's canary.")
    judge: JudgeGates = Field(default_factory=JudgeGates, description="Gates of judge's canary.")


# ----------------------------------------------------------------------------- train / evaluate


class TrackingConfig(_Strict):
    """Where training and evaluation runs, metrics and models are recorded (MLflow)."""

    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI; null: "
                                        "sqlite:///<lake>/_mlflow/mlflow.db (works offline). "
                                        "Databricks: 'databricks'.")
    registry_uri: Optional[str] = Field(None, description="Model registry URI; null: the tracking "
                                        "URI. Databricks with Unity Catalog: 'databricks-uc'.")
    artifact_location: Optional[str] = Field(None, description="Artifact root of a new experiment; "
                                             "null: <lake>/_mlflow/artifacts with the default local "
                                             "store, the server's default otherwise.")
    experiment: str = Field("finelake", description="Experiment name (Databricks: a workspace path, "
                            "e.g. /Shared/finelake).")
    registered_model_prefix: str = Field("finelake", description="Models register as "
                                         "'<prefix>_<table>_<method>'; Unity Catalog needs "
                                         "'catalog.schema.' in front (main.finelake.finelake).")
    register_model: bool = Field(True, description="Register the final model in the model registry.")


class LoraSettings(_Strict):
    """PEFT LoRA adapter settings (non-instructional fine-tuning §4; limitations paper §3)."""

    r: int = Field(16, ge=1, description="Rank of the low-rank update.")
    alpha: int = Field(32, ge=1, description="Scale numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Linear layers that get adapters (Llama names; 'all-linear' for every one).")
    merge: bool = Field(True, description="Merge the adapters into the base weights before the "
                        "model is saved and logged (the non-instructional paper merges them).")


class ScratchModelConfig(_Strict):
    """A Llama-style model trained from random weights with the training tokenizer (§4.2 trains
    1.8B-parameter models with a Llama-3 tokenizer; the local default is a few million)."""

    hidden_size: int = Field(256, ge=8, description="Width of the model (embedding and hidden "
                             "size).")
    intermediate_size: int = Field(1024, ge=8, description="Width of each MLP block.")
    num_layers: int = Field(4, ge=1, description="Transformer layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    num_kv_heads: int = Field(4, ge=1, description="Grouped-query attention: key/value heads.")
    rope_theta: float = Field(10000.0, gt=0, description="Base of the rotary position embedding.")
    tie_word_embeddings: bool = Field(True, description="Share the input embedding and output "
                                      "projection weights.")
    learning_rate: Optional[float] = Field(None, gt=0, description="Overrides train.learning_rate "
                                           "for scratch runs (5e-5 is a fine-tuning rate; small "
                                           "models from scratch want ~1e-3).")


class TrainConfig(_Strict):
    """``finelake train``: TRL SFTTrainer on a Delta table (FineInstructions §4.2, non-instructional
    fine-tuning §4, limitations of instruction tuning §3: 3 epochs, lr 5e-5, batch 32)."""

    base_model: str = Field("embedded:smollm2-135m-instruct", description="Model fine-tuned by "
                            "'lora' and 'full' (path, hub id or embedded:<name>).")
    method: Literal["lora", "full", "scratch"] = Field("lora", description="LoRA adapters, full "
                                                       "fine-tuning, or pre-training from scratch.")
    table: str = Field("pairs", description="Training table: pairs (instruction/answer), "
                       "continuations (prompt/continuation), or any table with a text column.")
    loss_on: Literal["answer", "all"] = Field("answer", description="Loss on the answer tokens only "
                                              "or on every token (text-only tables: always all).")
    epochs: float = Field(3.0, gt=0, description="Passes over the training set (max_steps, when "
                          "set, stops earlier).")
    learning_rate: float = Field(5e-5, gt=0, description="Peak AdamW learning rate (after warmup).")
    batch_size: int = Field(32, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer "
                                             "step (effective batch = batch_size x this x "
                                             "devices).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after N optimizer steps "
                                     "(null: run all epochs).")
    max_seq_len: int = Field(2048, ge=8, description="Examples are truncated to this many tokens.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps with linear warmup.")
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "cosine", description="Decay after warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seeds initialization, data order and dropout.")
    max_rows: Optional[int] = Field(None, ge=1, description="Use at most N rows (in key order).")
    token_budget: Optional[int] = Field(None, ge=1, description="Truncate the training set to this "
                                        "many tokens (whole examples, in key order).")
    packing: bool = Field(False, description="Pack examples into max_seq_len blocks (TRL BFD).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward "
                                         "pass: less memory, slower steps.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU.")
    logging_steps: int = Field(5, ge=1, description="Optimizer steps between logged loss / "
                               "learning-rate points (MLflow).")
    torch_threads: Optional[int] = Field(None, ge=1, description="torch.set_num_threads on CPU.")
    output_dir: Optional[str] = Field(None, description="Checkpoints and the final model; null: "
                                      "<lake>/_models/<run_id>.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter settings "
                               "(method lora).")
    scratch: ScratchModelConfig = Field(default_factory=ScratchModelConfig, description="The model "
                                        "trained from random weights (method scratch).")
    mlflow: TrackingConfig = Field(default_factory=TrackingConfig, description="Where runs, "
                                   "metrics and models are recorded (MLflow).")


class EvaluateConfig(_Strict):
    """``finelake evaluate``: IFEval, AlpacaEval-style win rates, multi-aspect scores, token shift."""

    benchmarks: list[Literal["ifeval", "alpacaeval", "aspects", "mt_bench", "token_shift"]] = Field(
        default_factory=lambda: ["ifeval", "alpacaeval", "aspects", "token_shift"],
        description="Benchmarks finelake evaluate runs (--benchmark overrides): ifeval, alpacaeval "
        "(win rates), aspects (1–5 aspect scores), mt_bench (first turn, opt-in), token_shift.")
    limit: Optional[int] = Field(None, ge=1, description="First N items of each set (null: all).")
    max_new_tokens: int = Field(512, ge=1, description="Greedy generation limit per response.")
    batch_size: int = Field(8, ge=1, description="Prompts generated together.")
    prompt_format: Literal["auto", "chat", "instruction"] = Field(
        "auto", description="auto: the model's training template when finelake trained it, else its "
        "chat template, else 'Instruction: {prompt}\\n\\nAnswer:'.")
    judge: Optional[ModelConfig] = Field(None, description="Judge for pairwise and aspect scores "
                                         "(any generation backend); null: models.generator.")
    judge_both_orders: bool = Field(True, description="Judge each pair in both orders (position bias).")
    base_model: Optional[str] = Field(None, description="Base model for token_shift; null: "
                                      "train.base_model.")
    shift_top_k: int = Field(20, ge=1, description="Most frequent shifted tokens reported.")
    torch_threads: Optional[int] = Field(None, ge=1, description="torch.set_num_threads on CPU.")


class CompareConfig(_Strict):
    """``finelake compare``: small-scale train + evaluate grid at an equal token count (§4.1)."""

    runs: list[str] = Field(default_factory=lambda: ["pairs:lora", "documents:lora", "pairs:full"],
                            description="'table:method' entries trained and evaluated.")
    epochs: float = Field(1.0, gt=0, description="Epochs over each equal-token training set.")
    token_budget: Optional[int] = Field(None, ge=1, description="Cap on the equal token budget.")
    include_base: bool = Field(True, description="Also evaluate the untrained base model.")


class MaintenanceConfig(_Strict):
    """``finelake optimize`` and Delta commits: VACUUM retention, pins, conflict retries."""

    min_retention_hours: float = Field(168.0, ge=0, description="VACUUM never keeps less history "
                                       "than this (168 h = 7 days, Delta's default); pinned "
                                       "versions can only make it longer.")
    pinned_versions: dict[str, list[int]] = Field(default_factory=dict, description="Table -> Delta "
                                                  "versions to keep readable besides those training "
                                                  "runs recorded in MLflow.")
    mlflow_pins: bool = Field(True, description="Read the versions training runs pinned from MLflow "
                              "(tags finelake.table_path / finelake.table_version).")
    commit_attempts: int = Field(8, ge=1, description="Tries of a merge whose Delta commit conflicts "
                                 "with another writer's before it fails (rerunning is safe).")
    commit_backoff_s: float = Field(0.5, gt=0, description="First wait between tries, seconds; "
                                    "doubles each try, with full jitter.")
    commit_backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between tries, seconds.")


class FinelakeConfig(_Strict):
    profile: str = Field("local", description="The profile's name, recorded with each run's "
                         "statistics.")
    lake: str = Field("./lake", description="Root folder (or URI) of the lake; tables live at <lake>/<name>.")
    spark: SparkConfig = Field(default_factory=SparkConfig, description="The Spark session: "
                               "master, Delta engine, extra spark.* settings.")
    catalog: CatalogConfig = Field(default_factory=CatalogConfig, description="Where the tables "
                                   "are registered for SQL (Unity Catalog / Glue / the session "
                                   "catalog).")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="The training "
                                       "tokenizer every token count uses (ingest, budget).")
    models: ModelsConfig = Field(..., description="The default generator, embedder and judge; a "
                                 "stage's own model: key overrides them.")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="finelake ingest: "
                                 "limits, dedup, decontamination, document quality filters.")
    genericize: GenericizeConfig = Field(default_factory=GenericizeConfig, description="finelake "
                                         "genericize: queries into <fi> templates (§3.1).")
    index: IndexConfig = Field(default_factory=IndexConfig, description="finelake index: the FAISS "
                               "index of template descriptions (§3.2).")
    match: MatchConfig = Field(default_factory=MatchConfig, description="finelake match: "
                               "Gaussian-pooled document embeddings, threshold, weighted template "
                               "sample (§3.2, Appendix B).")
    instantiate: InstantiateConfig = Field(default_factory=InstantiateConfig, description=(
        "finelake instantiate: templates filled from their documents, answers by excerpt (§3.3)."))
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="finelake judge: the 1–5 "
                               "judge and its threshold (§3.4).")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="finelake budget: the "
                                 "per-document token budget with rollover (§4.2).")
    continue_: ContinueConfig = Field(default_factory=ContinueConfig, alias="continue",
                                      description="The 'continue:' section (a Python keyword).")
    run: RunConfig = Field(default_factory=RunConfig, description="Default limits of a run (the "
                           "--max-queries / --max-documents options override them).")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="The canary: a first "
                                   "chunk of each model stage checked against quality gates.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="finelake train: TRL SFT "
                               "on a Delta table, tracked in MLflow.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="finelake "
                                     "evaluate: benchmarks, judge, token shift.")
    compare: CompareConfig = Field(default_factory=CompareConfig, description="finelake compare: "
                                   "small train + evaluate grid at equal tokens.")
    maintenance: MaintenanceConfig = Field(default_factory=MaintenanceConfig, description=(
        "finelake optimize (VACUUM retention, pins) and Delta commit retries."))
    load_test: bool = Field(False, description="True only in profiles for plumbing benchmarks and "
                            "fault tests (conf/load-test.yaml): allows the synthetic 'load' model "
                            "backends, whose outputs must never be trained on.")
    source_file: Optional[str] = Field(None, description="Set by the loader; not a user setting.")

    @field_validator("lake")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.expanduser(v)


# ----------------------------------------------------------------------------- loading


def catalog_location_problem(cfg: FinelakeConfig) -> Optional[str]:
    """Why Unity Catalog would refuse this profile's tables, or None.

    Every stage registers its tables as ``CREATE TABLE ... LOCATION '<lake>/<name>'``; Unity
    Catalog does not allow a table's location inside a Volume (``/Volumes/...``,
    ``dbfs:/Volumes/...``), so with ``catalog.catalog`` set the lake must be an external location
    (``s3://``, ``abfss://``, ``gs://``) or a path outside Volumes. A Volume is the place for the
    FAISS index (``index.path``), inputs and reports.
    """
    lake = cfg.lake[len("dbfs:"):] if cfg.lake.startswith("dbfs:") else cfg.lake
    if cfg.catalog.catalog and lake.startswith("/Volumes/"):
        return (f"lake: {cfg.lake} is inside a Unity Catalog Volume, where Unity Catalog does not "
                f"allow tables (catalog.catalog is {cfg.catalog.catalog!r}); put the lake at an "
                "external location (s3://..., abfss://..., gs://...) and keep index.path on the "
                "Volume")
    return None


def profile_path(profile: str | os.PathLike) -> Path:
    """Resolve a profile to a file.

    Args:
        profile: a path to a YAML file, or the name of a packaged profile (``local``,
            ``databricks``, ``emr``).

    Raises:
        ConfigError: neither a readable file nor a packaged profile.
    """
    p = Path(profile)
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
    packaged = resources.files("finelake.conf").joinpath(name)
    if packaged.is_file():
        return Path(str(packaged))
    raise ConfigError(f"config profile not found: {profile!s} (a YAML path, or one of "
                      f"{', '.join(available_profiles())})")


def available_profiles() -> list[str]:
    """Names of the profiles that ship with finelake (shared bases, ``_*.yaml``, left out)."""
    return sorted(f.name[:-5] for f in resources.files("finelake.conf").iterdir()
                  if f.name.endswith(".yaml") and not f.name.startswith("_"))


def deep_merge(base: dict, over: dict) -> dict:
    """Merge ``over`` onto ``base`` and return a new dict (inputs are not modified).

    Mappings present on both sides merge recursively; any other value in ``over`` (scalar, list,
    null) replaces the one in ``base``. Keys only in ``base`` are kept.
    """
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _parent_path(child: Path, ref: Any) -> Path:
    """The file that ``extends: ref`` in ``child`` names (see the module docstring)."""
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"{child}: extends: must be a profile name or a relative path, "
                          f"not {ref!r}")
    ref = ref.strip()
    local = child.parent / ref
    for cand in (local, local.with_name(local.name + ".yaml")):
        if cand.is_file():
            return cand
    try:
        return profile_path(ref)
    except ConfigError:
        raise ConfigError(f"{child}: extends: {ref!r} is neither a file next to it nor a packaged "
                          f"profile ({', '.join(available_profiles())})") from None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of keys to values")
    return data


def read_profile(path: Path, _chain: tuple[Path, ...] = ()) -> tuple[dict, list[Path]]:
    """Read a profile file with its ``extends`` chain resolved (not yet validated).

    Args:
        path: the profile's YAML file.

    Returns:
        ``(data, files)``: the merged mapping (without ``extends``) and the files read, the
        given one first, then its parent, grandparent...

    Raises:
        ConfigError: a file is not YAML or not a mapping, ``extends`` names no file, or the chain
            comes back to a file already in it (the message lists the cycle).
    """
    real = path.resolve()
    if real in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, real))
        raise ConfigError(f"{path}: extends: cycle {cycle}")
    data = _read_yaml(path)
    if "extends" not in data:
        return data, [path]
    ref = data.pop("extends")
    parent = _parent_path(path, ref)
    base, files = read_profile(parent, (*_chain, real))
    return deep_merge(base, data), [path, *files]


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], value); the value is read as YAML.

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = [k for k in key.strip().split(".") if k]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def _apply(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for k in parts[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[parts[-1]] = value


def load_config(profile: str | os.PathLike = "local", overrides: Optional[list[str]] = None,
                **fields: Any) -> FinelakeConfig:
    """Load and validate a profile: its keys and types (pydantic) and the lake's location.

    The commands and jobs load through :func:`finelake.validate.load_checked`, which also checks
    every model's backend name and options on the driver (they live above this module: the
    backends are code of :mod:`finelake.models`), so a misspelled option fails there, never on an
    executor.

    Args:
        profile: YAML path or packaged profile name.
        overrides: dotted ``key=value`` strings applied after the file.
        **fields: top-level values applied last when not None (e.g. ``lake="/tmp/lake"``).

    Returns:
        The validated :class:`FinelakeConfig`.

    The profile's ``extends`` chain is resolved first (:func:`read_profile`).

    Raises:
        ConfigError: the file is missing or not YAML, ``extends`` is broken or cyclic, or a key
            is unknown or mistyped; the message names the key and the file that sets it.
    """
    path = profile_path(profile)
    data, files = read_profile(path)
    data = copy.deepcopy(data)
    overridden = set()
    for item in overrides or []:
        parts, value = parse_override(item)
        _apply(data, parts, value)
        overridden.add(".".join(parts))
    for k, v in fields.items():
        if v is not None:
            _apply(data, k.split("."), v)
    data["source_file"] = str(path)
    where = str(path) if len(files) == 1 else \
        f"{path} (extends {' -> '.join(str(f) for f in files[1:])})"
    try:
        cfg = FinelakeConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            origin = " (from --set)" if key in overridden else _origin(files, err["loc"])
            problems.append(f"{key}{origin}: {msg}")
        raise ConfigError(f"{where}: invalid configuration: " + "; ".join(problems)) from None
    problem = catalog_location_problem(cfg)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return cfg


def origin_of(cfg: FinelakeConfig) -> str:
    """The profile file (and its ``extends`` chain) a loaded config came from, for messages."""
    return str(cfg.source_file)


def hub_model_ids(cfg: FinelakeConfig) -> list[str]:
    """Model ids of the profile that would be fetched from the Hugging Face hub: every model,
    tokenizer and training/evaluation base model that is neither ``embedded:<name>`` nor an
    existing local path (models served by the ``openai`` backend are names on a server, not hub
    ids, and are left out). Empty for the embedded profiles.

    The CLI sets ``HF_HUB_OFFLINE=1`` on the driver only when this is empty (no request to the hub
    can help then, and an offline hub fails fast); a profile whose executors are separate
    processes of a cluster sets ``spark.executorEnv.HF_HUB_OFFLINE`` itself
    (``conf/cluster-sim.yaml``). Profiles that name hub ids (databricks, emr) are left online on
    the driver and the executors: their tokenizer and models are downloaded (or read from a
    pre-filled cache when the cluster sets ``HF_HUB_OFFLINE`` in its own spec).
    """
    ids = [cfg.tokenizer.model, cfg.train.base_model]
    if cfg.evaluate.base_model:
        ids.append(cfg.evaluate.base_model)
    for mc in (cfg.models.generator, cfg.models.embedder, cfg.models.judge, cfg.genericize.model,
               cfg.instantiate.model, cfg.continue_.model, cfg.evaluate.judge):
        synthetic = mc is not None and "load" in (mc.backend, mc.options.get("inner_backend"),
                                                  mc.options.get("embedder_backend"))
        if mc is not None and mc.backend != "openai" and not synthetic:
            ids.append(mc.model)
    out = []
    for m in ids:
        if m.startswith("embedded:") or os.path.exists(os.path.expanduser(m)) or m in out:
            continue
        out.append(m)
    return out


def _origin(files: list[Path], loc: tuple) -> str:
    """`` (in FILE)`` for the first file of an extends chain (child first) that sets ``loc``;
    empty for a single-file profile or a key no file sets."""
    if len(files) < 2:
        return ""
    for f in files:
        node: Any = _read_yaml(f)
        for part in loc:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return f" (in {f})"
    return ""
