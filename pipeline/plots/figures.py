"""Figures as stage outputs: matplotlib without a display, and PNG files whose bytes depend only on the figure.

matplotlib is imported on first use, so stages (and the CLI) that draw nothing do not pay for it. :func:`tile` lays
out image grids for every figure that shows images.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

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


def tile(rows: Sequence[Sequence[np.ndarray]], fill: float, cols: int | None = None) -> np.ndarray:
    """Images laid out row by row with a 1-pixel gutter of ``fill`` between them (none around the edge).

    ``rows[r][k]``: the image at row ``r``, column ``k``, each ``(H, W, C)`` and of one dtype; ``cols`` (default: the
    longest row) sets the width, and missing places stay ``fill``. Returns ``(R (H + 1) - 1, cols (W + 1) - 1, C)``.
    """
    first = next(image for row in rows for image in row)
    h, w, c = first.shape
    cols = cols or max(len(row) for row in rows)
    grid = np.full((len(rows) * (h + 1) - 1, cols * (w + 1) - 1, c), fill, dtype=first.dtype)
    for r, row in enumerate(rows):
        for k, image in enumerate(row):
            grid[r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = image
    return grid


def square_rows(images: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """``images`` in rows of ``ceil(sqrt(N))``, for a near-square :func:`tile`."""
    cols = math.ceil(math.sqrt(len(images)))
    return [list(images[i : i + cols]) for i in range(0, len(images), cols)]
