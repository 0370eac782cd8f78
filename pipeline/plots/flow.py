"""Figures of the density-estimation experiments: samples of the flow (Fig. 5) and the log-det estimator's bias
against the number of series terms (Fig. 4/9)."""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

from pipeline.plots.figures import pyplot, save_figure, square_rows, tile

DPI = 120


def plot_samples(path: Path, samples: Tensor, data: Tensor, title: str, data_name: str = "data images") -> None:
    """Fig. 5: real images (``data``, titled ``data_name``) beside samples of the flow, both ``(N, C, H, W)`` in
    ``[0, 1]``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.8))
    for ax, name, images in ((axes[0], data_name, data), (axes[1], "samples", samples)):
        grid = tile(square_rows(list(images.detach().cpu().permute(0, 2, 3, 1).numpy())), fill=1.0)
        ax.imshow(grid.squeeze(-1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=DPI)


def plot_logdet_bias(path: Path, rows: list[dict[str, float]], title: str) -> None:
    """Fig. 4: the exact |bias| (eigenvalues), its Monte Carlo estimate (with its standard error), the std of the
    one-probe estimate and the Theorem 3 bound against the number of terms n, log y.

    ``rows``: the ``logdet_bias`` stage's curve (``n_terms``, ``exact_bias``, ``abs_bias``, ``bias_stderr``,
    ``std``, ``theorem3_bound``).
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    n = [r["n_terms"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    exact = [(k, abs(r["exact_bias"])) for k, r in zip(n, rows) if r["exact_bias"] != 0]
    ax.plot(*zip(*exact), marker="o", ms=4, lw=2, label="|bias|, exact (eigenvalues of each block's Jacobian)")
    ax.errorbar(
        n,
        [r["abs_bias"] for r in rows],
        yerr=[r["bias_stderr"] for r in rows],
        marker=".",
        ms=3,
        lw=0.8,
        alpha=0.6,
        capsize=2,
        label="|bias|, Monte Carlo estimate (± std. error)",
    )
    ax.plot(n, [r["std"] for r in rows], marker="s", ms=4, label="std of one-probe estimate")
    bounds = [r["theorem3_bound"] for r in rows]
    if all(math.isfinite(b) for b in bounds):
        ax.plot(n, bounds, "k--", label="Theorem 3 bound (certified Lip)")
    ax.set_yscale("log")
    ax.set_xlabel("number of power-series terms n")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("nats per example (flow log-det)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=DPI)
