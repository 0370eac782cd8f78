"""A throw-away git + DVC copy of the repository with a tiny params file, for tests that run real ``dvc`` commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COPIED = ("pipeline", "iresnet", "dvc.yaml", ".dvcignore", ".gitignore")
TEMPLATES = ".dvc/plots"  # the custom `dvc plots` templates dvc.yaml names


@dataclass(frozen=True)
class RepoCopy:
    root: Path
    env: dict[str, str]

    def sh(self, *args: str, timeout: float = 240) -> str:
        """Run a command in the copy; fail the test with its output unless it exits 0."""
        done = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done.stdout + done.stderr

    def dvc(self, *args: str, timeout: float = 240) -> str:
        return self.sh(sys.executable, "-m", "dvc", *args, timeout=timeout)


def make_repo_copy(root: Path, params: dict[str, Any]) -> RepoCopy:
    """Copy the code and dvc.yaml into ``root``, write ``params``, ``git init`` + ``dvc init`` and commit.

    The caller adds data (e.g. an IDX folder) and an MLflow store before committing more, or commits them itself.
    """
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "IRESNET_TRACKING": "1",
        "IRESNET_PROGRESS": "0",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for name in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "DVC_STAGE", "DVC_EXP_NAME", "DVC_ROOT"):
        env.pop(name, None)
    repo = RepoCopy(root, env)
    repo.sh("git", "init", "-q")
    repo.dvc("init", "-q")
    repo.dvc("config", "core.analytics", "false")
    if (REPO / TEMPLATES).is_dir():
        shutil.copytree(REPO / TEMPLATES, root / TEMPLATES)
    return repo


def commit_all(repo: RepoCopy, message: str = "tiny") -> None:
    repo.sh("git", "add", "-A")
    repo.sh("git", "commit", "-q", "-m", message)


ALWAYS_CHANGED = "raw_data"  # re-hashes the raw dataset files at every `dvc repro` (see dvc.yaml)


def up_to_date(status: str) -> bool:
    """Whether ``dvc status`` output reports nothing but the always-changed ``raw_data`` stage."""
    lines = [line.strip() for line in status.strip().splitlines() if line.strip()]
    return "up to date" in status.lower() or lines == [f"{ALWAYS_CHANGED}:", "always changed"]


def ran_stages(repro: str) -> list[str]:
    """The stages a ``dvc repro`` output says it ran, ``raw_data`` (which always runs) left out."""
    names = [line.split("'")[1] for line in repro.splitlines() if line.startswith("Running stage '")]
    return [name for name in names if name != ALWAYS_CHANGED]


def outputs_of(root: Path) -> dict[str, bytes]:
    """Every file the stages write (under data/, models/, reports/), by path from ``root``."""
    folders = [root / name for name in ("data", "models", "reports")]
    return {str(p.relative_to(root)): p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}
