"""The resumable epoch loop's catch-up after a restore (:meth:`pipeline.training.EpochLoop.replay`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.training import EpochLoop, ResumeFile


class FakeTracker:
    """Remembers the tags and the ``(step, metrics)`` logged; the rest of the tracker interface is not used here."""

    def __init__(self) -> None:
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
    tracker, moves = FakeTracker(), []

    def advance(n: int = 1, info: str | None = None) -> None:
        moves.append((n, info))

    for epoch in loop:
        loop.replay(tracker, advance, per_epoch)
        loop.save(epoch, _record(epoch))
    return tracker, moves


def test_a_fresh_run_replays_nothing(tmp_path: Path) -> None:
    tracker, moves = _run(EpochLoop(ResumeFile(tmp_path / "r.pt"), 3, {"model": torch.nn.Linear(2, 2)}), 5)
    assert moves == [] and tracker.tags == {} and tracker.metrics == []


def test_a_resumed_run_catches_up_once(tmp_path: Path) -> None:
    """After 2 of 4 epochs: the bar jumps 2 epochs, the run is tagged, epochs 1 and 2 are logged again at their step."""
    resume, model = ResumeFile(tmp_path / "r.pt"), torch.nn.Linear(2, 2)
    killed = EpochLoop(resume, 4, {"model": model})
    for epoch in killed:
        killed.save(epoch, _record(epoch))
        if epoch == 2:
            break  # the run dies after saving epoch 2

    loop = EpochLoop(resume, 4, {"model": model})
    tracker, moves = _run(loop, per_epoch=5)
    assert loop.resumed_from == 2
    assert moves == [(10, "resumed after epoch 2")]  # only in epoch 3: epoch 4 replays nothing
    assert tracker.tags == {"resumed_from_epoch": 2}
    assert tracker.metrics == [(1, {"loss": 1.0, "lr": 0.1}), (2, {"loss": 0.5, "lr": 0.1})]
