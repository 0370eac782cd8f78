"""The prepared data's preview: train examples by class, and their ZCA-whitened versions when the data are whitened."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pipeline.data.preprocess import ZCA
from pipeline.plots.figures import pyplot, save_figure, tile

PER_CLASS = 8  # preview columns
MAX_CLASSES = 10  # preview rows


def preview_rows(labels: Tensor) -> tuple[list[int], list[list[int]]]:
    """The classes shown, and the first ``PER_CLASS`` indices of each of the first ``MAX_CLASSES`` classes."""
    classes = [int(c) for c in torch.unique(labels)[:MAX_CLASSES]]
    return classes, [torch.nonzero(labels == c).flatten()[:PER_CLASS].tolist() for c in classes]


def _stretch(x: Tensor) -> Tensor:
    """Each image rescaled to [0, 1] (whitened values are unbounded)."""
    flat = x.reshape(len(x), -1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(x.shape)


def plot_preview(path: Path, images: Tensor, labels: Tensor, title: str, zca: ZCA | None) -> None:
    """Train examples ``(N, C, H, W)`` in ``[0, 1]`` by class (rows), and beside them their ZCA-whitened versions
    (each stretched to its own range) when ``zca`` is given."""
    plt = pyplot()
    classes, rows = preview_rows(labels)

    def mosaic(x: Tensor) -> Tensor:
        x = x.detach().cpu()  # the same tensor on the CPU
        return tile([[x[i].permute(1, 2, 0).numpy() for i in idx] for idx in rows], fill=0.5, cols=PER_CLASS)

    panels = [("images", mosaic(images))]
    if zca is not None:
        chosen = sorted({i for idx in rows for i in idx})
        whitened = images.clone()
        whitened[chosen] = _stretch(zca.whiten(images[chosen]))
        panels.append((f"ZCA-whitened (eps={zca.epsilon:g}, per-image contrast)", mosaic(whitened)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.5 * len(rows) + 1.2), squeeze=False)
    for ax, (name, grid) in zip(axes[0], panels):
        shown = grid.squeeze(-1) if grid.shape[-1] == 1 else grid
        ax.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        h = images.shape[2] + 1
        ax.set_yticks([r * h + h / 2 for r in range(len(classes))], [str(c) for c in classes], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
