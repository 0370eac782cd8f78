"""Figures as stage outputs: matplotlib without a display, and PNG files whose bytes depend only on the figure.

matplotlib is imported on first use, so stages (and the CLI) that draw nothing do not pay for it.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from pipeline.files import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (renders to memory: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path, dpi: int) -> None:
    """Write ``fig`` to ``path`` as a PNG at ``dpi`` (atomically, creating folders) and close it.

    The PNG metadata leave out ``Software`` (matplotlib's version), so the same figure gives the same bytes on every
    run and DVC sees no change.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    pyplot().close(fig)
    write_bytes_atomic(path, buffer.getvalue())
