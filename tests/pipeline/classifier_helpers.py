"""Tiny classification projects shared by the classifier stages' tests: prepared 8x8 data written directly (three
classes with a bright square in a class-specific corner, so a tiny network learns something) and tiny classifiers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.data.store import split_file, stats_file
from pipeline.files import save_torch, write_json
from pipeline.params import Params, parse_params
from pipeline.paths import Paths
from pipeline.stages import train_classifier

REPO = Path(__file__).resolve().parents[2]
# 8x8 inputs: 2 channels (1 + inj_pad 1) at 8x8 in stage 0, 8 channels at 4x4 after the squeeze of stage 1.
TINY_CLASSIFIER = {
    "coeffs": ["vanilla", 0.9, 0.5],
    "seeds": [0],  # one run per model keeps the tests fast; tests of the seed axis set more
    "n_blocks": [1, 1],
    "strides": [1, 2],
    "channels": [4, 4],
    "init_ds": 1,
    "inj_pad": 1,
    "n_power_iter": 1,
    "actnorm": True,
    "epochs": 2,
    "batch_size": 8,
    "eval_batch_size": 5,
    "milestones": [1],
    "gamma": 0.2,
    "lr": 0.05,
    "shift_px": 1,
    "hflip": True,
    "max_train_batches": None,
}
TINY_RECONSTRUCTION = {
    "iterations": [1, 2, 3, 5, 10, 40],
    "n_images": 6,
    "tolerances": [1e-2, 1e-6],
    "timing_iterations": [1, 3],
}


def tiny_images(n: int, n_classes: int = 3, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (n, 1, size, size) in [0, 1] on the 1/255 grid, labels (n,))``; label ``k`` lights corner ``k``."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_classes
    images = torch.rand(n, 1, size, size, generator=gen) * 0.3
    half = size // 2
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k % 4, 2)
        images[i, 0, r * half : (r + 1) * half, c * half : (c + 1) * half] += 0.6
    return torch.round(images.clamp(0, 1) * 255) / 255, labels


def write_prepared(root: Path, n_train: int = 32, n_test: int = 12, n_classes: int = 3, n_val: int = 6) -> None:
    """``data/prepared`` as the ``prepare`` stage writes it (train/validation/test tensors and stats.json)."""
    paths = Paths.at(root)
    train, train_labels = tiny_images(n_train, n_classes, seed=0)
    test, test_labels = tiny_images(n_test, n_classes, seed=1)
    val, val_labels = tiny_images(n_val, n_classes, seed=2)
    splits = (("train", train, train_labels), ("val", val, val_labels), ("test", test, test_labels))
    for split, images, labels in splits:
        pixels = torch.round(images * 255).to(torch.uint8)
        save_torch(split_file(paths, split), {"pixels": pixels, "labels": labels, "indices": torch.arange(len(labels))})
    x = train.double()
    write_json(
        stats_file(paths),
        {
            "dataset": "idx:tiny",
            "n_train": n_train,
            "n_val": n_val,
            "n_test": n_test,
            "n_classes": n_classes,
            "shape": [1, 8, 8],
            "mean": [float(x.mean())],
            "std": [float(x.std(correction=0))],
        },
    )


def tiny_raw(**classifier: Any) -> dict[str, Any]:
    """The committed params with the tiny classifier (plus ``classifier`` overrides) and tiny reconstruction."""
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw["data"].update({"dataset": "idx:tiny", "download": False})
    raw["classifier"].update({**TINY_CLASSIFIER, **classifier})
    raw["reconstruction"].update(TINY_RECONSTRUCTION)
    raw["singular_values"].update({"project": False, "lower_iters": 200})
    raw["evaluate_flow"]["sample_classifier"] = None  # no flow here; and c = 0.9 need not be among the coeffs
    raw["tracking"]["enabled"] = False
    return raw


def classifier_project(root: Path, **classifier: Any) -> tuple[Params, Paths]:
    """A project root with ``params.yaml`` (tiny) and prepared data; nothing trained yet."""
    root.mkdir(parents=True, exist_ok=True)
    raw = tiny_raw(**classifier)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_prepared(root)
    return parse_params(raw), Paths.at(root)


def trained_project(root: Path, **classifier: Any) -> tuple[Params, Paths]:
    """:func:`classifier_project` with every model of ``classifier.coeffs`` trained from every seed."""
    params, paths = classifier_project(root, **classifier)
    for value in params.classifier.coeffs:
        for seed in params.classifier.seeds:
            train_classifier.run(params, paths, coeff=value, seed=seed)
    return params, paths
