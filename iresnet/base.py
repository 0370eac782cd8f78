"""The contract every invertible layer follows, written once.

Direction is data -> latent. ``forward(x, settings=None)`` returns ``(y, logdet)`` with ``logdet`` of shape ``(B,)``
holding ``ln|det dy/dx|`` per example; ``inverse(y)`` returns ``x``. The return type never depends on arguments, so
containers and tests can treat every layer alike (as in distrax / zuko / nflows).

``settings`` (:class:`iresnet.logdet.LogDetSettings`) chooses the log-det estimator of the residual blocks for this
call (terms, probes, or ``"none"``), passed down through every container; ``None`` keeps each block's own default.
Layers whose log-det is exact accept and ignore it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from iresnet.logdet import LogDetSettings

__all__ = ["Invertible", "InvertibleSequential", "zero_logdet"]


class Invertible(nn.Module):
    """Base class of an invertible layer: ``forward(x, settings=None) -> (y, logdet)`` and ``inverse(y) -> x``."""

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class InvertibleSequential(Invertible):
    """A chain of invertible layers; log-determinants add up (chain rule)."""

    def __init__(self, layers: Iterable[Invertible]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, layer_logdet = layer(x, settings)
            logdet = logdet + layer_logdet
        return x, logdet

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            y = cast(Invertible, layer).inverse(y)
        return y

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Invertible:
        return cast(Invertible, self.layers[index])


def zero_logdet(x: Tensor) -> Tensor:
    """A ``(B,)`` zero log-determinant on ``x``'s device and dtype (volume-preserving layers)."""
    return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
