"""ActNorm, Squeeze, InjectivePad and the 1-Lipschitz nonlinearities, against brute force (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iresnet.base import Invertible
from iresnet.layers import (
    NONLINEARITIES,
    ActNorm,
    InjectivePad,
    LipSwish,
    Logit,
    MaxMin,
    Squeeze,
    make_nonlinearity,
)

F64 = torch.float64


def jacobian_logdets(layer: Invertible, x: Tensor) -> Tensor:
    """``ln|det dy_i/dx_i|`` per example from the autograd Jacobian of the single-example map."""
    values = []
    for example in x:
        fn = lambda z: layer(z.unsqueeze(0))[0].flatten()  # noqa: E731
        jac = torch.autograd.functional.jacobian(fn, example).reshape(example.numel(), example.numel())
        values.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(values)


def initialised_actnorm(shape: tuple[int, ...]) -> tuple[ActNorm, Tensor]:
    layer = ActNorm(shape[1]).to(F64)
    data = 3.0 * torch.randn(shape, dtype=F64) + torch.arange(shape[1], dtype=F64).view(1, -1, *[1] * (len(shape) - 2))
    layer(data)  # data-dependent initialisation (training mode)
    return layer, data


# ------------------------------------------------------------------ ActNorm


@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 5, 4)])
def test_actnorm_data_dependent_init(shape: tuple[int, ...]) -> None:
    layer = ActNorm(shape[1]).to(F64)
    assert not bool(layer.initialized)
    x = 2.0 * torch.randn(shape, dtype=F64) + 5.0
    y, _ = layer(x)
    assert bool(layer.initialized)
    dims = [d for d in range(len(shape)) if d != 1]
    assert torch.allclose(y.mean(dim=dims), torch.zeros(shape[1], dtype=F64), atol=1e-12)
    assert torch.allclose(y.std(dim=dims, unbiased=False), torch.ones(shape[1], dtype=F64), rtol=1e-12)
    # the second batch does not re-initialise
    params = [p.detach().clone() for p in layer.parameters()]
    layer(torch.randn(shape, dtype=F64))
    assert all(torch.equal(p, q) for p, q in zip(params, layer.parameters()))


def test_actnorm_eval_does_not_initialise() -> None:
    layer = ActNorm(3).to(F64).eval()
    x = torch.randn(4, 3, dtype=F64) + 2.0
    y, logdet = layer(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(4, dtype=F64))
    assert not bool(layer.initialized)


@pytest.mark.parametrize("shape", [(3, 2), (2, 3, 2, 2)])
def test_actnorm_inverse_and_logdet(shape: tuple[int, ...]) -> None:
    layer, _ = initialised_actnorm(shape)
    x = torch.randn(shape, dtype=F64)
    y, logdet = layer(x)
    assert y.shape == x.shape and logdet.shape == (shape[0],)
    assert float((layer.inverse(y) - x).detach().abs().max()) <= 1e-12
    assert float((logdet - jacobian_logdets(layer, x)).detach().abs().max()) <= 1e-8
    pixels = 1 if len(shape) == 2 else shape[2] * shape[3]
    assert torch.allclose(logdet, pixels * layer.log_scale.sum().expand(shape[0]), rtol=1e-15)


def test_actnorm_gradients_reach_every_parameter() -> None:
    layer, _ = initialised_actnorm((2, 3, 2, 2))
    x = torch.randn(2, 3, 2, 2, dtype=F64)
    y, logdet = layer(x)
    (y.square().sum() + logdet.sum()).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and float(param.grad.abs().max()) > 0, name


def test_actnorm_state_dict_round_trip_keeps_initialisation() -> None:
    saved, _ = initialised_actnorm((8, 3, 2, 2))
    assert "initialized" in saved.state_dict()
    loaded = ActNorm(3).to(F64)
    loaded.load_state_dict(saved.state_dict())
    assert bool(loaded.initialized)
    new_batch = torch.randn(4, 3, 2, 2, dtype=F64) * 7.0  # would re-initialise a fresh layer in training mode
    y_saved, ld_saved = saved(new_batch)
    y_loaded, ld_loaded = loaded(new_batch)
    assert torch.equal(y_saved, y_loaded) and torch.equal(ld_saved, ld_loaded)


def test_actnorm_bad_shape_raises() -> None:
    with pytest.raises(ValueError, match="ActNorm"):
        ActNorm(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="num_features"):
        ActNorm(0)


# ------------------------------------------------------------------ Squeeze and InjectivePad


@pytest.mark.parametrize("factor", [2, 3])
def test_squeeze_layout_inverse_and_logdet(factor: int) -> None:
    layer = Squeeze(factor)
    b, c, h, w = 2, 2, 2 * factor, factor
    x = torch.randn(b, c, h, w, dtype=F64)
    y, logdet = layer(x)
    assert y.shape == (b, c * factor * factor, h // factor, w // factor)
    for ci in range(c):
        for i in range(factor):
            for j in range(factor):
                assert torch.equal(y[:, ci * factor * factor + i * factor + j], x[:, ci, i::factor, j::factor])
    assert torch.equal(layer.inverse(y), x)
    assert torch.equal(logdet, torch.zeros(b, dtype=F64))
    assert float(jacobian_logdets(layer, x).abs().max()) <= 1e-12  # a permutation: |det| = 1


def test_squeeze_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        Squeeze(2)(torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="divisible"):
        Squeeze(2).inverse(torch.randn(1, 6, 2, 2))
    with pytest.raises(ValueError, match="factor"):
        Squeeze(0)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (3, 2)])
def test_injective_pad(shape: tuple[int, ...]) -> None:
    layer = InjectivePad(13)
    x = torch.randn(shape, dtype=F64)
    y, logdet = layer(x)
    assert y.shape == (shape[0], shape[1] + 13, *shape[2:])
    assert torch.equal(y[:, : shape[1]], x)
    assert torch.equal(y[:, shape[1] :], torch.zeros_like(y[:, shape[1] :]))
    assert torch.equal(layer.inverse(y), x)
    assert torch.equal(logdet, torch.zeros(shape[0], dtype=F64))
    # the Jacobian is an isometric embedding: sqrt(det(J^T J)) = 1, i.e. a zero volume term
    fn = lambda z: layer(z.unsqueeze(0))[0].flatten()  # noqa: E731
    jac = torch.autograd.functional.jacobian(fn, x[0]).reshape(-1, x[0].numel())
    assert float(torch.linalg.slogdet(jac.t() @ jac).logabsdet.abs()) <= 1e-12
    assert torch.equal(InjectivePad(0)(x)[0], x) and torch.equal(InjectivePad(0).inverse(x), x)
    with pytest.raises(ValueError, match="pad_channels"):
        InjectivePad(-1)


# ------------------------------------------------------------------ nonlinearities


def test_registry() -> None:
    assert set(NONLINEARITIES) == {"elu", "softplus", "relu", "sorting", "lipswish"}
    for name in NONLINEARITIES:
        assert isinstance(make_nonlinearity(name), nn.Module)
    assert make_nonlinearity("lipswish") is not make_nonlinearity("lipswish")  # fresh parameters each time
    with pytest.raises(ValueError, match="elu, softplus, relu, sorting, lipswish"):
        make_nonlinearity("tanh")


def lipswish_variants() -> list[nn.Module]:
    variants = []
    for raw in (-2.0, 0.5, 6.0):  # beta = softplus(raw) from 0.13 to 6.0; the peak slope sits at beta x = 2.4
        f = LipSwish().to(F64)
        with torch.no_grad():
            f.raw_beta.fill_(raw)
        variants.append(f)
    return variants


@pytest.mark.parametrize("name", ["elu", "softplus", "relu", "lipswish"])
def test_elementwise_nonlinearities_have_derivative_at_most_one(name: str) -> None:
    fns = lipswish_variants() if name == "lipswish" else [make_nonlinearity(name).to(F64)]
    x = torch.linspace(-30.0, 30.0, 60001, dtype=F64, requires_grad=True)
    for f in fns:
        (grad,) = torch.autograd.grad(f(x).sum(), x)
        assert float(grad.abs().max()) <= 1.0
        assert float(grad.abs().max()) >= 0.9  # a meaningful check: the slope does get close to 1
        a, b = torch.randn(2, 1000, dtype=F64) * 5.0
        with torch.no_grad():
            assert float(((f(a) - f(b)).abs() / (a - b).abs()).max()) <= 1.0


def test_lipswish_formula_and_gradient() -> None:
    f = LipSwish().to(F64)
    x = torch.randn(5, 4, dtype=F64)
    beta = F.softplus(torch.tensor(0.5, dtype=F64))
    assert torch.allclose(f(x), x * torch.sigmoid(beta * x) / 1.1, rtol=1e-15)
    f(x).square().sum().backward()
    assert f.raw_beta.grad is not None and float(f.raw_beta.grad.abs()) > 0


def test_sorting_is_max_min_and_one_lipschitz() -> None:
    f = make_nonlinearity("sorting")
    assert isinstance(f, MaxMin)
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    y = f(x)
    assert torch.equal(y[:, :2], torch.maximum(x[:, :2], x[:, 2:]))
    assert torch.equal(y[:, 2:], torch.minimum(x[:, :2], x[:, 2:]))
    assert torch.allclose(y.square().sum(), x.square().sum(), rtol=1e-15)  # norm preserving
    # Jacobian spectral norm <= 1, and pairwise differences shrink
    jac = torch.autograd.functional.jacobian(lambda z: f(z.unsqueeze(0)).flatten(), x[0]).reshape(16, 16)
    assert float(torch.linalg.matrix_norm(jac, ord=2)) <= 1.0 + 1e-12
    a, b = torch.randn(2, 200, 6, dtype=F64)
    assert float(((f(a) - f(b)).norm(dim=1) / (a - b).norm(dim=1)).max()) <= 1.0 + 1e-12
    with pytest.raises(ValueError, match="even"):
        f(torch.randn(2, 3))


def test_actnorm_keeps_a_constant_channel_at_scale_one() -> None:
    """A constant channel (injective zero padding) cannot be standardised; a floored std would scale it by 1/eps."""
    layer = ActNorm(3).double().train()
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64) * 3.0 + 1.0
    x[:, 2] = 0.0
    y, _ = layer(x)
    assert layer.log_scale[2].item() == 0.0 and y[:, 2].abs().max().item() == 0.0
    torch.testing.assert_close(y[:, :2].mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        y[:, :2].std(dim=(0, 2, 3), correction=0), torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0
    )


# The fast CPU nonlinearities (autograd Functions) against torch's own, and their first and second derivatives.
LARGE_VALUES = [-1e4, -800.0, -100.0, -40.0, -20.0, -1e-10, 0.0, 1e-10, 20.0, 40.0, 100.0, 800.0, 1e4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, reference", [("elu", F.elu), ("softplus", F.softplus)])
def test_fast_nonlinearity_equals_torch(name: str, reference, dtype: torch.dtype) -> None:
    x = torch.cat([torch.randn(4083, dtype=dtype) * 5.0, torch.tensor(LARGE_VALUES, dtype=dtype)]).view(64, 4, 4, 4)
    f = make_nonlinearity(name)
    y = f(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y, reference(x))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(xg).sum(), xg)
    xr = x.clone().requires_grad_(True)
    (grad_reference,) = torch.autograd.grad(reference(xr).sum(), xr)
    torch.testing.assert_close(grad, grad_reference)


@pytest.mark.parametrize("name", ["elu", "softplus", "lipswish"])
def test_smooth_nonlinearities_pass_gradcheck_and_gradgradcheck(name: str) -> None:
    x = (torch.randn(3, 2, 4, dtype=F64) * 3.0).requires_grad_(True)
    fns = lipswish_variants() if name == "lipswish" else [make_nonlinearity(name)]
    for f in fns:
        inputs = (x, f.raw_beta) if name == "lipswish" else (x,)
        # gradcheck perturbs raw_beta in place, so the module itself is checked in both of its inputs
        fn = (lambda z, raw, f=f: f(z)) if name == "lipswish" else f
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_lipswish_keeps_its_formula_in_float32() -> None:
    f = LipSwish()
    x = torch.cat([torch.randn(1000) * 5.0, torch.tensor(LARGE_VALUES)])
    beta = F.softplus(f.raw_beta.detach())
    torch.testing.assert_close(f(x), x * torch.sigmoid(beta * x) / 1.1)


# ------------------------------------------------------------------ Logit


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_logdet_equals_autograd_jacobian_and_inverts(alpha: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 2, 2, 2, dtype=F64) - 0.5
    x[0, 0, 0, 0] = -0.5  # the lowest dequantised value
    layer = Logit(alpha)
    y, logdet = layer(x)
    p = alpha + (1 - 2 * alpha) * (x + 0.5)
    torch.testing.assert_close(y, torch.log(p / (1 - p)), atol=1e-12, rtol=1e-12)
    assert logdet.shape == (3,)
    torch.testing.assert_close(logdet, jacobian_logdets(layer, x), atol=1e-9, rtol=1e-12)
    assert (layer.inverse(y) - x).abs().max() < 1e-12


def test_logit_float32_near_the_edges_and_bad_alpha() -> None:
    x = torch.tensor([[-0.5, 0.5 - 1 / 512, 0.0]])
    y, logdet = Logit(1e-6)(x)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    assert (Logit(1e-6).inverse(y) - x).abs().max() < 1e-6
    for alpha in (0.0, 0.5, -1.0):
        with pytest.raises(ValueError, match="alpha"):
            Logit(alpha)
