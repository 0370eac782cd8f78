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

import functools
import hashlib
import logging
import math
import os
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.env import env_flag
from pipeline.errors import TrackingError, brief, signals_held
from pipeline.params import params_hash
from pipeline.paths import Paths
from pipeline.processes import owner_alive, owner_tags

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from torch import Tensor, nn

FAMILIES = ("data", "classifier", "flow", "analysis", "toy")
EXPERIMENT_PREFIX = "iresnet-"
ENV_SWITCH = "IRESNET_TRACKING"


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

    from pipeline.files import probe_writable  # imports torch: not at start-up, which `iresnet ui` shares

    uri = uri or tracking_uri(paths)
    paths.workspace.mkdir(parents=True, exist_ok=True)
    if not _is_remote(uri):  # artifacts are logged at a stage's end: a folder that refuses them must stop it now
        probe_writable(paths.mlartifacts)
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


def flatten(data: Mapping[str, Any] | list[Any], prefix: str = "", lists: bool = False) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the project's one flattener (MLflow params, results tables, the GPU
    check's comparison). Lists stay values, or with ``lists`` are flattened by position (``{"a": [5]}`` -> ``a.0``)."""
    out: dict[str, Any] = {}
    for key, value in data.items() if isinstance(data, Mapping) else enumerate(data):
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or (lists and isinstance(value, list)):
            out.update(flatten(value, f"{name}.", lists))
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
    """Tags that tie an MLflow run to its DVC stage, DVC experiment, code version and parameters, over MLflow's own
    context tags (``mlflow.user``, ``mlflow.source.type``, ...: what ``mlflow.start_run`` would set)."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {**resolve_tags(), "stage": stage, "params_hash": params_hash(params)}
    tags["mlflow.source.name"] = f"iresnet {stage}"
    for env, tag in (("DVC_STAGE", "dvc_stage"), ("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_ROOT", "dvc_root")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    commit = _git_commit(paths.root)
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    return tags


class Tracker(Protocol):
    """What a stage may call while it runs (an MLflow run, or nothing when tracking is off).

    ``checkpoint_epoch`` is the last epoch a resumable stage saved (set by :class:`pipeline.training.EpochLoop`), so
    an interrupted stage can say where it will resume.
    """

    run_id: str | None
    checkpoint_epoch: int | None

    def continue_run(self, run_id: str | None) -> bool: ...

    def last_step(self, key: str) -> int | None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_results(self, results: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_model(self, model: nn.Module, example: Tensor, name: str = "model") -> str | None: ...

    def log_input(self, path: Path, context: str) -> None: ...

    def child_run(self, name: str, params: Mapping[str, Any]) -> AbstractContextManager[Tracker]: ...


class NullTracker:
    """The tracker when tracking is off: same methods, does nothing."""

    run_id: str | None = None

    def __init__(self) -> None:
        self.checkpoint_epoch: int | None = None

    def continue_run(self, run_id: str | None) -> bool:
        return False

    def last_step(self, key: str) -> int | None:
        return None

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

    def log_model(self, model: nn.Module, example: Tensor, name: str = "model") -> str | None:
        return None

    def log_input(self, path: Path, context: str) -> None:
        pass

    @contextmanager
    def child_run(self, name: str, params: Mapping[str, Any]) -> Iterator[Tracker]:
        yield NullTracker()


def store_error(uri: str, err: BaseException, doing: str = "write to") -> TrackingError:
    """The one-line error for a store that fails (locked, read-only, full, unreachable): names it and the ways out."""
    while err.__cause__ is not None:  # MLflow wraps SQLAlchemy, which wraps sqlite3: the innermost names the cause
        err = err.__cause__
    return TrackingError(
        f"cannot {doing} the MLflow store {uri} ({type(err).__name__}: {brief(err)}). Make it writable, wait for "
        "whatever holds it locked, point MLFLOW_TRACKING_URI elsewhere, or run without tracking: IRESNET_TRACKING=0 "
        "or `tracking.enabled: false`."
    )


def _store_failure(err: Exception) -> bool:
    """Whether ``err`` from an MLflow call is the store failing (a database or file error), not an answer such as
    "no such run", which the caller handles."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code == "TEMPORARILY_UNAVAILABLE"  # how MLflow re-raises every SQLAlchemy error
    return isinstance(err, OSError) or type(err).__module__.startswith(("sqlalchemy", "sqlite3"))


