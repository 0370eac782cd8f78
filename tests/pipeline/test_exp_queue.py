"""Real DVC experiments: a queued run executes in DVC's temporary copy of the repo and must still log into the
workspace's MLflow store, tagged with the DVC experiment's name; two at once keep apart."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.pipeline.repo_copy import commit_all, make_repo_copy


def test_queued_experiment_logs_into_the_workspace_store(
    tmp_path: Path, tiny_params: dict, make_idx_folder: Callable, fresh_store: Callable
) -> None:
    from mlflow import MlflowClient

    repo = make_repo_copy(tmp_path / "repo", tiny_params)
    make_idx_folder(repo.root / "tiny")
    commit_all(repo)  # a queued experiment starts from a commit: the dataset must be in it
    fresh_store(repo.root)  # git-ignored: only the workspace has it

    repo.dvc("exp", "run", "--queue", "-n", "tiny-exp", "-S", "data.max_train=20", "prepare")
    ran = repo.dvc("exp", "run", "--run-all", timeout=180)  # runs the queue and waits for it
    status = repo.dvc("queue", "status")
    assert "Success" in status, f"{ran}\n{status}\n{repo.dvc('queue', 'logs', 'tiny-exp')}"

    shown = json.loads(repo.dvc("exp", "show", "--json"))
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    names = [run["name"] for e in exps for run in (e.get("revs") or [])]
    assert "tiny-exp" in names, names

    client = MlflowClient(f"sqlite:///{repo.root.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("iresnet-data").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc_exp_name"] == "tiny-exp" and run.data.tags["dvc_stage"] == "prepare"
    assert run.data.params["data.max_train"] == "20"
    assert run.data.metrics["n_train"] == 17 and run.data.metrics["n_val"] == 3  # 0.125 x 20 = 2.5, rounded up
    artifact_root = client.get_experiment(run.info.experiment_id).artifact_location
    assert artifact_root == (repo.root.resolve() / "mlartifacts" / "data").as_uri()
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"figures", "metrics", "prepared"}
    # The stage wrote its outputs in DVC's temporary copy (deleted since), not here, yet its run is in this store.
    assert not (repo.root / "data" / "prepared").exists()


def _wait_for_line(log: Path, line: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert proc.poll() is None, f"it ended ({proc.returncode}) before printing {line!r}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {line!r} within {timeout} s:\n{log.read_text()}"
        time.sleep(0.2)


def test_two_experiments_train_at_once_without_sharing_a_checkpoint(
    tmp_path: Path, tiny_params: dict, make_idx_folder: Callable, fresh_store: Callable
) -> None:
    """Two experiments that differ only in an analysis param train the same classifier at once: each keeps its own
    resume checkpoint (keyed by ``DVC_EXP_NAME``) and its own complete MLflow run.

    They run as two ``dvc exp run --temp`` (DVC's queue sets the same ``DVC_EXP_NAME`` and ``DVC_ROOT``): the queue's
    ``-j 2`` is upstream's unstable multi-worker Celery (treeverse/dvc#10398, #10428; dvc-task#73) and once hung CI for
    300 s. The second starts once the first is training: two starts at once would race for DVC's experiment lock,
    which refuses rather than waits."""
    from mlflow import MlflowClient

    from tests.pipeline.classifier_helpers import TINY_CLASSIFIER

    params = {**tiny_params, "classifier": {**tiny_params["classifier"], **TINY_CLASSIFIER, "coeffs": [0.9]}}
    params["classifier"].update(epochs=2, milestones=[1], max_train_batches=1)
    repo = make_repo_copy(tmp_path / "repo", params)
    make_idx_folder(repo.root / "tiny")
    commit_all(repo)
    fresh_store(repo.root)

    runs: dict[str, tuple[subprocess.Popen, Path]] = {}
    for name, iters in (("exp-a", 3), ("exp-b", 4)):
        log = tmp_path / f"{name}.log"
        with log.open("w") as out:
            command = ["exp", "run", "--temp", "-n", name, "-S", f"singular_values.lower_iters={iters}"]
            proc = subprocess.Popen(
                [sys.executable, "-m", "dvc", *command, "train_classifier"],
                cwd=repo.root,
                env=repo.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        runs[name] = (proc, log)
        if name == "exp-a":
            _wait_for_line(log, "Running stage 'train_classifier'", proc, timeout=240)
    for name, (proc, log) in runs.items():
        assert proc.wait(timeout=300) == 0, f"{name}:\n{log.read_text()}"

    client = MlflowClient(f"sqlite:///{repo.root.resolve()}/mlflow.db")
    runs_found = client.search_runs([client.get_experiment_by_name("iresnet-classifier").experiment_id])
    assert sorted(r.data.tags["dvc_exp_name"] for r in runs_found) == ["exp-a", "exp-b"]
    for run in runs_found:
        assert run.info.status == "FINISHED" and "resumed_from_epoch" not in run.data.tags
        assert run.data.tags["dvc_root"] == str(repo.root.resolve())  # DVC points it at the user's repository
        history = client.get_metric_history(run.info.run_id, "val_error")
        assert sorted(m.step for m in history) == [1, 2]
    assert len({r.data.tags["resume_checkpoint"] for r in runs_found}) == 2  # no checkpoint shared
    assert not list((repo.root / ".resume").glob("*.pt"))  # in the workspace, and removed once each finished
