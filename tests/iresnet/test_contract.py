"""The layer contract, checked once for every invertible module against brute force (float64).

``forward(x) -> (y, logdet)`` with ``logdet: (B,)``; ``inverse(y) -> x``; the log-det equals ``slogdet`` of the
autograd Jacobian; gradients reach every parameter; a state-dict round trip reproduces the outputs bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from iresnet.base import Invertible, InvertibleSequential
from iresnet.blocks import (
    InvertibleResidualBlock,
    conv_branch,
    mlp_branch,
    residual_blocks,
    set_inverse_settings,
)
from iresnet.glow import AdditiveCoupling, InvertibleConv1x1, ReversePermutation, glow_step
from iresnet.glow import AffineCoupling as ConvAffineCoupling
from iresnet.inverse import InverseSettings
from iresnet.layers import ActNorm, Squeeze
from iresnet.logdet import LogDetSettings
from iresnet.toy import AffineCoupling, InvertibleLinear

EXACT = LogDetSettings(estimator="exact")
TIGHT_INVERSE = InverseSettings(max_iter=500, atol=1e-13)


def conv_block(channels: int = 2, hw: int = 4, coeff: float = 0.9, nonlin: str = "elu") -> InvertibleResidualBlock:
    return InvertibleResidualBlock(conv_branch(channels, 4, (hw, hw), coeff, nonlin=nonlin), EXACT, TIGHT_INVERSE)


def mlp_block(coeff: float = 0.9) -> InvertibleResidualBlock:
    return InvertibleResidualBlock(mlp_branch(2, 16, 2, coeff), EXACT, TIGHT_INVERSE)


def perturbed(layer: Invertible) -> Invertible:
    """Move every parameter away from its identity-like initial value so the checks see a non-trivial map."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


FACTORIES: dict[str, tuple[Callable[[], Invertible], tuple[int, ...]]] = {
    "actnorm_image": (lambda: ActNorm(3), (3, 2, 2)),
    "actnorm_vector": (lambda: ActNorm(2), (2,)),
    "squeeze": (lambda: Squeeze(2), (2, 4, 4)),
    "conv_block_elu": (lambda: conv_block(), (2, 4, 4)),
    "conv_block_softplus": (lambda: conv_block(nonlin="softplus"), (2, 4, 4)),
    "conv_block_lipswish": (lambda: conv_block(nonlin="lipswish"), (2, 4, 4)),
    "conv_block_sorting": (lambda: conv_block(nonlin="sorting"), (2, 4, 4)),
    "mlp_block": (lambda: mlp_block(), (2,)),
    "sequential": (
        lambda: InvertibleSequential([ActNorm(2), conv_block(2, 4), Squeeze(2), conv_block(8, 2)]),
        (2, 4, 4),
    ),
    "coupling": (lambda: perturbed(AffineCoupling(hidden=8, n_hidden_layers=2)), (2,)),
    "invertible_linear": (lambda: InvertibleLinear(2), (2,)),
    # Glow (Table 3): an odd channel count splits unevenly (1 + 2); the 1x1 convolution also on vectors
    "glow_conv1x1": (lambda: perturbed(InvertibleConv1x1(3)), (3, 2, 2)),
    "glow_conv1x1_vector": (lambda: perturbed(InvertibleConv1x1(3)), (3,)),
    "glow_reverse": (lambda: ReversePermutation(), (3, 2, 2)),
    "glow_affine_coupling": (lambda: perturbed(ConvAffineCoupling(3, 4)), (3, 2, 2)),
    "glow_additive_coupling": (lambda: perturbed(AdditiveCoupling(4, 4)), (4, 2, 2)),
    "glow_step": (lambda: perturbed(glow_step(4, 4, "affine", "conv1x1")), (4, 2, 2)),
    "glow_step_additive": (lambda: perturbed(glow_step(4, 4, "additive", "reverse")), (4, 2, 2)),
}


def prepared(name: str, batch: int = 3) -> tuple[Invertible, Tensor]:
    """The module in float64, its data-dependent state initialised and power iterations converged, in eval mode."""
    factory, shape = FACTORIES[name]
    torch.manual_seed(1)
    layer = factory().double()
    x = torch.randn(batch, *shape, dtype=torch.float64)
    layer.train()
    with torch.no_grad():
        for _ in range(50):  # ActNorm initialises on the first call; power iterations converge
            layer(x, LogDetSettings(estimator="none"))  # the log-det is not needed to converge: a cheap warm-up
    return layer.eval(), x


