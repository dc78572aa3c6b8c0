"""The canary: a model stage's first small chunk is checked against the profile's quality gates
before the rest of the stage runs (issue 25 item 6)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from click.testing import CliRunner

from finelake.method import canary as C


def _outcomes(**statuses):
    o = C.Outcomes(total=sum(statuses.values()), statuses=Counter(statuses))
    return o


def test_metrics_are_shares_of_the_canary_rows():
    o = _outcomes(ok=6, invalid=2, null=1, excerpt_rejected=1)
    o.reasons = Counter({"unfilled_slot": 1, "excerpt_markup_in_instruction": 1})
    o.flags = Counter({"unknown_keys": 5})
    assert C.METRICS["invalid_share"](o) == 0.2
    assert C.METRICS["null_share"](o) == 0.1
    assert C.METRICS["unknown_keys_share"](o) == 0.5
    assert C.METRICS["grounded_share"](o) == 6 / 7  # ok among rows with an answer
    assert C.METRICS["pass_share"](o) is None  # no scored pair: nothing to gate
    assert C.failed_gates(o, {"max_invalid_share": 0.25, "min_pass_share": 0.5}) == []
    assert C.failed_gates(o, {"max_unknown_keys_share": 0.4}) == ["max_unknown_keys_share: 0.50 > 0.40"]


def test_unknown_gate_names_are_refused():
    with pytest.raises(ValueError, match="unknown quality gate 'max_typo_share'"):
        C.gate_metric("max_typo_share")
    with pytest.raises(ValueError):
        C.gate_metric("most_invalid_share")


def test_every_configured_gate_has_a_metric():
    from finelake.config import QualityConfig

    q = QualityConfig()
    for stage in ("genericize", "instantiate", "judge"):
        for gate in getattr(q, stage).model_dump():
            C.gate_metric(gate)  # raises for a field without a metric


def test_failure_message_names_figures_replies_and_keys():
    o = _outcomes(invalid=3, ok=1)
    o.samples = [("invalid", "empty_template", '{"instruction_template": "x"}')]
    msg = C.failure_message("genericize", o, ["max_invalid_share: 0.75 > 0.50"],
                            {"max_invalid_share": 0.5}, {"genericize.mode": "direct"})
    assert msg.startswith("canary failed: genericize: max_invalid_share: 0.75 > 0.50 on 4 rows")
    assert '{"instruction_template": "x"}' in msg and "genericize.mode=direct" in msg
    assert "--no-canary" in msg


def _genericize(lake, queries, *sets):
    from finelake.cli import cli

    args = ["genericize", "--conf", "load-test", "--lake", lake, "--max-queries", "24",
            "--set", "genericize.chunk_rows=8",
            "--set", "models.generator.batch_size=4", "--set", "quality.canary=true",
            "--set", "quality.canary_rows=8"]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(cli, args)


def test_a_reply_in_another_shape_stops_the_stage_after_the_canary(spark, tmp_path):
    from conftest import sample_slice
    from finelake.cli import cli
    from finelake.config import load_config
    from finelake.runtime import StageContext
    from finelake.tables import GENERICIZATIONS

    lake = str(tmp_path / "lake")
    queries = sample_slice(tmp_path, "queries.jsonl", 30)
    res = CliRunner().invoke(cli, ["ingest", "--conf", "load-test", "--lake", lake,
                                   "--queries", queries])
    assert res.exit_code == 0, res.output
    renamed = json.dumps({"picks": "choices"})
    res = _genericize(lake, queries, f"models.generator.options.rename_keys={renamed}")
    assert res.exit_code == 3, res.output
    assert res.output.startswith("canary failed: genericize: max_invalid_share: 1.00 > 0.50")
    assert '"choices"' in res.output  # a raw reply is shown
    ctx = StageContext(load_config("load-test", lake=lake), spark=spark)
    # nothing of the stage was committed: every row stays pending, the canary's included
    assert not ctx.lake.exists(GENERICIZATIONS) or ctx.lake.read_arrow(GENERICIZATIONS).num_rows == 0

    # the replies in the shape finelake reads pass the default gates, and the stage completes
    res = _genericize(lake, queries)
    assert res.exit_code == 0, res.output
    assert "[genericize] canary passed on 8 rows" in res.output
    assert ctx.lake.read_arrow(GENERICIZATIONS).num_rows == 24
