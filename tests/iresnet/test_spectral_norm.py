"""Spectral normalisation (Eq. 2) against dense operators, and the exact / certified norm helpers (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import iresnet.spectral_norm as sn
from iresnet.layers import Squeeze
from iresnet.spectral_norm import (
    DENSE_MARGIN,
    EXACT_RTOL,
    LipschitzConv2d,
    LipschitzLinear,
    conv_norm_exact,
    conv_norm_lower_bound,
    conv_norm_upper_bound,
    conv_singular_values,
    dense_conv_norm,
    dense_operator,
    layer_lipschitz_bound,
    operator_norm,
    project_to_bound,
)

F64 = torch.float64

# (in_channels, out_channels, kernel_size, input_hw); the last one is the shape after Squeeze(2) of (2, 8, 8).
CONV_CASES = [(3, 4, 3, (5, 5)), (4, 4, 1, (5, 5)), (8, 8, 3, (4, 4)), (4, 6, 3, (6, 5))]


# Eq. 2 after 50 training forwards x 20 power iterations, against the dense-operator SVD (float64, seed 0): the
# effective norm exceeds coeff by at most 1.78e-6 relative (3to4_k3_5x5; 1.3e-7 for 4to6_k3_6x5, <= 7e-16 for the
# rest, measured). Power iteration's sigma = |W v| <= ||W|| for a unit v, so the norm never falls below coeff
# beyond float64 rounding. Hence 1e-5 over (5.6x the worst measured, yet 50x below a normaliser 0.05% too lax)
# and 1e-12 under (rounding only).
OVER_RTOL = 1e-5
UNDER_RTOL = 1e-12


def assert_normalised_to(exact: float, coeff: float) -> None:
    assert coeff * (1 - UNDER_RTOL) <= exact <= coeff * (1 + OVER_RTOL), (exact, coeff, exact / coeff - 1)


def zero_padded_norm(weight: Tensor, input_hw: tuple[int, int], padding: int) -> float:
    """Exact norm of the zero-padded stride-1 convolution, from its dense matrix."""
    return operator_norm(lambda z: F.conv2d(z, weight, padding=padding), (1, weight.shape[1], *input_hw))


def inflated_conv(
    c_in: int, c_out: int, k: int, hw: tuple[int, int], coeff: float | None, n_iter: int
) -> LipschitzConv2d:
    layer = LipschitzConv2d(c_in, c_out, k, hw, coeff=coeff, n_power_iter=n_iter).to(F64)
    with torch.no_grad():
        layer.weight.mul_(10.0)
    return layer


# ------------------------------------------------------------------ the normalised layers


@pytest.mark.parametrize("coeff", [0.9, 0.5])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}to{c[1]}_k{c[2]}_{c[3][0]}x{c[3][1]}")
def test_conv_normalised_to_coeff_on_exact_operator(case: tuple, coeff: float) -> None:
    c_in, c_out, k, hw = case
    layer = inflated_conv(c_in, c_out, k, hw, coeff, n_iter=20)
    assert zero_padded_norm(layer.weight.detach(), hw, layer.padding) > 5 * coeff  # really inflated
    x = torch.randn(2, c_in, *hw, dtype=F64)
    for _ in range(50):  # 50 training forwards x 20 power iterations
        layer(x)
    layer.eval()
    exact = zero_padded_norm(layer.effective_weight().detach(), hw, layer.padding)
    assert_normalised_to(exact, coeff)
    # sigma estimates the zero-padded operator at input_hw (Gouk et al.), not the reshaped kernel matrix.
    sigma_exact = zero_padded_norm(layer.weight.detach(), hw, layer.padding)
    assert float(layer.sigma) <= sigma_exact * (1 + UNDER_RTOL)  # power iteration only under-estimates
    assert float(layer.sigma) == pytest.approx(sigma_exact, rel=OVER_RTOL)
    kernel_matrix_norm = float(torch.linalg.matrix_norm(layer.weight.detach().reshape(c_out, -1), ord=2))
    if k > 1:
        assert abs(kernel_matrix_norm - sigma_exact) > 1e-2 * sigma_exact


def test_conv_after_squeeze_uses_the_real_input_shape() -> None:
    x = torch.randn(2, 2, 8, 8, dtype=F64)
    squeezed, _ = Squeeze(2)(x)
    assert squeezed.shape == (2, 8, 4, 4)
    layer = inflated_conv(8, 8, 3, (4, 4), coeff=0.7, n_iter=20)
    for _ in range(50):
        layer(squeezed)
    layer.eval()
    exact = zero_padded_norm(layer.effective_weight().detach(), (4, 4), 1)
    assert_normalised_to(exact, 0.7)
    with pytest.raises(ValueError, match="input_hw"):
        layer(x.repeat(1, 4, 1, 1))  # pre-squeeze spatial size 8x8: the wrong operator


@pytest.mark.parametrize("coeff", [0.9, 0.5])
def test_linear_normalised_to_coeff(coeff: float) -> None:
    layer = LipschitzLinear(5, 4, coeff=coeff, n_power_iter=20).to(F64)
    with torch.no_grad():
        layer.weight.mul_(10.0)
    x = torch.randn(3, 5, dtype=F64)
    for _ in range(50):
        layer(x)
    layer.eval()
    exact = float(torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2))
    assert_normalised_to(exact, coeff)
    assert layer_lipschitz_bound(layer) == pytest.approx(exact * (1 + DENSE_MARGIN), rel=1e-12)


def test_weight_only_scaled_down() -> None:
    layer = LipschitzConv2d(2, 3, 3, (4, 4), coeff=0.9, n_power_iter=50).to(F64)
    with torch.no_grad():
        layer.weight.mul_(0.1 / zero_padded_norm(layer.weight.detach(), (4, 4), 1))  # norm 0.1 < c
    layer(torch.randn(1, 2, 4, 4, dtype=F64))
    assert torch.equal(layer.effective_weight(), layer.weight)


def test_gradient_flows_through_sigma() -> None:
    """Finite differences of the eval forward (sigma depends on W) agree with autograd: sigma is not detached."""
    layer = inflated_conv(2, 2, 3, (3, 3), coeff=0.8, n_iter=5)
    layer(torch.randn(1, 2, 3, 3, dtype=F64))
    layer.eval()
    assert float(layer.sigma) > 0.8  # Eq. 2 active
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    weight = layer.weight.detach().clone().requires_grad_(True)
    fn = lambda w: torch.func.functional_call(layer, {"weight": w}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (weight,))


def test_eval_keeps_buffers_and_is_deterministic() -> None:
    layer = LipschitzConv2d(2, 3, 3, (4, 4), coeff=0.9, n_power_iter=1).to(F64)
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    out1, out2 = layer(x), layer(x)
    assert torch.equal(out1, out2)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    layer.train()
    layer(x)
    assert not torch.equal(layer.u, before["u"])  # training does update, so the check above can fail


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_state_dict_round_trip_is_bitwise(kind: str) -> None:
    def make() -> LipschitzConv2d | LipschitzLinear:
        if kind == "conv":
            return LipschitzConv2d(2, 3, 3, (4, 4), coeff=0.9, n_power_iter=2).to(F64)
        return LipschitzLinear(3, 4, coeff=0.9, n_power_iter=2).to(F64)

    x = torch.randn(2, 2, 4, 4, dtype=F64) if kind == "conv" else torch.randn(2, 3, dtype=F64)
    saved = make()
    with torch.no_grad():
        saved.weight.mul_(5.0)
    for _ in range(3):
        saved(x)
    assert {"weight", "bias", "u", "v", "sigma"} <= set(saved.state_dict())
    loaded = make()  # different random u, v, weight
    loaded.load_state_dict(saved.state_dict())
    saved.eval(), loaded.eval()
    assert torch.equal(saved(x), loaded(x))
    saved.train(), loaded.train()  # the next training step continues from the same vectors
    assert torch.equal(saved(x), loaded(x))
    assert torch.equal(saved.sigma, loaded.sigma)


def test_coeff_none_is_a_plain_conv() -> None:
    layer = inflated_conv(2, 3, 3, (4, 4), coeff=None, n_iter=1)
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    expected = F.conv2d(x, layer.weight, layer.bias, padding=1)
    assert torch.equal(layer(x), expected)
    layer.eval()
    assert torch.equal(layer(x), expected)
    assert layer.effective_weight() is layer.weight
    assert layer_lipschitz_bound(layer) >= zero_padded_norm(layer.weight.detach(), (4, 4), 1) > 1.0

    linear = LipschitzLinear(3, 2, coeff=None).to(F64)
    z = torch.randn(4, 3, dtype=F64)
    assert torch.equal(linear(z), F.linear(z, linear.weight, linear.bias))


def test_construction_is_reproducible_under_a_seed() -> None:
    torch.manual_seed(3)
    a = LipschitzConv2d(2, 3, 3, (4, 4), coeff=0.9)
    torch.manual_seed(3)
    b = LipschitzConv2d(2, 3, 3, (4, 4), coeff=0.9)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert a.u.shape == (1, 3, 4, 4) and a.v.shape == (1, 2, 4, 4) and a.sigma.shape == ()
    assert float(a.sigma) > 0


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="coeff"):
        LipschitzConv2d(2, 2, 3, (4, 4), coeff=0.0)
    with pytest.raises(ValueError, match="coeff"):
        LipschitzLinear(2, 2, coeff=-1.0)
    with pytest.raises(ValueError, match="n_power_iter"):
        LipschitzConv2d(2, 2, 3, (4, 4), coeff=0.9, n_power_iter=-1)
    with pytest.raises(ValueError, match="odd"):
        LipschitzConv2d(2, 2, 2, (4, 4), coeff=0.9)
    with pytest.raises(ValueError, match="input_hw"):
        LipschitzConv2d(2, 2, 3, (4, 0), coeff=0.9)
    with pytest.raises(ValueError, match="expected input"):
        LipschitzLinear(2, 2, coeff=0.9)(torch.randn(3, 5))
    LipschitzConv2d(2, 2, 3, (4, 4), coeff=1.5)  # c >= 1 is allowed here; the models validate c < 1


# ------------------------------------------------------------------ exact and certified norms


def test_dense_operator_matches_autograd_jacobian() -> None:
    weight = torch.randn(3, 2, 3, 3, dtype=F64)
    fn = lambda z: F.conv2d(z, weight, padding=1)  # noqa: E731
    shape = (1, 2, 4, 3)
    dense = dense_operator(fn, shape, chunk=5)  # several chunks
    jac = torch.autograd.functional.jacobian(fn, torch.zeros(shape, dtype=F64)).reshape(3 * 4 * 3, 2 * 4 * 3)
    assert torch.allclose(dense, jac, rtol=0, atol=1e-14)
    # a batch dimension > 1: the map acts per example, so its matrix is block diagonal
    dense2 = dense_operator(fn, (2, 2, 4, 3))
    assert torch.allclose(dense2, torch.block_diag(jac, jac), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "c_out, c_in, k, hw",
    [(3, 2, 3, (5, 4)), (2, 3, 1, (4, 4)), (2, 2, 5, (6, 5)), (1, 1, 3, (3, 3)), (4, 4, 3, (2, 2))],
)
def test_conv_singular_values_match_dense_circular_operator(c_out: int, c_in: int, k: int, hw: tuple) -> None:
    weight = torch.randn(c_out, c_in, k, k, dtype=F64)
    p = k // 2  # F.pad's circular mode wraps at most the input size: every case has p <= min(hw)
    circular = lambda z: F.conv2d(F.pad(z, (p, p, p, p), mode="circular"), weight)  # noqa: E731
    expected = torch.linalg.svdvals(dense_operator(circular, (1, c_in, *hw)))
    got = conv_singular_values(weight, hw)
    assert got.shape == expected.shape == (hw[0] * hw[1] * min(c_in, c_out),)
    assert torch.all(got[:-1] >= got[1:])
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert float((got - expected).abs().max()) < 1e-12  # in fact exact up to rounding


@pytest.mark.parametrize(
    "c_out, c_in, k, hw", [(3, 2, 3, (5, 4)), (4, 4, 3, (4, 4)), (2, 3, 5, (6, 6)), (3, 3, 1, (4, 5))]
)
def test_upper_and_lower_bounds_bracket_the_zero_padded_norm(c_out: int, c_in: int, k: int, hw: tuple) -> None:
    weight = torch.randn(c_out, c_in, k, k, dtype=F64)
    p = k // 2
    exact = zero_padded_norm(weight, hw, p)
    upper = conv_norm_upper_bound(weight, hw, p)
    lower = conv_norm_lower_bound(weight, hw, p)
    assert upper > exact  # strictly, rounding included: the margin covers it when the bound is tight (k = 1)
    assert lower <= exact * (1 + 1e-12)
    assert lower == pytest.approx(exact, rel=1e-10)
    if k == 1:
        assert upper == pytest.approx(exact * (1 + DENSE_MARGIN), rel=1e-12)  # circular = zero-padded for 1x1
    else:
        assert upper > exact  # strictly an upper bound on small inputs


@pytest.mark.parametrize("seed", range(6))
def test_every_grid_of_at_least_h_plus_p_bounds_the_zero_padded_norm(seed: int) -> None:
    """Each circular grid from H + p up bounds the exact (dense) norm; the bound, the smallest of those from H + p to
    H + 2p, is never below the exact norm and never above the single (H + 2p) grid used before."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 2, 3, 3, generator=generator, dtype=F64)
    hw, p = (4, 5), 1
    exact = zero_padded_norm(weight, hw, p)
    for n_h in range(hw[0] + p, hw[0] + 2 * p + 3):
        for n_w in range(hw[1] + p, hw[1] + 2 * p + 3):
            assert float(conv_singular_values(weight, (n_h, n_w))[0]) >= exact * (1 - 1e-12), (n_h, n_w)
    upper = conv_norm_upper_bound(weight, hw, p, dense_limit=0)  # circular grids only
    padded_grid = float(conv_singular_values(weight, (hw[0] + 2 * p, hw[1] + 2 * p))[0])
    assert exact < upper <= padded_grid * (1 + DENSE_MARGIN)


