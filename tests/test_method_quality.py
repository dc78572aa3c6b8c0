"""finelake.method.quality: every rule's reason on a real example (issue 26).

Examples come from the shipped sample (``sample/documents.jsonl``, read through the package) and
from Debian manual pages as ``man`` renders them at 80 columns (``tools/make_manuals.py``), quoted
below with their package and licence. The sample has examples of ``answer_short``,
``answer_header_block``, ``answer_markup``, ``answer_headings`` and ``answer_not_prose``; none of
its 998 documents has a navigation line or a repeated block, and no run on it (2026-12-07) filled
a slot with a section number, a path or another slot's text, so those rules' examples are manual
pages and issue 26's own held-out example.
"""

import json
from importlib import resources
from pathlib import Path

import pytest

from finelake.config import QUALITY_RULES, InstantiateQualityConfig
from finelake.method import furniture as fu
from finelake.method import quality as q
from finelake.method.spans import split_sentences

# polkitd(8), Debian package polkitd 122-3 (LGPL-2.0+ and Expat), as `man` renders it
# (tests/data/manpages/README.md).
POLKITD = (Path(__file__).parent / "data" / "manpages" / "polkitd.8.txt").read_text(encoding="utf-8")

# diff(1), Debian diffutils 1:3.8-4 (GPL-3+): an option list.
DIFF_OPTIONS = """\
--normal
              output a normal diff (the default)

       -q, --brief
              report only when files differ

       -s, --report-identical-files
              report when two files are the same

       -c, -C NUM, --context[=NUM]
              output NUM (default 3) lines of copied context"""

# rmt(8) (rmt-tar.8), Debian tar 1.34+dfsg-1.2+deb12u1 (GPL-3+): the protocol's repeated blocks.
RMT_REPLIES = """\
Reply
                     A0\\n on success.

              Extensions
                     BSD version allows only decimal number as flags.

       C[device]\\n
              Close the currently open device.

              Arguments
                     Any arguments are silently ignored.

              Reply
                     A0\\n on success.

       Lwhence\\noffset\\n
              Performs an lseek(2) on the currently open device with the spec‐
              ified parameters."""


@pytest.fixture(scope="module")
def sample_docs():
    text = resources.files("finelake.sample").joinpath("documents.jsonl").read_text("utf-8")
    return [json.loads(line)["text"] for line in text.split("\n") if line.strip()]


def _doc(docs, start):
    return next(d for d in docs if d.startswith(start))


def _rule(reason):
    return reason.split(": ")[0] if reason else None


def test_config_lists_exactly_the_modules_rules():
    assert tuple(QUALITY_RULES) == q.RULES
    assert q.QualityRules.from_dict(InstantiateQualityConfig().model_dump()) == q.QualityRules()


def test_sample_prose_passes(sample_docs):
    wild_boar = _doc(sample_docs, "The wild boar, also known as")
    assert q.check_answer(wild_boar) is None
    assert q.prose_share(wild_boar) == 1.0


def test_answer_short_on_a_sample_sentence(sample_docs):
    doc = _doc(sample_docs, "As the weather worsened with the coming of the monsoon rains")
    answer = "He abandoned 150 pieces of artillery in the river."
    assert answer in doc
    assert q.check_answer(answer) == "quality:answer_short: 9 words < 10"
    assert q.check_answer(answer, q.QualityRules(answer_min_words=9)) is None


