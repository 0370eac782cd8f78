"""What every training stage shares: seeding, resumable checkpoints, finite-loss checks, model files, optimisers,
and the resumable epoch loop (:class:`EpochLoop`).

Resume state lives outside DVC's outputs (DVC deletes a stage's outputs before it runs, which would throw away the
very checkpoint a crashed run needs). It sits in ``<workspace>/.resume/<name>-<key>.pt``, keyed by a hash of
everything that defines the run (params, data, the code of the stage's DVC deps, the DVC experiment), so a run with
other params or code never resumes from it (an ablation starts afresh instead of failing), and it is deleted once the
stage has written its final outputs.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from pipeline.env import world
from pipeline.errors import DataError, UserError, brief
from pipeline.files import save_torch
from pipeline.params import LR_SCHEDULES, OPTIMIZER_NAMES, params_hash
from pipeline.paths import Paths

if TYPE_CHECKING:
    from pipeline.outputs import StageRun
    from pipeline.tracking import Tracker

C = TypeVar("C")


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): ``base_lr · (step + 1) / warmup_steps`` during the warm-up,
    then ``base_lr``.

    The first step uses ``base_lr / warmup_steps`` and step ``warmup_steps - 1`` (the last of the warm-up)
    exactly ``base_lr``. (The authors' schedule was off by one and ended at twice the intended rate.)
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got step={step}, warmup_steps={warmup_steps}")
    if step >= warmup_steps:
        return base_lr
    return base_lr * (step + 1) / warmup_steps


def scheduled_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total_steps``: :func:`warmup_lr` during the warm-up;
    after it ``base_lr`` (``constant``) or ``base_lr · (1 + cos(π (step - W) / (T - W))) / 2`` (``cosine``, with
    ``W = warmup_steps``, ``T = total_steps``): ``base_lr`` at the first step after the warm-up, decaying to 0 at
    ``T`` (the end of training, one step after the last).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    lr = warmup_lr(step, base_lr, warmup_steps)
    if schedule == "constant" or step < warmup_steps:
        return lr
    if step >= total_steps:
        return 0.0
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


def n_params(model: torch.nn.Module) -> int:
    """The number of trainable values in ``model`` (the run-cost table's parameter count)."""
    return sum(p.numel() for p in model.parameters())


class TrainingDiverged(UserError):
    """A loss or gradient became NaN or infinite; the message says where and what to try."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch once per stage (every stage is then deterministic on the CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """Every global RNG's state in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # the current GPU's stream (probes drawn there)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_finite(value: Tensor, what: str, where: str, hint: str | Callable[[], str]) -> None:
    """Stop with a diagnosis when ``value`` holds a NaN or an infinity.

    ``what`` names the quantity (``"loss"``), ``where`` the place (``"epoch 3, batch 17"``), ``hint`` what to try;
    a callable hint is only called when the check fails (for a diagnosis too costly to build at every step).
    """
    if not torch.isfinite(value).all():
        text = hint() if callable(hint) else hint
        raise TrainingDiverged(f"the {what} became {value.detach().flatten()[0].item()} at {where}. {text}")


def gradient_norm(model: torch.nn.Module) -> Tensor:
    """``‖∇θ‖₂`` over every parameter that has a gradient (measured only, to catch a diverging step)."""
    return torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()


CODE_ROOT = Path(__file__).resolve().parents[1]  # the repository holding pipeline/, iresnet/ and dvc.yaml
CODE_DIRS = ("pipeline", "iresnet")
_NOT_CODE = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}  # as in .dvcignore


def code_deps(stage: str, root: Path = CODE_ROOT) -> list[str]:
    """The code a DVC stage depends on, as ``dvc.yaml`` declares it: its ``pipeline/...`` files and the ``iresnet``
    folder (``stage`` without a matrix item: ``train_classifier``, not ``train_classifier@0.9``). Without a
    ``dvc.yaml`` stage to read, all of ``pipeline/`` and ``iresnet/``."""
    import yaml

    try:
        deps = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage.split("@")[0]].get("deps", [])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return list(CODE_DIRS)
    return [dep for dep in deps if isinstance(dep, str) and dep.split("/")[0] in CODE_DIRS]


