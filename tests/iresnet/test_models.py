"""Classifier, multiscale flow and toy flows against brute force (float64, tiny shapes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from iresnet.blocks import residual_blocks, set_inverse_settings
from iresnet.inverse import InverseSettings
from iresnet.layers import Logit
from iresnet.logdet import LogDetSettings
from iresnet.models import FlowConfig, IResNetClassifier, MultiscaleFlow, ResNetConfig, bits_per_dim
from iresnet.priors import ConditionalGaussian, DiagonalGaussian, standard_normal_logprob
from iresnet.toy import toy_glow, toy_iresnet

TINY = dict(n_blocks=(1, 1, 1), strides=(1, 2, 2), channels=(4, 4, 4))


def converge_power_iterations(model: torch.nn.Module, x: Tensor, steps: int = 40) -> None:
    """Initialise ActNorm and converge the power iterations, skipping the log-det (not needed for that; a
    classifier's blocks compute none anyway)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x, LogDetSettings(estimator="none")) if isinstance(model, MultiscaleFlow) else model(x)
    model.eval()


def test_classifier_shapes_and_reconstruction() -> None:
    model = IResNetClassifier(ResNetConfig(in_shape=(1, 8, 8), inj_pad=3, **TINY), n_classes=10).double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    converge_power_iterations(model, x)
    assert model(x).shape == (5, 10)
    assert model.feature_shape == (64, 2, 2)  # 1+3 channels, squeezed twice
    set_inverse_settings(model, InverseSettings(max_iter=200, atol=1e-12))
    with torch.no_grad():
        x_back = model.reconstruct(model.features(x))
    assert (x_back - x).abs().max() <= 1e-6
    assert all(block.last_inverse_info.converged for block in residual_blocks(model))


def test_classifier_init_ds_squeezes_first() -> None:
    model = IResNetClassifier(ResNetConfig(in_shape=(3, 8, 8), init_ds=2, n_blocks=(1,), strides=(1,), channels=(4,)))
    assert model.feature_shape == (12, 4, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_blocks=(1, 1), strides=(1,), channels=(4,)), "equal length"),
        (dict(strides=(1, 3, 2)), "strides"),
        (dict(coeff=1.0), "coeff"),
        (dict(init_ds=3), "init_ds"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ResNetConfig(in_shape=(1, 8, 8), **kwargs)


def test_indivisible_spatial_size_is_named() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        IResNetClassifier(ResNetConfig(in_shape=(1, 6, 6), **TINY))


def tiny_flow(**options) -> MultiscaleFlow:
    """A two-scale float64 flow on 1x4x4 with the exact log-det and FlowConfig ``options``; every prior parameter is
    drawn at random (non-trivial learned priors, also the zero-initialised conditional convolutions)."""
    config = FlowConfig(
        in_shape=(1, 4, 4),
        n_blocks=(1, 1),
        strides=(1, 2),
        channels=(4, 4),
        logdet=LogDetSettings(estimator="exact"),
        **options,
    )
    flow = MultiscaleFlow(config).double()
    with torch.no_grad():
        for prior in flow.priors:
            for param in prior.parameters():
                param.normal_(0, 0.3)
    return flow


def test_flow_log_prob_equals_brute_force() -> None:
    flow = tiny_flow()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) - 0.5
    converge_power_iterations(flow, x)
    assert flow.block_dims == [16, 8]

    def latent(v: Tensor) -> Tensor:
        return torch.cat([z.flatten() for z in flow.encode(v.unsqueeze(0))[0]])

    expected = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(latent, xi).reshape(16, 16)
        zs, _ = flow.encode(xi.unsqueeze(0))
        prior = sum(p.log_prob(z) for p, z in zip(flow.priors, zs))
        expected.append(prior.squeeze(0) + torch.linalg.slogdet(jac)[1])
    torch.testing.assert_close(flow.log_prob(x).detach(), torch.stack(expected).detach(), atol=1e-8, rtol=0)


def test_flow_decode_inverts_encode_and_samples() -> None:
    flow = tiny_flow()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) - 0.5
    converge_power_iterations(flow, x)
    set_inverse_settings(flow, InverseSettings(max_iter=300, atol=1e-12))
    with torch.no_grad():
        zs, _ = flow.encode(x)
        assert (flow.decode(zs) - x).abs().max() <= 1e-6
    assert flow.sample(4).shape == (4, 1, 4, 4)


def test_flow_rejects_unconstrained_or_padded() -> None:
    with pytest.raises(ValueError, match="coeff"):
        FlowConfig(in_shape=(1, 4, 4), coeff=None)
    with pytest.raises(ValueError, match="inj_pad"):
        FlowConfig(in_shape=(1, 4, 4), inj_pad=2)


