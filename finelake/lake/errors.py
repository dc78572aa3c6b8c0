"""What can go wrong with a table: :class:`LakeError`, and recognising Delta's commit conflicts."""

from __future__ import annotations

from finelake.errors import FinelakeError


class LakeError(FinelakeError):
    """A table cannot be read or written (missing, unreadable, wrong schema), or a commit kept
    conflicting with another writer."""


_CONFLICT_MARKERS = (
    "ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
    "ConcurrentTransactionException", "ConcurrentWriteException", "ProtocolChangedException",
    "MetadataChangedException", "DELTA_CONCURRENT_", "DELTA_PROTOCOL_CHANGED",
    "DELTA_METADATA_CHANGED", "CommitFailedError",
)


def is_commit_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a Delta commit conflict with another writer:
    delta-spark's ``Concurrent*Exception`` / ``ProtocolChangedException`` /
    ``MetadataChangedException`` (also when surfaced as Py4J or ``AnalysisException`` text with a
    ``DELTA_CONCURRENT_*`` error class) or delta-rs ``CommitFailedError``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {c.__name__ for c in type(exc).__mro__}
        text = str(exc)[:4000]
        if any(m in names or m in text for m in _CONFLICT_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
