"""Progress of long stages: rows done of total, rows/s and time left.

On a terminal this is a live ``tqdm`` bar on stderr; otherwise (a log file, a Databricks or EMR
driver log, CI) the same figures, formatted by tqdm's own ``format_meter``, are written as one
plain ``INFO`` log line per update, so a log never fills with carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from tqdm import tqdm

log = logging.getLogger("finelake.progress")

BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]"


class Progress:
    """Counts ``total`` units (rows, documents) of one stage.

    Args:
        desc: what is being done, e.g. ``"instantiate"``.
        total: units to do (>= 0).
        unit: the units' name, plural (``"rows"``).
        tty: force the live bar (True) or log lines (False); default: whether stderr is a terminal.

    Use as a context manager and call :meth:`update` with the units just finished.
    """

    def __init__(self, desc: str, total: int, unit: str = "rows", tty: Optional[bool] = None):
        self.desc, self.total, self.unit = desc, int(total), unit
        self.n = 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._bar = (tqdm(total=self.total, desc=desc, unit=unit, file=sys.stderr,
                          dynamic_ncols=True, leave=False) if self.tty else None)

    def line(self) -> str:
        """The current figures as one line (``desc: n/total unit [elapsed<left, rate]``)."""
        return tqdm.format_meter(self.n, self.total, time.monotonic() - self.start,
                                 prefix=self.desc, unit=self.unit, bar_format=BAR_FORMAT)

    def update(self, n: int) -> None:
        """Record ``n`` more units done; redraw the bar, or log one line."""
        self.n += int(n)
        if self._bar is not None:
            self._bar.update(int(n))
        else:
            log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
