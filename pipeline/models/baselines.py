"""Closed-form density baselines for Table 4: what a flow's bits/dim must beat to have learnt anything.

Both models are densities on the space the flow models, dequantised pixels ``x = (k + u) / 256 - 0.5`` in
``[-0.5, 0.5)^D`` (:func:`pipeline.data.preprocess.dequantize`), fitted by maximum likelihood on the train split
with no iterative training, so their bits/dim come from :func:`iresnet.models.bits_per_dim` exactly as the flow's:

- :class:`LogitGaussian`: a full-covariance Gaussian on ``y = logit(α + (1 - 2α)(x + 0.5))`` (the Real NVP
  pre-processing with a tiny α that only keeps the logit finite), with the transform's Jacobian so that it is a
  density on ``x`` (change of variables, as Eq. 3 of the paper for the flow):
  ``ln p(x) = ln N(y; μ, Σ) + Σ_d ln |dy_d / dx_d|``.
- :class:`PixelHistogram`: every pixel independent, a 256-bin histogram each (add-one smoothing); as a density on
  ``x`` it is constant ``256 P_d(k)`` on each bin, so its bits/dim are exactly ``-Σ_d log2 P_d(k_d) / D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Only keeps the logit finite at x + 0.5 = 0, far inside the first bin (width 1/256). Real NVP's 0.05 squeezes the
# dark background into a narrow logit range, which the Gaussian then fits badly (4.5 bits/dim on mnist-5k, vs 2.1).
LOGIT_ALPHA = 1e-6
N_BINS = 256


def logit_transform(x: Tensor, alpha: float = LOGIT_ALPHA) -> tuple[Tensor, Tensor]:
    """``x`` ``(N, *shape)`` in ``[-0.5, 0.5)`` -> ``y = logit(q)``, ``q = α + (1 - 2α)(x + 0.5)``, flattened to
    ``(N, D)``, and ``ln |det dy/dx|`` ``(N,)`` = ``Σ_d ln((1 - 2α) / (q_d (1 - q_d)))`` (the map is elementwise)."""
    q = alpha + (1.0 - 2.0 * alpha) * (x.flatten(1).double() + 0.5)
    y = torch.log(q) - torch.log1p(-q)
    log_jacobian = (math.log1p(-2.0 * alpha) - torch.log(q) - torch.log1p(-q)).sum(dim=1)
    return y, log_jacobian


@dataclass(frozen=True)
class LogitGaussian:
    """``N(μ, Σ)`` on logit-space pixels; ``mean`` ``(D,)``, ``cholesky`` ``(D, D)`` lower factor of ``Σ``."""

    mean: Tensor
    cholesky: Tensor
    alpha: float = LOGIT_ALPHA

    @classmethod
    def fit(cls, x: Tensor, alpha: float = LOGIT_ALPHA) -> LogitGaussian:
        """Maximum likelihood on dequantised train pixels ``x`` ``(N, *shape)``: sample mean and the population
        covariance ``(y - μ)ᵀ(y - μ) / N`` (float64; needs ``N > D`` for a full-rank ``Σ``)."""
        y, _ = logit_transform(x, alpha)
        if len(y) <= y.shape[1]:
            raise ValueError(f"a full covariance needs more examples than dimensions, got {len(y)} <= {y.shape[1]}")
        mean = y.mean(dim=0)
        centred = y - mean
        cov = centred.T @ centred / len(y)
        return cls(mean, torch.linalg.cholesky(cov), alpha)

    def log_prob(self, x: Tensor) -> Tensor:
        """``ln p(x)`` ``(N,)`` in nats, a density on the dequantised pixel space.

        ``ln N(y) = -|L⁻¹(y - μ)|² / 2 - Σ ln L_dd - D ln(2π) / 2`` with ``Σ = L Lᵀ``, plus the logit's Jacobian.
        """
        y, log_jacobian = logit_transform(x, self.alpha)
        z = torch.linalg.solve_triangular(self.cholesky, (y - self.mean).T, upper=False)  # (D, N)
        d = y.shape[1]
        log_normal = -0.5 * z.pow(2).sum(0) - self.cholesky.diagonal().log().sum() - 0.5 * d * math.log(2 * math.pi)
        return log_normal + log_jacobian


def pixel_bins(x: Tensor) -> Tensor:
    """The bin ``k`` ``(N, D)`` (int64, 0..255) of each dequantised pixel ``x = (k + u) / 256 - 0.5``."""
    return torch.floor((x.flatten(1).double() + 0.5) * N_BINS).long().clamp(0, N_BINS - 1)


@dataclass(frozen=True)
class PixelHistogram:
    """Independent per-pixel histograms: ``log_p`` ``(D, 256)``, ``ln P_d(k)``."""

    log_p: Tensor

    @classmethod
    def fit(cls, x: Tensor, smoothing: float = 1.0) -> PixelHistogram:
        """``P_d(k) = (count_d(k) + s) / (N + 256 s)`` from dequantised train pixels ``x`` ``(N, *shape)``; the
        smoothing ``s`` (add-one by default) gives bins no train image hit a finite cost."""
        bins = pixel_bins(x)
        n, d = bins.shape
        counts = torch.zeros(d, N_BINS, dtype=torch.float64)
        counts.scatter_add_(1, bins.T, torch.ones(d, n, dtype=torch.float64))
        return cls(torch.log(counts + smoothing) - math.log(n + N_BINS * smoothing))

    def log_prob(self, x: Tensor) -> Tensor:
        """``ln p(x)`` ``(N,)``: ``Σ_d [ln P_d(k_d) + ln 256]``, the density ``256 P_d(k)`` on each 1/256 bin."""
        bins = pixel_bins(x)
        per_pixel = self.log_p.gather(1, bins.T)  # (D, N)
        return per_pixel.sum(0) + bins.shape[1] * math.log(N_BINS)