def test_bits_per_dim_closed_form() -> None:
    """The uniform density on [-1/2, 1/2]^D has ln p = 0, so each of the 256 bins costs exactly 8 bits."""
    for n_dims in (784, 3072):
        assert bits_per_dim(torch.zeros(2, dtype=torch.float64), n_dims).tolist() == pytest.approx(
            [8.0, 8.0], abs=1e-12
        )
    # a Gaussian with std s: per-dimension entropy 0.5 ln(2πe s²) nats; its bits/dim follow in closed form
    s, n_dims = 0.1, 10
    log_prob = torch.tensor([-n_dims * 0.5 * math.log(2 * math.pi * math.e * s**2)], dtype=torch.float64)
    expected = (0.5 * math.log(2 * math.pi * math.e * s**2) + math.log(256)) / math.log(2)
    assert bits_per_dim(log_prob, n_dims).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("make", [lambda: toy_iresnet(n_blocks=2, hidden=8), lambda: toy_glow(n_layers=2, hidden=8)])
def test_toy_flow_log_prob_equals_brute_force(make) -> None:
    flow = make().double()
    x = torch.randn(4, 2, dtype=torch.float64)
    converge_power_iterations(flow, x)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: flow.transform(v.unsqueeze(0))[0].squeeze(0), xi)
        z = flow.transform(xi.unsqueeze(0))[0]
        expected.append(standard_normal_logprob(z).squeeze(0) + torch.linalg.slogdet(jac)[1])
    torch.testing.assert_close(flow.log_prob(x).detach(), torch.stack(expected).detach(), atol=1e-8, rtol=0)
    assert flow.sample(7).shape == (7, 2)


# ------------------------------------------------------------------ flow options: logit, conditional prior, one scale


def brute_force_log_prob(flow: MultiscaleFlow, x: Tensor, prior_log_prob) -> Tensor:
    """``prior_log_prob(zs) + ln|det J|`` per example, with ``J`` the autograd Jacobian of ``x -> cat(zs)``."""

    def latent(v: Tensor) -> Tensor:
        return torch.cat([z.flatten() for z in flow.encode(v.unsqueeze(0))[0]])

    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(latent, xi).reshape(xi.numel(), xi.numel())
        zs, _ = flow.encode(xi.unsqueeze(0))
        out.append(prior_log_prob(zs).squeeze(0) + torch.linalg.slogdet(jac)[1])
    return torch.stack(out).detach()


def normal_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """The Gaussian density written out: ``Σ -(z - m)² / (2 σ²) - ln σ - ln(2π) / 2``, ``(B, ...) -> (B,)``."""
    var = torch.exp(2 * log_std)
    return (-((z - mean) ** 2) / (2 * var) - log_std - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def inverts(flow: MultiscaleFlow, x: Tensor) -> None:
    set_inverse_settings(flow, InverseSettings(max_iter=300, atol=1e-12))
    with torch.no_grad():
        zs, _ = flow.encode(x)
        assert (flow.decode(zs) - x).abs().max() <= 1e-6


def test_flow_with_logit_counts_its_logdet_in_pixel_space() -> None:
    torch.manual_seed(0)
    flow = tiny_flow(logit_alpha=0.05)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64) - 0.5
    converge_power_iterations(flow, x)
    assert isinstance(flow.stages[0][0], Logit) and flow.block_dims == [16, 8]
    expected = brute_force_log_prob(flow, x, lambda zs: sum(p.log_prob(z) for p, z in zip(flow.priors, zs)))
    torch.testing.assert_close(flow.log_prob(x).detach(), expected, atol=1e-8, rtol=0)
    inverts(flow, x)
    samples = flow.sample(3, generator=torch.Generator().manual_seed(0))
    bound = 0.5 + 0.05 / 0.9  # the logit's inverse maps the real line onto (-bound, bound)
    assert samples.shape == (3, 1, 4, 4) and samples.abs().max() < bound


def test_conditional_prior_log_prob_equals_exact_densities_by_hand() -> None:
    torch.manual_seed(1)
    flow = tiny_flow(prior="conditional")
    assert isinstance(flow.priors[0], ConditionalGaussian) and isinstance(flow.priors[1], DiagonalGaussian)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64) - 0.5
    converge_power_iterations(flow, x)

    def by_hand(zs: list[Tensor]) -> Tensor:
        z0, top = zs
        h = top_input(zs)
        weight, bias = flow.priors[0].conv.weight, flow.priors[0].conv.bias
        params = torch.nn.functional.conv2d(h, weight, bias, padding=1)
        mean, log_std = params[:, :2], params[:, 2:]
        last = flow.priors[1]
        return normal_log_prob(z0, mean, log_std) + normal_log_prob(top, last.mean, last.log_std)

    def top_input(zs: list[Tensor]) -> Tensor:  # stage 0's kept half = the inverse of stage 1 at the last latent
        return flow.stages[1].inverse(zs[1])

    set_inverse_settings(flow, InverseSettings(max_iter=300, atol=1e-13))
    expected = brute_force_log_prob(flow, x, by_hand)
    torch.testing.assert_close(flow.log_prob(x).detach(), expected, atol=1e-7, rtol=0)