def brute_force_logdet(layer: Invertible, x: Tensor) -> Tensor:
    """``ln|det ∂y/∂x|`` per example from the full autograd Jacobian."""
    values = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: layer(v.unsqueeze(0))[0].flatten(), xi)
        values.append(torch.linalg.slogdet(jac.reshape(xi.numel(), xi.numel()))[1])
    return torch.stack(values)


@pytest.mark.parametrize("name", FACTORIES)
def test_shapes_and_logdet_shape(name: str) -> None:
    layer, x = prepared(name)
    y, logdet = layer(x)
    assert y.shape[0] == x.shape[0] and y.numel() == x.numel()
    assert logdet.shape == (x.shape[0],)
    assert layer.inverse(y).shape == x.shape


@pytest.mark.parametrize("name", FACTORIES)
def test_inverse_round_trip(name: str) -> None:
    layer, x = prepared(name)
    with torch.no_grad():
        y, _ = layer(x)
        x_back = layer.inverse(y)
    assert (x_back - x).abs().max() <= 1e-6


@pytest.mark.parametrize("name", FACTORIES)
def test_logdet_equals_autograd_jacobian(name: str) -> None:
    layer, x = prepared(name)
    _, logdet = layer(x)
    torch.testing.assert_close(logdet.detach(), brute_force_logdet(layer, x), atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", FACTORIES)
def test_gradients_reach_every_parameter(name: str) -> None:
    layer, x = prepared(name)
    if not list(layer.parameters()):
        pytest.skip("the layer has no parameters")
    y, logdet = layer(x)
    (y * torch.randn_like(y)).sum().add(logdet.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


@pytest.mark.parametrize("name", FACTORIES)
def test_state_dict_round_trip(name: str) -> None:
    layer, x = prepared(name)
    factory, _ = FACTORIES[name]
    torch.manual_seed(123)  # a differently initialised twin: everything it must match comes from the state dict
    twin = factory().double()
    twin.load_state_dict(layer.state_dict())
    twin.eval()
    with torch.no_grad():
        y, logdet = layer(x)
        y_twin, logdet_twin = twin(x)
        assert torch.equal(y, y_twin) and torch.equal(logdet, logdet_twin)
        assert torch.equal(layer.inverse(y), twin.inverse(y))


def test_block_inverse_reports_convergence() -> None:
    layer, x = prepared("conv_block_elu")
    set_inverse_settings(layer, InverseSettings(max_iter=100, atol=1e-10))
    with torch.no_grad():
        layer.inverse(layer(x)[0])
    info = layer.last_inverse_info
    assert info is not None and info.converged and info.iterations < 100 and info.residual <= 1e-10


def test_vanilla_block_scaled_up_is_not_reported_converged() -> None:
    block = InvertibleResidualBlock(conv_branch(2, 4, (4, 4), coeff=None), EXACT, InverseSettings(50, 1e-8)).double()
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(10.0)
        block.inverse(torch.randn(2, 2, 4, 4, dtype=torch.float64))
    assert not block.last_inverse_info.converged


def test_block_lipschitz_bound_is_certified() -> None:
    """The certified bound is an upper bound on Lip(g): no finite difference exceeds it, and it is < 1 for c = 0.9."""
    layer, x = prepared("conv_block_elu")
    bound = layer.lipschitz_bound()
    assert bound < 1
    with torch.no_grad():
        for _ in range(20):
            a, b = torch.randn_like(x), torch.randn_like(x)
            ratio = (layer.g(a) - layer.g(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
            assert ratio.max() <= bound


def test_log_det_settings_are_an_argument_of_the_call() -> None:
    """Blocks built with the power series: `settings` of one call reach every block through the container (here the
    exact log-det, equal to the autograd Jacobian's), and leave no state behind (the next call is the series')."""
    torch.manual_seed(0)
    series = LogDetSettings("series", n_terms=1)  # one term: far from exact, so the two are told apart
    chain = InvertibleSequential(
        [
            InvertibleResidualBlock(mlp_branch(2, 16, 2, 0.9), series),
            ActNorm(2),
            InvertibleResidualBlock(mlp_branch(2, 16, 2, 0.9), series),
        ]
    ).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    chain(x)  # ActNorm initialises
    chain.eval()
    _, exact = chain(x, EXACT)
    torch.testing.assert_close(exact.detach(), brute_force_logdet(chain, x), atol=1e-10, rtol=0)
    _, again = chain(x)
    assert (again - exact).abs().max() > 1e-3 and all(b.logdet_settings is series for b in residual_blocks(chain))
