"""Shared fixtures of the pipeline tests: tiny IDX datasets and params files in ``tmp_path``, a clean environment,
and a template MLflow database (creating one runs MLflow's migrations, ~10 s, so it is done once per session)."""

from __future__ import annotations

import copy
import gzip
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's tracking store, DVC variables or progress bars; tracking is opt-in."""
    for name in ("MLFLOW_TRACKING_URI", "DVC_STAGE", "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IRESNET_TRACKING", "0")
    monkeypatch.setenv("IRESNET_PROGRESS", "0")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: 0, 0, 0x08, ndim, big-endian int32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def tiny_arrays(n_train: int = 30, n_test: int = 12, size: int = 8, n_classes: int = 3, seed: int = 0) -> dict:
    """Random uint8 images ``(N, size, size)`` and cycling labels ``0..n_classes-1``."""
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % n_classes).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % n_classes).astype(np.uint8),
    }


@pytest.fixture(name="idx_bytes")
def _idx_bytes_fixture() -> Callable[[np.ndarray], bytes]:
    """:func:`idx_bytes` for tests (test modules do not import conftest)."""
    return idx_bytes


@pytest.fixture
def make_idx_folder() -> Callable[..., dict]:
    """``make(folder, gz=False, **tiny_arrays_kwargs) -> arrays``: writes the four IDX files into ``folder``."""

    def make(folder: Path, gz: bool = False, **kwargs: Any) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = tiny_arrays(**kwargs)
        for key, stem in IDX_NAMES.items():
            data = idx_bytes(arrays[key])
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (folder / stem).write_bytes(data)
        return arrays

    return make


@pytest.fixture(scope="session")
def repo_params() -> dict[str, Any]:
    """The committed ``params.yaml`` as plain data (tests deep-copy it before changing it)."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def tiny_params(repo_params: dict[str, Any]) -> dict[str, Any]:
    """The committed params pointed at an 8x8 ``idx:tiny`` dataset (relative to the project root)."""
    raw = copy.deepcopy(repo_params)
    raw["data"].update({"dataset": "idx:tiny", "root": "data/raw", "download": False})
    raw["data"]["zca"] = {"enabled": True, "epsilon": 0.01}
    return raw


@pytest.fixture
def tiny_project(tmp_path: Path, tiny_params: dict[str, Any], make_idx_folder: Callable[..., dict]) -> Path:
    """A project root in ``tmp_path`` with ``params.yaml`` (tiny profile) and the ``tiny/`` IDX dataset."""
    make_idx_folder(tmp_path / "tiny")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    return tmp_path


@pytest.fixture(scope="session")
def _template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the schema
    return path


@pytest.fixture
def fresh_store(_template_db: Path) -> Callable[[Path], Path]:
    """``fresh_store(root)`` puts an empty, migrated ``mlflow.db`` at ``root`` (copy of the session template)."""

    def place(root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_template_db, root / "mlflow.db")
        return root / "mlflow.db"

    return place


@pytest.fixture
def classifier_repo(
    tmp_path: Path,
    tiny_params: dict[str, Any],
    make_idx_folder: Callable[..., dict],
    fresh_store: Callable[[Path], Path],
) -> Callable[..., tuple[Any, dict[str, Any], dict[str, bytes]]]:
    """``make(**classifier)``: a git + DVC copy of the repository in ``tmp_path/repo`` with the tiny dataset and two
    tiny classifiers (c = 0.9 and 0.5, one epoch, ``classifier`` settings on top) trained by ``dvc repro
    train_classifier`` and committed; returns the copy, its params and every output's bytes (the last good ones)."""
    from tests.pipeline.classifier_helpers import TINY_CLASSIFIER
    from tests.pipeline.repo_copy import commit_all, make_repo_copy, outputs_of

    def make(**classifier: Any) -> tuple[Any, dict[str, Any], dict[str, bytes]]:
        params = {**tiny_params, "classifier": {**tiny_params["classifier"], **TINY_CLASSIFIER, "coeffs": [0.9, 0.5]}}
        params["classifier"].update(epochs=1, **classifier)
        repo = make_repo_copy(tmp_path / "repo", params)
        make_idx_folder(repo.root / "tiny")
        fresh_store(repo.root)
        repo.dvc("repro", "train_classifier")
        commit_all(repo)
        return repo, params, outputs_of(repo.root)

    return make