def test_smallest_grid_is_tighter_where_it_can_be() -> None:
    """Over random kernels the smaller grids beat the (H + 2p) one strictly, and often (not a rounding effect)."""
    generator = torch.Generator().manual_seed(0)
    gains = []
    for _ in range(20):
        weight = torch.randn(2, 2, 3, 3, generator=generator, dtype=F64)
        padded_grid = float(conv_singular_values(weight, (7, 7))[0])
        gains.append(padded_grid - conv_norm_upper_bound(weight, (5, 5), 1, dense_limit=0))
    assert sum(g > 1e-6 for g in gains) >= 5


@pytest.mark.parametrize(("c_out", "c_in", "hw", "padding"), [(3, 2, (5, 4), 1), (4, 4, (3, 3), 1), (2, 3, (4, 4), 2)])
def test_small_operators_get_their_dense_exact_norm(c_out: int, c_in: int, hw: tuple, padding: int) -> None:
    """Below the size limit the bound is the dense operator's exact norm (an SVD here, eigvalsh of a Gram matrix
    there), raised by the stated margin only: never below it, and tighter than every circular grid."""
    weight = torch.randn(c_out, c_in, 3, 3, generator=torch.Generator().manual_seed(c_in), dtype=F64)
    exact = operator_norm(lambda z: F.conv2d(z, weight, padding=padding), (1, c_in, *hw))
    upper = conv_norm_upper_bound(weight, hw, padding)
    assert exact <= upper <= exact * (1 + 2 * DENSE_MARGIN)
    assert upper < conv_norm_upper_bound(weight, hw, padding, dense_limit=0)


