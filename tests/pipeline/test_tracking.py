"""MLflow tracking against a temporary sqlite store: experiments, runs, params, metrics, artifacts, tags, failures."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.errors import ParamsError
from pipeline.params import params_hash
from pipeline.paths import Paths
from pipeline.tracking import (
    FAMILIES,
    NullTracker,
    experiment_name,
    flatten,
    init_store,
    stage_run,
    tracking_enabled,
    tracking_uri,
)

PARAMS = {"data": {"dataset": "idx:tiny", "zca": {"enabled": True, "epsilon": 0.01}}, "seed": 3}


@pytest.fixture
def store(tmp_path: Path, fresh_store: Callable, monkeypatch: pytest.MonkeyPatch) -> Paths:
    monkeypatch.setenv("IRESNET_TRACKING", "1")
    fresh_store(tmp_path)
    return Paths.at(tmp_path)


def _client(paths: Paths):  # MlflowClient, imported lazily
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(paths))


def test_uri_and_switches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths.at(tmp_path)
    assert tracking_uri(paths) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri(paths) == "http://127.0.0.1:1"
    monkeypatch.setenv("IRESNET_TRACKING", "1")
    assert tracking_enabled(True) and not tracking_enabled(False)
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv("IRESNET_TRACKING", off)
        assert not tracking_enabled(True)
    for on in ("yes", " On "):
        monkeypatch.setenv("IRESNET_TRACKING", on)
        assert tracking_enabled(True)
    for bad in ("maybe", "2", "of"):  # a typo is refused, not read as "on"
        monkeypatch.setenv("IRESNET_TRACKING", bad)
        with pytest.raises(ParamsError, match=f"`IRESNET_TRACKING` = '{bad}': expected an on/off switch"):
            tracking_enabled(True)
    with pytest.raises(ValueError, match="unknown tracking family"):
        experiment_name("models")
    flat = {"data.dataset": "idx:tiny", "data.zca.enabled": True, "data.zca.epsilon": 0.01, "seed": 3}
    assert flatten(PARAMS) == flat


def test_queued_experiment_copy_logs_to_the_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC points ``DVC_ROOT`` at the user's repository, also for a queued experiment's temporary copy."""
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    paths = Paths.at(copy)
    assert paths.workspace == (tmp_path / "repo").resolve()
    assert tracking_uri(paths) == f"sqlite:///{(tmp_path / 'repo').resolve()}/mlflow.db"
    assert paths.prepared == copy.resolve() / "data" / "prepared"  # outputs stay in the copy, for DVC
    monkeypatch.delenv("DVC_ROOT")
    assert Paths.at(copy).workspace == copy.resolve()  # outside DVC: the root itself


def test_init_store_creates_experiments_once(store: Paths) -> None:
    ids = init_store(store)
    assert set(ids) == set(FAMILIES)
    client = _client(store)
    for family, exp_id in ids.items():
        exp = client.get_experiment(exp_id)
        assert exp.name == experiment_name(family)
        assert exp.artifact_location == (store.root / "mlartifacts" / family).as_uri()
    assert init_store(store) == ids  # idempotent


