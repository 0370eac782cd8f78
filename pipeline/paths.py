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
        """The user's workspace that owns the tracking store.

        ``dvc exp run --queue`` runs stages in a temporary copy at ``<workspace>/.dvc/tmp/exps/<tmpdir>``; runs there
        must log into the workspace's store, not into a copy that DVC deletes afterwards.
        """
        for path in (self.root, *self.root.parents):
            up = path.parents
            if len(up) >= 4 and up[0].name == "exps" and up[1].name == "tmp" and up[2].name == ".dvc":
                return up[3]
        return self.root

    @property
    def mlflow_db(self) -> Path:
        return self.workspace / "mlflow.db"

    @property
    def mlartifacts(self) -> Path:
        return self.workspace / "mlartifacts"
