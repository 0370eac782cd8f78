"""What every training stage shares: seeding, resumable checkpoints, finite-loss checks, model files.

Resume state lives outside DVC's outputs (DVC deletes a stage's outputs before it runs, which would throw away the
very checkpoint a crashed run needs). It sits in ``<workspace>/.resume/<name>-<fingerprint>.pt``, keyed by a hash of
everything that defines the run, so a run with other params never resumes from it (an ablation starts afresh
instead of failing), and it is deleted once the stage has written its final outputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import DataError, UserError
from pipeline.files import save_torch
from pipeline.paths import Paths


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
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def check_finite(value: Tensor, what: str, where: str, hint: str) -> None:
    """Stop with a diagnosis when ``value`` holds a NaN or an infinity.

    ``what`` names the quantity (``"loss"``), ``where`` the place (``"epoch 3, batch 17"``), ``hint`` what to try.
    """
    if not torch.isfinite(value).all():
        raise TrainingDiverged(f"the {what} became {value.detach().flatten()[0].item()} at {where}. {hint}")


@dataclass(frozen=True)
class ResumeFile:
    """The resume state of one training run: model, optimiser, scheduler, RNG and epoch, saved atomically."""

    path: Path

    @classmethod
    def for_run(cls, paths: Paths, name: str, fingerprint: str) -> ResumeFile:
        return cls(paths.workspace / ".resume" / f"{name.replace('/', '-')}-{fingerprint}.pt")

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none; a corrupt file is an error that says how to start over."""
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
            raise DataError(
                f"the resume checkpoint {self.path} cannot be read ({err}). Delete it to train from scratch."
            ) from None

    def save(self, state: dict[str, Any]) -> None:
        save_torch(self.path, state)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def save_model(path: Path, kind: str, config: dict[str, Any], model: nn.Module, **extra: Any) -> None:
    """Write a final model file: its kind, the config that rebuilds it, its state dict, and ``extra`` metadata."""
    save_torch(path, {"kind": kind, "config": config, "state_dict": model.state_dict(), **extra})


def load_model_file(path: Path, kind: str) -> dict[str, Any]:
    """Read a model file written by :func:`save_model` safely, checking it holds a ``kind`` model."""
    if not path.exists():
        raise DataError(f"no model at {path}: run the stage that trains it first (e.g. `dvc repro`).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"the model file {path} cannot be read ({err}); re-run the stage that writes it.") from None
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