def code_digest(stage: str, root: Path = CODE_ROOT) -> str:
    """SHA-256 over the paths and bytes of every file of :func:`code_deps` (bytecode and tool caches left out)."""
    digest = hashlib.sha256()
    for dep in code_deps(stage, root):
        path = root / dep
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            rel = file.relative_to(root)
            if file.is_file() and not _NOT_CODE & set(rel.parts) and file.suffix not in (".pyc", ".pyo"):
                digest.update(f"{rel.as_posix()}\0".encode() + file.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class ResumeFile:
    """The resume state of one training run: model, optimiser, scheduler, RNG and epoch, saved atomically."""

    path: Path

    @classmethod
    def for_run(cls, paths: Paths, name: str, fingerprint: str, stage: str) -> ResumeFile:
        """The checkpoint of run ``name`` (e.g. ``classifier-0.9``) of DVC stage ``stage``: ``fingerprint`` (a hash of
        the params and data that define the run) + the code the stage depends on + the DVC experiment, so neither
        another code version nor a parallel queued experiment ever resumes from it."""
        key = params_hash({"run": fingerprint, "code": code_digest(stage), "exp": os.environ.get("DVC_EXP_NAME")})
        return cls(paths.workspace / ".resume" / f"{name.replace('/', '-')}-{key}.pt")

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none; a corrupt file is an error that says how to start over."""
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # any unreadable file gets the same advice
            raise DataError(
                f"the resume checkpoint {self.path} cannot be read ({brief(err)}). Delete it to train from scratch."
            ) from None

    def save(self, state: dict[str, Any]) -> None:
        save_torch(self.path, state)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A library config (a dataclass, nested ones included) as plain data, tuples as lists: what a model file stores,
    and what ``torch.load(weights_only=True)`` reads back."""
    return TypeAdapter(type(config)).dump_python(config, mode="json")


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Inverse of :func:`config_to_dict`: pydantic rebuilds ``cls`` (lists back to tuples, nested configs from their
    dicts) and runs its checks. A key ``cls`` does not know, or a bad value, raises a one-line ``ValueError`` naming
    its key path (``logdet.n_terms: ...``); a key missing from an older file takes the field's default."""
    try:
        return TypeAdapter(cls).validate_python(data, extra="forbid")
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(f"{'.'.join(map(str, first['loc'])) or cls.__name__}: {first['msg']}") from None


def save_model(path: Path, kind: str, config: dict[str, Any], model: nn.Module, **extra: Any) -> None:
    """Write a final model file: its kind, the config that rebuilds it, its state dict, and ``extra`` metadata."""
    save_torch(path, {"kind": kind, "config": config, "state_dict": cpu_state(model), **extra})


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every tensor on the CPU (the same tensors when it is there already), so a file
    written on a GPU loads anywhere."""
    state = model.state_dict()
    for key, value in state.items():  # in place: the dict keeps its ``_metadata``, which torch.save writes
        state[key] = value.cpu()
    return state


def load_model_file(path: Path, kind: str) -> dict[str, Any]:
    """Read a model file written by :func:`save_model` safely, checking it holds a ``kind`` model."""
    if not path.exists():
        raise DataError(f"no model at {path}: run the stage that trains it first (e.g. `dvc repro`).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(
            f"the model file {path} cannot be read ({brief(err)}); re-run the stage that writes it."
        ) from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise DataError(f"{path} holds a {found!r} model, not a {kind!r} one; re-run the stage that writes it.")
    return state


def load_state_checked(model: nn.Module, state_dict: dict[str, Tensor], source: Path) -> None:
    """``load_state_dict`` that explains a mismatch (a checkpoint from another configuration) instead of a traceback."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise DataError(
            f"{source} was trained with another configuration than the one now built ({first}). "
            "Re-run the stage that writes it with the current params."
        ) from None


