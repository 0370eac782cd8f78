"""Base distributions of the flows: a standard normal, a learned diagonal Gaussian, and a Glow-style conditional
Gaussian for factored-out latents."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

__all__ = ["ConditionalGaussian", "DiagonalGaussian", "standard_normal_logprob"]

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_logprob(z: Tensor) -> Tensor:
    """``ln N(z; 0, I)`` summed over all but the batch dimension: ``(B, *shape) -> (B,)``.

    >>> import math, torch
    >>> logp = standard_normal_logprob(torch.zeros(3, 2, 2))  # 4 dimensions at the mode: -2 ln(2 pi)
    >>> logp.shape, round(float(logp[0]), 6) == round(-2 * math.log(2 * math.pi), 6)
    (torch.Size([3]), True)
    """
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


class ConditionalGaussian(nn.Module):
    """Glow's factor-out prior: ``p(z | h) = N(z; mean(h), diag(exp(2 log_std(h))))`` for a factored-out part ``z``
    ``(B, *shape)`` given the kept half ``h`` ``(B, cond_channels, H, W)`` of the same scale.

    ``mean`` and ``log_std`` come from one ``kernel_size`` convolution of ``h`` (``cond_channels -> 2 C``, same
    padding), zero-initialised, so the prior starts as the standard normal.
    """

    def __init__(self, shape: tuple[int, int, int], cond_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.conv = nn.Conv2d(cond_channels, 2 * self.shape[0], kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(cast(Tensor, self.conv.bias))

    def params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)``, each ``(B, *shape)``, given the kept half ``h``."""
        mean, log_std = self.conv(h).chunk(2, dim=1)
        return mean, log_std

    def log_prob(self, z: Tensor, h: Tensor) -> Tensor:
        """``ln p(z | h)``: ``(B, *shape), (B, cond_channels, H, W) -> (B,)``."""
        mean, log_std = self.params(h)
        return standard_normal_logprob((z - mean) * torch.exp(-log_std)) - log_std.flatten(1).sum(1)

    def sample(self, h: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """One sample ``(B, *shape)`` per kept half in ``h``; ``temperature`` scales the standard deviation."""
        mean, log_std = self.params(h)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + temperature * torch.exp(log_std) * eps
