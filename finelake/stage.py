"""A stage as a declared thing: what it reads and writes, its key, resources, gates and code.

finelake's pipeline is a list of stages (:data:`finelake.jobs.pipeline.PIPELINE`) that the command
line, ``finelake run``, the retry gates, the Databricks bundle and ``finelake emr-steps`` all read,
in the spirit of NeMo Curator's ``ProcessingStage`` and datatrove's ``PipelineStep``. There are two
kinds, both frozen dataclasses:

* :class:`Stage` (ingest, index, budget, report): a driver function over the lake.
* :class:`ModelStage` (genericize, match, instantiate, judge, continue): a model runs on the
  executors over the rows of one table, one row per key. What differs between model stages is
  declared here (which rows are in scope, how a chunk's inputs are read, the executor row
  function); :func:`finelake.jobs.runner.run_model_stage` writes what they share once: pending
  rows, the resource plan, the canary, the chunk loop with its commits, attempts, quarantine and
  the retry count.

Adding a stage is one entry in ``PIPELINE`` plus its row function (README, *Layout*).

Spark is the executor: there is no registry and no metaclass; a stage is data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from finelake.resources import MODEL_STAGE, Resources
from finelake.tables import TableDef

if TYPE_CHECKING:  # pragma: no cover
    from finelake.config import FinelakeConfig, ModelConfig
    from finelake.runtime import StageContext, StageStats

CPU_STAGE = Resources()
"""What a stage without a model declares: default scheduling, every core."""


@dataclass(frozen=True)
class Gate:
    """A stage waits for another to settle: no row of ``table`` (written by model stage
    ``stage``) may be left with status ``retry`` (:mod:`finelake.faults`) when it starts."""

    stage: str
    table: TableDef


@dataclass(frozen=True)
class Limits:
    """What one invocation of a stage is asked to do (command-line options, job parameters).

    Attributes:
        max_queries: genericize at most the first N queries by id (None: ``run.max_queries``).
        max_documents: match, instantiate and continue at most the first N documents by id
            (None: ``run.max_documents``).
        force: start even though a gate holds (rows of an upstream stage left to retry).
        canary: run the canary chunk first (None: the profile's ``quality.canary``).
    """

    max_queries: Optional[int] = None
    max_documents: Optional[int] = None
    force: bool = False
    canary: Optional[bool] = None


@dataclass(frozen=True)
class Stage:
    """A stage that runs on the driver (it may start Spark jobs, but loads no model itself).

    Attributes:
        name: the command name (``finelake <name>``) and the task key of the deployables.
        help: one line for ``--help``, the docs and the bundle's task description.
        reads / writes: the tables it reads and writes (the lineage the docs and tests read).
        run: ``run(ctx, limits, **options) -> StageStats`` (or a list of them: ingest reports one
            per input), the driver scope; ``options`` are the stage's own command-line options.
        resources: what one task needs (:class:`finelake.resources.Resources`); decides whether the
            deployables put the stage on GPU nodes.
        gates: the :class:`Gate` s it waits for: model stages whose ``retry`` rows must be settled
            before this stage starts (:func:`finelake.jobs.gates.check_gates`); ``--force``
            overrides.
        options: the command-line options the stage takes: ``"max_queries"``, ``"max_documents"``
            (limits), ``"inputs"`` (ingest's inputs and field names), ``"out"`` (report).
        in_run: part of ``finelake run`` and of the scheduled pipeline.
    """

    name: str
    help: str
    reads: tuple[TableDef, ...]
    writes: tuple[TableDef, ...]
    run: Callable[..., Any]
    resources: Resources = CPU_STAGE
    gates: tuple[Gate, ...] = ()
    options: tuple[str, ...] = ()
    in_run: bool = True

    @property
    def uses_model(self) -> bool:
        """Whether a model runs on the executors (GPU nodes on a cluster)."""
        return self.resources.uses_gpu


@dataclass(frozen=True)
class ChunkSettings:
    """How a model stage's work is cut and retried, from its section of the profile.

    Attributes:
        model: the model config the stage runs (the driver turns it into one checked
            :class:`finelake.models.spec.ModelSpec`).
        chunk_size: keys (queries, documents, pairs) per committed chunk, a floor raised so each
            GPU task gets a whole batch (:func:`finelake.resources.chunk_size`).
        max_attempts: runs that may try a row whose model call failed transiently.
        kind: the model's kind for the cache and the backend checks (generator, embedder, judge).
    """

    model: "ModelConfig"
    chunk_size: int
    max_attempts: int
    kind: str = "generator"


@dataclass(frozen=True)
class ModelStage:
    """A stage that runs a model on the executors over the rows of one table (one row per key).

    Attributes:
        name, help, gates, in_run: as for :class:`Stage`.
        table: the table with one row per key (``status``, ``reason``, ``attempts``): a key is
            pending while it has no row or its row is ``retry``.
        key: that table's key column.
        chunk_key: rows sharing a value share a chunk and a task partition (``doc_id`` for
            instantiate: a document's templates are generated together).
        reads: the tables it reads.
        also_writes: tables its :attr:`commit` writes besides :attr:`table` (match: ``matches``).
        settings: ``settings(cfg) -> ChunkSettings``.
        scope: ``scope(ctx, limits) -> DataFrame`` on the driver: the rows in scope, keys only
            (``key``, ``chunk_key``, the :attr:`order` columns), never text.
        inputs: ``inputs(ctx, keys, n_chunks, chunk) -> DataFrame``: one chunk's keys joined with
            what the model needs (text), read by key so that the read prunes by key bucket.
        rows: the executor row function, ``rows(pdf, **row_args) -> list[dict]`` (rows of
            :attr:`table`, less ``run_id``); a pure function over a pandas batch that reaches its
            model only through :mod:`finelake.udfs`.
        row_args: ``row_args(ctx, spec) -> dict``: the row function's keyword arguments (all
            picklable; ``spec`` is the stage's checked model spec).
        order: columns after ``chunk_key`` that fix the order inside a partition.
        prompts_per_key: ``prompts_per_key(ctx, scope, n_keys) -> float``: model prompts one chunk
            key makes (matches per document for instantiate); None: 1.
        output: the executor's output table (None: :attr:`table`), for stages that write more
            than their row table (match writes ``match_log`` rows carrying their matches).
        commit: ``commit(ctx, out) -> None`` merges one chunk's persisted output (None: merged
            into :attr:`table`, new rows inserted and ``retry`` rows overwritten).
        summarize: ``summarize(ctx, stats, scope) -> None`` after the chunks: the stage's own
            counts and derived tables (genericize rebuilds ``templates``).
        resources: per-task needs; model stages ask for a GPU where the cluster has them.

    The canary's gates are the stage's section of ``quality:`` in the profile, by name.
    """

    name: str
    help: str
    table: TableDef
    key: str
    chunk_key: str
    reads: tuple[TableDef, ...]
    settings: Callable[["FinelakeConfig"], ChunkSettings]
    scope: Callable[["StageContext", Limits], Any]
    inputs: Callable[["StageContext", Any, int, int], Any]
    rows: Callable[..., list[dict]]
    row_args: Callable[["StageContext", Any], dict]
    order: tuple[str, ...] = ()
    also_writes: tuple[TableDef, ...] = ()
    prompts_per_key: Optional[Callable[["StageContext", Any, int], float]] = None
    output: Optional[TableDef] = None
    commit: Optional[Callable[["StageContext", Any], None]] = None
    summarize: Optional[Callable[["StageContext", "StageStats", Any], None]] = None
    resources: Resources = MODEL_STAGE
    gates: tuple[Gate, ...] = ()
    options: tuple[str, ...] = ("max_queries", "max_documents")
    in_run: bool = True

    @property
    def writes(self) -> tuple[TableDef, ...]:
        return (self.table, *self.also_writes)

    @property
    def uses_model(self) -> bool:
        return True

