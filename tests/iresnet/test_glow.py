"""Glow as a classifier (Table 3): what the layer contract tests (tests/iresnet/test_contract.py) do not already
check — the LU parametrisation, the bounded affine scale, the classifier's layout, head and exact reconstruction
(float64)."""

from __future__ import annotations

import pytest
import torch

from iresnet.glow import (
    AdditiveCoupling,
    AffineCoupling,
    GlowClassifier,
    GlowConfig,
    InvertibleConv1x1,
    ReversePermutation,
    glow_step,
)
from iresnet.layers import ActNorm, Squeeze
from iresnet.models import IResNetClassifier, ResNetConfig
from tests.helpers import DTYPE


def test_conv1x1_is_p_l_u_with_the_closed_form_logdet_and_c_squared_parameters() -> None:
    layer = InvertibleConv1x1(5).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn_like(p))
    permutation, lower, upper = layer.factors()
    assert torch.equal(lower, lower.tril()) and torch.equal(torch.diagonal(lower), torch.ones(5, dtype=DTYPE))
    assert torch.equal(upper, upper.triu())
    weight = layer.weight()
    torch.testing.assert_close(weight, permutation @ lower @ upper)
    x = torch.randn(2, 5, 3, 4, dtype=DTYPE)
    y, logdet = layer(x)
    torch.testing.assert_close(y, torch.einsum("oc,bchw->bohw", weight, x))  # W x at every pixel
    expected = 3 * 4 * torch.linalg.slogdet(weight)[1]
    torch.testing.assert_close(logdet, expected.expand(2))
    assert sum(p.numel() for p in layer.parameters()) == 25  # as a plain 5x5 weight


def test_conv1x1_starts_as_a_rotation_and_stays_invertible_for_extreme_parameters() -> None:
    layer = InvertibleConv1x1(4).double()
    weight = layer.weight()
    torch.testing.assert_close(weight @ weight.T, torch.eye(4, dtype=DTYPE), atol=1e-6, rtol=0)  # a rotation (float32)
    with torch.no_grad():
        layer.log_scale.copy_(torch.tensor([-8.0, 8.0, 0.0, 3.0]))  # no choice of parameters makes W singular
        layer.lower.mul_(50.0)
    x = torch.randn(3, 4, 2, 2, dtype=DTYPE)
    torch.testing.assert_close(layer.inverse(layer(x)[0]), x, atol=1e-7, rtol=1e-7)


def test_affine_scale_is_bounded_and_its_logdet_finite_for_any_network_output() -> None:
    coupling = AffineCoupling(4, 8).double()
    with torch.no_grad():
        coupling.net[-1].bias.copy_(torch.tensor([0.0, 0.0, -1e3, 1e3], dtype=DTYPE))  # shift, then raw log-scale
    x = torch.randn(2, 4, 3, 3, dtype=DTYPE)
    y, logdet = coupling(x)
    assert torch.equal(y[:, :2], x[:, :2])  # the first half passes through
    assert torch.all(y[:, 2:].abs() <= x[:, 2:].abs())  # 0 < sigmoid(s + 2) < 1: never scaled up
    torch.testing.assert_close(logdet, torch.full((2,), 9 * (-1e3 + 2.0), dtype=DTYPE))  # ln σ(z) ~ z for z << 0


def test_couplings_start_near_the_identity() -> None:
    x = torch.randn(2, 4, 3, 3)
    y, logdet = AdditiveCoupling(4, 8)(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(2))
    y, _ = AffineCoupling(4, 8)(x)
    torch.testing.assert_close(y[:, 2:], x[:, 2:] * torch.sigmoid(torch.tensor(2.0)))  # Glow's scale offset


def test_a_step_is_actnorm_mixing_coupling() -> None:
    affine = glow_step(4, 8)
    assert [type(m) for m in affine.layers] == [ActNorm, InvertibleConv1x1, AffineCoupling]
    additive = glow_step(4, 8, "additive", "reverse")
    assert [type(m) for m in additive.layers] == [ActNorm, ReversePermutation, AdditiveCoupling]
    with pytest.raises(ValueError, match="coupling must be one of"):
        glow_step(4, 8, "spline")
    with pytest.raises(ValueError, match="at least 2"):
        AffineCoupling(1, 8)


def test_classifier_layout_head_and_exact_reconstruction() -> None:
    config = GlowConfig(in_shape=(1, 8, 8), n_steps=(2, 1), strides=(1, 2), channels=(6, 8), init_ds=2)
    model = GlowClassifier(config, n_classes=3).double()
    squeezes = [m for m in model.body.layers if isinstance(m, Squeeze)]
    assert len(squeezes) == 2 and model.feature_shape == (16, 2, 2)  # 1x8x8 -> 4x4x4 -> 16x2x2: nothing factored out
    assert len(model.body) == 2 + 3  # two squeezes, three steps
    resnet = IResNetClassifier(ResNetConfig(in_shape=(1, 8, 8), n_blocks=(1,), strides=(1,), channels=(4,), inj_pad=3))
    assert [type(m) for m in model.head] == [type(m) for m in resnet.head]  # the i-ResNet's head
    x = torch.randn(5, 1, 8, 8, dtype=DTYPE)
    model.train()
    model(x)  # ActNorm's data-dependent initialisation
    model.eval()
    assert model(x).shape == (5, 3)
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(model.features(x)), x, atol=1e-10, rtol=0)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="equal length"):
        GlowConfig(in_shape=(1, 8, 8), n_steps=(1, 1), strides=(1,), channels=(4, 4))
    with pytest.raises(ValueError, match="coupling must be one of"):
        GlowConfig(in_shape=(1, 8, 8), coupling="spline")
    with pytest.raises(ValueError, match="needs at least 2"):  # one channel at 8x8: no coupling can split it
        GlowClassifier(GlowConfig(in_shape=(1, 8, 8), n_steps=(1,), strides=(1,), channels=(4,), init_ds=1))
    GlowClassifier(GlowConfig(in_shape=(1, 8, 8), n_steps=(1,), strides=(1,), channels=(4,), init_ds=1, inj_pad=1))
