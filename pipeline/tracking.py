"""MLflow tracking of stage runs (MLflow 3.x, through ``MlflowClient``: no global active-run state).

- Store: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<workspace>/mlflow.db`` (absolute, so runs of
  ``dvc exp run --queue``, which execute in a temporary copy, land in the workspace's store).
- One experiment per family (``FAMILIES``), created with an absolute artifact location
  ``<workspace>/mlartifacts/<family>`` (an experiment freezes its creator's working directory otherwise).
- :func:`init_store` creates the schema and experiments under a file lock, so stages started in parallel on a fresh
  database do not race MLflow's migrations.
- :func:`stage_run` wraps a stage: params, tags (DVC stage / experiment / root, git commit, params hash), batched
  metrics, artifacts; an exception marks the run FAILED (KILLED for Ctrl-C) with the error text and is re-raised.
- Disabled by ``tracking.enabled: false`` or env ``IRESNET_TRACKING=0``: stages then get a :class:`NullTracker`.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.env import env_flag
from pipeline.errors import TrackingError
from pipeline.params import params_hash
from pipeline.paths import Paths

if TYPE_CHECKING:
    from mlflow import MlflowClient

FAMILIES = ("data", "classifier", "flow", "analysis", "toy")
EXPERIMENT_PREFIX = "iresnet-"
ENV_SWITCH = "IRESNET_TRACKING"
_BATCH = 100  # MLflow's limit of params/tags per log_batch call (metrics allow 1000)


def experiment_name(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown tracking family {family!r}; expected one of {', '.join(FAMILIES)}")
    return EXPERIMENT_PREFIX + family


def tracking_uri(paths: Paths) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the absolute sqlite store of the workspace."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db}"


def tracking_enabled(enabled: bool = True) -> bool:
    """The param ``tracking.enabled`` and the env switch ``IRESNET_TRACKING`` (``0/false/no/off`` disable)."""
    return enabled and env_flag(ENV_SWITCH)


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def init_store(paths: Paths, uri: str | None = None) -> dict[str, str]:
    """Create the store (if new) and one experiment per family; returns ``{family: experiment_id}``. Idempotent."""
    from filelock import FileLock
    from mlflow import MlflowClient

    uri = uri or tracking_uri(paths)
    paths.workspace.mkdir(parents=True, exist_ok=True)
    # The lock file matches the .gitignore pattern ``mlflow.db-*``.
    with FileLock(str(paths.workspace / "mlflow.db-init.lock"), timeout=300):
        client = MlflowClient(uri)
        ids = {}
        for family in FAMILIES:
            name = experiment_name(family)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                # A remote server chooses its own artifact store; a local store keeps artifacts in the workspace.
                location = None if _is_remote(uri) else (paths.mlartifacts / family).as_uri()
                ids[family] = client.create_experiment(name, artifact_location=location)
            else:
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp.experiment_id)
                ids[family] = exp.experiment_id
    return ids


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _git_commit(root: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None  # not a git repository, or no commit yet
    return done.stdout.strip() or None


def run_tags(stage: str, params: Mapping[str, Any], paths: Paths) -> dict[str, str]:
    """Tags that tie an MLflow run to its DVC stage, DVC experiment, code version and parameters."""
    tags = {"stage": stage, "params_hash": params_hash(params), "mlflow.source.name": f"iresnet {stage}"}
    for env, tag in (("DVC_STAGE", "dvc_stage"), ("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_ROOT", "dvc_root")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    commit = _git_commit(paths.root)
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    return tags


class Tracker(Protocol):
    """What a stage may call while it runs (an MLflow run, or nothing when tracking is off)."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_results(self, results: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...


class NullTracker:
    """The tracker when tracking is off: same methods, does nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_results(self, results: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass


class MlflowTracker:
    """Logs to one MLflow run; every call is one batched request."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened params; lists and None as their text."""
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Numeric metrics (bools as 0/1) at ``step`` in one request; a non-number is a programming error."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            if not isinstance(value, (int, float)):
                raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
            items.append(Metric(key, float(value), stamp, step or 0))
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_results(self, results: Mapping[str, Any]) -> None:
        """A stage's final result dict: finite numbers become metrics, everything else a ``result.<key>`` tag."""
        numbers = {k: v for k, v in results.items() if _is_finite_number(v)}
        self.log_metrics(numbers)
        self.set_tags({f"result.{k}": v for k, v in results.items() if k not in numbers})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + _BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents, under ``artifact_path`` of the run."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"artifact {path} does not exist")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and (isinstance(value, bool) or math.isfinite(value))


@contextmanager
def stage_run(
    family: str, stage: str, params: Mapping[str, Any], paths: Paths, enabled: bool = True
) -> Iterator[Tracker]:
    """One MLflow run for one stage execution, in the family's experiment; yields the tracker.

    ``params`` (nested sections) are logged flattened and hashed into the ``params_hash`` tag. On an exception the
    run ends FAILED (KILLED for KeyboardInterrupt) with an ``error`` tag, and the exception propagates.
    """
    experiment_name(family)  # validates the family before anything runs
    if not tracking_enabled(enabled):
        yield NullTracker()
        return
    from mlflow import MlflowClient

    uri = tracking_uri(paths)
    try:
        experiment_id = init_store(paths, uri)[family]
        client = MlflowClient(uri)
        run = client.create_run(experiment_id, run_name=stage, tags=run_tags(stage, params, paths))
    except Exception as err:  # sqlite locked, a broken file, an unreachable server, a lock timeout ...
        raise TrackingError(
            f"cannot start an MLflow run in {uri} ({type(err).__name__}: {err}). Fix or move that store, point "
            f"MLFLOW_TRACKING_URI elsewhere, or run without tracking: IRESNET_TRACKING=0 or `tracking.enabled: false`."
        ) from err
    tracker = MlflowTracker(client, run.info.run_id)
    try:
        tracker.log_params(params)
        yield tracker
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            tracker.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
        finally:
            client.set_terminated(run.info.run_id, status)
        raise
    else:
        client.set_terminated(run.info.run_id, "FINISHED")
