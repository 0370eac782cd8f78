"""Small exact constructions shared by the numerical tests (float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from iresnet.spectral_norm import operator_norm

DTYPE = torch.float64


def randn(generator: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=DTYPE)


def scaled_to_norm(weight: Tensor, norm: float) -> Tensor:
    """``weight`` rescaled so that its spectral norm (largest singular value) is exactly ``norm``."""
    return weight * (norm / torch.linalg.matrix_norm(weight, ord=2))


def conv_operator_norm(kernel: Tensor, shape: tuple[int, int, int]) -> float:
    """Exact 2-norm of ``x -> conv2d(x, kernel, padding=k//2)`` on inputs of ``shape``, from its dense matrix."""
    padding = kernel.shape[-1] // 2
    return operator_norm(lambda z: F.conv2d(z, kernel, padding=padding), (1, *shape))
