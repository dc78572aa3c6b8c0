"""Reading the model stages' JSON replies and counting their signals (finelake.method.replies):
strict and lenient reading, unknown keys, flag and parse-rate counts. No Spark, no model."""

from __future__ import annotations

import pytest

from finelake.method import replies


def test_strict_reading_takes_one_json_value_and_a_code_fence():
    assert replies.read_json_reply('{"a": 1}').data == {"a": 1}
    assert replies.read_json_reply('```json\n{"a": 1}\n```').data == {"a": 1}
    assert replies.read_json_reply(" null ").data is None
    for bad in ('Sure! {"a": 1}', '{"a": 1} {"b": 2}', "", None):
        with pytest.raises(ValueError):
            replies.read_json_reply(bad)


def test_lenient_reading_takes_the_first_object_and_says_so():
    r = replies.read_json_reply('Here you go: {"a": {"b": [1, "}"]}} and {"c": 3} trailing',
                                lenient=True)
    assert r.data == {"a": {"b": [1, "}"]}} and r.lenient
    # a brace that opens no object is skipped
    r = replies.read_json_reply('set {x} then {"a": 1}', lenient=True)
    assert r.data == {"a": 1} and r.lenient
    # a clean reply is not flagged lenient
    assert not replies.read_json_reply('{"a": 1}', lenient=True).lenient
    with pytest.raises(ValueError, match="no JSON object"):
        replies.read_json_reply("no braces here, only [1, 2]", lenient=True)
    with pytest.raises(ValueError):
        replies.read_json_reply('{"cut": "off', lenient=True)


def test_unknown_keys_flag_lists_sorted_extra_keys():
    assert replies.unknown_keys_flag({"b": 1, "a": 2, "x": 3}, ["x"]) == "unknown_keys:a,b"
    assert replies.unknown_keys_flag({"x": 1}, ["x"]) is None
    assert replies.unknown_keys_flag(["x"], ["x"]) is None
    assert replies.unknown_keys_flag({"a,b": 1}, []) == "unknown_keys:a_b"


def test_stage_signals_count_replies_parse_rate_and_flags():
    rows = [  # (replied, reason, flags, n)
        (True, None, ["constrained"], 5),
        (True, "unparseable_output", ["constrained"], 2),
        (True, "no_slot", ["constrained", "unknown_keys:foo,bar"], 1),
        (True, None, ["constrained", "unknown_keys:foo", "unknown_keys:foo"], 2),
        (False, "generation_error: timeout", None, 3),
        (False, "no_candidate_span", [], 1),
    ]
    s = replies.stage_signals(rows)
    assert (s.rows, s.replies, s.unparseable) == (14, 10, 2)
    assert s.parse_rate == pytest.approx(0.8)
    assert s.flags == {"constrained": 10, "unknown_keys": 3}  # a repeated flag counts once a row
    assert s.unknown_keys == {"foo": 3, "bar": 1}
    summ = s.summary()
    assert summ["parse_rate"] == "0.800 (8/10)"
    assert summ["flags"] == "{constrained:10, unknown_keys:3}"
    assert summ["unknown_keys"] == "{foo:3, bar:1}"
    # row by row gives the same counts as grouped rows
    per_row = [(r, why, f, 1) for r, why, f, n in rows for _ in range(n)]
    assert replies.stage_signals(per_row) == s


def test_stage_signals_without_replies_and_bad_counts():
    s = replies.stage_signals([(False, "generation_error: x", None, 4)])
    assert s.parse_rate is None and s.summary() == {"parse_rate": "n/a"}
    with pytest.raises(ValueError):
        replies.stage_signals([(True, None, None, -1)])
