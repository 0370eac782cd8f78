"""Sampling of the priors (iresnet/priors.py): temperature scales the standard deviation, checked against the
definition with shared random draws (float64, exact to rounding) and by sample moments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from iresnet.priors import ConditionalGaussian, DiagonalGaussian, standard_normal_logprob

F64 = torch.float64
TEMPERATURES = [0.0, 0.3, 0.7, 1.0, 2.0]


def diagonal(seed: int = 0) -> DiagonalGaussian:
    """A learned diagonal Gaussian moved off the standard normal (its init), so that mean and std both matter."""
    prior = DiagonalGaussian((2, 3, 3), learned=True).to(F64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        prior.mean.copy_(torch.randn(prior.shape, generator=gen, dtype=F64))
        prior.log_std.copy_(0.5 * torch.randn(prior.shape, generator=gen, dtype=F64))
    return prior


def conditional(seed: int = 0) -> tuple[ConditionalGaussian, Tensor]:
    """A conditional Gaussian with random (non-zero) convolution, and a batch of kept halves ``h``."""
    prior = ConditionalGaussian((2, 3, 3), cond_channels=2).to(F64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        prior.conv.weight.copy_(0.3 * torch.randn(prior.conv.weight.shape, generator=gen, dtype=F64))
        prior.conv.bias.copy_(0.3 * torch.randn(prior.conv.bias.shape, generator=gen, dtype=F64))
    h = torch.randn(4, 2, 3, 3, generator=gen, dtype=F64)
    return prior, h


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_diagonal_sample_is_mean_plus_temperature_times_std_times_the_draw(temperature: float) -> None:
    prior = diagonal()
    with torch.no_grad():
        got = prior.sample(5, temperature, torch.Generator().manual_seed(3))
        eps = torch.randn((5, *prior.shape), generator=torch.Generator().manual_seed(3), dtype=F64)
        assert torch.equal(got, prior.mean + temperature * torch.exp(prior.log_std) * eps)  # the definition, bitwise
        # ... and relative to the T = 1 draw from the same generator: the deviation from the mean scales by T
        at_one = prior.sample(5, 1.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got - prior.mean, temperature * (at_one - prior.mean), rtol=1e-13, atol=1e-13)
    if temperature == 0.0:
        assert torch.equal(got, prior.mean.expand_as(got))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_conditional_sample_is_mean_plus_temperature_times_std_times_the_draw(temperature: float) -> None:
    prior, h = conditional()
    with torch.no_grad():
        mean, log_std = prior.params(h)
        assert float(mean.abs().max()) > 0.1 and float(log_std.abs().max()) > 0.1  # not the standard normal
        got = prior.sample(h, temperature, torch.Generator().manual_seed(3))
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
        assert torch.equal(got, mean + temperature * torch.exp(log_std) * eps)
        at_one = prior.sample(h, 1.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got - mean, temperature * (at_one - mean), rtol=1e-13, atol=1e-13)


# Moments over n = 40,000 draws per coordinate: the sample std's relative standard error is 1/sqrt(2n) = 0.35%,
# the sample mean's is std/sqrt(n) = 0.5% of T std. A 2.5% tolerance on the std (7 standard errors) and 0.04 T std
# on the mean (8 standard errors) never fails by chance here yet separates every temperature checked (>= 30% apart).
# Measured with these seeds (max over the 18 coordinates): std off by 0.70%, mean by 0.012 T std.
N_MOMENT = 40_000


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
def test_diagonal_sample_moments_scale_with_temperature(temperature: float) -> None:
    prior = diagonal()
    with torch.no_grad():
        samples = prior.sample(N_MOMENT, temperature, torch.Generator().manual_seed(11))
        std = temperature * torch.exp(prior.log_std)
        torch.testing.assert_close(samples.std(dim=0) / std, torch.ones_like(std), rtol=0, atol=0.025)
        assert float(((samples.mean(dim=0) - prior.mean) / std).abs().max()) < 0.04


@pytest.mark.parametrize("temperature", [0.3, 2.0])
def test_conditional_sample_moments_scale_with_temperature(temperature: float) -> None:
    prior, h = conditional()
    with torch.no_grad():
        h_many = h[:1].expand(N_MOMENT, -1, -1, -1)  # one kept half, many draws given it
        samples = prior.sample(h_many, temperature, torch.Generator().manual_seed(11))
        mean, log_std = prior.params(h[:1])
        std = temperature * torch.exp(log_std[0])
        torch.testing.assert_close(samples.std(dim=0) / std, torch.ones_like(std), rtol=0, atol=0.025)
        assert float(((samples.mean(dim=0) - mean[0]) / std).abs().max()) < 0.04


def test_log_prob_of_the_diagonal_prior_is_the_gaussian_density() -> None:
    prior = diagonal()
    z = torch.randn(3, *prior.shape, dtype=F64)
    with torch.no_grad():
        std = torch.exp(prior.log_std)
        expected = (-0.5 * ((z - prior.mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1)
        torch.testing.assert_close(prior.log_prob(z), expected.sum(1), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            DiagonalGaussian(prior.shape, learned=False).to(F64).log_prob(z), standard_normal_logprob(z)
        )
