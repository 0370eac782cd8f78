"""The library stands on its own: the distribution ``iresnet`` needs torch alone and holds only the library; the
pipeline is the distribution ``iresnet-pipeline`` (``pipeline/pyproject.toml``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]

# What the pipeline installs beyond torch and torch's own dependencies: the library must import without any of it.
PIPELINE_ONLY = (
    "pipeline", "dvc", "mlflow", "typer", "rich", "pandas", "matplotlib", "yaml", "ruamel", "pydantic", "mlxtend",
    "torchvision", "numpy", "psutil", "tabulate",
)  # fmt: skip

_IMPORT_EVERY_MODULE = """
import importlib, importlib.abc, pkgutil, sys
blocked = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is not installed here", name=name)
        return None

sys.meta_path.insert(0, Block())
import iresnet
names = [m.name for m in pkgutil.walk_packages(iresnet.__path__, "iresnet.")]
for name in names:
    importlib.import_module(name)
print(len(names), "modules")
"""


def _project(path: str) -> dict:
    return tomllib.loads((REPO / path).read_text())["project"]


def test_the_library_distribution_needs_torch_alone_and_holds_only_the_library() -> None:
    lib = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert lib["project"]["name"] == "iresnet"
    assert [d.split(">")[0].split("=")[0] for d in lib["project"]["dependencies"]] == ["torch"]
    assert lib["tool"]["setuptools"]["packages"]["find"]["include"] == ["iresnet*"]
    assert "scripts" not in lib["project"]  # the `iresnet` command is the pipeline's


def test_the_pipeline_distribution_has_its_own_name_and_every_subpackage() -> None:
    """Its packages are listed by hand (the folder is the package): a new subpackage must be added there."""
    pipe = tomllib.loads((REPO / "pipeline" / "pyproject.toml").read_text())
    assert pipe["project"]["name"] == "iresnet-pipeline"
    assert f"iresnet=={_project('pyproject.toml')['version']}" in pipe["project"]["dependencies"]
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "pipeline").rglob("__init__.py")
    }  # fmt: skip
    assert set(pipe["tool"]["setuptools"]["packages"]) == on_disk


def test_every_library_module_imports_without_the_pipelines_dependencies() -> None:
    """Each iresnet module, imported in a fresh interpreter in which the pipeline's packages cannot be imported
    (numpy included: torch, which the library needs alone, does not need it either)."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERY_MODULE, ",".join(PIPELINE_ONLY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[0]) >= 10


@pytest.mark.slow
def test_the_library_installs_alone_into_a_fresh_environment(tmp_path: Path) -> None:
    """`pip install <repo>` into a new venv: torch and what torch needs come in, nothing of the pipeline; then
    iresnet imports and runs a block. (Slow: pip copies the torch wheel, several GB.)"""
    source = tmp_path / "source"  # a copy: an in-tree build would leave build/ in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "iresnet"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(source)], env=env, capture_output=True, text=True, timeout=1800
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], env=env, capture_output=True, text=True, check=True
    ).stdout.lower()
    installed = {line.split("==")[0] for line in listed.split()}
    assert "iresnet" in installed and "torch" in installed
    assert not installed & {"iresnet-pipeline", "dvc", "mlflow", "typer", "pandas", "pydantic", "torchvision"}
    run = "import torch, iresnet; print(iresnet.InvertibleResidualBlock.__name__)"
    done = subprocess.run([str(python), "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "InvertibleResidualBlock", done.stderr[-3000:]


def test_every_library_module_lists_exactly_its_public_names() -> None:
    """``__all__`` of each module: every public class, function and constant defined there, and nothing else."""
    import ast
    import importlib

    for path in sorted((REPO / "iresnet").glob("*.py")):
        module = importlib.import_module(f"iresnet.{path.stem}" if path.stem != "__init__" else "iresnet")
        if path.stem == "__init__":
            assert all(hasattr(module, name) for name in module.__all__)
            continue
        defined = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined |= {t.id for t in targets if isinstance(t, ast.Name)}
        public = {name for name in defined if not name.startswith("_")}
        assert sorted(module.__all__) == sorted(public), path.name
