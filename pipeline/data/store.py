"""The prepared dataset on disk (written by the ``prepare`` stage) and the loaders every later stage uses.

``data/prepared/``:

- ``train.pt``, ``val.pt``, ``test.pt``: ``{"pixels": uint8 (N, C, H, W), "labels": int64 (N,), "indices": int64
  (N,)}`` (``indices``: position of each example in its source, which records the split). ``val`` is the validation
  split, carved from the train part: training curves and every choice read it; only final evaluations read
  ``test``. Raw pixels keep the files a quarter of the size of float32 ones, small enough to commit with the default
  profile's results; :func:`load_prepared` returns them as ``k / 255``;
- ``stats.json``: dataset, source, split, counts, shape, per-channel mean/std of the train split (validation
  excluded), ZCA summary;
- ``zca.pt`` (when ``data.zca.enabled``): :meth:`pipeline.data.preprocess.ZCA.state_dict`.

Images are stored unnormalised so that classification (normalise with ``stats.json``) and density estimation
(dequantise, optionally whiten) start from the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.data.preprocess import ZCA, ChannelStats, to_unit
from pipeline.errors import DataError, brief
from pipeline.files import read_json
from pipeline.paths import Paths

SPLITS = ("train", "val", "test")
_HINT = "run `dvc repro prepare` (or `iresnet prepare`) first"


def split_file(paths: Paths, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return paths.prepared / f"{split}.pt"


def stats_file(paths: Paths) -> Path:
    return paths.prepared / "stats.json"


def zca_file(paths: Paths) -> Path:
    return paths.prepared / "zca.pt"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"prepared data {path} does not exist: {_HINT}.")
    return path


def _load(path: Path) -> dict[str, Tensor]:
    try:
        return torch.load(_require(path), map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as err:  # truncated zip, pickle error, ...: the file cannot be trusted
        raise DataError(f"prepared data {path} is unreadable ({brief(err)}); delete it and {_HINT}.") from None


def load_stats(paths: Paths) -> dict[str, Any]:
    """The contents of ``stats.json``, checked to hold what the stages read (a hand-edited or foreign file is refused
    here, not met later as a KeyError)."""
    path = _require(stats_file(paths))
    try:
        stats = read_json(path)
    except (ValueError, OSError) as err:  # truncated or garbled JSON
        raise DataError(f"prepared data {path} is unreadable ({brief(err)}); delete it and {_HINT}.") from None
    problem = _stats_problem(stats)
    if problem is not None:
        raise DataError(f"prepared data {path} is not what `prepare` writes ({problem}); delete it and {_HINT}.")
    return stats


def _stats_problem(stats: Any) -> str | None:
    """What is wrong with a ``stats.json`` document, or ``None``."""

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(stats, dict):
        return f"a JSON object was expected, not {type(stats).__name__}"
    counts = ("n_classes", *(f"n_{split}" for split in SPLITS))
    missing = [key for key in ("dataset", "shape", *counts, "mean", "std") if key not in stats]
    if missing:
        return f"no {', '.join(missing)}"
    shape = stats["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(count(d) and d > 0 for d in shape)):
        return f"shape {shape!r} is not [channels, height, width]"
    if not all(count(stats[key]) for key in counts):
        return "the counts n_classes, n_train, n_val, n_test are not all whole numbers"
    for key in ("mean", "std"):
        values = stats[key]
        numbers = isinstance(values, list) and all(isinstance(v, (int, float)) for v in values)
        if not (numbers and len(values) == shape[0]):
            return f"{key} is not a list of {shape[0]} numbers, one per channel"
    return None


def load_prepared(paths: Paths, split: str) -> tuple[Tensor, Tensor]:
    """``(images float32 (N, C, H, W) in [0, 1], labels int64 (N,))`` of ``split``, checked against ``stats.json``.

    ``images`` are the stored uint8 pixels ``k`` as ``k / 255`` (:func:`pipeline.data.preprocess.to_unit`).
    """
    path = split_file(paths, split)
    data = _load(path)
    stats = load_stats(paths)
    images, labels = data.get("pixels"), data.get("labels")
    expected = tuple(stats["shape"])
    problems = []
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or tuple(images.shape[1:]) != expected:
        problems.append(f"pixels should be uint8 (N, {', '.join(map(str, expected))})")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
        problems.append("labels should be int64 (N,)")
    elif isinstance(images, Tensor) and len(labels) != len(images):
        problems.append(f"{len(labels)} labels for {len(images)} images")
    elif len(labels) != stats[f"n_{split}"]:
        problems.append(f"{len(labels)} examples but stats.json says {stats[f'n_{split}']}")
    if problems:
        raise DataError(f"prepared data {path} is inconsistent ({'; '.join(problems)}); {_HINT} again.")
    return to_unit(images), labels  # type: ignore[arg-type]


def load_channel_stats(paths: Paths) -> ChannelStats:
    """Per-channel train mean/std (float64) for ``(x - mean) / std``."""
    stats = load_stats(paths)
    mean, std = (torch.tensor(stats[key], dtype=torch.float64) for key in ("mean", "std"))
    return ChannelStats(mean, std)


def load_zca(paths: Paths) -> ZCA:
    """The fitted ZCA transform; :class:`DataError` if ``data.zca.enabled`` was false when preparing."""
    path = zca_file(paths)
    if not path.is_file():
        raise DataError(f"no ZCA at {path}: set `data.zca.enabled: true` and {_HINT}.")
    return ZCA.from_state_dict(_load(path))
