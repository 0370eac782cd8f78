"""Real signals on a real ``iresnet train-classifier`` process: SIGINT and SIGTERM end the stage cleanly (checkpoint
kept, MLflow run KILLED, exit 130 / 143, one line saying how to resume); a resumed stage continues the same MLflow run
with one complete curve; a run left RUNNING by ``kill -9`` is continued by the resumed stage, or closed as KILLED when
the next run of the stage starts afresh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.pipeline.classifier_helpers import REPO, classifier_project

EPOCHS = 8  # one batch of 8x8 images per epoch: a fraction of a second each


# The stage as ``python -m pipeline.cli`` runs it, except that right after the first epoch's resume checkpoint is
# saved it writes a marker file and pauses (until the test's signal). Eight tiny epochs take a second or two, so
# without the pause the stage could finish before the signal arrived (then no checkpoint, exit 0: the test would
# fail or, worse, test nothing); the marker is the evidence that the stage is mid-run with a checkpoint on disk.
# The library and pipeline code are unchanged: the pause wraps EpochLoop.save from outside.
_PAUSING_CLI = """
import os, runpy, sys, time
from pathlib import Path
from pipeline.training import EpochLoop
marker = Path(os.environ["IRESNET_TEST_PAUSE_MARKER"])
save = EpochLoop.save
def save_then_pause(self, epoch, record):
    save(self, epoch, record)
    if not marker.exists():
        marker.write_text(str(epoch))
        time.sleep(600)
