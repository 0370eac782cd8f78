"""Shared training helpers: the resumable epoch loop's catch-up after a restore
(:meth:`pipeline.training.EpochLoop.replay`) and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import training
from pipeline.tracking import NullTracker
from pipeline.training import EpochLoop, ResumeFile


class FakeTracker(NullTracker):
    """Remembers the tags and the ``(step, metrics)`` logged; the rest of the tracker interface does nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update(tags)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))


def _record(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "loss": 1.0 / epoch, "lr": 0.1}


def _run(loop: EpochLoop, per_epoch: int) -> tuple[FakeTracker, list[tuple[int, str | None]]]:
    """Run ``loop`` to its end as a stage does (replay first in every epoch); returns the tracker and bar moves."""
    tracker, moves = loop.tracker, []

    def advance(n: int = 1, info: str | None = None) -> None:
        moves.append((n, info))

    for epoch in loop:
        loop.replay(advance, per_epoch)
        loop.save(epoch, _record(epoch))
    return tracker, moves


def test_a_fresh_run_replays_nothing(tmp_path: Path) -> None:
    tracker, moves = _run(
        EpochLoop(ResumeFile(tmp_path / "r.pt"), 3, {"model": torch.nn.Linear(2, 2)}, FakeTracker()), 5
    )
    assert moves == [] and tracker.tags == {"resume_checkpoint": "r.pt"}
    assert tracker.metrics == [(e, {"loss": 1.0 / e, "lr": 0.1}) for e in (1, 2, 3)]  # save() logs each epoch


def test_a_resumed_run_catches_up_once(tmp_path: Path) -> None:
    """After 2 of 4 epochs: the bar jumps 2 epochs and the run is tagged; epochs 1 and 2 are not logged again (the
    resumed stage continues the MLflow run that holds them)."""
    resume, model = ResumeFile(tmp_path / "r.pt"), torch.nn.Linear(2, 2)
    killed = EpochLoop(resume, 4, {"model": model})
    for epoch in killed:
        killed.save(epoch, _record(epoch))
        if epoch == 2:
            break  # the run dies after saving epoch 2

    loop = EpochLoop(resume, 4, {"model": model}, FakeTracker())
    tracker, moves = _run(loop, per_epoch=5)
    assert loop.resumed_from == 2
    assert moves == [(10, "resumed after epoch 2")]  # only in epoch 3: epoch 4 replays nothing
    assert tracker.tags == {"resume_checkpoint": "r.pt", "resumed_from_epoch": 2}
    assert [step for step, _ in tracker.metrics] == [3, 4] and tracker.checkpoint_epoch == 4


def test_a_resumed_run_logs_only_the_epochs_its_mlflow_run_lacks(tmp_path: Path) -> None:
    """Killed after saving epoch 2 but before logging it: the continued run holds epoch 1 only, so epoch 2 is logged
    at the catch-up, then 3 and 4 as they end: every epoch exactly once."""
    resume, model = ResumeFile(tmp_path / "r.pt"), torch.nn.Linear(2, 2)
    killed = EpochLoop(resume, 4, {"model": model})
    for epoch in killed:
        killed.save(epoch, _record(epoch))
        if epoch == 2:
            break

    class HoldsEpochOne(FakeTracker):
        def last_step(self, key: str) -> int:
            return 1

    tracker, _ = _run(EpochLoop(resume, 4, {"model": model}, HoldsEpochOne()), per_epoch=5)
    assert [step for step, _ in tracker.metrics] == [2, 3, 4]


def test_resume_keys_follow_the_stage_code_and_the_dvc_experiment(tmp_path: Path, monkeypatch) -> None:
    """The checkpoint's name changes with any file of the stage's code deps (not with bytecode or another stage's
    code) and with the DVC experiment: another code version or a parallel queued experiment never resumes from it."""
    import shutil

    from pipeline.paths import Paths
    from pipeline.training import CODE_ROOT, code_deps, code_digest

    root = tmp_path / "code"
    for name in ("pipeline", "iresnet"):
        shutil.copytree(CODE_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(CODE_ROOT / "dvc.yaml", root / "dvc.yaml")
    assert "pipeline/training.py" in code_deps("train_flow", root) and "iresnet" in code_deps("train_flow", root)
    assert code_deps("train_classifier@0.9-1", root) == code_deps("train_classifier", root)
    before = code_digest("train_flow", root)
    (root / "iresnet" / "__pycache__").mkdir()
    (root / "iresnet" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"bytecode")
    (root / "pipeline" / "stages" / "prepare.py").write_text("# another stage's code\n")
    assert code_digest("train_flow", root) == before
    (root / "iresnet" / "blocks.py").write_text((root / "iresnet" / "blocks.py").read_text() + "\n# edited\n")
    assert code_digest("train_flow", root) != before

    paths = Paths.at(tmp_path)
    names = {ResumeFile.for_run(paths, "flow", "abc", "train_flow").path.name}
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    names.add(ResumeFile.for_run(paths, "flow", "abc", "train_flow").path.name)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-b")
    names.add(ResumeFile.for_run(paths, "flow", "abc", "train_flow").path.name)
    assert len(names) == 3 and all(n.startswith("flow-") for n in names)


def test_warmup_lr_values() -> None:
    lr = 0.003
    assert [training.warmup_lr(s, lr, 4) for s in range(6)] == [lr / 4, lr / 2, 3 * lr / 4, lr, lr, lr]
    assert training.warmup_lr(0, lr, 0) == lr  # no warm-up
    with pytest.raises(ValueError, match="step and warmup_steps"):
        training.warmup_lr(-1, lr, 4)


def test_scheduled_lr_closed_form() -> None:
    lr, warmup, total = 0.01, 4, 12
    constant = [training.scheduled_lr(s, lr, warmup, total, "constant") for s in range(total)]
    assert constant == [training.warmup_lr(s, lr, warmup) for s in range(total)]  # today's schedule
    cosine = [training.scheduled_lr(s, lr, warmup, total, "cosine") for s in range(total)]
    assert cosine[:warmup] == constant[:warmup]
    expected = [lr * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2 for s in range(warmup, total)]
    assert cosine[warmup:] == pytest.approx(expected, rel=1e-15, abs=0)
    assert cosine[warmup] == lr and cosine[warmup + 4] == pytest.approx(lr / 2) and 0 < cosine[-1] < lr / 20
    assert training.scheduled_lr(total, lr, warmup, total, "cosine") == 0.0
    assert training.scheduled_lr(0, lr, 0, 5, "cosine") == lr  # no warm-up: decays from the first step
    with pytest.raises(ValueError, match="schedule"):
        training.scheduled_lr(0, lr, warmup, total, "step")
