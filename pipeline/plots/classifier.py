"""Figures of the classification experiments, drawn only from the numbers the stages write to their CSV/JSON files:
Fig. 6 (largest singular value per layer), Fig. 8 (reconstruction error vs iterations), Fig. 3/7 (reconstructions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from pipeline.plots.figures import pyplot, save_figure, tile

DPI = 120


def _colours(labels: list[str]) -> dict[str, Any]:
    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def plot_singular_values(path: Path, rows: pd.DataFrame, models: dict[str, dict[str, Any]]) -> None:
    """Fig. 6: per convolution (in network order) its largest singular value, one line per model, log y.

    ``rows``: the CSV rows of the trained weights; ``models``: the JSON summaries (for ``coeff`` and the
    certificate). The line is ``sigma_exact`` (the true norm of the zero-padded operator); the band spans the
    bounds, from the power-iteration ``sigma_lower`` up to the certified ``sigma_upper``. A solid black line marks 1,
    a dashed line in each i-ResNet's colour its ``c``.
    """
    plt = pyplot()
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter

    labels = list(models)
    colour = _colours(labels)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label in labels:
        part = rows[rows["model"] == label]
        x = np.arange(len(part))
        summary = models[label]
        mark = "certified" if summary["guaranteed_inverse"] else "not certified"
        ax.plot(x, part["sigma_exact"], marker="o", ms=3, lw=1.2, color=colour[label], label=f"{label} ({mark})")
        ax.fill_between(x, part["sigma_lower"], part["sigma_upper"], color=colour[label], alpha=0.25, lw=0)
        if summary["coeff"] is not None:
            ax.axhline(summary["coeff"], color=colour[label], ls="--", lw=0.8)
    ax.axhline(1.0, color="black", lw=1.0)
    ax.set_yscale("log")
    coeffs = [m["coeff"] for m in models.values() if m["coeff"] is not None]
    ticks = sorted({*coeffs, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0})
    low, high = ax.get_ylim()
    ax.yaxis.set_major_locator(FixedLocator([t for t in ticks if low <= t <= high]))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("convolution (network order: 3x3, 1x1, 3x3 per block)")
    ax.set_ylabel("largest singular value: exact (band: lower to certified bound)")
    ax.set_title("Fig. 6: largest singular value of each convolution after training")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=DPI)


def plot_reconstruction_error(path: Path, curve: pd.DataFrame, tolerances: tuple[float, ...]) -> None:
    """Fig. 8: mean (solid) and max (dashed) absolute reconstruction error vs fixed-point iterations, log y."""
    plt = pyplot()
    labels = list(dict.fromkeys(curve["model"]))
    colour = _colours(labels)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in labels:
        part = curve[curve["model"] == label]
        for column, style in (("mean_error", "-"), ("max_error", "--")):
            finite = part[np.isfinite(part[column]) & (part[column] > 0)]
            ax.plot(
                finite["iterations"],
                finite[column],
                style,
                marker="o",
                ms=3,
                color=colour[label],
                label=f"{label} ({column.split('_')[0]})",
            )
    for tol in tolerances:
        ax.axhline(tol, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fixed-point iterations per block")
    ax.set_ylabel("absolute reconstruction error (pixels in [0, 1])")
    ax.set_title("Fig. 8: reconstruction error vs iterations (dotted: tolerances)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path, dpi=DPI)


def _rgb(image: Tensor) -> np.ndarray:
    """``(C, H, W)`` -> ``(H, W, 3)`` in ``[0, 1]``: grey repeated to RGB, non-finite pixels red."""
    img = image.detach().cpu().permute(1, 2, 0).numpy()
    img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]
    bad = ~np.isfinite(img).all(axis=2)
    img = np.clip(np.nan_to_num(img, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    img[bad] = (1.0, 0.0, 0.0)
    return img


def plot_reconstructions(path: Path, rows: dict[str, Tensor], iterations: int) -> None:
    """Fig. 3/7: one row per entry of ``rows`` (``original`` first), images ``(N, C, H, W)`` in pixel units.

    Values are clipped to ``[0, 1]``; non-finite pixels (a diverged inverse) are shown in red.
    """
    plt = pyplot()
    names = list(rows)
    n = rows[names[0]].shape[0]
    fig, axes = plt.subplots(len(names), 1, figsize=(1.0 * n + 1.5, 1.15 * len(names) + 0.6), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        images = rows[name].detach().double().cpu()
        ax.imshow(tile([[_rgb(image) for image in images]], fill=1.0), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(
        f"Fig. 3: originals and reconstructions from the final features ({iterations} iterations per block)",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=DPI)
