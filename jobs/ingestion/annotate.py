"""Per-partition annotations of ingest rows: quality-filter reasons and token counts.

Both run in the Python workers of Spark's RDD pool (``mapPartitions``): that pool keeps one worker
per task slot, so what they load (datatrove's filters and spaCy, the training tokenizer) loads
once per slot and stays for the next partition. A pandas UDF would run in Spark SQL's Python
worker pool, which rotates over every worker the job's other UDFs started, so each of them paid
the load (10-20 s for the tokenizer, a few seconds for spaCy).
"""

from __future__ import annotations

from typing import Sequence

from finelake.method.document_filters import FilterSpec, document_filters

#: Documents per :meth:`~finelake.method.document_filters.DocumentFilters.reasons` call.
FILTER_BATCH = 256


def with_filter_reasons(specs: Sequence[FilterSpec], rows, text_index: int):
    """Append the quality-filter reason of ``row[text_index]`` to every row of one partition.

    Args:
        specs: ``ingest.filters`` as :func:`~finelake.method.document_filters.filter_specs` gives
            them (built once per worker).
        rows: an iterator of tuples; ``text_index``: position of the text in each.

    Yields:
        ``(*row, reason)`` in input order: ``reason`` None for a kept document, else
        ``"<filter>:<datatrove reason>"``; filtered in batches of :data:`FILTER_BATCH`.
    """
    filters = document_filters(tuple(specs))
    batch: list = []
    for r in rows:
        batch.append(tuple(r))
        if len(batch) >= FILTER_BATCH:
            yield from (b + (w,) for b, w in zip(batch, filters.reasons([b[text_index] for b in batch])))
            batch = []
    if batch:
        yield from (b + (w,) for b, w in zip(batch, filters.reasons([b[text_index] for b in batch])))


#: Texts per ``count_tokens`` call.
TOKEN_BATCH = 256


def with_token_counts(model: str, rows, text_index: int):
    """Append the token count of ``row[text_index]`` to every row of one partition.

    The tokenizer is cached per process by :func:`~finelake.models.tokenizer.count_tokens`.

    Args:
        model: ``tokenizer.model``.
        rows: an iterator of tuples; ``text_index``: position of the text in each.

    Yields:
        ``(*row, num_tokens)`` in input order, counted in batches of :data:`TOKEN_BATCH`.
    """
    from finelake.models.tokenizer import count_tokens

    batch: list = []
    for r in rows:
        batch.append(tuple(r))
        if len(batch) >= TOKEN_BATCH:
            yield from (b + (n,) for b, n in zip(batch, count_tokens(model, [b[text_index] for b in batch])))
            batch = []
    if batch:
        yield from (b + (n,) for b, n in zip(batch, count_tokens(model, [b[text_index] for b in batch])))