EpochLoop.save = save_then_pause
runpy.run_module("pipeline.cli", run_name="__main__", alter_sys=True)
"""


def _marker(root: Path) -> Path:
    return root / "paused-after-epoch"


def _start(root: Path, *extra: str, pause: bool = False) -> subprocess.Popen:
    env = {**os.environ, "IRESNET_TRACKING": "1", "IRESNET_PROGRESS": "0", "IRESNET_THREADS": "1"}
    _marker(root).unlink(missing_ok=True)
    if pause:
        env["IRESNET_TEST_PAUSE_MARKER"] = str(_marker(root))
    args = [
        "--root",
        str(root),
        "-S",
        "tracking.enabled=true",
        "train-classifier",
        "--coeff",
        "0.9",
        "--seed",
        "0",
        *extra,
    ]
    command = ["-c", _PAUSING_CLI] if pause else ["-m", "pipeline.cli"]
    return subprocess.Popen(
        [sys.executable, *command, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _signal_mid_run(root: Path, signum: int) -> tuple[int, str]:
    """Start the stage, wait until it has saved an epoch and paused (:data:`_PAUSING_CLI`), send ``signum``; returns
    the exit code and stderr."""
    proc = _start(root, pause=True)
    deadline = time.monotonic() + 120
    while not _marker(root).exists():
        assert proc.poll() is None, ("the stage ended before it paused", proc.communicate())
        assert time.monotonic() < deadline, "the stage did not save its first epoch within 120 s"
        time.sleep(0.05)
    assert int(_marker(root).read_text()) < EPOCHS  # mid-run: epochs remain
    assert len(list((root / ".resume").glob("*.pt"))) == 1, "paused without a resume checkpoint"
    assert proc.poll() is None, proc.communicate()  # still running: the signal reaches a live stage
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=90)
    return proc.returncode, err


def _runs(root: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root.resolve()}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("iresnet-classifier").experiment_id])


def _finish(root: Path) -> None:
    proc = _start(root)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert not list((root / ".resume").glob("*.pt"))


@pytest.fixture
def project(tmp_path: Path, fresh_store: Callable) -> Path:
    classifier_project(tmp_path, epochs=EPOCHS, milestones=[EPOCHS - 1], max_train_batches=1)
    fresh_store(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_the_stage_cleanly_and_the_resumed_stage_continues_its_run(
    project: Path, signum: int, code: int
) -> None:
    from mlflow import MlflowClient

    returncode, err = _signal_mid_run(project, signum)
    assert returncode == code, err
    assert "Traceback" not in err
    (line,) = [text for text in err.splitlines() if text.strip()]
    command = f"python -m pipeline.cli --root {project} -S tracking.enabled=true train-classifier --coeff 0.9 --seed 0"
    assert line.startswith(f"error: interrupted: run `{command}` again to resume from epoch "), line  # with its -S
    assert len(list((project / ".resume").glob("*.pt"))) == 1  # the checkpoint is kept
    (killed,) = _runs(project)
    assert killed.info.status == "KILLED"

    _finish(project)
    (run,) = _runs(project)  # the same run, continued: one stage execution, one run
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert "error" not in run.data.tags and int(run.data.tags["resumed_from_epoch"]) >= 1
    history = MlflowClient(f"sqlite:///{project}/mlflow.db").get_metric_history(run.info.run_id, "val_error")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # one complete curve, no epoch twice


def test_a_run_left_running_by_kill_9_is_continued_or_closed(project: Path) -> None:
    returncode, _ = _signal_mid_run(project, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    (orphan,) = _runs(project)
    assert orphan.info.status == "RUNNING"  # nobody could close it

    _finish(project)  # resumes from the checkpoint: continues the orphan
    (run,) = _runs(project)
    assert run.info.run_id == orphan.info.run_id and run.info.status == "FINISHED"

    returncode, _ = _signal_mid_run(project, signal.SIGKILL)
    assert returncode == -signal.SIGKILL  # killed mid-run again, not finished before the signal
    for checkpoint in (project / ".resume").glob("*.pt"):
        checkpoint.unlink()  # this time the next run starts afresh
    _finish(project)
    runs = {r.info.run_id: r for r in _runs(project)}
    statuses = sorted(r.info.status for r in runs.values())
    assert statuses == ["FINISHED", "FINISHED", "KILLED"], statuses
    (closed,) = [r for r in runs.values() if r.info.status == "KILLED"]
    assert "kill -9" in closed.data.tags["error"]


def test_a_signal_during_a_store_write_waits_for_the_write_to_end() -> None:
    """A signal inside an MLflow call (here a fake client's) is held until the call returns, then raised: the store's
    transaction is never cut in the middle (that left SQLite locked for the cleanup's writes)."""
    from pipeline.errors import Interrupted, signals_held
    from pipeline.runner import on_signals
    from pipeline.tracking import SignalSafeClient

    done: list[str] = []

    class FakeClient:
        tracking_uri = "sqlite:///fake"

        def log_batch(self, run_id: str) -> str:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-write
            done.append(run_id)  # the rest of the write still runs
            return "ok"

    client = SignalSafeClient(FakeClient())
    assert client.tracking_uri == "sqlite:///fake"  # attributes pass through
    with on_signals(signal.SIGINT, signal.SIGTERM):
        with pytest.raises(Interrupted) as caught:
            client.log_batch("run")
        assert done == ["run"] and caught.value.signum == signal.SIGTERM
        with pytest.raises(Interrupted):  # outside a held block, a signal interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        with pytest.raises(Interrupted) as caught:
            with signals_held():
                with signals_held():  # nested: the outer block raises, once
                    os.kill(os.getpid(), signal.SIGINT)
                done.append("inner ended")
        assert done[-1] == "inner ended" and caught.value.signum == signal.SIGINT


def test_the_resume_hint_names_the_command_that_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DVC, `dvc repro <stage>`; run by hand, that very command line with its `-S` values (a `dvc repro` would
    run the params file's values instead and leave this run's checkpoint unused)."""
    from pipeline.runner import interrupted_message

    argv = ["/venv/bin/iresnet", "-S", "classifier.lr=0.5", "train-classifier", "--coeff", "0.9", "--seed", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert interrupted_message(3) == (
        "interrupted: run `iresnet -S classifier.lr=0.5 train-classifier --coeff 0.9 --seed 1` again to resume from "
        "epoch 4 (the checkpoint of epoch 3 is kept)."
    )
    monkeypatch.setenv("DVC_STAGE", "train_classifier")
    assert interrupted_message(None) == "interrupted: run `dvc repro train_classifier` again to run it."