OPTIMIZERS = OPTIMIZER_NAMES


def build_optimizer(
    name: str, parameters: Iterable[nn.Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``sgd`` (heavy-ball momentum; App. C.2), ``adam`` or ``adamax`` (App. C.3; ``momentum`` unused).

    ``weight_decay`` is the L2 term added to the gradient (``torch.optim``'s coupled decay, as in the paper's code).
    """
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamax":
        return torch.optim.Adamax(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict`` (modules, optimisers, LR schedulers)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class EpochLoop:
    """Epochs ``1..epochs`` that survive a crash, with everything a bit-identical continuation needs.

    ::

        loop = EpochLoop(resume, epochs, {"model": model, "optimizer": opt, "scheduler": sched}, tracker)
        with progress(name, epochs * per_epoch) as advance:
            for epoch in loop:        # first restores the last saved state (if any), then yields the epochs left
                loop.replay(advance, per_epoch)  # after a restore: catch up the progress bar
                ...                   # train, evaluate, scheduler.step()
                loop.save(epoch, record)  # appends ``record`` to ``loop.history``; saves the state, logs the record
        ...                           # write the final outputs
        loop.finish()                 # then remove the resume file

    Restoring happens when iteration starts, so build the objects (which may draw random numbers) before it: the RNG
    state of the saved epoch then replaces whatever construction left. ``resumed_from`` is the epoch restored (0:
    fresh start). A run killed at any point redoes at most the epoch it was in, from the same state.

    The checkpoint also keeps the MLflow run id: a resumed stage continues that run (``tracker.continue_run``), so
    the killed and the resumed part make one run with one complete curve. Each save sets
    ``tracker.checkpoint_epoch``, which the CLI names when a signal stops the stage.
    """

    def __init__(
        self, resume: ResumeFile, epochs: int, stateful: Mapping[str, Stateful], tracker: Tracker | None = None
    ) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
        from pipeline.tracking import NullTracker

        self.resume, self.epochs, self.stateful = resume, epochs, dict(stateful)
        self.tracker = tracker if tracker is not None else NullTracker()
        self.history: list[dict[str, Any]] = []
        self.resumed_from = 0

    def __iter__(self) -> Iterator[int]:
        first = self._restore() + 1
        self.tracker.set_tags({"resume_checkpoint": self.resume.path.name})  # tells parallel runs' checkpoints apart
        for epoch in range(first, self.epochs + 1):
            yield epoch
            if len(self.history) != epoch:
                raise RuntimeError(f"epoch {epoch} ended without loop.save(epoch, record)")

    def _restore(self) -> int:
        state = self.resume.load()
        if state is None:
            return 0
        if set(state.get("states", {})) != set(self.stateful) or not 1 <= state.get("epoch", 0) <= self.epochs:
            raise DataError(f"the resume checkpoint {self.resume.path} does not fit this run; delete it to start over.")
        try:
            for name, obj in self.stateful.items():
                obj.load_state_dict(state["states"][name])
        except (RuntimeError, ValueError, KeyError) as err:
            raise DataError(
                f"the resume checkpoint {self.resume.path} does not fit this run ({brief(err)}); "
                "delete it to start over."
            ) from None
        restore_rng(state["rng"])
        self.history = [dict(record) for record in state["history"]]
        self.resumed_from = int(state["epoch"])
        self.tracker.checkpoint_epoch = self.resumed_from
        self.tracker.continue_run(state.get("run_id"))
        return self.resumed_from

    def replay(self, advance: Callable[..., None], per_epoch: int) -> None:
        """Call first thing in every epoch: on the first one after a restore, catch up with the epochs a killed run
        already did; otherwise it does nothing.

        The progress bar (``advance(n, info=...)`` of :func:`pipeline.console.progress`) moves past their
        ``per_epoch`` steps each and the run is tagged ``resumed_from_epoch``. The resumed stage continues the killed
        stage's MLflow run, which holds their metrics already: only epochs it lacks are logged (one saved just
        before the kill, or all of them when that run is gone and this is a new one).
        """
        if not self.resumed_from or len(self.history) != self.resumed_from:
            return  # a fresh run, or an epoch after the first resumed one (it has saved since)
        advance(self.resumed_from * per_epoch, info=f"resumed after epoch {self.resumed_from}")
        self.tracker.set_tags({"resumed_from_epoch": self.resumed_from})
        metrics = _epoch_metrics(self.history[0])
        logged = self.tracker.last_step(next(iter(metrics))) if metrics else None
        if logged is not None:
            for epoch, record in enumerate(self.history[logged:], start=logged + 1):
                self.tracker.log_metrics(_epoch_metrics(record), step=epoch)

    def save(self, epoch: int, record: Mapping[str, Any]) -> None:
        """Close ``epoch``: record its numbers, write the resume state (atomic: a kill leaves the previous one), then
        log the record's numbers (all but ``epoch``) at ``step = epoch``.

        Logging after the save means a resumed run never logs an epoch twice: a kill between the two leaves the
        epoch out of the run, and :meth:`replay` logs it then."""
        if epoch != len(self.history) + 1:
            raise ValueError(f"epoch {epoch} saved out of order: {len(self.history)} epochs are recorded")
        self.history.append(dict(record))
        states = {name: obj.state_dict() for name, obj in self.stateful.items()}
        state = {"epoch": epoch, "history": self.history, "rng": capture_rng(), "states": states}
        if self.tracker.run_id is not None:
            state["run_id"] = self.tracker.run_id
        if world().is_main:  # the other ranks of a data-parallel run hold the same state
            self.resume.save(state)
        self.tracker.checkpoint_epoch = epoch
        self.tracker.log_metrics(_epoch_metrics(record), step=epoch)

    def finish(self) -> None:
        """Remove the resume file (call after the final outputs are written)."""
        self.resume.remove()

    def close(
        self,
        out: StageRun,
        model: nn.Module,
        metrics: dict[str, Any],
        example: Tensor | None = None,
        inputs: Mapping[str, Path] | None = None,
    ) -> dict[str, Any]:
        """End a training stage: add the parameter count and the training throughput (images per second of training,
        over every epoch, an interrupted run's included) to ``metrics``, end the stage with :meth:`StageRun.finish`
        (its wall time counts the interrupted run's epochs too), then remove the resume file. Epoch records need
        ``images``, ``train_seconds`` and ``seconds``.

        After the wall time is taken, the run also gets ``model`` as an MLflow model (signature and input example
        from ``example``, a small batch of its input) and ``inputs`` (context -> file, e.g. the prepared splits) as
        its dataset inputs."""
        history = self.history
        metrics["n_params"] = n_params(model)
        metrics["throughput_img_s"] = sum(r["images"] for r in history) / sum(r["train_seconds"] for r in history)
        out.finish(metrics, earlier_s=sum(r["seconds"] for r in history[: self.resumed_from]))
        for context, path in (inputs or {}).items():
            self.tracker.log_input(path, context)
        if example is not None:
            self.tracker.log_model(model, example)
        self.finish()
        return metrics


def _epoch_metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    """An epoch record's numbers as logged per step: everything but the epoch number itself."""
    return {k: v for k, v in record.items() if k != "epoch"}


class GeneratorState:
    """A ``torch.Generator`` as a :class:`Stateful`, so an :class:`EpochLoop` saves and restores its stream too
    (e.g. dequantisation noise drawn from its own seeded generator, apart from the global RNG)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["state"])
