"""The closed-form density baselines of Table 4 against exact values: the Gaussian's maximum-likelihood closed form
and an independent implementation, the histogram against a direct count."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from iresnet.models import bits_per_dim
from pipeline.data.preprocess import dequantize
from pipeline.models.baselines import LogitGaussian, PixelHistogram, logit_transform

F64 = torch.float64


def _dequantised(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, *shape), generator=generator).to(F64) / 255.0
    return dequantize(pixels, generator)


def _log_jacobian(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``ln |det dy/dx|`` per example by autograd (the logit map is elementwise: the Jacobian is diagonal)."""
    flat = x.flatten(1).clone().requires_grad_(True)
    y, _ = logit_transform(flat, alpha)
    (grad,) = torch.autograd.grad(y.sum(), flat)
    return grad.abs().log().sum(dim=1)


def test_logit_gaussian_on_its_own_train_set_meets_the_maximum_likelihood_closed_form() -> None:
    """At the MLE, the mean Gaussian NLL over the fitting data is ``D/2 (1 + ln 2π) + ½ ln det Σ̂`` exactly."""
    alpha = 1e-6
    x = _dequantised(40, (1, 2, 3), seed=0)
    model = LogitGaussian.fit(x, alpha)
    y, _ = logit_transform(x, alpha)
    d = y.shape[1]
    cov = torch.cov(y.T, correction=0)
    mean_nll = 0.5 * d * (1 + math.log(2 * math.pi)) + 0.5 * float(torch.logdet(cov))
    mean_log_p = -mean_nll + float(_log_jacobian(x, alpha).mean())
    expected = (-mean_log_p + d * math.log(256)) / (d * math.log(2))
    assert float(bits_per_dim(model.log_prob(x), d).mean()) == pytest.approx(expected, rel=1e-12)


def test_logit_gaussian_on_new_points_matches_torch_multivariate_normal() -> None:
    alpha = 0.05
    train, test = _dequantised(30, (2, 2), seed=1), _dequantised(7, (2, 2), seed=2)
    y_train, _ = logit_transform(train, alpha)
    y_test, _ = logit_transform(test, alpha)
    reference = MultivariateNormal(y_train.mean(0), covariance_matrix=torch.cov(y_train.T, correction=0))
    expected = reference.log_prob(y_test) + _log_jacobian(test, alpha)
    torch.testing.assert_close(LogitGaussian.fit(train, alpha).log_prob(test), expected, rtol=1e-12, atol=1e-10)


def test_logit_gaussian_needs_more_examples_than_dimensions() -> None:
    with pytest.raises(ValueError, match="more examples than dimensions"):
        LogitGaussian.fit(_dequantised(4, (1, 2, 2), seed=0))


def test_histogram_bits_per_dim_equal_a_direct_count() -> None:
    """bits/dim = -Σ_d log2 P_d(k_d) / D with P_d(k) = (count + 1) / (N + 256), counted pixel by pixel."""
    train, test = _dequantised(25, (1, 2, 2), seed=3), _dequantised(5, (1, 2, 2), seed=4)
    train_bins = torch.floor((train.flatten(1) + 0.5) * 256).long().tolist()
    test_bins = torch.floor((test.flatten(1) + 0.5) * 256).long().tolist()
    test_bins[0][0] = 255 if train_bins[0][0] != 255 else 254  # a bin no train pixel hit (only smoothing)
    test = (torch.tensor(test_bins, dtype=F64).view_as(test) + 0.5) / 256 - 0.5
    d, n = 4, len(train_bins)
    expected = []
    for image in test_bins:
        bits = 0.0
        for pixel, k in enumerate(image):
            count = sum(1 for row in train_bins if row[pixel] == k)
            bits -= math.log2((count + 1) / (n + 256))
        expected.append(bits / d)
    got = bits_per_dim(PixelHistogram.fit(train).log_prob(test), d)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
