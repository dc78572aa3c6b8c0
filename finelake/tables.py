"""Every Delta table finelake writes, declared once: name, schema, merge key, partitioning.

Jobs never spell a table's columns themselves: they build rows for a :class:`TableDef` and hand
them to :class:`finelake.lake.Lake`, which creates, merges into and registers the table.
Every table carries ``run_id`` (the run that first wrote the row) for lineage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class TableDef:
    """A Delta table's contract.

    Attributes:
        name: table name, also the folder under the lake root and the SQL name ``<db>.<name>``.
        schema: Arrow schema of the rows (nullable unless stated).
        key: columns that identify a row; writes are merges on them, so reruns never duplicate.
        partition_by: partition columns (none for the small local tables).
        description: one line for ``finelake tables`` and the table's Delta description.
    """

    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    description: str
    partition_by: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        missing = [k for k in (*self.key, *self.partition_by) if k not in self.schema.names]
        if missing:
            raise ValueError(f"table {self.name}: key/partition columns {missing} not in schema")

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def empty(self) -> pa.Table:
        return self.schema.empty_table()


S, I64, F64, I32, B = pa.string(), pa.int64(), pa.float64(), pa.int32(), pa.bool_()
LINEAGE = [("run_id", S)]


def _schema(*cols: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in cols])


QUERIES = TableDef(
    "queries",
    _schema(("query_id", S), ("query", S), ("source", S), ("num_tokens", I64),
            ("metadata", S), *LINEAGE),
    key=("query_id",),
    description="Real user queries after normalization, dedup and decontamination.",
)

DOCUMENTS = TableDef(
    "documents",
    _schema(("doc_id", S), ("text", S), ("source", S), ("num_tokens", I64), ("metadata", S),
            *LINEAGE),
    key=("doc_id",),
    description="Pre-training documents after normalization and dedup.",
)

QUARANTINE = TableDef(
    "quarantine",
    _schema(("quarantine_id", S), ("target", S), ("source", S), ("location", S), ("reason", S),
            ("raw", S), ("row_key", S), ("attempts", I32), *LINEAGE),
    key=("quarantine_id",),
    description="Input rows that were not ingested, judged pairs the budget refused as not "
    "grounded in their document (target pairs), and model-stage rows that failed for good "
    "(target genericizations / instantiations / judgments, source the stage, row_key the "
    "table's key, attempts the runs that tried it), with where they came from and why.",
)

INGEST_DROPS = TableDef(
    "ingest_drops",
    _schema(("drop_id", S), ("target", S), ("source", S), ("location", S), ("reason", S),
            ("kept_id", S), *LINEAGE),
    key=("drop_id",),
    description="Well-formed input rows removed as duplicates, near-duplicates or eval contamination, "
                "or documents a quality filter rejected (reason '<filter>:<datatrove reason>').",
)

GENERICIZATIONS = TableDef(
    "genericizations",
    _schema(("query_id", S), ("status", S), ("template_id", S), ("template", S),
            ("compatible_document_description", S), ("num_slots", I32), ("reason", S),
            ("raw_output", S), ("model_id", S), ("prompt_version", S), ("attempts", I32),
            ("flags", pa.list_(S)), *LINEAGE),
    key=("query_id",),
    description="One row per query: the template it gave (status 'ok') or why it gave none "
                "('retry': a transient failure the next run tries again; attempts: runs that "
                "tried it). flags: signals of the model's reply (constrained, lenient_parse, "
                "unknown_keys:<keys>; finelake.method.replies); null without a reply.",
)

TEMPLATES = TableDef(
    "templates",
    _schema(("template_id", S), ("template", S), ("compatible_document_description", S),
            ("num_slots", I32), ("source_query_ids", pa.list_(S)), ("source_count", I64),
            ("model_id", S), ("prompt_version", S), *LINEAGE),
    key=("template_id",),
    description="Valid instruction templates with <fi> slots, merged across identical outputs.",
)

MATCHES = TableDef(
    "matches",
    _schema(("doc_id", S), ("template_id", S), ("chunk_index", I32), ("score", F64),
            ("num_slots", I32), ("sample_rank", I32), ("embedding_model", S), ("index_version", S),
            *LINEAGE),
    key=("doc_id", "template_id"),
    description="Templates sampled for each document from candidates above the threshold (§3.2).",
)

MATCH_LOG = TableDef(
    "match_log",
    _schema(("doc_id", S), ("candidates", I32), ("sampled", I32), ("threshold", F64),
            ("embedding_model", S), ("index_version", S), ("cut", B), ("status", S), ("reason", S),
            ("attempts", I32), *LINEAGE),
    key=("doc_id",),
    description="One row per processed document: candidates above the threshold, templates "
                "sampled, cut (the candidate list was capped at match.max_candidates), status "
                "(ok; null on rows written before statuses) and attempts.",
)

MATCH_OUTPUT = TableDef(
    "match_output",
    pa.schema([*MATCH_LOG.schema,
               pa.field("picked", pa.list_(pa.struct([
                   ("template_id", S), ("chunk_index", I32), ("score", F64), ("num_slots", I32),
                   ("sample_rank", I32)])))]),
    key=("doc_id",),
    description="Not a lake table: what match's executors return per document, its match_log row "
                "with the templates it sampled (picked), committed as matches and match_log.",
)

INSTANTIATIONS = TableDef(
    "instantiations",
    _schema(("pair_key", S), ("doc_id", S), ("template_id", S), ("status", S), ("instruction", S),
            ("answer", S), ("excerpt_ratio", F64), ("reason", S), ("raw_output", S),
            ("model_id", S), ("prompt_version", S), ("attempts", I32), ("flags", pa.list_(S)),
            ("answer_position", F64),
            *LINEAGE),
    key=("pair_key",),
    description="One row per match: status ok, null (incompatible), excerpt_rejected, filtered "
                "(failed a quality rule: reason quality:<rule>: ...; never judged), invalid, "
                "error, or retry (a transient failure the next run tries again); attempts: runs "
                "that tried it; flags: signals of the model's reply (constrained, lenient_parse, "
                "unknown_keys:<keys>; finelake.method.replies), null without a reply; "
                "answer_position: where the answer starts in its document, as a "
                "fraction of the document's characters (§3.2).",
)

JUDGMENTS = TableDef(
    "judgments",
    _schema(("pair_key", S), ("doc_id", S), ("template_id", S), ("judge_score", I32),
            ("judge_reason", S), ("kept", B), ("judge_model", S), ("prompt_version", S),
            ("status", S), ("attempts", I32), ("judge_parts", S), *LINEAGE),
    key=("pair_key",),
    description="1-5 judge score and reason for every instantiated pair; kept = score >= min. "
                "judge_parts: the embedded (relevance) judge's parts as JSON (relevance, answer "
                "and instruction quality, how they combine); null for an LLM judge. "
                "status: ok (scored), error (no score: the reason says why; quarantined) or "
                "retry (a transient failure the next run tries again; null on rows written "
                "before statuses existed); attempts: runs that tried it.",
)

PAIRS = TableDef(
    "pairs",
    _schema(("pair_id", S), ("doc_id", S), ("template_id", S), ("instruction", S), ("answer", S),
            ("text", S), ("excerpt_ratio", F64), ("judge_score", I32), ("num_tokens", I64),
            ("budget_order", I64), ("generator_model", S), ("judge_model", S), *LINEAGE),
    key=("pair_id",),
    description="Kept pairs formatted 'Instruction: ...\\n\\nAnswer: ...' within the token budget.",
)

BUDGET_LEDGER = TableDef(
    "budget_ledger",
    _schema(("doc_id", S), ("budget_order", I64), ("doc_tokens", I64), ("carry_in", I64),
            ("used_tokens", I64), ("carry_out", I64), ("candidates", I32), ("kept", I32),
            ("dropped_over_budget", I32), ("bucket", I32), ("buckets", I32),
            ("kept_pair_ids", pa.list_(S)), *LINEAGE),
    key=("doc_id",),
    description="Per-document token budget accounting with rollover (§4.2): the walk (bucket of "
                "buckets, budget_order within it) and the ids of the pairs it kept, from which "
                "pairs is derived.",
)

CONTINUATIONS = TableDef(
    "continuations",
    _schema(("doc_id", S), ("status", S), ("reason", S), ("prompt", S), ("continuation", S),
            ("original_second_half", S), ("split_char", I64), ("split_fraction", F64),
            ("split_unit", S), ("doc_chars", I64), ("raw_output", S), ("finish_reason", S),
            ("prompt_tokens", I64), ("completion_tokens", I64), ("instructional_score", F64),
            ("document_instructional_score", F64), ("prompt_instructional_score", F64),
            ("continuation_instructional_score", F64),
            ("instructional", B), ("flags", pa.list_(S)), ("model_id", S), ("prompt_version", S),
            ("seed", I64), ("attempts", I32), *LINEAGE),
    key=("doc_id",),
    description="Non-instructional data: a document's first half, a teacher's continuation (status "
                "ok, dropped with a reason, error, or retry: a transient failure the next run "
                "tries again; attempts: runs that tried it) and instructional-content flags.",
)

ALL_TABLES: dict[str, TableDef] = {
    t.name: t
    for t in (QUERIES, DOCUMENTS, QUARANTINE, INGEST_DROPS, GENERICIZATIONS, TEMPLATES, MATCHES,
              MATCH_LOG, INSTANTIATIONS, JUDGMENTS, PAIRS, BUDGET_LEDGER, CONTINUATIONS)
}

# ----------------------------------------------------------------------------- evaluation

EVAL_SETS = TableDef(
    "eval_sets",
    _schema(("benchmark", S), ("item_id", S), ("prompt", S), ("instruction_id_list", pa.list_(S)),
            ("kwargs", S), ("reference", S), ("reference_generator", S), ("category", S),
            ("turns", pa.list_(S)), ("source_file", S), *LINEAGE),
    key=("benchmark", "item_id"),
    description="Evaluation items (ifeval, alpacaeval with GPT-4-turbo references, mt_bench) from "
                "the shipped files; kwargs is JSON.",
)

EVALUATIONS = TableDef(
    "evaluations",
    _schema(("model", S), ("benchmark", S), ("metric", S), ("value", F64), ("n", I64),
            ("eval_version", I64), ("model_uri", S), ("train_run", S), ("mlflow_run_id", S),
            ("judge", S), ("prompt_format", S), ("created_at", S), *LINEAGE),
    key=("run_id", "model", "benchmark", "metric"),
    description="One metric of one model on one benchmark per evaluation run (eval_version: "
                "the eval_sets Delta version used).",
)

ALL_TABLES.update({t.name: t for t in (EVAL_SETS, EVALUATIONS)})


def table(name: str) -> TableDef:
    """Look up a declared table.

    Raises:
        KeyError: with the list of known tables.
    """
    try:
        return ALL_TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(ALL_TABLES)}") from None
