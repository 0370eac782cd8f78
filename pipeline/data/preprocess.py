"""Preprocessing transforms, each fitted on the train split: padding, per-channel normalisation, uniform
dequantisation and ZCA whitening. Images are float tensors ``(N, C, H, W)`` with pixel values in ``[0, 1]``
(``uint8 / 255``) unless stated otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor


def to_unit(images: Tensor) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 in ``[0, 1]`` (``k / 255``)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}; pass the raw pixel values")
    return images.to(torch.float32) / 255.0


def pad_to(images: Tensor, size: int = 32) -> Tensor:
    """Zero-pad ``(N, C, H, W)`` symmetrically to ``size`` x ``size`` (28 -> 32 adds 2 pixels on each side).

    The padded border is black, like MNIST's own border, so the digits stay centred.
    """
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}: they are larger; set data.pad_to_32: false")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and standard deviation ``(C,)`` of the train split, for ``(x - mean) / std`` (App. C.2)."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, images: Tensor) -> ChannelStats:
        """Population statistics over all examples and pixels of ``images`` ``(N, C, H, W)``, in float64."""
        x = images.to(torch.float64)
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3), correction=0)
        if bool((std <= 0).any()):
            raise ValueError("a channel is constant over the train split; its standard deviation is 0")
        return cls(mean, std)

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` per channel; ``x`` is ``(N, C, H, W)``."""
        return (x - self._view(self.mean, x)) / self._view(self.std, x)

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`."""
        return z * self._view(self.std, z) + self._view(self.mean, z)

    @staticmethod
    def _view(v: Tensor, like: Tensor) -> Tensor:
        return v.to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1)


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation for density estimation: ``(x * 255 + u) / 256 - 0.5`` with ``u ~ U[0, 1)``.

    ``x`` holds pixels ``k / 255`` (``k`` = 0..255); the result is continuous in ``[-0.5, 0.5)`` and each value lies in
    the bin ``[k/256, (k+1)/256) - 0.5`` of width 1/256, so a density on it is a lower bound on the discrete model's
    likelihood (bits/dim count 256 bins per dimension). Draw fresh noise every batch with an explicit generator.
    """
    # Drawn where the generator lives (the pipeline keeps its noise generators on the CPU, so a GPU run sees the noise
    # a CPU run does and a checkpoint's generator state fits either), then moved to ``x``.
    where = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=where).to(x.device)
    return (x * 255.0 + u) / 256.0 - 0.5


@dataclass(frozen=True)
class ZCA:
    """ZCA whitening ``z = W (x - mean)`` with ``W = U diag((λ + ε)^(-1/2)) Uᵀ`` from the train covariance
    ``Σ = U diag(λ) Uᵀ`` (population covariance, float64).

    ``W`` is symmetric and invertible for ``ε > 0``; ``ln|det W| = -½ Σ ln(λ_i + ε)`` (:attr:`logdet`) converts a
    density of whitened data into one of the original data: ``ln p_x(x) = ln p_z(W (x - mean)) + ln|det W|``.
    Flattened dimension ``D = C·H·W``; ``mean (D,)``, ``eigenvectors (D, D)`` (columns), ``eigenvalues (D,)``.
    Storing the eigen-decomposition instead of ``W`` and ``W⁻¹`` keeps one ``D x D`` matrix on disk; both are
    rebuilt exactly from it.
    """

    mean: Tensor
    eigenvectors: Tensor
    eigenvalues: Tensor
    epsilon: float

    @classmethod
    def fit(cls, images: Tensor, epsilon: float) -> ZCA:
        """Fit on ``images`` ``(N, ...)`` (flattened per example)."""
        if not epsilon > 0:
            raise ValueError(f"ZCA epsilon must be > 0 (got {epsilon}); image covariances are singular")
        x = images.reshape(len(images), -1).to(torch.float64)
        mean = x.mean(dim=0)
        centred = x - mean
        cov = centred.T @ centred / len(x)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        # Round-off can make the eigenvalues of a singular covariance slightly negative; they are 0.
        return cls(mean, eigenvectors, eigenvalues.clamp_min(0.0), float(epsilon))

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @cached_property
    def matrix(self) -> Tensor:
        """``W (D, D)`` (computed once per object)."""
        return (self.eigenvectors * (self.eigenvalues + self.epsilon).rsqrt()) @ self.eigenvectors.T

    @cached_property
    def inverse_matrix(self) -> Tensor:
        """``W⁻¹ (D, D)`` (computed once per object)."""
        return (self.eigenvectors * (self.eigenvalues + self.epsilon).sqrt()) @ self.eigenvectors.T

    @property
    def logdet(self) -> float:
        """``ln|det W|`` (``W`` is symmetric positive definite, so ``det W > 0``)."""
        return float(-0.5 * torch.log(self.eigenvalues + self.epsilon).sum())

    def to(self, device: torch.device | str) -> ZCA:
        """A copy on ``device`` (whitening runs where the data is; move it once, not per batch)."""
        return ZCA(self.mean.to(device), self.eigenvectors.to(device), self.eigenvalues.to(device), self.epsilon)

    def whiten(self, x: Tensor) -> Tensor:
        """``(N, ...)`` in the fitted units -> whitened ``(N, ...)``, same shape and dtype."""
        flat = x.reshape(len(x), -1).to(torch.float64)
        self._check(flat)
        return ((flat - self.mean) @ self.matrix).reshape(x.shape).to(x.dtype)  # W symmetric: x Wᵀ = x W

    def unwhiten(self, z: Tensor) -> Tensor:
        """Exact inverse of :meth:`whiten`."""
        flat = z.reshape(len(z), -1).to(torch.float64)
        self._check(flat)
        return (flat @ self.inverse_matrix + self.mean).reshape(z.shape).to(z.dtype)

    def _check(self, flat: Tensor) -> None:
        if flat.shape[1] != self.dim:
            raise ValueError(f"ZCA was fitted on {self.dim} dimensions, got {flat.shape[1]}")
        if flat.device != self.mean.device:
            raise ValueError(f"data on {flat.device} but ZCA on {self.mean.device}; use zca.to(device) once")

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors, loadable with ``torch.load(weights_only=True)``."""
        return {
            "mean": self.mean,
            "eigenvectors": self.eigenvectors,
            "eigenvalues": self.eigenvalues,
            "epsilon": torch.tensor(self.epsilon, dtype=torch.float64),
            "logdet": torch.tensor(self.logdet, dtype=torch.float64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ZCA:
        return cls(state["mean"], state["eigenvectors"], state["eigenvalues"], float(state["epsilon"]))
