"""Base distributions of the flows: a standard normal and a learned diagonal Gaussian."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_logprob(z: Tensor) -> Tensor:
    """``ln N(z; 0, I)`` summed over all but the batch dimension: ``(B, *shape) -> (B,)``."""
    return (-0.5 * (z.pow(2) + _LOG_2PI)).flatten(1).sum(1)


class DiagonalGaussian(nn.Module):
    """``N(mean, diag(exp(2 log_std)))`` over tensors of ``shape`` (without batch); fixed = standard normal.

    ``learned=True`` makes mean and log-std parameters (initialised at the standard normal), as the learned prior of
    the multiscale flow; ``learned=False`` keeps them as zero buffers.
    """

    def __init__(self, shape: tuple[int, ...], learned: bool = True) -> None:
        super().__init__()
        self.shape = tuple(shape)
        zeros = torch.zeros(self.shape)
        if learned:
            self.mean = nn.Parameter(zeros.clone())
            self.log_std = nn.Parameter(zeros.clone())
        else:
            self.register_buffer("mean", zeros.clone())
            self.register_buffer("log_std", zeros.clone())

    def log_prob(self, z: Tensor) -> Tensor:
        """``(B, *shape) -> (B,)``."""
        normalised = (z - self.mean) * torch.exp(-self.log_std)
        return standard_normal_logprob(normalised) - self.log_std.sum()

    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``(n, *shape)``; ``temperature`` scales the standard deviation."""
        eps = torch.randn((n, *self.shape), generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + temperature * torch.exp(self.log_std) * eps