def test_upper_bound_covers_other_paddings() -> None:
    weight = torch.randn(2, 3, 3, 3, dtype=F64)
    for padding in (0, 1, 2):
        exact = operator_norm(lambda z, p=padding: F.conv2d(z, weight, padding=p), (1, 3, 5, 5))
        assert conv_norm_upper_bound(weight, (5, 5), padding) >= exact
        assert conv_norm_lower_bound(weight, (5, 5), padding) == pytest.approx(exact, rel=1e-10)
    with pytest.raises(ValueError, match="padding"):
        conv_norm_upper_bound(weight, (5, 5), -1)


def test_upper_bound_uses_the_padded_grid() -> None:
    """A kernel whose taps cancel when wrapped on the 2x2 input grid: circular norm 0 there, zero-padded norm 1."""
    weight = torch.zeros(1, 1, 3, 3, dtype=F64)
    weight[0, 0, 1, 0], weight[0, 0, 1, 2] = 1.0, -1.0  # y[i, j] = x[i, j - 1] - x[i, j + 1]
    assert float(conv_singular_values(weight, (2, 2))[0]) == pytest.approx(0.0, abs=1e-15)
    assert zero_padded_norm(weight, (2, 2), 1) == pytest.approx(1.0, rel=1e-14)
    assert conv_norm_upper_bound(weight, (2, 2), 1) >= 1.0


