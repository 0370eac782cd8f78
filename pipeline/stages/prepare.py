"""Stage ``prepare``: load the dataset, split it into train / validation / test, fit normalisation (and ZCA) on the
train split only (neither on validation nor on test), write ``data/prepared/``
(format in :mod:`pipeline.data.store`), a preview grid and the stage's metrics (:data:`pipeline.outputs.PREPARE`).

Deterministic: the same params give byte-identical data files (seeded split, sorted JSON, in-memory ``torch.save``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.data.datasets import load_dataset
from pipeline.data.preprocess import ZCA, ChannelStats, pad_to, to_unit
from pipeline.data.store import split_file, stats_file, zca_file
from pipeline.files import save_torch, write_json
from pipeline.outputs import PREPARE, StageRun
from pipeline.params import Params, check_spatial
from pipeline.paths import Paths
from pipeline.plots.data import plot_preview
from pipeline.tracking import Tracker


def _per_class(labels: Tensor, n_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=n_classes).tolist()


def run(params: Params, paths: Paths, tracker: Tracker | None = None) -> dict[str, Any]:
    """Prepare ``params.data.dataset``; returns the stage's metrics (counts, shape, mean/std, ZCA log-det, time)."""
    out = StageRun(PREPARE, paths, tracker)
    data = params.data
    raw = load_dataset(data, paths.root)
    splits = {
        "train": (raw.train_images, raw.train_labels, raw.train_indices),
        "val": (raw.val_images, raw.val_labels, raw.val_indices),
        "test": (raw.test_images, raw.test_labels, raw.test_indices),
    }
    if data.pad_to_32:
        splits = {name: (pad_to(pixels, 32), labels, idx) for name, (pixels, labels, idx) in splits.items()}
    # Stats, ZCA and the preview need values of the train split only; validation and test are only counted.
    train = to_unit(splits["train"][0])
    c, h, w = train.shape[1:]
    check_spatial(params, h, w)  # an idx: folder's size is known only now, still before any training
    stats = ChannelStats.fit(train)
    zca = ZCA.fit(train, data.zca.epsilon) if data.zca.enabled else None

    for split, (pixels, labels, indices) in splits.items():
        save_torch(split_file(paths, split), {"pixels": pixels, "labels": labels, "indices": indices})
    if zca is not None:
        save_torch(zca_file(paths), zca.state_dict())
    else:
        zca_file(paths).unlink(missing_ok=True)  # never leave a stale transform from an earlier run

    n_classes = int(max(labels.max() for _, labels, _ in splits.values())) + 1
    counts = {f"n_{split}": len(labels) for split, (_, labels, _) in splits.items()}
    summary = {
        "dataset": data.dataset,
        "source": raw.source,
        "split": {
            **raw.split,
            **{f"{split}_per_class": _per_class(labels, n_classes) for split, (_, labels, _) in splits.items()},
        },
        **counts,
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
    title = f"{data.dataset}: {len(train)} train / {counts['n_val']} val / {counts['n_test']} test, {c}x{h}x{w}"
    plot_preview(out.figure("preview"), train, raw.train_labels, title, zca)
    out.artifact(stats_file(paths), "prepared")

    metrics: dict[str, Any] = {
        "dataset": data.dataset,
        **counts,
        "n_classes": n_classes,
        "shape": f"{c}x{h}x{w}",
    }
    for i, (m, s) in enumerate(zip(summary["mean"], summary["std"])):
        metrics[f"mean_c{i}"], metrics[f"std_c{i}"] = m, s
    if zca is not None:
        metrics["zca_logdet"] = zca.logdet
    # The wall time goes into the metrics, not into stats.json, which must stay byte-identical across re-runs.
    return out.finish(metrics)
