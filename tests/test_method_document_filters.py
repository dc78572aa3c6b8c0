"""finelake/method/document_filters.py: datatrove's document filters called from finelake, each
reason shown on a real text of the shipped sample (documents where the sample's documents have
one, else a query's text, which is as real; ingest filters only documents).

The verdicts are datatrove's; what is tested here is that finelake builds the filters the profile
names with their options, reports the library's own reason as ``<filter>:<reason>``, runs them in
order with the first rejection winning, and checks the configuration before any Spark job. Each
case also states, independently of datatrove, the property of the text that the reason is about.
"""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

from finelake.config import load_config
from finelake.errors import ConfigError
from finelake.method.document_filters import (
    FILTERS,
    DocumentFilters,
    check_filters,
    document_filters,
    filter_specs,
)
from finelake.method.text import normalize_text

pytest.importorskip("datatrove", reason="the 'filters' extra (datatrove, spaCy) is not installed")

SAMPLE = resources.files("finelake.sample")


def _lines(name: str, field: str) -> list[str]:
    rows = SAMPLE.joinpath(name).read_text("utf-8").split("\n")
    return [normalize_text(json.loads(r)[field]) for r in rows if r.strip()]


DOCS = _lines("documents.jsonl", "text")
QUERIES = _lines("queries.jsonl", "query")


def _one(name: str, **options) -> DocumentFilters:
    return DocumentFilters([(name, json.dumps(options, sort_keys=True))])


def _words(t: str) -> list[str]:
    return t.split()


def _tokens(t: str) -> list[str]:
    """Words and punctuation marks apart (roughly what spaCy's tokenizer gives datatrove)."""
    return re.findall(r"\w+|[^\w\s]", t)


STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}  # Gopher's


# (source, 0-based line, filter, datatrove's reason, an independent fact about the text)
CASES = [
    ("doc", 4, "gopher_quality", "gopher_below_alpha_threshold",  # Moscow: figures, units
     lambda t: sum(any(c.isalpha() for c in w) for w in _tokens(t)) < 0.8 * len(_tokens(t))),
    ("query", 0, "gopher_quality", "gopher_short_doc", lambda t: len(_words(t)) < 50),
    ("query", 679, "gopher_quality", "gopher_enough_stop_words",
     lambda t: len(_words(t)) >= 50 and len(STOP_WORDS & set(_tokens(t))) < 2),
    ("query", 875, "gopher_quality", "gopher_below_avg_threshold",  # Korean: short words
     lambda t: sum(len(w) for w in _tokens(t)) / len(_tokens(t)) < 3),
    ("query", 1235, "gopher_quality", "gopher_too_many_end_ellipsis",
     lambda t: sum(ln.endswith("...") for ln in t.split("\n")) > 0.3 * len(t.split("\n"))),
    ("doc", 505, "gopher_repetition", "duplicated_6_n_grams",  # census boilerplate
     lambda t: t.count("Race (United States Census)") >= 6),
    ("doc", 671, "gopher_repetition", "top_4_gram",  # a drum tab
     lambda t: t.count("|----|----|----|----|") >= 8),
    ("doc", 995, "gopher_repetition", "duplicated_5_n_grams",  # election results, year by year
     lambda t: t.count("In the United States presidential election in New Jersey") >= 3),
    ("query", 262, "gopher_repetition", "dup_line_frac",  # if/else ladder
     lambda t: len(t.split("\n")) - len(set(t.split("\n"))) > 0.3 * len(t.split("\n"))),
    ("doc", 31, "fineweb_quality", "line_punct_ratio",  # one line, ends in a list of dishes
     lambda t: "\n" not in t and not t.endswith((".", "!", "?"))),
    ("query", 69, "fineweb_quality", "short_line_ratio", lambda t: len(t) <= 30),
    ("doc", 1, "c4_quality", "too_few_sentences", lambda t: t.count(". ") + 1 < 5),
    ("query", 250, "c4_quality", "curly_bracket", lambda t: "{" in t),
]


@pytest.mark.parametrize("src,line,name,reason,fact", CASES,
                         ids=[f"{c[2]}:{c[3]}" for c in CASES])
def test_each_reason_on_a_real_sample_text(src, line, name, reason, fact):
    text = (DOCS if src == "doc" else QUERIES)[line]
    assert fact(text), "the case's premise about the text no longer holds"
    assert _one(name).reason(text) == f"{name}:{reason}"


def test_a_clean_document_passes_and_the_first_rejection_wins():
    chain = DocumentFilters(filter_specs(
        load_config("local", ["ingest.filters=[gopher_repetition, gopher_quality, "
                              "fineweb_quality]"]).ingest.filters))
    assert chain.reasons([DOCS[0], DOCS[4], DOCS[505]]) == [
        None, "gopher_quality:gopher_below_alpha_threshold",
        "gopher_repetition:duplicated_6_n_grams"]
    # doc 4 fails gopher_quality and C4 both: the order of the profile decides the reason
    assert _one("c4_quality").reason(DOCS[4]) == "c4_quality:too_few_sentences"
    both = DocumentFilters([("c4_quality", "{}"), ("gopher_quality", "{}")])
    assert both.reason(DOCS[4]) == "c4_quality:too_few_sentences"


def test_options_reach_the_filter():
    # doc 4 is rejected at Gopher's default alphabetic-word share (0.8) and kept at 0.5
    assert _one("gopher_quality").reason(DOCS[4]) is not None
    assert _one("gopher_quality", max_non_alpha_words_ratio=0.5).reason(DOCS[4]) is None
    # doc 1 has fewer than 5 sentences; C4 keeps it when 2 are enough
    assert _one("c4_quality", min_num_sentences=2).reason(DOCS[1]) is None


def test_filters_are_built_once_per_process():
    specs = (("gopher_quality", "{}"),)
    assert document_filters(specs) is document_filters(specs)


def test_configuration_is_checked_with_the_key_named():
    check_filters(filter_specs(load_config("databricks").ingest.filters))
    cfg = load_config("local", ["ingest.filters=[{name: gopher_quality, options: {min_doc_wordz: 3}}]"])
    with pytest.raises(ConfigError, match=r"ingest.filters\[0\].options.min_doc_wordz: not an "
                                          r"option of gopher_quality .*min_doc_words"):
        check_filters(filter_specs(cfg.ingest.filters))
    cfg = load_config("local", ["ingest.filters=[fineweb_quality, {name: c4_quality, options: "
                                "{exclusion_writer: x}}]"])
    with pytest.raises(ConfigError, match=r"ingest.filters\[1\].options.exclusion_writer"):
        check_filters(filter_specs(cfg.ingest.filters))
    with pytest.raises(ConfigError, match="unknown filter 'c5'"):
        check_filters((("c5", "{}"),))
    with pytest.raises(ConfigError, match=r"ingest.filters.0.name"):
        load_config("local", ["ingest.filters=[gopher]"])


def test_config_names_are_the_filters_finelake_knows():
    from finelake.config import DocumentFilterConfig

    names = DocumentFilterConfig.model_fields["name"].annotation.__args__
    assert set(names) == set(FILTERS)
