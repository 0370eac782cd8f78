"""Classifier inputs (App. C.2): random shifts and flips on ``[0, 1]`` images, then per-channel normalisation.

Everything draws from the global torch RNG (seeded once per stage, saved in every resume checkpoint), so an
interrupted and resumed run sees exactly the batches an uninterrupted one would. Images are ``(N, C, H, W)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def random_shift(images: Tensor, shift_px: int) -> Tensor:
    """Shift each image by its own random ``(dy, dx)`` with ``|dy|, |dx| <= shift_px``, filling with zeros (black).

    Zero padding by ``shift_px`` and a random ``H x W`` crop: output pixel ``(i, j)`` is input pixel
    ``(i + dy, j + dx)`` when that lies inside the image, else 0. ``(B, C, H, W) -> (B, C, H, W)``.
    """
    if shift_px < 0:
        raise ValueError(f"shift_px must be >= 0, got {shift_px}")
    if shift_px == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (shift_px,) * 4)
    dy = torch.randint(0, 2 * shift_px + 1, (b,))  # on the CPU on every device: a GPU run sees the CPU's shifts
    dx = torch.randint(0, 2 * shift_px + 1, (b,))
    rows = (dy[:, None] + torch.arange(h))[:, :, None].to(images.device)  # (B, H, 1): padded row of output row i
    cols = (dx[:, None] + torch.arange(w))[:, None, :].to(images.device)  # (B, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indexing over (batch, row, col) of the channels-last view gives (B, H, W, C).
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_hflip(images: Tensor) -> Tensor:
    """Mirror each image left-right with probability 1/2. ``(B, C, H, W) -> (B, C, H, W)``."""
    flip = (torch.rand(images.shape[0]) < 0.5).to(images.device)  # drawn on the CPU on every device
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def augment(images: Tensor, shift_px: int, hflip: bool) -> Tensor:
    """MNIST: shifts up to 2 px; CIFAR: shifts and horizontal flips (App. C.2). Inputs and outputs in ``[0, 1]``."""
    images = random_shift(images, shift_px)
    return random_hflip(images) if hflip else images


def batch_indices(n: int, batch_size: int, shuffle: bool, max_batches: int | None = None) -> Iterator[Tensor]:
    """Index tensors of consecutive batches over ``range(n)`` (a fresh permutation when ``shuffle``).

    The last batch may be smaller; ``max_batches`` stops early (the CPU profile's cap on an epoch).
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 examples and batch_size >= 1, got n={n}, batch_size={batch_size}")
    order = torch.randperm(n) if shuffle else torch.arange(n)
    for k, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and k >= max_batches:
            return
        yield order[start : start + batch_size]


def n_batches(n: int, batch_size: int, max_batches: int | None = None) -> int:
    """How many batches :func:`batch_indices` yields."""
    full = -(-n // batch_size)
    return full if max_batches is None else min(full, max_batches)


def evenly_spaced(n: int, k: int | None) -> Tensor:
    """``k`` indices spread evenly over ``range(n)``, first and last included (all ``n`` when ``k`` is None or
    ``>= n``): a split sorted by class then contributes every class, not only its first. ``-> (k,)`` int64."""
    if k is None or k >= n:
        return torch.arange(n)
    if k < 1:
        raise ValueError(f"k must be >= 1 (or None for all), got {k}")
    return torch.linspace(0, n - 1, k, dtype=torch.float64).round().long()
