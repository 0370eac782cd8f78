"""The ``prepare`` stage on a tiny IDX dataset: outputs, their consistency, the validation split, statistics fitted
on the train split only, determinism, and the loaders."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.datasets import read_idx
from pipeline.data.store import load_channel_stats, load_prepared, load_stats, load_zca, split_file, zca_file
from pipeline.errors import DataError, ParamsError
from pipeline.files import read_json
from pipeline.outputs import PREPARE
from pipeline.params import load_params, parse_params
from pipeline.paths import Paths
from pipeline.stages.prepare import run


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_prepare_writes_consistent_outputs(tiny_project: Path) -> None:
    paths = Paths.at(tiny_project)
    metrics = run(load_params(paths.params_file), paths)
    # 30 source train images: 4 (0.125, rounded) held out for validation
    assert metrics["n_train"] == 26 and metrics["n_val"] == 4 and metrics["n_test"] == 12
    assert metrics["shape"] == "1x8x8"

    train, labels = load_prepared(paths, "train")
    assert train.dtype == torch.float32 and train.shape == (26, 1, 8, 8) and labels.dtype == torch.int64
    assert float(train.min()) >= 0 and float(train.max()) <= 1
    val, val_labels = load_prepared(paths, "val")
    assert val.shape == (4, 1, 8, 8) and torch.bincount(val_labels).tolist() == [2, 1, 1]
    raw = torch.load(split_file(paths, "train"), weights_only=True)
    raw_val = torch.load(split_file(paths, "val"), weights_only=True)
    assert sorted(raw["indices"].tolist() + raw_val["indices"].tolist()) == list(range(30))  # disjoint, complete
    assert raw_val["indices"].tolist() == sorted(raw_val["indices"].tolist())  # in source order
    source = read_idx(tiny_project / "tiny" / "train-images-idx3-ubyte", 3)
    for stored in (raw, raw_val):  # stored raw, at the source positions its indices name
        assert stored["pixels"].dtype == torch.uint8
        assert np.array_equal(stored["pixels"][:, 0].numpy(), source[stored["indices"].numpy()])
    assert torch.equal(train, raw["pixels"].float() / 255)  # loaded as k / 255, bit for bit
    assert read_json(paths.metrics / "prepare.json") == metrics and metrics["wall_time_s"] > 0

    stats = load_stats(paths)
    assert stats["shape"] == [1, 8, 8] and stats["n_classes"] == 3 and stats["dims"] == 64
    assert stats["split"]["train_per_class"] == [8, 9, 9] and stats["split"]["val_per_class"] == [2, 1, 1]
    assert stats["split"]["test_per_class"] == [4, 4, 4] and stats["split"]["val_fraction"] == 0.125
    assert (stats["n_train"], stats["n_val"], stats["n_test"]) == (26, 4, 12)
    # Normalisation and ZCA are fitted on the train split alone: not on train + validation.
    expected_mean = train.double().mean().item()
    expected_std = train.double().std(correction=0).item()
    assert stats["mean"] == [expected_mean] and stats["std"] == [expected_std]
    with_val = torch.cat([train, val]).double()
    assert with_val.mean().item() != expected_mean and with_val.std(correction=0).item() != expected_std
    assert metrics["mean_c0"] == expected_mean
    channel = load_channel_stats(paths)
    assert channel.mean.tolist() == [expected_mean]

    zca = load_zca(paths)
    assert stats["zca"] == {"enabled": True, "epsilon": 0.01, "logdet": zca.logdet, "dims": 64}
    assert metrics["zca_logdet"] == zca.logdet
    torch.testing.assert_close(zca.mean, train.double().reshape(26, -1).mean(0), rtol=0, atol=1e-12)
    cov = torch.cov(train.double().reshape(26, -1).T, correction=0)
    refit = zca.eigenvectors @ torch.diag(zca.eigenvalues) @ zca.eigenvectors.T
    torch.testing.assert_close(refit, cov, atol=1e-9, rtol=0)

    png = PREPARE.figure_path(paths, "preview")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prepare_is_byte_identical_on_rerun(tiny_project: Path) -> None:
    paths = Paths.at(tiny_project)
    params = load_params(paths.params_file)
    run(params, paths)
    first = {
        **_digest(paths.prepared),
        "preview": hashlib.sha256((PREPARE.figure_path(paths, "preview")).read_bytes()).hexdigest(),
    }
    for f in paths.prepared.iterdir():
        f.unlink()
    run(params, paths)
    second = {
        **_digest(paths.prepared),
        "preview": hashlib.sha256((PREPARE.figure_path(paths, "preview")).read_bytes()).hexdigest(),
    }
    assert first == second and len(first) == 6  # train, val, test, stats, zca, preview


def test_prepare_options_pad_subsample_no_zca(tiny_project: Path, tiny_params: dict) -> None:
    paths = Paths.at(tiny_project)
    run(load_params(paths.params_file), paths)
    assert zca_file(paths).exists()
    raw = copy.deepcopy(tiny_params)
    raw["data"].update({"pad_to_32": True, "max_train": 9, "max_test": 6})
    raw["data"]["zca"]["enabled"] = False
    metrics = run(parse_params(raw), paths)
    assert metrics["shape"] == "1x32x32" and "zca_logdet" not in metrics
    assert not zca_file(paths).exists()  # a stale transform from the earlier run is removed
    images, labels = load_prepared(paths, "test")
    assert images.shape == (6, 1, 32, 32) and labels.shape == (6,)
    stats = read_json(paths.prepared / "stats.json")
    assert stats["zca"] == {"enabled": False} and stats["split"]["subsample"]["max_train"] == 9
    with pytest.raises(DataError, match="data.zca.enabled: true"):
        load_zca(paths)


def test_idx_size_not_divisible_by_squeezes(tiny_project: Path, tiny_params: dict, make_idx_folder: Callable) -> None:
    make_idx_folder(tiny_project / "tiny", size=6)  # 6 / 4 is not an integer
    with pytest.raises(ParamsError, match="divide the 6x6 input"):
        run(parse_params(tiny_params), Paths.at(tiny_project))


def test_loaders_explain_missing_or_broken_outputs(tiny_project: Path) -> None:
    paths = Paths.at(tiny_project)
    with pytest.raises(DataError, match="run `dvc repro prepare`"):
        load_prepared(paths, "train")
    run(load_params(paths.params_file), paths)
    with pytest.raises(ValueError, match="unknown split"):
        load_prepared(paths, "valid")
    split_file(paths, "test").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable"):
        load_prepared(paths, "test")
    torch.save(
        {"pixels": torch.zeros(12, 1, 8, 9, dtype=torch.uint8), "labels": torch.zeros(12, dtype=torch.int64)},
        split_file(paths, "test"),
    )
    with pytest.raises(DataError, match=r"pixels should be uint8 \(N, 1, 8, 8\)"):
        load_prepared(paths, "test")
    torch.save(
        {"pixels": torch.zeros(12, 1, 8, 8), "labels": torch.zeros(12, dtype=torch.int64)}, split_file(paths, "test")
    )
    with pytest.raises(DataError, match=r"pixels should be uint8"):  # a float32 file from an older prepare
        load_prepared(paths, "test")
    torch.save(
        {"pixels": torch.zeros(11, 1, 8, 8, dtype=torch.uint8), "labels": torch.zeros(11, dtype=torch.int64)},
        split_file(paths, "test"),
    )
    with pytest.raises(DataError, match="11 examples but stats.json says 12"):
        load_prepared(paths, "test")