def test_answer_header_block_on_the_sample_and_a_manual_page(sample_docs):
    bbc = _doc(sample_docs, "4 May 2016 Last updated at 17:39 BST\n")
    body = bbc.index("The way players navigate")
    assert q.header_end(bbc) == body
    answer = bbc[:bbc.index("researchers.") + len("researchers.")]
    why = q.check_answer(answer, document=bbc, answer_start=0)
    assert _rule(why) == "quality:answer_header_block"
    # the same sentence, drawn from the body, passes
    assert q.check_answer(bbc[body:body + len(answer) - body], document=bbc, answer_start=body) is None
    assert q.header_end(POLKITD) == POLKITD.index("polkitd provides")
    name = POLKITD[POLKITD.index("polkitd - The"):POLKITD.index("DESCRIPTION")]
    assert _rule(q.check_answer(name, document=POLKITD, answer_start=POLKITD.index(name))) in (
        "quality:answer_short", "quality:answer_header_block")
    assert _rule(q.check_answer(name, q.QualityRules(skip=("answer_short",)), POLKITD,
                                POLKITD.index(name))) == "quality:answer_header_block"


def test_answer_navigation_on_a_running_foot():
    answer = POLKITD[POLKITD.index("SEE ALSO"):].split("\n", 1)[1]
    assert q.check_answer(answer) == ("quality:answer_navigation: navigation line "
                                      "'polkit                             May 2009                         POLKITD(8)'")
    assert fu.furniture_kind("Prev       Up       Home       Next") == "navigation"  # issue 26's example
    assert fu.furniture_kind("Next time you're making pesto, consider roasted seeds.") is None


def test_answer_markup_on_sample_html_and_wiki_links(sample_docs):
    lee = _doc(sample_docs, "The United States offered full and direct approval to Indonesia")
    i = lee.index("During a launch in 1995")
    answer = lee[i:lee.index(".", lee.index("</i>")) + 1]
    assert "<i>Diplomacy</i>" in answer
    assert _rule(q.check_answer(answer)) == "quality:answer_markup"
    assert fu.furniture_kind("the plague outbreak that struck Finland and Sweden]] between 1710-1713") == "markup"
    for line in (".. SPDX-License-Identifier: GPL-2.0", "=========", "See :mod:`os` for details.",
                 ".. _label:", "## Installation", ".TH GZIP 1"):
        assert fu.furniture_kind(line) == "markup", line
    # man pages' <placeholders> are not HTML
    assert fu.furniture_kind("       <locale> <charset>") is None


def test_answer_headings_when_the_answer_runs_into_the_next_section():
    start = POLKITD.index("See the polkit(8)")
    answer = POLKITD[start:POLKITD.index("many others.") + len("many others.")]
    assert q.check_answer(answer) == "quality:answer_headings: heading line 'AUTHOR'"
    assert fu.furniture_kind("53.33. pg_opclass") == "heading"
    # an indented manual entry is not a section heading
    assert fu.furniture_kind("       XDG_CONFIG_HOME") is None


def test_answer_repetition_on_repeated_protocol_lines():
    assert q.check_answer(RMT_REPLIES) == "quality:answer_repetition: fineweb char_dup_ratio"


def test_answer_not_prose_on_an_option_list():
    why = q.check_answer(DIFF_OPTIONS)
    assert _rule(why) == "quality:answer_not_prose"
    assert q.prose_share(DIFF_OPTIONS) < 0.5


def test_answer_not_prose_on_the_samples_flattened_list(sample_docs):
    """The shipped sample's Wikipedia lead on radiation ends in its bulleted list, flattened to
    one unpunctuated line per item: an answer made of the list is not prose; its lead is."""
    radiation = _doc(sample_docs, "In physics, radiation is the emission or transmission")
    items = radiation[radiation.index("electromagnetic radiation consisting"):]
    assert items.count("\n") >= 3
    assert _rule(q.check_answer(items)) == "quality:answer_not_prose"
    assert q.prose_share(items) == 0.0
    lead = radiation[:radiation.index("This includes:")]
    assert q.check_answer(lead) is None


