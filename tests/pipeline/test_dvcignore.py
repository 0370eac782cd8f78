"""Bytecode and tool caches never make a stage look changed: ``.dvcignore`` keeps them out of DVC's hashes.

This machine sets ``PYTHONDONTWRITEBYTECODE``, users' machines do not: the test removes it, so importing the package
and running a stage write ``__pycache__/*.pyc`` inside the ``iresnet`` and ``pipeline`` folders, as they would there.
"""

from __future__ import annotations

import copy
import sys

from tests.pipeline.repo_copy import commit_all, make_repo_copy

IMPORT_ALL = """
import importlib, pkgutil
for package in ("pipeline", "iresnet"):
    importlib.import_module(package)
    for info in pkgutil.walk_packages([package], prefix=package + "."):
        importlib.import_module(info.name)
"""
TINY_TOY = {
    "datasets": ["moons"],
    "seeds": [0],
    "n_blocks": 1,
    "hidden": [4, 4],
    "coeff": 0.9,
    "nonlin": "elu",
    "n_power_iter": 1,
    "steps": 2,
    "batch_size": 16,
    "lr": 1.0e-3,
    "glow_lr": 1.0e-3,
    "warmup_steps": 0,
    "lr_schedule": "constant",
    "glow_scale_cap": True,
    "n_test": 16,
    "n_val": 16,
    "grid_size": 4,
}


def test_bytecode_and_caches_leave_dvc_status_clean(tmp_path, tiny_params: dict) -> None:
    params = copy.deepcopy(tiny_params)
    params["toy"] = TINY_TOY
    repo = make_repo_copy(tmp_path / "repo", params)
    repo.env.pop("PYTHONDONTWRITEBYTECODE", None)
    repo.env["IRESNET_TRACKING"] = "0"
    commit_all(repo)

    repo.dvc("repro", "toy_density")  # a stage whose deps include the iresnet folder, run with bytecode writing on
    repo.sh(sys.executable, "-c", IMPORT_ALL)
    for cache in (".pytest_cache", ".ruff_cache", "iresnet/.pytest_cache"):
        (repo.root / cache).mkdir(parents=True, exist_ok=True)
        (repo.root / cache / "CACHEDIR.TAG").write_text("cache\n")
    assert list((repo.root / "iresnet").rglob("*.pyc")), "the check needs bytecode inside a folder dep"

    status = repo.dvc("status", "toy_density")
    assert "changed" not in status and "modified" not in status, status
