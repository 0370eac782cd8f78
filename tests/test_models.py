"""Classifier, multiscale flow and toy flows against brute force (float64, tiny shapes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from iresnet.blocks import residual_blocks, set_inverse_settings, set_logdet_settings
from iresnet.inverse import InverseSettings
from iresnet.logdet import LogDetSettings
from iresnet.models import FlowConfig, IResNetClassifier, MultiscaleFlow, ResNetConfig, bits_per_dim
from iresnet.priors import standard_normal_logprob
from iresnet.toy import toy_glow, toy_iresnet

TINY = dict(n_blocks=(1, 1, 1), strides=(1, 2, 2), channels=(4, 4, 4))


def converge_power_iterations(model: torch.nn.Module, x: Tensor, steps: int = 40) -> None:
    """Initialise ActNorm and converge the power iterations, skipping the log-det (not needed for that)."""
    blocks = residual_blocks(model)
    saved = [block.logdet_settings for block in blocks]
    set_logdet_settings(model, LogDetSettings(estimator="none"))
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    model.eval()
    for block, settings in zip(blocks, saved):
        block.logdet_settings = settings


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


def tiny_flow() -> MultiscaleFlow:
    config = FlowConfig(
        in_shape=(1, 4, 4),
        n_blocks=(1, 1),
        strides=(1, 2),
        channels=(4, 4),
        logdet=LogDetSettings(estimator="exact"),
    )
    flow = MultiscaleFlow(config).double()
    with torch.no_grad():  # a non-trivial learned prior
        for prior in flow.priors:
            prior.mean.normal_(0, 0.3)
            prior.log_std.normal_(0, 0.3)
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