def test_layer_bound_is_certified() -> None:
    layer = LipschitzConv2d(3, 4, 3, (5, 5), coeff=0.9, n_power_iter=3).to(F64)
    layer(torch.randn(1, 3, 5, 5, dtype=F64))
    layer.eval()
    effective = layer.effective_weight().detach()
    bound = layer_lipschitz_bound(layer)
    assert bound == conv_norm_upper_bound(effective, (5, 5), 1)
    assert bound >= zero_padded_norm(effective, (5, 5), 1)
    with pytest.raises(ValueError, match="LipschitzConv2d"):
        layer_lipschitz_bound(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize("layer_coeff", [None, 0.9, 0.5])
def test_project_to_bound_repairs_a_lagging_conv(layer_coeff: float | None) -> None:
    layer = inflated_conv(3, 4, 3, (5, 5), layer_coeff, n_iter=0)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    with torch.no_grad():  # the weights moved after the last power iteration: sigma now under-estimates
        layer.weight.add_(3.0 * torch.randn_like(layer.weight))
    layer.eval()
    assert layer_lipschitz_bound(layer) > 0.9
    raw_before, sigma_before = layer.weight.detach().clone(), layer.sigma.clone()
    scale = project_to_bound(layer, 0.9)
    assert 0 < scale < 1
    assert torch.allclose(layer.weight.detach(), raw_before * scale, rtol=1e-14, atol=0)
    # re-measure: certified bound and the exact dense norm of the effective weight
    assert layer_lipschitz_bound(layer) <= 0.9
    assert zero_padded_norm(layer.effective_weight().detach(), (5, 5), 1) <= 0.9
    assert layer_lipschitz_bound(layer) >= 0.9 * (1 - 1e-6)  # shrunk no more than needed
    assert float(layer.sigma) == pytest.approx(float(sigma_before) * scale, rel=1e-14)  # the record follows W
    # later training-mode power iterations only shrink the effective weight further
    layer.train()
    layer.n_power_iter = 10
    layer(x)
    layer.eval()
    assert layer_lipschitz_bound(layer) <= 0.9
    assert project_to_bound(layer, 0.9) == 1.0  # nothing to do


def test_project_to_bound_linear() -> None:
    layer = LipschitzLinear(4, 3, coeff=0.8, n_power_iter=0).to(F64)
    with torch.no_grad():
        layer.weight.mul_(10.0).add_(5.0 * torch.randn_like(layer.weight))
    layer.eval()
    assert layer_lipschitz_bound(layer) > 0.8
    project_to_bound(layer, 0.8)
    assert float(torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2)) <= 0.8
    with pytest.raises(ValueError, match="coeff"):
        project_to_bound(layer, 0.0)