def test_stage_run_logs_everything(store: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_STAGE", "prepare")
    monkeypatch.setenv("DVC_EXP_NAME", "tiny-exp")
    artifact = store.root / "stats.json"
    artifact.write_text('{"n": 1}\n')
    with stage_run("data", "prepare", PARAMS, store) as tracker:
        run_id = tracker.run_id
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 2}, step=step)
        tracker.log_artifact(artifact, "prepared")
        tracker.log_results({"n_train": 30, "dataset": "idx:tiny", "ok": True})
    client = _client(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "prepare"
    assert run.info.experiment_id == init_store(store)["data"]
    assert run.data.params == {
        "data.dataset": "idx:tiny",
        "data.zca.enabled": "True",
        "data.zca.epsilon": "0.01",
        "seed": "3",
    }
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert run.data.metrics["n_train"] == 30 and run.data.metrics["ok"] == 1.0
    tags = run.data.tags
    assert tags["dvc_stage"] == "prepare" and tags["dvc_exp_name"] == "tiny-exp"
    assert tags["params_hash"] == params_hash(PARAMS) and tags["result.dataset"] == "idx:tiny"
    assert "dvc_root" not in tags and "git_commit" not in tags  # not set, not a git repository
    assert [a.path for a in client.list_artifacts(run_id, "prepared")] == ["prepared/stats.json"]
    local = Path(run.info.artifact_uri.removeprefix("file://")) / "prepared" / "stats.json"
    assert local.read_text() == '{"n": 1}\n' and str(local).startswith(str(store.root / "mlartifacts" / "data"))


def test_failing_stage_marks_run_failed(store: Paths) -> None:
    with pytest.raises(RuntimeError, match="diverged"):
        with stage_run("classifier", "train_classifier", PARAMS, store) as tracker:
            run_id = tracker.run_id
            raise RuntimeError("loss diverged at epoch 2")
    run = _client(store).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: loss diverged at epoch 2"


def test_non_numeric_metric_is_rejected(store: Paths) -> None:
    with pytest.raises(TypeError, match="'name' must be a number"):
        with stage_run("toy", "toy_density", PARAMS, store) as tracker:
            tracker.log_metrics({"name": "moons"})  # type: ignore[dict-item]


def test_disabled_tracking_touches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths.at(tmp_path)
    monkeypatch.setenv("IRESNET_TRACKING", "1")
    with stage_run("data", "prepare", PARAMS, paths, enabled=False) as tracker:
        assert type(tracker) is NullTracker
        tracker.log_metrics({"x": 1.0}, step=1)
        tracker.log_artifact(tmp_path / "missing.txt")
    monkeypatch.setenv("IRESNET_TRACKING", "0")
    with stage_run("data", "prepare", PARAMS, paths) as tracker:
        assert type(tracker) is NullTracker
    assert not (tmp_path / "mlflow.db").exists()


def test_parallel_first_use_of_a_fresh_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes initialising a brand-new database at once: the file lock serialises MLflow's migrations.

    (Without the lock, one of the two crashes in alembic: checked when this test was written.)
    """
    code = (
        "import sys; from pipeline.paths import Paths; from pipeline.tracking import init_store; "
        "print(sorted(init_store(Paths.at(sys.argv[1])).items()))"
    )
    repo = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    ids = [dict(ast.literal_eval(out)) for out, _ in outs]
    assert ids[0] == ids[1] and set(ids[0]) == set(FAMILIES)


def test_unusable_store_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.errors import TrackingError

    monkeypatch.setenv("IRESNET_TRACKING", "1")
    (tmp_path / "mlflow.db").write_bytes(b"this is not a sqlite database" * 10)
    with pytest.raises(TrackingError, match="IRESNET_TRACKING=0"):
        with stage_run("data", "prepare", PARAMS, Paths.at(tmp_path)):
            pass


def test_final_results_do_not_repeat_a_curve_at_step_0(store: Paths) -> None:
    """``test_error`` has a per-epoch curve: the final results leave it alone; ``n_params`` has none: it is logged."""
    with stage_run("classifier", "train_classifier@0.9", PARAMS, store) as tracker:
        for epoch in (1, 2):
            tracker.log_metrics({"test_error": 0.5 / epoch}, step=epoch)
        tracker.log_results({"test_error": 0.25, "n_params": 10})
    client = _client(store)
    run_id = tracker.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "test_error")] == [(1, 0.5), (2, 0.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "n_params")] == [(0, 10.0)]
    assert client.get_run(run_id).data.metrics["test_error"] == 0.25


def test_mlflow_telemetry_is_off_unless_asked_for() -> None:
    """MLflow reads MLFLOW_DISABLE_TELEMETRY; importing the pipeline sets it unless the user did."""
    code = "import os, pipeline; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    for given, expected in ((None, "true"), ("false", "false")):
        run_env = env if given is None else {**env, "MLFLOW_DISABLE_TELEMETRY": given}
        done = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expected  # off by default; a user's own choice wins


@pytest.fixture
def locked(store: Paths, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """``lock()`` takes an exclusive lock on the store's database (as another writer mid-transaction would); it is
    released at the end of the test. MLflow waits 20 s for a lock (``PRAGMA busy_timeout = 20000``); here 0.1 s."""
    import sqlite3

    from mlflow.store.db import utils

    text = utils.sql.text
    monkeypatch.setattr(utils.sql, "text", lambda sql: text(sql.replace("busy_timeout = 20000", "busy_timeout = 100")))
    holder = sqlite3.connect(store.mlflow_db, isolation_level=None)

    def lock() -> None:
        holder.execute("BEGIN EXCLUSIVE")

    yield lock
    holder.close()


def test_a_store_locked_mid_run_fails_in_one_line(store: Paths, locked: Callable[[], None]) -> None:
    """Every call that the store fails is one TrackingError naming the store, its cause and the way out; the failed
    attempt to mark the run FAILED does not bury it under a second error."""
    from pipeline.errors import TrackingError

    with pytest.raises(TrackingError) as err:
        with stage_run("data", "prepare", PARAMS, store) as tracker:
            locked()
            tracker.log_metrics({"x": 1.0})
    message = str(err.value)
    assert "\n" not in message and not isinstance(err.value.__context__, TrackingError)  # the first, not the cleanup's
    assert all(part in message for part in (tracking_uri(store), "database is locked", "IRESNET_TRACKING=0")), message


def test_a_failure_in_a_locked_store_keeps_the_stages_own_error(store: Paths, locked: Callable[[], None]) -> None:
    """The stage's error stays the one reported when the store then refuses to record it."""
    with pytest.raises(RuntimeError, match="diverged") as err:
        with stage_run("data", "prepare", PARAMS, store) as tracker:
            assert tracker.run_id
            locked()
            raise RuntimeError("loss diverged")
    assert err.value.__context__ is None


def test_an_artifact_folder_that_takes_no_file_stops_the_stage_before_it_runs(store: Paths) -> None:
    """Artifacts are logged at a stage's end: a folder that refuses them (here mlartifacts is a file: a read-only
    folder does the same for a user who is not root) is found before any compute."""
    from pipeline.errors import TrackingError

    (store.root / "mlartifacts").write_text("not a folder")
    ran = []
    with pytest.raises(TrackingError, match=r"mlartifacts.*IRESNET_TRACKING=0"):
        with stage_run("data", "prepare", PARAMS, store):
            ran.append(True)
    assert not ran


def test_logging_a_model_into_a_locked_store_fails_in_one_line(store: Paths, locked: Callable[[], None]) -> None:
    """The model is logged through MLflow's fluent API, not the wrapped client: its store failure reads the same."""
    import torch

    from pipeline.errors import TrackingError

    with pytest.raises(TrackingError, match="database is locked.*IRESNET_TRACKING=0"):
        with stage_run("data", "prepare", PARAMS, store) as tracker:
            assert tracker.run_id
            locked()
            tracker.log_model(torch.nn.Linear(2, 2), torch.zeros(1, 2))
