"""Fig. 2: the 2-D toy densities, one row per dataset: a histogram of its samples, then each flow's density."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pipeline.data.toy2d import WINDOW, sample
from pipeline.plots.figures import pyplot, save_figure

FIGURE_POINTS = 100_000  # data drawn for the "data" column's histogram (presentation only)

Panel = tuple[str, dict[str, str], dict[str, Tensor]]  # dataset, column titles, column images (size, size)


def data_histogram(name: str, seed: int, size: int) -> Tensor:
    """Empirical density of ``FIGURE_POINTS`` samples on the heatmap grid ``(size, size)`` (row = y)."""
    x = sample(name, FIGURE_POINTS, seed, "figure")
    h = 2 * WINDOW / size
    counts = torch.histogramdd(x.flip(1), bins=[size, size], range=[-WINDOW, WINDOW, -WINDOW, WINDOW]).hist
    return counts / (FIGURE_POINTS * h * h)


def plot_toy_densities(path: Path, panels: list[Panel], columns: list[str], note: str = "") -> None:
    """Rows = datasets; ``columns`` = keys of each panel's images (``data`` first, then the models), heatmaps on
    ``[-WINDOW, WINDOW]²`` with row = y; ``note``: a second title line (the setup)."""
    plt = pyplot()
    fig, axes = plt.subplots(
        len(panels), len(columns), figsize=(7.5, 2.5 * len(panels) + (0.6 if note else 0.4)), squeeze=False
    )
    for row, (name, titles, images) in enumerate(panels):
        for col, key in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(
                images[key].detach().cpu().numpy(),
                origin="lower",
                extent=(-WINDOW, WINDOW, -WINDOW, WINDOW),
                cmap="magma",
                interpolation="nearest",
            )
            ax.set_title(titles[key], fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=10)
    title = "Fig. 2: 2-D densities (test NLL in nats, lower is better)"
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