# ------------------------------------------------------------------ the exact norm of the zero-padded operator

# (c_out, c_in, kernel, input_hw, padding): kernel sizes 1, 3, 5, other paddings, more and fewer outputs than inputs.
EXACT_CASES = [
    (3, 2, 3, (5, 4), 1),
    (4, 4, 1, (6, 6), 0),
    (2, 3, 5, (7, 6), 2),
    (5, 3, 3, (6, 6), 0),
    (2, 2, 3, (9, 9), 2),
]


@pytest.mark.parametrize("dense_limit", [10**6, 0], ids=["dense", "lanczos"])
@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: f"{c[0]}to{c[1]}_k{c[2]}_{c[3][0]}x{c[3][1]}_p{c[4]}")
def test_exact_norm_matches_a_dense_svd(case: tuple, dense_limit: int) -> None:
    """Both paths give the largest singular value of the dense float64 operator to 1e-10, and say which they took."""
    c_out, c_in, k, hw, padding = case
    weight = torch.randn(c_out, c_in, k, k, generator=torch.Generator().manual_seed(c_out + k), dtype=F64)
    dense = dense_operator(lambda z: F.conv2d(z, weight, padding=padding), (1, c_in, *hw))
    expected = float(torch.linalg.svdvals(dense)[0])
    got = conv_norm_exact(weight, hw, padding, dense_limit=dense_limit)
    assert got.value == pytest.approx(expected, rel=1e-10)
    assert got.method == ("dense" if dense_limit else "lanczos")
    if got.method == "lanczos":
        assert 0 < got.steps <= c_in * hw[0] * hw[1] and got.residual <= EXACT_RTOL


