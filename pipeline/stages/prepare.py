"""Stage ``prepare``: load the dataset, split it, fit normalisation (and ZCA) on train, write ``data/prepared/``
(format in :mod:`pipeline.data.store`), a preview grid ``reports/figures/data_preview.png`` and the stage's metrics
``reports/metrics/prepare.json``.

Deterministic: the same params give byte-identical data files (seeded split, sorted JSON, in-memory ``torch.save``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.data.datasets import load_dataset
from pipeline.plots.figures import pyplot, save_figure
from pipeline.files import save_torch, write_json
from pipeline.params import Params, check_spatial
from pipeline.paths import Paths
from pipeline.data.store import split_file, stats_file, zca_file
from pipeline.data.preprocess import ZCA, ChannelStats, pad_to, to_unit
from pipeline.tracking import NullTracker, Tracker

PREVIEW = "data_preview.png"
_PER_CLASS = 8  # preview columns
_MAX_CLASSES = 10  # preview rows


def metrics_file(paths: Paths) -> Any:
    return paths.metrics / "prepare.json"


def _preview_rows(images: Tensor, labels: Tensor) -> tuple[list[int], list[list[int]]]:
    """The first ``_PER_CLASS`` train indices of each of the first ``_MAX_CLASSES`` classes."""
    classes = [int(c) for c in torch.unique(labels)[:_MAX_CLASSES]]
    return classes, [torch.nonzero(labels == c).flatten()[:_PER_CLASS].tolist() for c in classes]


def _tile(images: Tensor, rows: list[list[int]]) -> np.ndarray:
    """A ``(rows·H, cols·W, C)`` mosaic in [0, 1] with a 1-pixel grey gutter."""
    _, c, h, w = images.shape
    grid = np.full((len(rows) * (h + 1), _PER_CLASS * (w + 1), c), 0.5, dtype=np.float32)
    for r, idx in enumerate(rows):
        for k, i in enumerate(idx):
            grid[r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = images[i].permute(1, 2, 0).numpy()
    return grid


def _stretch(x: Tensor) -> Tensor:
    """Each image rescaled to [0, 1] (whitened values are unbounded)."""
    flat = x.reshape(len(x), -1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(x.shape)


def write_preview(path: Any, images: Tensor, labels: Tensor, title: str, zca: ZCA | None) -> None:
    """Train examples by class (rows), and their ZCA-whitened versions beside them when ``zca`` is given."""
    plt = pyplot()
    classes, rows = _preview_rows(images, labels)
    panels = [("images", _tile(images, rows))]
    if zca is not None:
        chosen = sorted({i for idx in rows for i in idx})
        whitened = images.clone()
        whitened[chosen] = _stretch(zca.whiten(images[chosen]))
        panels.append((f"ZCA-whitened (eps={zca.epsilon:g}, per-image contrast)", _tile(whitened, rows)))
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


def _per_class(labels: Tensor, n_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=n_classes).tolist()


def run(params: Params, paths: Paths, tracker: Tracker | None = None) -> dict[str, Any]:
    """Prepare ``params.data.dataset``; returns the stage's metrics (counts, shape, mean/std, ZCA log-det, time)."""
    tracker = tracker or NullTracker()
    start = time.perf_counter()
    data = params.data
    raw = load_dataset(data, paths.root)
    train_pixels, test_pixels = raw.train_images, raw.test_images
    if data.pad_to_32:
        train_pixels, test_pixels = pad_to(train_pixels, 32), pad_to(test_pixels, 32)
    train = to_unit(train_pixels)  # stats, ZCA and the preview need values; the test split is only counted
    c, h, w = train.shape[1:]
    check_spatial(params, h, w)  # an idx: folder's size is known only now, still before any training
    stats = ChannelStats.fit(train)
    zca = ZCA.fit(train, data.zca.epsilon) if data.zca.enabled else None

    for split, pixels, labels, indices in (
        ("train", train_pixels, raw.train_labels, raw.train_indices),
        ("test", test_pixels, raw.test_labels, raw.test_indices),
    ):
        save_torch(split_file(paths, split), {"pixels": pixels, "labels": labels, "indices": indices})
    if zca is not None:
        save_torch(zca_file(paths), zca.state_dict())
    else:
        zca_file(paths).unlink(missing_ok=True)  # never leave a stale transform from an earlier run

    n_classes = int(max(raw.train_labels.max(), raw.test_labels.max())) + 1
    summary = {
        "dataset": data.dataset,
        "source": raw.source,
        "split": {
            **raw.split,
            "train_per_class": _per_class(raw.train_labels, n_classes),
            "test_per_class": _per_class(raw.test_labels, n_classes),
        },
        "n_train": len(train),
        "n_test": len(test_pixels),
        "n_classes": n_classes,
        "shape": [c, h, w],
        "dims": c * h * w,
        "pixel_values": "stored as uint8 k; loaded as k / 255, in [0, 1]",
        "padded_to_32": data.pad_to_32,
        "mean": stats.mean.tolist(),
        "std": stats.std.tolist(),
        "zca": {"enabled": False}
        if zca is None
        else {"enabled": True, "epsilon": zca.epsilon, "logdet": zca.logdet, "dims": zca.dim},
    }
    write_json(stats_file(paths), summary)
    preview = paths.figures / PREVIEW
    title = f"{data.dataset}: {len(train)} train / {len(test_pixels)} test, {c}x{h}x{w}"
    write_preview(preview, train, raw.train_labels, title, zca)
    tracker.log_artifact(stats_file(paths), "prepared")
    tracker.log_artifact(preview, "figures")

    metrics: dict[str, Any] = {
        "dataset": data.dataset,
        "n_train": len(train),
        "n_test": len(test_pixels),
        "n_classes": n_classes,
        "shape": f"{c}x{h}x{w}",
    }
    for i, (m, s) in enumerate(zip(summary["mean"], summary["std"])):
        metrics[f"mean_c{i}"], metrics[f"std_c{i}"] = m, s
    if zca is not None:
        metrics["zca_logdet"] = zca.logdet
    metrics["wall_time_s"] = time.perf_counter() - start
    # The wall time goes here, not into stats.json, which must stay byte-identical across re-runs.
    write_json(metrics_file(paths), metrics)
    return metrics
