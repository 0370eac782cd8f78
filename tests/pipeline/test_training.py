"""The resumable epoch loop's catch-up after a restore (:meth:`pipeline.training.EpochLoop.replay`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

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
    assert moves == [] and tracker.tags == {}
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
    assert tracker.tags == {"resumed_from_epoch": 2}
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
