"""Where every stage reads and writes, relative to one root (the repository, or a ``tmp_path`` in tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """The file layout of the project under ``root``; directories are created by the stage that writes them."""

    root: Path

    @classmethod
    def at(cls, root: str | Path | None = None) -> Paths:
        """Paths rooted at ``root``, or at the current directory (DVC runs every command in the repo root)."""
        return cls(Path(root if root is not None else os.getcwd()).resolve())

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def prepared(self) -> Path:
        """Output of the ``prepare`` stage: ``train.pt``, ``test.pt``, ``stats.json``, ``zca.pt``."""
        return self.data / "prepared"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics"

    @property
    def tables(self) -> Path:
        return self.reports / "tables"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    @property
    def curves(self) -> Path:
        return self.reports / "curves"

    @property
    def workspace(self) -> Path:
        """The user's repository, which owns the MLflow store and the resume checkpoints: ``DVC_ROOT`` when set, else
        ``root``.

        DVC sets ``DVC_ROOT`` for every stage it runs, and for a queued experiment (``dvc exp run --queue``, which
        runs in a temporary copy under ``.dvc/tmp/exps/``) it points it at the user's repository, not the copy
        (``dvc/repo/experiments/queue/base.py``, checked in ``tests/pipeline/test_exp_queue.py``). Runs there must
        log into the workspace's store, not into a copy that DVC deletes afterwards.
        """
        dvc_root = os.environ.get("DVC_ROOT")
        return Path(dvc_root).resolve() if dvc_root else self.root

    @property
    def mlflow_db(self) -> Path:
        return self.workspace / "mlflow.db"

    @property
    def mlartifacts(self) -> Path:
        return self.workspace / "mlartifacts"