def test_conditional_prior_starts_standard_normal_and_samples_round_trip() -> None:
    torch.manual_seed(2)
    fresh = MultiscaleFlow(
        FlowConfig(
            in_shape=(1, 4, 4),
            n_blocks=(1, 1),
            strides=(1, 2),
            channels=(4, 4),
            prior="conditional",
            learned_prior=False,
        )
    )
    h = torch.randn(3, 2, 2, 2)
    z = torch.randn(3, 2, 2, 2)
    torch.testing.assert_close(fresh.priors[0].log_prob(z, h), standard_normal_logprob(z))

    flow = tiny_flow(prior="conditional")
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64) - 0.5
    converge_power_iterations(flow, x)
    inverts(flow, x)
    samples = flow.sample(3, temperature=0.7, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        zs, _ = flow.encode(samples)
        gen = torch.Generator().manual_seed(5)  # the same draws in the same order: last scale first
        top = flow.priors[1].sample(3, 0.7, gen)
        kept = flow.stages[1].inverse(top)
        z0 = flow.priors[0].sample(kept, 0.7, gen)
    assert (zs[1] - top).abs().max() < 1e-6 and (zs[0] - z0).abs().max() < 1e-6


def test_single_scale_flow_has_one_prior_over_everything() -> None:
    torch.manual_seed(3)
    flow = tiny_flow(factor_out=False)
    assert len(flow.priors) == 1 and flow.priors[0].shape == (16, 1, 1) and flow.block_dims == [16, 16]
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64) - 0.5
    converge_power_iterations(flow, x)
    zs, _ = flow.encode(x)
    assert len(zs) == 1 and zs[0].shape == (2, 16, 1, 1)
    expected = brute_force_log_prob(flow, x, lambda zs: flow.priors[0].log_prob(zs[0]))
    torch.testing.assert_close(flow.log_prob(x).detach(), expected, atol=1e-8, rtol=0)
    inverts(flow, x)
    assert flow.sample(2).shape == (2, 1, 4, 4)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(prior="learned"), "prior must be one of"),
        (dict(prior="conditional", factor_out=False), "conditional"),
        (dict(prior="conditional", n_blocks=(1,), strides=(1,), channels=(4,)), "conditional"),
        (dict(logit_alpha=0.5), "logit_alpha"),
        (dict(logit_alpha=0.0), "logit_alpha"),
    ],
)
def test_flow_options_are_checked(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlowConfig(in_shape=(1, 4, 4), **options)


def test_three_scale_flow_with_logit_and_conditional_priors_equals_brute_force() -> None:
    """The default profile's layout on a small input: logit first, then 1x8x8 -> 4x4x4 -> (factor out 2) squeeze
    8x2x2 -> (factor out 4) a third scale of 4x2x2 without a squeeze; two conditional priors. ``ln p(x)`` equals the
    prior terms plus the autograd Jacobian's log-determinant of ``x -> cat(zs)`` (64 x 64), in float64."""
    torch.manual_seed(4)
    config = FlowConfig(
        in_shape=(1, 8, 8),
        n_blocks=(1, 1, 1),
        strides=(1, 2, 1),
        channels=(4, 4, 4),
        logdet=LogDetSettings(estimator="exact"),
        logit_alpha=0.05,
        prior="conditional",
    )
    flow = MultiscaleFlow(config).double()
    with torch.no_grad():
        for prior in flow.priors:
            for param in prior.parameters():
                param.normal_(0, 0.3)
    assert [tuple(p.shape) for p in flow.priors] == [(2, 4, 4), (4, 2, 2), (4, 2, 2)]
    assert [type(p) for p in flow.priors] == [ConditionalGaussian, ConditionalGaussian, DiagonalGaussian]
    assert flow.block_dims == [64, 32, 16]
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) - 0.5
    converge_power_iterations(flow, x)

    def priors(zs: list[Tensor]) -> Tensor:
        # the kept halves given the latents: scale 1's is scale 2's inverse; scale 0's is scale 1's inverse of both
        kept1 = flow.stages[2].inverse(zs[2])
        kept0 = flow.stages[1].inverse(torch.cat([zs[1], kept1], dim=1))
        return (
            flow.priors[0].log_prob(zs[0], kept0)
            + flow.priors[1].log_prob(zs[1], kept1)
            + flow.priors[2].log_prob(zs[2])
        )

    set_inverse_settings(flow, InverseSettings(max_iter=300, atol=1e-13))
    expected = brute_force_log_prob(flow, x, priors)
    torch.testing.assert_close(flow.log_prob(x).detach(), expected, atol=1e-7, rtol=0)
    inverts(flow, x)
    samples = flow.sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, 8, 8) and samples.abs().max() <= 0.5 + 0.05 / 0.9  # sigmoid may round to 0 or 1
