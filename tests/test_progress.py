"""Stage progress: figures on a terminal bar, plain log lines elsewhere (issue 14)."""

from __future__ import annotations

import logging
import re

from finelake.progress import Progress


def test_without_a_terminal_each_update_is_one_plain_log_line(caplog):
    caplog.set_level(logging.INFO, logger="finelake.progress")
    with Progress("instantiate", 30, unit="rows", tty=False) as p:
        p.update(10)
        p.update(20)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and not any("\r" in ln for ln in lines)
    assert lines[0].startswith("instantiate: 10/30 rows [")
    assert lines[1].startswith("instantiate: 30/30 rows [")
    # elapsed<remaining, rate: tqdm's own meter
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, (?:[\d.]+rows/s|[\d.]+s/rows|\?rows/s)\]", lines[0]), lines[0]


def test_on_a_terminal_the_bar_counts_and_logs_nothing(caplog, capsys):
    caplog.set_level(logging.INFO, logger="finelake.progress")
    with Progress("judge", 4, unit="rows", tty=True) as p:
        p.update(3)
        assert p.n == 3 and p._bar.n == 3
    assert caplog.records == []
    assert "judge" in capsys.readouterr().err
