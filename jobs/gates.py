"""Gates: a stage does not start while an upstream model stage has rows left to retry.

``index`` waits for ``genericize`` (the index is built only from a settled ``genericizations``
table: templates that arrive later would change what already-matched documents were sampled from)
and ``budget`` for ``instantiate`` and ``judge`` (a document that became ready a run later would
be walked after the others, so the ledger would depend on when faults happened). A row is retried
at most ``<stage>.max_attempts`` runs (:mod:`finelake.faults`), so a few reruns of the upstream
stage always open the gate. Every entry point checks the gates: ``finelake <stage>``,
``finelake run``, the Databricks bundle's tasks and the EMR steps; ``--force`` overrides.
"""

from __future__ import annotations

from typing import Union

from finelake.errors import FinelakeError
from finelake.stage import ModelStage, Stage


class GateHeld(FinelakeError):
    """A stage may not start yet: an upstream model stage left rows to retry. The message names
    them and the command that retries them."""


def held(ctx, stage: Union[Stage, ModelStage]) -> str:
    """Why ``stage`` may not start yet (``""`` when it may): ``"3 genericize row(s) to retry"``."""
    out = []
    for gate in stage.gates:
        if not ctx.lake.exists(gate.table):
            continue
        ctx.lake.add_missing_columns(gate.table)
        n = ctx.lake.read(gate.table).where("status = 'retry'").count()
        if n:
            out.append(f"{n} {gate.stage} row(s) to retry")
    return ", ".join(out)


def check_gates(ctx, stage: Union[Stage, ModelStage], force: bool = False) -> None:
    """Raise :class:`GateHeld` when :func:`held` says ``stage`` must wait and ``force`` is false.

    Raises:
        GateHeld: with the rows to retry and what to run (``finelake <upstream>`` retries them;
            each row at most ``<upstream>.max_attempts`` runs, then it is quarantined).
    """
    if force or not stage.gates:
        return
    why = held(ctx, stage)
    if why:
        again = " and ".join(f"'finelake {g.stage}'" for g in stage.gates)
        raise GateHeld(f"{stage.name} waits: {why}; rerun {again} (or 'finelake run') to retry "
                       f"them (each row at most <stage>.max_attempts runs, then it is "
                       f"quarantined), or pass --force to run {stage.name} anyway")
