"""End to end: ``dvc repro`` of the WHOLE stage graph on a really tiny params file in a temporary git + DVC copy of
the repository; every table and figure is produced, MLflow holds a finished run per stage, and ``dvc metrics show`` /
``dvc plots show`` read the results."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.outputs import figures
from tests.pipeline.repo_copy import ALWAYS_CHANGED, RepoCopy, commit_all, make_repo_copy, ran_stages, up_to_date

TABLES = ("table2", "table3", "table4", "toy", "runcost", "verdicts")

# Only the keys that make each stage tiny; every other key keeps its committed default, so a key added later to a
# section still gets a valid value. 8x8 images (``idx:tiny``: 30 train / 12 test, 3 classes).
TINY = {
    "classifier": {
        "coeffs": ["vanilla", 0.9],
        "n_blocks": [1, 1],
        "strides": [1, 2],
        "channels": [4, 4],
        "init_ds": 1,
        "inj_pad": 1,
        "epochs": 1,
        "batch_size": 16,
        "eval_batch_size": 16,
        "milestones": [],
        "max_train_batches": 1,
    },
    "glow_classifier": {  # Table 3: one step per scale at 4x4 and 2x2 (after init_ds 2)
        "n_steps": [1, 1],
        "channels": {"affine": [4, 4], "additive": [4, 4], "iresnet": [4, 4]},
    },
    "singular_values": {"lower_iters": 5},
    "reconstruction": {
        "iterations": [1, 2, 4],
        "n_images": 4,
        "tolerances": [1.0e-1, 1.0e-3],
        "timing_iterations": [1, 2],
    },
    "flow": {
        "n_blocks": [1, 1],
        "strides": [1, 2],
        "channels": [4, 4],
        "init_ds": 2,
        "n_power_iter": 1,
        "n_terms": 2,
        "epochs": 1,
        "batch_size": 16,
        "eval_batch_size": 16,
        "warmup_epochs": 0,
        "n_generated": 4,
        "max_train_batches": 1,
    },
    "evaluate_flow": {"max_terms": 4, "max_samples": 2, "n_examples": 4, "batch_size": 4},
    "logdet_bias": {"n_examples": 2, "max_terms": 3, "n_samples": 2},
    "toy": {
        "datasets": ["moons"],
        "seeds": [0],
        "n_blocks": 2,
        "hidden": [8],
        "steps": 3,
        "batch_size": 32,
        "n_test": 64,
        "n_val": 32,
        "grid_size": 8,
    },
}


def tiny_everything(tiny_params: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(tiny_params)
    for section, values in TINY.items():
        for key, value in values.items():
            if key in raw[section]:
                raw[section][key] = value
    return raw


def test_dvc_repro_whole_graph(
    tmp_path: Path, tiny_params: dict, make_idx_folder: Callable, fresh_store: Callable
) -> None:
    from mlflow import MlflowClient

    repo = make_repo_copy(tmp_path / "repo", tiny_everything(tiny_params))
    make_idx_folder(repo.root / "tiny")
    fresh_store(repo.root)
    commit_all(repo)

    repo.dvc("repro", timeout=600)
    stages = set(yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"])
    assert {"prepare", "train_classifier", "train_glow_classifier", "report"} <= stages
    for name in (
        "classifier/vanilla/seed0.json",
        "classifier/0.9/seed1.json",
        "glow_classifier/additive-sgd/seed0.json",
    ):
        assert (repo.root / "reports" / "metrics" / name).is_file(), name  # every (label, seed) run of the stages

    reports = repo.root / "reports"
    for name in TABLES:
        for ext in ("md", "tex", "csv"):
            assert (reports / "tables" / f"{name}.{ext}").stat().st_size > 0
    for name in figures():
        assert (reports / "figures" / name).read_bytes()[:4] == b"\x89PNG", name
    page = (reports / "README.md").read_text()
    assert all(f"(figures/{name})" in page for name in figures())
    summary = json.loads((reports / "metrics" / "summary.json").read_text())
    assert set(summary["classifier"]) == {"vanilla", "0.9"}

    client = MlflowClient(f"sqlite:///{repo.root.resolve()}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    tracked = {r.data.tags.get("dvc_stage") for r in runs if r.info.status == "FINISHED"}
    untracked = stages - tracked - {ALWAYS_CHANGED}  # raw_data logs no run: it runs at every `dvc repro`
    assert not untracked, f"stages without a finished MLflow run: {sorted(untracked)}"

    shown = json.loads(repo.dvc("metrics", "show", "--json"))
    (workspace,) = shown.values()  # one revision: the workspace
    metrics = workspace["data"]["reports/metrics/summary.json"]["data"]
    assert metrics["classifier"]["0.9"]["test_error_pct"] == summary["classifier"]["0.9"]["test_error_pct"]
    plots = json.loads(repo.dvc("plots", "show", "--json"))
    assert not plots.get("errors"), plots.get("errors")
    assert "Log-det estimator bias vs series terms (Fig. 4/9)" in plots["data"]
    assert up_to_date(repo.dvc("status"))

    # Committed results are complete: a fresh clone (no DVC cache, no remote) is up to date as it stands.
    commit_all(repo, "results")
    clone = RepoCopy(tmp_path / "clone", repo.env)
    repo.sh("git", "clone", "-q", str(repo.root), str(clone.root))
    assert up_to_date(clone.dvc("status"))
    assert ran_stages(clone.dvc("repro")) == []