def test_exact_norm_default_limit_picks_the_path_by_size() -> None:
    small = torch.randn(2, 2, 3, 3, dtype=F64)  # 2 x 8 x 8 = 128 entries per side
    assert conv_norm_exact(small, (8, 8), 1).method == "dense"
    assert conv_norm_exact(small, (16, 16), 1).method == "lanczos"  # 512 entries > EXACT_DENSE_LIMIT


def test_exact_norm_converges_where_power_iteration_falls_short() -> None:
    """A random 4-channel conv on 16x16: 50 block power iterations stop 8e-5 below the norm (its top singular values
    crowd around the peak of the frequency response); Lanczos meets the dense value."""
    weight = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    expected = zero_padded_norm(weight, (16, 16), 1)
    lower = conv_norm_lower_bound(weight, (16, 16), 1, n_iter=50)
    assert lower < expected * (1 - 1e-5)  # the case is hard for the power iteration
    got = conv_norm_exact(weight, (16, 16), 1, dense_limit=0)
    assert got.value == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("seed", range(8))
def test_lower_exact_upper_are_ordered_for_random_weights(seed: int) -> None:
    """lower <= exact <= upper (up to rounding), the lower bound cut short so that it is a strict bound."""
    generator = torch.Generator().manual_seed(seed)
    k = (1, 3, 5)[seed % 3]
    c_out, c_in = (int(c) for c in torch.randint(1, 6, (2,), generator=generator))
    weight = torch.randn(c_out, c_in, k, k, generator=generator, dtype=F64)
    hw, padding = (7, 6), k // 2
    exact = conv_norm_exact(weight, hw, padding, dense_limit=0).value
    lower = conv_norm_lower_bound(weight, hw, padding, n_iter=3)
    upper = conv_norm_upper_bound(weight, hw, padding, dense_limit=0)  # the circular grids, not the dense norm
    assert lower <= exact * (1 + 1e-12) and exact <= upper * (1 + 1e-12)
    assert exact == pytest.approx(zero_padded_norm(weight, hw, padding), rel=1e-10)


def test_exact_norm_of_a_zero_weight_and_an_unconverged_run() -> None:
    zero = conv_norm_exact(torch.zeros(2, 3, 3, 3, dtype=F64), (6, 6), 1, dense_limit=0)
    assert zero.value == 0.0 and zero.method == "lanczos"
    weight = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    with pytest.raises(RuntimeError, match="Lanczos did not reach"):  # 5 steps cannot meet 1e-10 here
        conv_norm_exact(weight, (16, 16), 1, dense_limit=0, max_steps=5)
    with pytest.raises(ValueError, match="does not fit"):
        conv_norm_exact(weight, (1, 1), 0)


