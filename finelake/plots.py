"""One way to write a report figure (PNG, headless), shared by ``report`` and ``compare``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def saved_figure(path: str, figsize: tuple[float, float] = (6, 3.5), dpi: int = 110) -> Iterator:
    """Yield ``(fig, ax)`` of a new figure; on leaving the block lay it out, save it to ``path``
    (format from the suffix, ``dpi`` dots per inch) and close it.

    Uses matplotlib's Agg backend (no display needed). A figure whose block raises is closed,
    not saved.

    Raises:
        ImportError: matplotlib is missing (``pip install 'finelake[report]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
