"""``dvc.yaml`` against the code: each stage's outputs are exactly the registry's, and its code deps exactly the
modules it imports (so DVC re-runs a stage when, and only when, code that shapes its results changes)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.outputs import STAGES, TRAIN_CLASSIFIER, TRAIN_FLOW

REPO = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
# Modules that change how a stage runs or reports, never what it writes: editing them re-runs nothing.
INFRASTRUCTURE = {
    "cli", "console", "env", "errors", "output_set", "params", "paths", "processes", "runner", "schema", "tracking"
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    """Dotted names of every module ``path`` imports, also inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pipeline.x import module`
    return names


def _module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _data_files(module: Path) -> set[Path]:
    """Files beside ``module`` that it names in a string (``with_name("claims.yaml")``): the data it reads."""
    source = module.read_text()
    return {p for p in module.parent.iterdir() if p.suffix != ".py" and p.is_file() and f'"{p.name}"' in source}


def code_deps(stage: str) -> set[str]:
    """``pipeline/`` files the stage's module reaches through imports (infrastructure left out) and the data files
    they read beside them, plus ``iresnet``."""
    todo, seen, uses_library = [f"pipeline.stages.{stage}"], set(), False
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        if path.parent.name == "pipeline" and path.stem in INFRASTRUCTURE:
            continue  # what infrastructure imports does not shape results either
        for imported in _imports(path):
            uses_library |= imported.split(".")[0] == "iresnet"
            if imported.startswith("pipeline."):
                todo.append(imported)
    modules = {p for p in seen if not (p.parent.name == "pipeline" and p.stem in INFRASTRUCTURE)}
    files = {str(p.relative_to(REPO)) for p in modules | {d for m in modules for d in _data_files(m)}}
    return files | ({"iresnet"} if uses_library else set())


def _paths(entries: list) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_exactly_the_imported_modules(stage: str) -> None:
    deps = {d for d in DVC["stages"][stage]["deps"] if d.startswith(("pipeline/", "iresnet"))}
    assert deps == code_deps(stage)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_outputs_are_exactly_the_registry(stage: str) -> None:
    spec = DVC["stages"][stage]
    declared = _paths(spec.get("outs", [])) | _paths(spec.get("metrics", [])) | _paths(spec.get("plots", []))
    assert declared == set(STAGES[stage].declared())


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_output_lies_in_a_declared_path(stage: str) -> None:
    declared = STAGES[stage].declared()
    for name in STAGES[stage].files():
        assert any(name == d or name.startswith(f"{d}/") for d in declared), name


def test_every_dvc_stage_is_registered() -> None:
    assert set(DVC["stages"]) == set(STAGES)


def test_top_level_plots_and_metrics_name_registered_files() -> None:
    files = {f for outputs in STAGES.values() for f in outputs.declared()}
    folders = {str(parent) for f in files for parent in Path(f).parents}  # e.g. reports/curves/classifier
    for entry in DVC["plots"]:
        name = next(iter(entry)) if isinstance(entry, dict) else entry
        targets = entry[name].get("y", {}) if isinstance(entry, dict) and isinstance(entry[name].get("y"), dict) else {}
        for target in targets or [name]:
            assert target in files or target in folders, target
    assert set(DVC["metrics"]) <= files


def test_training_curve_plots_draw_validation_columns_the_stages_write() -> None:
    """The per-epoch plots read columns the training stages write, validation ones: no curve reads the test split."""

    plots = {next(iter(e)): e[next(iter(e))] for e in DVC["plots"] if isinstance(e, dict)}
    classifier = plots["reports/curves/classifier"]["y"]
    flow = plots["Flow bits/dim per epoch (Table 4)"]["y"]["reports/curves/flow.csv"]
    assert classifier == "val_error" and classifier in TRAIN_CLASSIFIER.curves["epochs"].columns
    assert flow == ["train_bpd", "val_bpd"] and set(flow) <= set(TRAIN_FLOW.curves["epochs"].columns)
    for columns in (TRAIN_CLASSIFIER.curves["epochs"].columns, TRAIN_FLOW.curves["epochs"].columns):
        assert not [c for c in columns if "test" in c], columns