def test_answer_headings_on_the_samples_dateline(sample_docs):
    """A BBC item of the shipped sample opens with its dateline: an answer that runs from the
    dateline into the story fails on the heading line, unless it is the document's own header
    block (then the header-block rule names it, with the document)."""
    bbc = _doc(sample_docs, "4 May 2016 Last updated at 17:39 BST\n")
    answer = bbc[:bbc.index("anonymously tracked and sent to the researchers.") + 49]
    assert q.check_answer(answer) == ("quality:answer_headings: heading line "
                                      "'4 May 2016 Last updated at 17:39 BST'")
    assert _rule(q.check_answer(answer, document=bbc, answer_start=0)) == "quality:answer_header_block"


def test_unwrap_joins_a_manual_paragraph_and_its_hanging_indent():
    para = POLKITD[POLKITD.index("polkitd provides"):POLKITD.index("AUTHOR")]
    lines = fu.unwrap_lines(para)
    assert lines[0].startswith("polkitd provides") and lines[0].endswith("calls into the service.")
    assert len(lines) == 3
    hanging = ("-a     (Linux only) ignore /proc/PID/coredump_filter and also dump mem‐\n"
               "              ory mappings marked with the 'VM_DONTDUMP' flag.")
    assert len(fu.unwrap_lines("       " + hanging)) == 1
    assert len(fu.unwrap_lines("- first item of a list\n- second item of a list")) == 2


def test_body_units_leave_out_the_header_block_and_edge_headings():
    units = split_sentences(POLKITD, min_chars=40)
    body = q.body_units(POLKITD, units)
    assert body[0].text.startswith("polkitd provides")
    assert all(POLKITD[u.start:u.end] == u.text for u in body)
    assert not any(u.text.startswith(("NAME", "SYNOPSIS", "AUTHOR", "SEE ALSO")) for u in body)
    assert not any("POLKITD(8)" in u.text for u in body)


def test_sample_documents_keep_their_first_sentence(sample_docs):
    """A document that starts with prose has no header block: nothing is left out."""
    for doc in sample_docs[:50]:
        units = split_sentences(doc, min_chars=40)
        if doc.lstrip()[:1].isalpha() and q.prose_share(units[0].text) >= 0.5:
            assert q.header_end(doc) == 0


def test_instruction_rules_on_fills():
    tpl = "How to <fi>task</fi> on <fi>system catalog</fi> <fi>section</fi>"
    bad = "How to 53.33 on pg_opclass 53.33"  # issue 26's held-out example
    assert q.slot_fills(tpl, bad) == ["53.33", "pg_opclass", "53.33"]
    assert _rule(q.check_instruction(bad, template=tpl)) == "quality:instruction_section_number"
    rules = q.QualityRules(skip=("instruction_section_number",))
    assert q.check_instruction(bad, rules, tpl) == (
        "quality:instruction_repetition: slots 1 and 3 both filled with '53.33'")
    assert q.check_instruction(bad) == "quality:instruction_repetition: '53.33' occurs twice"
    tpl2 = "Where is the configuration file <fi>file</fi> used by <fi>program</fi>?"
    ok = "Where is the configuration file user-dirs.conf used by xdg-user-dirs-update?"
    assert q.check_instruction(ok, template=tpl2) is None
    path = "Where is the configuration file /etc/xdg/user-dirs.conf used by xdg-user-dirs-update?"
    assert _rule(q.check_instruction(path, template=tpl2)) == "quality:instruction_path"
    assert q.slot_fills(tpl2, "something else entirely") is None


def test_answer_start_and_position():
    doc = POLKITD
    span = "polkitd must be started with superuser privileges"
    start = q.answer_start(f"<excerpt>{span}</excerpt>", doc)
    assert start == doc.index(span)
    assert q.answer_position(start, doc) == round(start / len(doc), 4)
    assert q.answer_start("no excerpt here", doc) is None
    assert q.answer_position(None, doc) is None


def test_rules_validate_their_settings():
    with pytest.raises(ValueError, match="unknown quality rule"):
        q.QualityRules(skip=("answer_typo",))
    with pytest.raises(ValueError):
        q.QualityRules(answer_min_prose_share=1.5)