@pytest.mark.parametrize("seed", range(6))
def test_every_certificate_is_strictly_above_the_exact_norm(seed: int) -> None:
    """A certificate covers the rounding of its own SVD: a 1x1 kernel's circular norm (exact in exact arithmetic)
    and a linear layer's SVD norm are raised by the margin, so the float64 value of the true norm never exceeds them."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 5, 1, 1, generator=gen, dtype=torch.float64)
    exact = dense_conv_norm(weight, (4, 4), 0)
    bound = conv_norm_upper_bound(weight, (4, 4), 0, dense_limit=0)  # the circular path only
    assert exact < bound <= exact * (1 + 2 * DENSE_MARGIN)
    linear = LipschitzLinear(5, 6, coeff=None)
    with torch.no_grad():
        linear.weight.copy_(weight[:, :, 0, 0].float())
    svd = float(torch.linalg.matrix_norm(linear.weight.detach().double(), ord=2))
    assert svd < layer_lipschitz_bound(linear) <= svd * (1 + 2 * DENSE_MARGIN)


# ------------------------------------------------------------------ the certificate's grids, from their definition

# (c_out, c_in, kh, kw, input_hw, padding): odd and rectangular inputs, non-square kernels, padding below, at and
# above k // 2 (with k = 1, p = 1 the output height H + 2p - kh + 1 is the binding constraint, not H + p).
GRID_CASES = [
    (3, 2, 3, 3, (4, 5), 1),
    (2, 3, 5, 5, (5, 7), 2),
    (2, 2, 3, 3, (6, 3), 1),
    (1, 2, 5, 5, (3, 4), 2),
    (2, 2, 3, 3, (5, 5), 2),
    (2, 2, 1, 1, (4, 3), 1),
    (2, 3, 3, 3, (4, 6), 0),
    (2, 2, 3, 5, (5, 4), 2),
]


def embedded_circular_conv(weight: Tensor, x: Tensor, grid: tuple[int, int], padding: int) -> Tensor:
    """Embed ``x`` at the top-left of an ``N_h x N_w`` grid, apply the circular convolution in
    :func:`conv_singular_values`' centred-tap convention (written out with rolls), and read zero-padded output ``o``
    off grid row ``o - p + kh // 2`` (mod ``N_h``), likewise in width: the construction the certificate rests on."""
    (n_h, n_w), (h, w), (kh, kw), p = grid, x.shape[-2:], weight.shape[-2:], padding
    grid_x = x.new_zeros(*x.shape[:-2], n_h, n_w)
    grid_x[..., :h, :w] = x
    out = 0
    for a in range(kh):
        for b in range(kw):  # y[i, j] += K[:, :, a, b] x[(i + a - kh//2) mod N_h, (j + b - kw//2) mod N_w]
            shifted = torch.roll(grid_x, shifts=(-(a - kh // 2), -(b - kw // 2)), dims=(-2, -1))
            out = out + torch.einsum("oc,bchw->bohw", weight[:, :, a, b], shifted)
    rows = (torch.arange(h + 2 * p - kh + 1) - p + kh // 2) % n_h
    cols = (torch.arange(w + 2 * p - kw + 1) - p + kw // 2) % n_w
    return out[..., rows[:, None], cols[None, :]]


def grid_is_valid(weight: Tensor, hw: tuple[int, int], padding: int, grid: tuple[int, int]) -> bool:
    """Is the zero-padded convolution (embed, circular convolution on ``grid``, restrict) with embedding and restriction
    of norm <= 1: the input fits, the outputs sit on distinct grid positions, and the values agree (random probes)?"""
    (kh, kw), p = weight.shape[-2:], padding
    if grid[0] < hw[0] or grid[1] < hw[1]:
        return False  # the input does not even fit
    if grid[0] < hw[0] + 2 * p - kh + 1 or grid[1] < hw[1] + 2 * p - kw + 1:
        return False  # two outputs would be read off one grid row: not a restriction (norm up to sqrt 2, not <= 1)
    x = torch.randn(3, weight.shape[1], *hw, generator=torch.Generator().manual_seed(7), dtype=F64)
    return torch.allclose(
        embedded_circular_conv(weight, x, grid, padding), F.conv2d(x, weight, padding=padding), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("case", GRID_CASES, ids=lambda c: f"{c[0]}to{c[1]}_k{c[2]}x{c[3]}_{c[4][0]}x{c[4][1]}_p{c[5]}")
def test_certificate_uses_exactly_the_valid_grids(case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every grid the certificate takes its minimum over is one on which the zero-padded convolution is a restriction
    of the circular one (checked by the construction itself, not by the size formula); the range starts at the least
    such size on each axis (one smaller is not valid) and ends at H + 2p; the bound is the margin times that minimum."""
    c_out, c_in, kh, kw, hw, p = case
    weight = torch.randn(c_out, c_in, kh, kw, generator=torch.Generator().manual_seed(c_in + kh), dtype=F64)
    grids: list[tuple[int, int]] = []
    values: list[float] = []
    original = sn.conv_singular_values

    def recording(w: Tensor, input_hw: tuple[int, int]) -> Tensor:
        grids.append(tuple(int(s) for s in input_hw))
        out = original(w, input_hw)
        values.append(float(out[0]))
        return out

    monkeypatch.setattr(sn, "conv_singular_values", recording)
    bound = sn.conv_norm_upper_bound(weight, hw, p, dense_limit=0)
    monkeypatch.undo()
    assert grids, "no circular grid was evaluated"
    for grid in grids:
        assert grid_is_valid(weight, hw, p, grid), f"grid {grid} does not contain the zero-padded operator"
    least_h, least_w = min(g[0] for g in grids), min(g[1] for g in grids)
    assert not grid_is_valid(weight, hw, p, (least_h - 1, least_w)), "the height range starts above the least valid"
    assert not grid_is_valid(weight, hw, p, (least_h, least_w - 1)), "the width range starts above the least valid"
    expected = {(n_h, n_w) for n_h in range(least_h, hw[0] + 2 * p + 1) for n_w in range(least_w, hw[1] + 2 * p + 1)}
    assert sorted(grids) == sorted(expected)
    assert bound == (1.0 + DENSE_MARGIN) * min(values)


@pytest.mark.parametrize("case", GRID_CASES, ids=lambda c: f"{c[0]}to{c[1]}_k{c[2]}x{c[3]}_{c[4][0]}x{c[4][1]}_p{c[5]}")
def test_circular_certificate_is_above_the_dense_svd_norm_for_random_kernels(case: tuple) -> None:
    """The circular certificate alone (no dense shortcut) is >= the exact norm from the dense operator's SVD, for 40
    random kernels per geometry: Gaussian, concentrated on the first tap row or column (the taps that wrap onto an
    input row when a grid is one size too small), or all of one sign. Measured: a height range started one too small
    under-estimates here for 2to2_k3x3_5x5_p2, a width range one too small for three geometries; the grid test above
    catches every such start exactly."""
    c_out, c_in, kh, kw, hw, p = case
    generator = torch.Generator().manual_seed(100 + kh * 10 + hw[0])
    for trial in range(40):
        weight = torch.randn(c_out, c_in, kh, kw, generator=generator, dtype=F64)
        if trial % 4 == 1:
            weight[:, :, 1:] *= 0.1  # energy in the first tap row: the one that wraps under a too-small grid
        elif trial % 4 == 2:
            weight[:, :, :, 1:] *= 0.1
        elif trial % 4 == 3:
            weight = weight.abs()  # all taps one sign: the peak response sits at frequency 0
        exact = float(
            torch.linalg.matrix_norm(
                dense_operator(lambda z, w=weight: F.conv2d(z, w, padding=p), (1, c_in, *hw)), ord=2
            )
        )
        bound = conv_norm_upper_bound(weight, hw, p, dense_limit=0)
        assert bound >= exact, (trial, bound, exact, bound / exact - 1)
