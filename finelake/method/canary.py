"""The canary's quality gates: figures of a model stage's first small chunk, checked against limits.

A model stage first runs one small chunk (the *canary*, ``quality.canary_rows`` rows chosen by a
stable hash) and checks it against the gates of its section of ``quality:`` in the profile
(``quality.genericize.max_invalid_share`` ...). A failed gate stops the run before the rest of the
stage, with the figures, a few raw replies and the profile keys that matter, so a model that
answers in another shape than finelake parses (other JSON keys, markup in the instruction) costs a
chunk, not a GPU-day. Pure functions over outcome counts; the driver counts
(:func:`finelake.jobs.canary.outcomes_of`).

A gate's name is ``max_<metric>`` or ``min_<metric>``; the metrics (shares of the canary's rows):

=====================  =============================================================================
metric                 share of ...
=====================  =============================================================================
``invalid_share``      rows with status ``invalid`` (the reply did not parse or broke a rule)
``null_share``         rows with status ``null`` (the instantiator called the pair incompatible)
``unfilled_slot_share``rows whose reason is ``unfilled_slot`` (``<fi>`` left in the instruction)
``excerpt_markup_share`` rows whose reason is ``excerpt_markup_in_instruction``
``unknown_keys_share`` rows flagged ``unknown_keys`` (reply JSON with keys finelake does not read)
``error_share``        rows whose model call failed (status ``error`` or ``retry``)
``grounded_share``     rows with an answer whose answer passed the excerpt check (§3.3), among
                       rows with an answer (``ok``, ``excerpt_rejected``, ``filtered``)
``pass_share``         scored pairs the judge kept (§3.4), among scored pairs
=====================  =============================================================================
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from finelake.errors import FinelakeError


class CanaryFailed(FinelakeError):
    """The canary chunk of a model stage failed a quality gate: the run stops before the rest of
    the stage (the command exits with status 3). The message starts with ``canary failed:``."""

    exit_code = 3


@dataclass
class Outcomes:
    """Counts of a chunk's rows.

    Attributes:
        total: rows.
        statuses: rows per ``status``.
        reasons: rows per reason code (the reason up to its first ``:``).
        flags: rows per flag code (a flag up to its first ``:``), each row counted once per code.
        kept: judge only: scored rows kept; scored: rows with a score.
        samples: up to five ``(status, reason, raw reply)`` of rows that were not ``ok``.
    """

    total: int = 0
    statuses: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    flags: Counter = field(default_factory=Counter)
    kept: int = 0
    scored: int = 0
    samples: list[tuple[str, str, str]] = field(default_factory=list)


def _share(num: int, den: int) -> Optional[float]:
    return None if den <= 0 else num / den


def _answered(o: Outcomes) -> int:
    return sum(o.statuses[s] for s in ("ok", "excerpt_rejected", "filtered"))


METRICS: dict[str, Callable[[Outcomes], Optional[float]]] = {
    "invalid_share": lambda o: _share(o.statuses["invalid"], o.total),
    "null_share": lambda o: _share(o.statuses["null"], o.total),
    "unfilled_slot_share": lambda o: _share(o.reasons["unfilled_slot"], o.total),
    "excerpt_markup_share": lambda o: _share(o.reasons["excerpt_markup_in_instruction"], o.total),
    "unknown_keys_share": lambda o: _share(o.flags["unknown_keys"], o.total),
    "error_share": lambda o: _share(o.statuses["error"] + o.statuses["retry"], o.total),
    "grounded_share": lambda o: _share(o.statuses["ok"], _answered(o)),
    "pass_share": lambda o: _share(o.kept, o.scored),
}
"""Metric name -> its value on a chunk's :class:`Outcomes` (None when it has no denominator)."""


def gate_metric(gate: str) -> tuple[str, str]:
    """``("max"|"min", metric)`` of a gate name such as ``max_invalid_share``.

    Raises:
        ValueError: not ``max_``/``min_`` followed by a known metric.
    """
    bound, _, metric = gate.partition("_")
    if bound not in ("max", "min") or metric not in METRICS:
        raise ValueError(f"unknown quality gate {gate!r}: a gate is max_<metric> or min_<metric> "
                         f"with metric one of {', '.join(sorted(METRICS))}")
    return bound, metric


def failed_gates(outcomes: Outcomes, gates: Mapping[str, float]) -> list[str]:
    """The gates ``outcomes`` fails, each as ``"max_invalid_share: 0.62 > 0.50"``; [] when all
    hold. A metric without a denominator (no scored pair, no answer) passes its gate."""
    out = []
    for gate, limit in gates.items():
        bound, metric = gate_metric(gate)
        value = METRICS[metric](outcomes)
        if value is None:
            continue
        if (bound == "max" and value > limit) or (bound == "min" and value < limit):
            out.append(f"{gate}: {value:.2f} {'>' if bound == 'max' else '<'} {limit:.2f}")
    return out


def figures(outcomes: Outcomes, gates: Mapping[str, float]) -> str:
    """Every gated metric's value on the canary, ``"invalid_share=0.12 null_share=0.05 ..."``."""
    parts = []
    for gate in gates:
        _, metric = gate_metric(gate)
        v = METRICS[metric](outcomes)
        parts.append(f"{metric}={'n/a' if v is None else f'{v:.2f}'}")
    return " ".join(parts)


def failure_message(stage: str, outcomes: Outcomes, failed: list[str], gates: Mapping[str, float],
                    keys: Mapping[str, object]) -> str:
    """The text of :class:`CanaryFailed`: ``canary failed: <stage>: ...`` with the failed gates,
    every gated figure, the status counts, up to five raw replies and the profile keys that
    matter (``keys``: dotted key -> its value in this profile)."""
    lines = [f"canary failed: {stage}: {'; '.join(failed)} on {outcomes.total} rows "
             f"(statuses {dict(sorted(outcomes.statuses.items()))})",
             f"  figures: {figures(outcomes, gates)}"]
    if outcomes.flags:
        lines.append(f"  flags: {dict(sorted(outcomes.flags.items()))}")
    for status, reason, raw in outcomes.samples[:5]:
        shown = (raw or "").replace("\n", "\\n")
        lines.append(f"  reply ({status}: {reason}): {shown[:300]}{'...' if len(shown) > 300 else ''}")
    lines.append("  profile keys that matter: " + ", ".join(f"{k}={v}" for k, v in keys.items()))
    lines.append(f"  the canary's rows were not committed; fix the profile and rerun, or rerun "
                 f"with --no-canary to go on anyway (or relax quality.{stage}.*)")
    return "\n".join(lines)
