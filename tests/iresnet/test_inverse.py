"""Fixed-point inverse (Algorithm 1) against Eq. 1 and exact solutions, in float64.

Branches with known 2-norm Lipschitz bounds: linear ``x Aᵀ`` (``Lip = ‖A‖₂``), an MLP ``W2 elu(W1 x + b1) + b2``
(``Lip <= ‖W2‖₂‖W1‖₂``) and a conv branch (C=2, 4x4, two 3x3 convs; ``Lip <=`` the product of the dense operator
norms).
Errors are measured per example in the 2-norm, the norm the Lipschitz constants are measured in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from iresnet import blocks
from iresnet.blocks import InvertibleResidualBlock
from iresnet.inverse import InverseInfo, InverseSettings, fixed_point_inverse, lipschitz_error_bound
from tests.helpers import DTYPE, conv_operator_norm, randn, scaled_to_norm

Branch = Callable[[Tensor], Tensor]


def linear_branch(lipschitz: float, seed: int = 0) -> tuple[Branch, tuple[int, ...], float]:
    a = scaled_to_norm(randn(torch.Generator().manual_seed(seed), 5, 5), lipschitz)
    return (lambda x: x @ a.T), (5,), lipschitz


def mlp_branch(layer_norm: float) -> tuple[Branch, tuple[int, ...], float]:
    gen = torch.Generator().manual_seed(1)
    w1, b1 = scaled_to_norm(randn(gen, 8, 3), layer_norm), randn(gen, 8)
    w2, b2 = scaled_to_norm(randn(gen, 3, 8), layer_norm), randn(gen, 3)
    return (lambda x: F.elu(x @ w1.T + b1) @ w2.T + b2), (3,), layer_norm**2


def conv_branch(layer_norm: float) -> tuple[Branch, tuple[int, ...], float]:
    gen = torch.Generator().manual_seed(2)
    shape = (2, 4, 4)
    kernels = []
    for _ in range(2):
        k = randn(gen, 2, 2, 3, 3)
        kernels.append(k * (layer_norm / conv_operator_norm(k, shape)))
    k1, k2 = kernels
    return (lambda x: F.conv2d(F.elu(F.conv2d(x, k1, padding=1)), k2, padding=1)), shape, layer_norm**2


BRANCHES = {
    "linear-0.5": lambda: linear_branch(0.5),
    "linear-0.9": lambda: linear_branch(0.9),
    "mlp-0.9": lambda: mlp_branch(math.sqrt(0.9)),
    "conv-0.64": lambda: conv_branch(0.8),
    "conv-0.9": lambda: conv_branch(math.sqrt(0.9)),
}


def per_example_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


@pytest.mark.parametrize("name", BRANCHES)
def test_error_after_n_steps_respects_eq1(name: str) -> None:
    g, shape, lipschitz = BRANCHES[name]()
    y = 2 * torch.randn(3, *shape, dtype=DTYPE)
    x_star, info = fixed_point_inverse(g, y, max_iter=600, atol=0)  # Lip^600 <= 1e-27: exact to round-off
    torch.testing.assert_close(x_star + g(x_star), y, rtol=0, atol=1e-13)
    first_step = per_example_norm(fixed_point_inverse(g, y, max_iter=1, atol=0)[0] - y)  # ‖x_1 - x_0‖
    checked = 0
    for n in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144):
        x_n, info = fixed_point_inverse(g, y, max_iter=n, atol=0)
        assert info.iterations == n
        error = per_example_norm(x_n - x_star)
        for b in range(3):
            bound = lipschitz_error_bound(lipschitz, n, float(first_step[b]))
            if bound < 1e-9:
                continue  # 1e-12 below is x*'s float64 round-off: keep it under 0.1% of every bound checked
            assert float(error[b]) <= bound + 1e-12, (n, b, float(error[b]), bound)
            checked += 1
    assert checked >= 12


@pytest.mark.parametrize("name", ["linear-0.9", "mlp-0.9", "conv-0.9"])
def test_converges_to_reconstruction_error_below_1e6_for_lip_09(name: str) -> None:
    g, shape, lipschitz = BRANCHES[name]()
    assert lipschitz == pytest.approx(0.9)
    x = torch.randn(4, *shape, dtype=DTYPE)
    y = x + g(x)
    x_hat, info = fixed_point_inverse(g, y, max_iter=1000, atol=1e-9)
    assert info.converged and info["converged"]
    assert info.iterations == len(info.residuals) < 1000
    assert info.residual == info.residuals[-1] <= 1e-9
    assert float((x_hat - x).abs().max()) <= 1e-6
    # The reported residual is the equation residual y - F(x_{k-1}) of the previous iterate, exactly.
    _, before = fixed_point_inverse(g, y, max_iter=info.iterations - 1, atol=0)
    assert before.residuals == info.residuals[:-1]


def test_residual_is_the_equation_residual() -> None:
    g, shape, _ = BRANCHES["mlp-0.9"]()
    y = torch.randn(2, *shape, dtype=DTYPE)
    x_k, _ = fixed_point_inverse(g, y, max_iter=4, atol=0)
    _, info = fixed_point_inverse(g, y, max_iter=5, atol=0)
    assert info.residual == pytest.approx(float((y - (x_k + g(x_k))).abs().max()), rel=1e-12)


def test_expansive_block_is_reported_as_not_converged() -> None:
    # A = 3Q with Q orthogonal: every eigenvalue has modulus 3, so the iteration diverges for any y.
    q, _ = torch.linalg.qr(randn(torch.Generator().manual_seed(3), 5, 5))
    a = 3 * q
    y = torch.randn(4, 5, dtype=DTYPE)
    x, info = fixed_point_inverse(lambda z: z @ a.T, y, max_iter=100, atol=1e-5)
    assert not info.converged and not info["converged"]
    assert info.iterations == 100 and info.residual > 1e40
    assert all(later > earlier for earlier, later in zip(info.residuals, info.residuals[1:]))
    assert float((x + x @ a.T - y).abs().max()) > 1e40  # the returned x is indeed no inverse


def test_overflow_stops_as_not_converged_with_last_finite_iterate() -> None:
    # In float32 the same diverging iteration overflows (3^k > 3e38 near k = 81) before max_iter.
    q, _ = torch.linalg.qr(randn(torch.Generator().manual_seed(3), 5, 5))
    a = (3 * q).float()
    x, info = fixed_point_inverse(lambda z: z @ a.T, torch.randn(4, 5), max_iter=200, atol=1e-5)
    assert not info.converged
    assert info.iterations < 200 and not math.isfinite(info.residual)
    assert torch.isfinite(x).all()


def test_nan_branch_is_reported_as_not_converged() -> None:
    y = torch.randn(3, 4, dtype=DTYPE)
    x, info = fixed_point_inverse(lambda z: z * math.nan, y, max_iter=50, atol=1e-5)
    assert not info.converged and info.iterations == 1 and math.isnan(info.residual)
    assert torch.equal(x, y)


def test_nan_after_some_steps_returns_the_last_finite_iterate() -> None:
    g, shape, _ = BRANCHES["linear-0.5"]()
    calls = {"n": 0}

    def flaky(z: Tensor) -> Tensor:
        calls["n"] += 1
        return g(z) * (math.nan if calls["n"] == 4 else 1.0)

    y = torch.randn(2, *shape, dtype=DTYPE)
    x, info = fixed_point_inverse(flaky, y, max_iter=50, atol=0)
    assert not info.converged and info.iterations == 4 and math.isnan(info.residual)
    torch.testing.assert_close(x, fixed_point_inverse(g, y, max_iter=3, atol=0)[0], rtol=0, atol=0)


def test_cap_reached_before_tolerance_is_not_converged() -> None:
    g, shape, _ = BRANCHES["linear-0.9"]()
    _, info = fixed_point_inverse(g, torch.randn(2, *shape, dtype=DTYPE), max_iter=5, atol=1e-10)
    assert not info.converged and info.iterations == 5 and info.residual > 1e-10


def test_zero_atol_runs_exactly_max_iter_steps() -> None:
    g, shape, _ = BRANCHES["linear-0.5"]()
    _, info = fixed_point_inverse(g, torch.randn(2, *shape, dtype=DTYPE), max_iter=150, atol=0)
    assert info.iterations == len(info.residuals) == 150
    assert info.residuals[-1] <= 1e-15  # long past convergence, yet it kept going


def test_runs_without_graph_unless_differentiable() -> None:
    g, shape, lipschitz = BRANCHES["linear-0.5"]()
    y = torch.randn(2, *shape, dtype=DTYPE, requires_grad=True)
    x, _ = fixed_point_inverse(g, y)
    assert not x.requires_grad
    x, info = fixed_point_inverse(g, y, max_iter=200, atol=1e-14, differentiable=True)
    assert info.converged and x.requires_grad
    # x = (I + A)^{-1} y, so d(sum x)/dy = (I + A)^{-T} 1 (A recovered from the linear branch).
    a = g(torch.eye(5, dtype=DTYPE)).T
    (grad,) = torch.autograd.grad(x.sum(), y)
    expected = torch.linalg.solve(torch.eye(5, dtype=DTYPE) + a.T, torch.ones(5, dtype=DTYPE))
    torch.testing.assert_close(grad, expected.expand(2, 5), rtol=0, atol=1e-12)
    assert lipschitz < 1


def test_lipschitz_error_bound_formula_and_validation() -> None:
    assert lipschitz_error_bound(0.5, 3, 2.0) == pytest.approx(0.5**3 / 0.5 * 2.0, rel=1e-15)
    assert lipschitz_error_bound(0.0, 0, 1.5) == 1.5
    with pytest.raises(ValueError, match=r"lipschitz must lie in \[0, 1\)"):
        lipschitz_error_bound(1.0, 3, 1.0)
    with pytest.raises(ValueError, match="n .* must be an integer >= 0"):
        lipschitz_error_bound(0.5, -1, 1.0)
    with pytest.raises(ValueError, match="first_step"):
        lipschitz_error_bound(0.5, 1, math.inf)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_iter": 0}, r"InverseSettings\.max_iter must be an integer >= 1"),
        ({"max_iter": 10.0}, r"InverseSettings\.max_iter must be an integer >= 1"),
        ({"atol": -1e-3}, r"InverseSettings\.atol must be a finite number >= 0"),
        ({"atol": math.nan}, r"InverseSettings\.atol must be a finite number >= 0"),
    ],
)
def test_settings_reject_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InverseSettings(**kwargs)


def test_fixed_point_inverse_rejects_bad_arguments() -> None:
    y = torch.randn(2, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
        fixed_point_inverse(lambda z: z, y, max_iter=0)
    with pytest.raises(ValueError, match="atol must be a finite number >= 0"):
        fixed_point_inverse(lambda z: z, y, atol=-1.0)


def test_info_reads_like_a_mapping_of_its_fields() -> None:
    info = InverseInfo(converged=True, iterations=3, residual=1e-7, residuals=[1e-1, 1e-4, 1e-7])
    assert info["iterations"] == 3 and info["residuals"] == [1e-1, 1e-4, 1e-7]
    with pytest.raises(KeyError, match="no field 'iters'"):
        info["iters"]


# ------------------------------------------------------------------ the block's inverse and spectral-norm state


def _block(kind: str) -> InvertibleResidualBlock:
    g = blocks.conv_branch(2, 4, (4, 4), coeff=0.9) if kind == "conv" else blocks.mlp_branch(3, 8, 2, coeff=0.9)
    return InvertibleResidualBlock(g).to(DTYPE)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_train_mode_inverse_leaves_spectral_norm_buffers_bit_identical(kind: str) -> None:
    block = _block(kind)
    x = torch.randn(3, *((2, 4, 4) if kind == "conv" else (3,)), dtype=DTYPE)
    with torch.no_grad():
        y = block(x)[0]  # training mode: one power iteration per layer
    before = {name: b.clone() for name, b in block.named_buffers()}
    assert {"u", "v", "sigma"} <= {name.rsplit(".", 1)[-1] for name in before}
    x_rec = block.inverse(y)  # still in training mode
    for name, buffer in block.named_buffers():
        assert torch.equal(buffer, before[name]), name
    # ... and it inverts the map with the weights of those buffers (the ones the forward used)
    assert block.last_inverse_info.converged
    torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-4)


def test_block_inverse_equals_plain_iteration_with_eq2_weights() -> None:
    block = _block("conv").eval()
    y = torch.randn(3, 2, 4, 4, dtype=DTYPE)
    x_block = block.inverse(y)
    x_plain, info = fixed_point_inverse(block.g, y)  # eval mode: every call recomputes the same Eq. 2 weight
    assert torch.equal(x_block, x_plain)
    assert block.last_inverse_info == info


@pytest.mark.parametrize("name", ["linear-0.5", "mlp-0.9", "conv-0.9"])
@pytest.mark.parametrize("atol", [1e-3, 1e-9])
def test_early_stop_returns_the_last_iterate_bitwise(name: str, atol: float) -> None:
    # Algorithm 1 written out by hand: x_0 = y, x_{k+1} = y - g(x_k), stop once max|x_{k+1} - x_k| <= atol and
    # return x_{k+1}. Same operations in the same order, so the library's answer must agree bit for bit; returning
    # x_k instead (one step behind) differs by about the reported residual, far above 0.
    g, shape, _ = BRANCHES[name]()
    y = 2 * torch.randn(3, *shape, dtype=DTYPE)
    x, residuals = y, []
    for _ in range(1000):
        x_next = y - g(x)
        residuals.append(float((x_next - x).abs().max()))
        x = x_next
        if residuals[-1] <= atol:
            break
    assert residuals[-1] <= atol and len(residuals) > 1
    x_lib, info = fixed_point_inverse(g, y, max_iter=1000, atol=atol)
    assert info.converged and info.iterations == len(residuals) and info.residuals == residuals
    assert torch.equal(x_lib, x)
    # The returned iterate is one step ahead of the one whose residual was reported.
    x_prev, _ = fixed_point_inverse(g, y, max_iter=info.iterations - 1, atol=0)
    assert float((x_lib - x_prev).abs().max()) == info.residual > 0