class SignalSafeClient:
    """An ``MlflowClient`` whose every call runs with SIGINT and SIGTERM held (:func:`pipeline.errors.signals_held`):
    a signal that arrives during a store write stops the stage right after it, never inside its transaction. A call
    that the store fails raises :class:`TrackingError` (:func:`store_error`), which the CLI prints as one line."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def held(*args: Any, **kwargs: Any) -> Any:
            with signals_held():
                try:
                    return value(*args, **kwargs)
                except Exception as err:
                    if _store_failure(err):
                        raise store_error(self._client.tracking_uri, err) from err
                    raise

        return held


class MlflowTracker:
    """Logs to one MLflow run of ``stage``; every call is one request (``log_batch`` splits large ones itself).

    The run starts at the first call that logs anything, or continues an earlier run of the same stage through
    :meth:`continue_run` (a resumed stage: one stage execution, killed and resumed, is one run with one curve).
    Either way, runs of this stage left RUNNING by a dead process are closed as KILLED first.
    """

    def __init__(
        self, client: MlflowClient, experiment_id: str, stage: str, tags: Mapping[str, str], params: Mapping[str, Any]
    ) -> None:
        self.client, self.experiment_id, self.stage = client, experiment_id, stage
        self.uri = client.tracking_uri
        self._tags, self._params = {**tags, **owner_tags()}, dict(params)
        self._run_id: str | None = None
        self._curves: set[str] = set()  # metrics with a per-step history in the run (not repeated by log_results)
        self.checkpoint_epoch: int | None = None

    @property
    def run_id(self) -> str:
        """The run's id; starts the run if nothing has started it yet."""
        if self._run_id is None:
            self._close_orphans()
            run = self.client.create_run(self.experiment_id, run_name=self.stage, tags=self._tags)
            self._run_id = run.info.run_id
            self.log_params(self._params)
        return self._run_id

    @property
    def started(self) -> bool:
        return self._run_id is not None

    def continue_run(self, run_id: str | None) -> bool:
        """Log into the earlier run ``run_id`` (set RUNNING again) instead of a new one, if it is a run of this stage
        in this store that no live process holds and that has not finished; returns whether it does."""
        from mlflow.exceptions import MlflowException

        if run_id is None or self._run_id is not None:
            return False
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False  # another store, or a deleted run
        info, tags = run.info, run.data.tags
        if (
            info.experiment_id != self.experiment_id
            or info.lifecycle_stage != "active"
            or info.status == "FINISHED"
            or tags.get("stage") != self.stage
            or (info.status == "RUNNING" and owner_alive(tags))
        ):
            return False
        self._close_orphans(keep=run_id)
        self.client.update_run(run_id, status="RUNNING")
        self._run_id = run_id
        self._curves.update(run.data.metrics)  # a killed run logged nothing but its per-epoch curves
        self.set_tags(self._tags)
        try:
            self.client.delete_tag(run_id, "error")  # the interruption it recorded is over
        except MlflowException:
            pass  # it had none
        missing = {k: v for k, v in flatten(self._params).items() if k not in run.data.params}
        self.log_params(missing)  # params are immutable in MLflow: the run keeps the values it started with
        return True

    def last_step(self, key: str) -> int:
        """The highest step of metric ``key`` in the run (0 when it has none)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)

    def _close_orphans(self, keep: str | None = None) -> None:
        """Mark KILLED every run of this stage still RUNNING whose process is gone (``kill -9``, a power cut)."""
        query = f"attributes.status = 'RUNNING' and tags.stage = '{self.stage}'"
        for run in self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000):
            if run.info.run_id != keep and not owner_alive(run.data.tags):
                self.client.set_tag(run.info.run_id, "error", "its process ended without closing the run (kill -9?)")
                self.client.set_terminated(run.info.run_id, "KILLED")

    @contextmanager
    def child_run(self, name: str, params: Mapping[str, Any]) -> Iterator[Tracker]:
        """A nested run (tag ``mlflow.parentRunId``: the UI shows it under this run) for one part of the stage, e.g.
        one toy fit; it ends FINISHED, or FAILED / KILLED with the exception, like the stage's own run."""
        tags = {**self._tags, "mlflow.parentRunId": self.run_id}
        child = MlflowTracker(self.client, self.experiment_id, self.stage, tags, params)
        child._run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        child.log_params(params)
        with _ended(child):
            yield child

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened params; lists and None as their text."""
        from mlflow.entities import Param

        if params:
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in flatten(params).items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Numeric metrics (bools as 0/1) at ``step`` in one request; a non-number is a programming error."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            if not isinstance(value, (int, float)):
                raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
            items.append(Metric(key, float(value), stamp, step or 0))
        self.client.log_batch(self.run_id, metrics=items)
        if step:
            self._curves.update(metrics)

    def log_results(self, results: Mapping[str, Any]) -> None:
        """A stage's final result dict: finite numbers become metrics, everything else a ``result.<key>`` tag.

        A number whose key already has a per-step curve in the run (a final ``test_error`` after the per-epoch ones)
        is not logged again: a second point at step 0 would bend the curve back to its start, and the curve's last
        point, which MLflow shows as the metric's value, is that final number already."""
        numbers = {k: v for k, v in results.items() if _is_finite_number(v)}
        self.log_metrics({k: v for k, v in numbers.items() if k not in self._curves})
        self.set_tags({f"result.{k}": v for k, v in results.items() if k not in numbers})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents, under ``artifact_path`` of the run."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"artifact {path} does not exist")

    def log_model(self, model: nn.Module, example: Tensor, name: str = "model") -> str:
        """``model`` as an MLflow model of the run (the runs page's Models column), with the signature and input
        example of ``example`` (a small batch of what its ``forward`` takes); returns its ``models:/`` URI.

        ``pip_requirements`` is given, so MLflow does not infer it (that loads the model in a subprocess: seconds);
        the ``iresnet`` package is copied along (``code_paths``), so the model loads wherever torch is installed.
        """
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        import iresnet

        if any(t.device.type != "cpu" for t in model.state_dict().values()):  # a GPU model: log a CPU copy
            import copy

            model = copy.deepcopy(model).cpu()
        example = example.cpu()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = model(example)
            # mlflow.pytorch logs through the global client, and files the model under the global experiment (else
            # the Default one, with its artifacts in ./mlruns of the working directory)
            mlflow.set_tracking_uri(self.uri)
            with signals_held():  # its store writes, like the client's (SignalSafeClient)
                mlflow.set_experiment(experiment_id=self.experiment_id)
                info = mlflow.pytorch.log_model(
                    model,
                    name=name,
                    run_id=self.run_id,
                    signature=infer_signature(example.numpy(), output.numpy()),
                    input_example=example.numpy(),
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    code_paths=[str(Path(iresnet.__file__).parent)],  # the model's classes travel with it
                    serialization_format="pickle",  # torch.export cannot trace the flow's log-det estimators
                )
        except Exception as err:  # the fluent API bypasses SignalSafeClient: the same one-line error for the store
            if _store_failure(err):
                raise store_error(self.uri, err) from err
            raise
        finally:
            model.train(was_training)
        return info.model_uri

    def log_input(self, path: Path, context: str) -> None:
        """The file ``path`` (e.g. the prepared training split) as a dataset input of the run, named after the file
        and its folder, with its md5 as the digest (the hash DVC records for it) and ``context`` (train, test)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        digest = hashlib.md5(path.read_bytes()).hexdigest()  # identity, not security
        with warnings.catch_warnings():  # a local path fits two registered source kinds (the same one, twice)
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path))
        dataset = MetaDataset(source, name=f"{path.parent.name}/{path.name}", digest=digest)
        tags = [InputTag("mlflow.data.context", context)]
        self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(), tags)])


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and (isinstance(value, bool) or math.isfinite(value))


@contextmanager
def stage_run(
    family: str,
    stage: str,
    params: Mapping[str, Any],
    paths: Paths,
    enabled: bool = True,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[Tracker]:
    """One MLflow run for one stage execution, in the family's experiment; yields the tracker.

    ``params`` (nested sections) are logged flattened and hashed into the ``params_hash`` tag. The run starts with
    the first thing logged, or continues the run a resumed stage names (:meth:`MlflowTracker.continue_run`). On an
    exception the run ends FAILED (KILLED for KeyboardInterrupt, which SIGINT and SIGTERM raise) with an ``error``
    tag, and the exception propagates. ``tags``: more tags for the run (e.g. the device it computes on).
    """
    experiment_name(family)  # validates the family before anything runs
    if not tracking_enabled(enabled):
        yield NullTracker()
        return
    from mlflow import MlflowClient

    # MLflow logs every failed database call with its traceback before raising; the error reaches the user as one
    # line (store_error), so those logs would only bury it.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    uri = tracking_uri(paths)
    try:
        experiment_id = init_store(paths, uri)[family]
        client = SignalSafeClient(MlflowClient(uri))
        tracker = MlflowTracker(
            client,
            experiment_id,
            stage,
            {**run_tags(stage, params, paths), **{k: str(v) for k, v in (tags or {}).items()}},
            params,
        )
    except TrackingError:
        raise
    except Exception as err:  # sqlite locked, a broken file, an unreachable server, a lock timeout ...
        raise store_error(uri, err, "start a run in") from err
    with _ended(tracker):
        yield tracker


@contextmanager
def _ended(tracker: MlflowTracker) -> Iterator[None]:
    """End ``tracker``'s run with the block: FINISHED, or FAILED (KILLED for a KeyboardInterrupt) with an ``error``
    tag, the exception propagating."""
    try:
        yield
        run_id = tracker.run_id  # a stage that logged nothing still gets its (empty) run
    except BaseException as err:
        if isinstance(err, TrackingError):
            raise  # the store just failed (a lock holds for 20 s a call): a later stage closes the run as KILLED
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            tracker.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
            tracker.client.set_terminated(tracker.run_id, status)
        except TrackingError:
            pass  # the store fails too: the stage's own error is the one to report
        raise
    else:
        tracker.client.set_terminated(run_id, "FINISHED")
