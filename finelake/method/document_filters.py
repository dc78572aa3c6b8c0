"""Document quality filters at ingest: datatrove's heuristic filters, called as a library.

FineInstructions restructures documents into pairs so that the token budget goes to a document's
educational parts rather than "footers, headers, less educational content" (§1); a corpus that
was not filtered before (raw crawl, manuals, exported wikis) otherwise spends an instantiation and
a judge call on every navigation bar. The filters are the ones FineWeb was built with, from
`datatrove <https://github.com/huggingface/datatrove>`_ (``pipeline/filters/``), with their own
defaults and their own reasons; nothing here reimplements a rule:

* ``gopher_repetition`` (``GopherRepetitionFilter``): repeated lines, paragraphs and n-grams
  (``dup_line_frac``, ``dup_para_char_frac``, ``top_2_gram``, ``duplicated_5_n_grams``, ...).
* ``gopher_quality`` (``GopherQualityFilter``): too few or too many words, mean word length,
  hashes and ellipses, bullet lines, too few alphabetic words or stop words
  (``gopher_short_doc``, ``gopher_below_alpha_threshold``, ``gopher_enough_stop_words``, ...).
* ``fineweb_quality`` (``FineWebQualityFilter``): line-level boilerplate: too few lines ending in
  punctuation, too many short lines, duplicated lines, list-like pages (``line_punct_ratio``,
  ``short_line_ratio``, ``char_dup_ratio``, ``list_ratio``).
* ``c4_quality`` (``C4QualityFilter``): C4's rules: fewer than 5 sentences once lines without
  terminal punctuation or under 3 words are removed (``too_few_sentences``), a curly bracket
  anywhere (``curly_bracket``), ``lorem_ipsum``.

A rejected document's drop reason is ``"<filter>:<datatrove reason>"``, e.g.
``gopher_quality:gopher_below_avg_threshold``. The filters run per document in the configured
order and the first rejection wins, as in a datatrove pipeline; every filter sees the same
``Document``, so a filter after ``c4_quality`` sees the text with C4's lines removed, as in
FineWeb's pipeline. The stored document is never rewritten (its id is the hash of its text and
excerpts point into that text): C4's line removal only decides its verdict.

Words come from datatrove's tokenizer for the language (``language`` option, default English:
spaCy's blank ``en`` pipeline, rule-based, no model download). No NLTK data (punkt) is needed.
"""

from __future__ import annotations

import importlib
import inspect
import json
from functools import lru_cache
from typing import Any, Iterable, Optional, Sequence

from finelake.errors import ConfigError, FinelakeError

#: Filters ``ingest.filters`` may name: name -> (datatrove module, class).
FILTERS: dict[str, tuple[str, str]] = {
    "gopher_repetition": ("datatrove.pipeline.filters.gopher_repetition_filter",
                          "GopherRepetitionFilter"),
    "gopher_quality": ("datatrove.pipeline.filters.gopher_quality_filter", "GopherQualityFilter"),
    "fineweb_quality": ("datatrove.pipeline.filters.fineweb_quality_filter", "FineWebQualityFilter"),
    "c4_quality": ("datatrove.pipeline.filters.c4_filters", "C4QualityFilter"),
}

#: Constructor arguments that are not options: finelake writes the rejections itself.
_NOT_OPTIONS = ("self", "exclusion_writer")

#: The install hint when datatrove or spaCy is missing.
INSTALL_HINT = "pip install 'finelake[filters]' (datatrove and spaCy)"

#: A filter as the executors receive it: ``(name, options as sorted JSON)`` (hashable, picklable).
FilterSpec = tuple[str, str]


def filter_specs(filters: Iterable[Any]) -> tuple[FilterSpec, ...]:
    """``ingest.filters`` entries (objects with ``name`` and ``options``) as hashable specs."""
    return tuple((f.name, json.dumps(f.options, sort_keys=True)) for f in filters)


def _class(name: str):
    module, cls = FILTERS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise FinelakeError(f"ingest.filters names {name!r}, which needs datatrove: {INSTALL_HINT} "
                            f"({exc})") from None


def check_filters(specs: Sequence[FilterSpec]) -> None:
    """Check ``ingest.filters`` on the driver before any Spark job: names, options, packages.

    Each filter is built once with its options (datatrove's constructors only store them), and
    the word tokenizer of each language is looked up (datatrove checks that its package is
    installed; nothing is loaded).

    Raises:
        ConfigError: an unknown filter, or an option its datatrove class does not take (the key
            ``ingest.filters[i].options.<name>`` and the valid options are named).
        FinelakeError: datatrove, or the tokenizer package for a language (spaCy for English),
            is not installed; the message gives the pip command.
    """
    languages = set()
    for i, (name, options) in enumerate(specs):
        if name not in FILTERS:
            raise ConfigError(f"ingest.filters[{i}]: unknown filter {name!r} "
                              f"(one of {', '.join(sorted(FILTERS))})")
        cls = _class(name)
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in _NOT_OPTIONS]
        for key in json.loads(options):
            if key not in params:
                raise ConfigError(f"ingest.filters[{i}].options.{key}: not an option of "
                                  f"{name} (datatrove {cls.__name__}: {', '.join(params)})")
        try:
            flt = cls(**json.loads(options))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"ingest.filters[{i}].options: {name}: {exc}") from None
        languages.add(getattr(flt, "language", None))
    if not any(languages):  # no filter, or none that tokenizes words: nothing more to load
        return
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    for lang in sorted(x for x in languages if x):
        try:
            load_word_tokenizer(lang)
        except ImportError as exc:
            raise FinelakeError(f"ingest.filters: the {lang!r} word tokenizer is missing: {exc} "
                                f"({INSTALL_HINT})") from None
        except ValueError as exc:
            raise ConfigError(f"ingest.filters: language {lang!r}: {exc}") from None


class DocumentFilters:
    """The configured filters, built once per Python worker (see :func:`document_filters`).

    Args:
        specs: ``(name, options JSON)`` per filter, in the order they run.
    """

    def __init__(self, specs: Sequence[FilterSpec]):
        self.filters = [(name, _class(name)(**json.loads(options))) for name, options in specs]

    def reason(self, text: str) -> Optional[str]:
        """None when every filter keeps ``text``; else the first rejection's reason,
        ``"<filter>:<datatrove reason>"`` (``"<filter>:rejected"`` when the filter gave none, and
        ``"<filter>:error <exception>"`` when it raised on this text, so the document lands in
        ``ingest_drops`` with the cause rather than failing the whole ingest)."""
        from datatrove.data import Document

        doc = Document(text=text, id="")
        for name, flt in self.filters:
            try:
                res = flt.filter(doc)
            except Exception as exc:  # noqa: BLE001 - one document's failure is its drop reason
                return f"{name}:error {type(exc).__name__}: {exc}"[:500]
            keep, why = res if isinstance(res, tuple) else (res, None)
            if not keep:
                return f"{name}:{why or 'rejected'}"
        return None

    def reasons(self, texts: Iterable[str]) -> list[Optional[str]]:
        """:meth:`reason` of each text of a batch, in order.

        Document-major (each document through every filter before the next document) rather than
        datatrove's ``filter_batch`` per filter: none of these filters batches, and datatrove
        caches the last few tokenizations, so every filter of a document reuses its words.
        """
        return [self.reason(t) for t in texts]


@lru_cache(maxsize=4)
def document_filters(specs: tuple[FilterSpec, ...]) -> DocumentFilters:
    """The filters of ``specs``, built once per process (executors reuse their Python workers)."""
    return DocumentFilters(specs)
