"""Log-det estimators against brute-force Jacobians, in float64 (Eq. 4, Algorithm 2, Theorems 3 and Lemma 7).

Three residual branches with known Lipschitz bounds (2-norm): a linear map ``x Aᵀ`` with ``‖A‖₂ = 0.5``, an MLP
``W2 elu(W1 x + b1) + b2`` with ``‖W_i‖₂ = 0.6`` (Lip <= 0.36) and a conv branch (C=2, 4x4, two 3x3 convs whose
dense operators have norm 0.6, ELU between; Lip <= 0.36). Statistical checks repeat one example R times in the
batch: every row draws its own probe, so the rows are independent samples whose spread gives the standard error.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from iresnet.blocks import conv_branch
from iresnet.logdet import (
    LogDetSettings,
    branch_jacobian,
    chain_truncation_bound,
    draw_probe,
    estimate_logdet,
    exact_logdet,
    hutchinson_traces,
    logdet_bounds,
    neumann_logdet,
    power_series_logdet,
    series_coefficients,
    truncation_bound,
    unbiased_logdet,
)
from tests.helpers import DTYPE, conv_operator_norm, randn, scaled_to_norm

ROWS = 4000  # Hutchinson samples for the statistical checks
Z = 4.0  # standard errors allowed


@dataclass(eq=False)  # hashable by identity, for functools.cache
class Case:
    """A residual branch ``g``, one input example ``x0: (1, *shape)`` and an upper bound on ``Lip(g)`` (2-norm)."""

    g: Callable[[Tensor], Tensor]
    x0: Tensor
    lipschitz: float
    params: list[Tensor]

    @property
    def dim(self) -> int:
        return self.x0[0].numel()

    def rows(self, n: int) -> Tensor:
        return self.x0.expand(n, *self.x0.shape[1:]).clone()


# Cases are built from their own generator and cached: identical in every test, whatever the order (the conv
# case's dense operator norms cost a few hundred ms to build). Nothing mutates them: gradients use autograd.grad.


@functools.cache
def linear_case() -> Case:
    gen = torch.Generator().manual_seed(10)
    a = scaled_to_norm(randn(gen, 4, 4), 0.5).requires_grad_(True)
    return Case(lambda x: x @ a.T, randn(gen, 1, 4), 0.5, [a])


@functools.cache
def mlp_case() -> Case:
    gen = torch.Generator().manual_seed(11)
    w1 = scaled_to_norm(randn(gen, 5, 3), 0.6).requires_grad_(True)
    b1 = (0.5 * randn(gen, 5)).requires_grad_(True)
    w2 = scaled_to_norm(randn(gen, 3, 5), 0.6).requires_grad_(True)
    b2 = (0.5 * randn(gen, 3)).requires_grad_(True)
    return Case(lambda x: F.elu(x @ w1.T + b1) @ w2.T + b2, randn(gen, 1, 3), 0.36, [w1, b1, w2, b2])


@functools.cache
def conv_case() -> Case:
    gen = torch.Generator().manual_seed(12)
    shape = (2, 4, 4)
    kernels = []
    for _ in range(2):
        k = randn(gen, 2, 2, 3, 3)
        kernels.append((k * (0.6 / conv_operator_norm(k, shape))).requires_grad_(True))
    k1, k2 = kernels
    return Case(
        lambda x: F.conv2d(F.elu(F.conv2d(x, k1, padding=1)), k2, padding=1), randn(gen, 1, *shape), 0.36, [k1, k2]
    )


CASES = {"linear": linear_case, "mlp": mlp_case, "conv": conv_case}


def jacobian_logdet(case: Case, x: Tensor) -> Tensor:
    """Reference: ``ln|det d(x + g(x))/dx|`` per example from torch.autograd.functional.jacobian."""
    out = []
    for xb in x:
        full = torch.autograd.functional.jacobian(lambda z: z + case.g(z.unsqueeze(0)).squeeze(0), xb, vectorize=True)
        out.append(torch.linalg.slogdet(full.reshape(xb.numel(), xb.numel())).logabsdet)
    return torch.stack(out)


def exact_value(case: Case) -> float:
    """``ln det(I + J_g(x0))`` from the dense Jacobian."""
    return float(torch.linalg.slogdet(torch.eye(case.dim, dtype=DTYPE) + dense_jacobian(case)).logabsdet)


@functools.cache
def dense_jacobian(case: Case) -> Tensor:
    """``J_g(x0)`` as a ``(d, d)`` matrix from torch.autograd.functional.jacobian."""
    d = case.dim
    jac = torch.autograd.functional.jacobian(lambda z: case.g(z.unsqueeze(0)).squeeze(0), case.x0[0], vectorize=True)
    return jac.detach().reshape(d, d)


def truncated_series(case: Case, n_terms: int) -> float:
    """``PS(J, n) = Σ_{k=1..n} (-1)^{k+1} tr(J^k) / k`` from the dense Jacobian (Eq. 4 truncated)."""
    jac = dense_jacobian(case)
    traces = [float(torch.trace(torch.linalg.matrix_power(jac, k))) for k in range(1, n_terms + 1)]
    return sum((-1) ** (k + 1) * trace / k for k, trace in enumerate(traces, start=1))


def series_matrix(case: Case, n_terms: int) -> Tensor:
    """``P_n(J) = Σ_{k=1..n} (-1)^{k+1} J^k / k`` as a dense ``(d, d)`` matrix, so that ``vᵀ P_n v`` is one
    Hutchinson sample of the truncated series exactly (float64)."""
    jac = dense_jacobian(case)
    out, power = torch.zeros_like(jac), torch.eye(case.dim, dtype=DTYPE)
    for k in range(1, n_terms + 1):
        power = power @ jac
        out = out + (-1) ** (k + 1) / k * power
    return out


# Per-sample oracle tolerance, relative to 1 + |vᵀ P_n v|: measured <= 7.7e-16 over the 24 cases below (float64
# round-off), while a series one term too long moves some sample by >= 1.1e-10 in every case (measured; the
# weakest is conv, n = 10). 1e-13 sits 130x above the one and 1000x below the other.
SAMPLE_RTOL = 1e-13


def mean_and_se(samples: Tensor) -> tuple[float, float]:
    return float(samples.mean()), float(samples.std() / math.sqrt(samples.shape[0]))


# --- exact -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_exact_logdet_equals_slogdet_of_autograd_jacobian(name: str) -> None:
    case = CASES[name]()
    x = torch.randn(3, *case.x0.shape[1:], dtype=DTYPE)
    gx, logdet = exact_logdet(case.g, x)
    assert logdet.shape == (3,)
    torch.testing.assert_close(gx, case.g(x), rtol=0, atol=1e-14)
    torch.testing.assert_close(logdet, jacobian_logdet(case, x), rtol=0, atol=1e-10)


def test_branch_jacobian_equals_autograd() -> None:
    torch.manual_seed(0)
    g = conv_branch(2, 4, (3, 3), coeff=0.8).double().eval()
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        gx, jac = branch_jacobian(g, x)
    assert not jac.requires_grad and jac.shape == (3, 18, 18)
    torch.testing.assert_close(gx, g(x), rtol=0, atol=1e-14)
    for b in range(3):
        expected = torch.autograd.functional.jacobian(lambda v: g(v.unsqueeze(0)).squeeze(0), x[b]).reshape(18, 18)
        torch.testing.assert_close(jac[b], expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("chunk", [1 << 21, 3 * 18 * 5])  # every row in one pass; 5 rows a pass (the last has 3)
def test_branch_jacobian_batched_passes_equal_one_pass_per_row(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Without gradients the rows come from batched backward passes; with them, one VJP per row: the same bytes."""
    monkeypatch.setattr("iresnet.logdet._JACOBIAN_CHUNK", chunk)
    torch.manual_seed(0)
    g = conv_branch(2, 4, (3, 3), coeff=0.8).double().eval()
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        _, batched = branch_jacobian(g, x)
    _, per_row = branch_jacobian(g, x)
    assert per_row.requires_grad and not batched.requires_grad
    assert torch.equal(batched, per_row.detach())


def test_series_coefficients_are_those_of_eq4() -> None:
    like = torch.zeros(1, dtype=torch.float64)
    assert series_coefficients(4, like).tolist() == [1.0, -1 / 2, 1 / 3, -1 / 4]
    assert series_coefficients(3, like.float()).dtype == torch.float32


def test_exact_logdet_of_linear_branch_is_slogdet_of_identity_plus_a() -> None:
    case = linear_case()
    (a,) = case.params
    _, logdet = exact_logdet(case.g, torch.randn(2, 4, dtype=DTYPE))
    expected = torch.linalg.slogdet(torch.eye(4, dtype=DTYPE) + a).logabsdet
    torch.testing.assert_close(logdet, expected.expand(2), rtol=0, atol=1e-12)


def test_exact_logdet_gradient_matches_closed_form() -> None:
    # d/dA ln det(I + A) = (I + A)^{-T}: the toy flows train through this gradient.
    case = linear_case()
    (a,) = case.params
    _, logdet = exact_logdet(case.g, torch.randn(2, 4, dtype=DTYPE))
    (grad,) = torch.autograd.grad(logdet.sum(), a)
    torch.testing.assert_close(grad, 2 * torch.linalg.inv(torch.eye(4, dtype=DTYPE) + a).T, rtol=0, atol=1e-12)


# --- truncated power series (Algorithm 2) -------------------------------------------------------------------------


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
@pytest.mark.parametrize("n_terms", [1, 2, 5, 10])
@pytest.mark.parametrize("name", CASES)
def test_power_series_mean_within_theorem3_bound(name: str, n_terms: int, probe: str) -> None:
    case = CASES[name]()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        _, samples = power_series_logdet(case.g, case.rows(ROWS), n_terms, generator=generator, probe=probe)
    mean, se = mean_and_se(samples)
    bias_bound = truncation_bound(case.lipschitz, case.dim, n_terms)
    assert abs(mean - exact_value(case)) <= bias_bound + Z * se, (mean, exact_value(case), bias_bound, se)
    # Sharper: Hutchinson is unbiased for the truncated series itself, PS(J, n) from the dense Jacobian.
    assert abs(mean - truncated_series(case, n_terms)) <= Z * se, (mean, truncated_series(case, n_terms), se)
    # Exact: with the probes replayed from the same generator, every sample is vᵀ P_n(J) v with the dense Jacobian
    # (the statistical checks above cannot tell n from n + 1 terms once the extra term is below their error).
    probes = draw_probe(case.rows(ROWS), torch.Generator().manual_seed(1), probe).reshape(ROWS, -1)
    oracle = ((probes @ series_matrix(case, n_terms).T) * probes).sum(dim=1)
    deviation = float(((samples - oracle).abs() / (1 + oracle.abs())).max())
    assert deviation <= SAMPLE_RTOL, deviation


@pytest.mark.parametrize("name", CASES)
def test_exact_traces_converge_within_theorem3_bound(name: str) -> None:
    # Basis vectors as probes give exact traces: Σ_i e_iᵀ J^k e_i = tr(J^k), so PS(J, n) is deterministic.
    # Row i of the batch is x0 with probe e_i, so one chain of VJPs serves all d basis vectors.
    case = CASES[name]()
    d = case.dim
    basis = torch.eye(d, dtype=DTYPE).reshape(1, d, *case.x0.shape[1:])
    with torch.no_grad():
        _, traces = hutchinson_traces(case.g, case.rows(d), basis, n_powers=30)
    traces = traces[0].sum(dim=0)  # (30,) = tr(J^k), k = 1..30
    jac = dense_jacobian(case)
    powers = torch.stack([torch.trace(torch.linalg.matrix_power(jac, k)) for k in range(1, 31)])
    torch.testing.assert_close(traces, powers, rtol=0, atol=1e-12)
    k = torch.arange(1, 31, dtype=DTYPE)
    partial_sums = torch.cumsum((-1) ** (k + 1) / k * traces, dim=0)
    exact = exact_value(case)
    for n in range(1, 31):
        # 1e-12: float64 round-off of the sums, far below the bound for every n used here (>= 1e-11 at n = 30).
        assert abs(float(partial_sums[n - 1]) - exact) <= truncation_bound(case.lipschitz, d, n) + 1e-12
    assert abs(float(partial_sums[-1]) - exact) <= 1e-8  # converged


def test_power_series_gradient_is_derivative_of_truncated_series() -> None:
    # With exact traces, d/dA Σ_{k<=n} (-1)^{k+1} tr(A^k)/k = Σ_{k<=n} (-1)^{k+1} (A^{k-1})ᵀ.
    case = linear_case()
    (a,) = case.params
    basis = torch.eye(4, dtype=DTYPE).reshape(4, 1, 4)
    n = 6
    _, traces = hutchinson_traces(case.g, case.x0, basis, n_powers=n)
    k = torch.arange(1, n + 1, dtype=DTYPE)
    series = (traces.sum(dim=0)[0] * (-1) ** (k + 1) / k).sum()
    (grad,) = torch.autograd.grad(series, a)
    expected = sum((-1) ** (j + 1) * torch.linalg.matrix_power(a.detach(), j - 1).T for j in range(1, n + 1))
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_power_series_averages_n_samples_probes_in_draw_order() -> None:
    case = mlp_case()
    x = torch.randn(3, 3, dtype=DTYPE)
    gx, logdet = power_series_logdet(case.g, x, 4, n_samples=8, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    probes = torch.stack([draw_probe(x, generator) for _ in range(8)])
    _, traces = hutchinson_traces(case.g, x, probes, n_powers=4)
    k = torch.arange(1, 5, dtype=DTYPE)
    expected = (traces @ ((-1) ** (k + 1) / k)).mean(dim=0)
    torch.testing.assert_close(logdet, expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(gx, case.g(x), rtol=0, atol=0)


# --- unbiased (Russian roulette) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_exact_terms", "p"), [(2, 0.5), (0, 0.3)])
@pytest.mark.parametrize("name", CASES)
def test_unbiased_mean_within_four_standard_errors(name: str, n_exact_terms: int, p: float) -> None:
    case = CASES[name]()
    assert case.lipschitz**2 < 1 - p  # finite variance, so the standard error means something
    with torch.no_grad():
        _, samples = unbiased_logdet(
            case.g, case.rows(ROWS), n_exact_terms, p, generator=torch.Generator().manual_seed(2)
        )
    mean, se = mean_and_se(samples)
    assert abs(mean - exact_value(case)) <= Z * se, (mean, exact_value(case), se)


# --- Neumann gradient ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_neumann_value_equals_power_series_value(name: str) -> None:
    case = CASES[name]()
    x = torch.randn(3, *case.x0.shape[1:], dtype=DTYPE)
    _, series = power_series_logdet(case.g, x, 7, n_samples=2, generator=torch.Generator().manual_seed(3))
    gx, value = neumann_logdet(case.g, x, 7, n_samples=2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(value, series, rtol=0, atol=1e-13)
    torch.testing.assert_close(gx, case.g(x), rtol=0, atol=0)
    assert value.requires_grad


def _per_row_linear(rows: int) -> tuple[Callable[[Tensor], Tensor], list[Tensor], list[Tensor], Tensor]:
    """Linear branch with a private copy of A per batch row, so each row's gradient is one probe's sample."""
    case = linear_case()
    (a,) = case.params
    a_rows = a.detach().expand(rows, 4, 4).clone().requires_grad_(True)
    exact = [torch.linalg.inv(torch.eye(4, dtype=DTYPE) + a.detach()).T]  # d/dA ln det(I + A)
    return lambda x: (a_rows @ x.unsqueeze(-1)).squeeze(-1), [a_rows], exact, case.rows(rows)


def _per_row_mlp(rows: int) -> tuple[Callable[[Tensor], Tensor], list[Tensor], list[Tensor], Tensor]:
    """MLP branch with per-row parameter copies; the per-row gradient w.r.t. x is tested too."""
    case = mlp_case()
    x0 = case.x0.clone().requires_grad_(True)
    _, logdet = exact_logdet(case.g, x0)
    exact = [
        torch.zeros_like(t) if grad is None else grad
        for t, grad in zip(case.params + [x0], torch.autograd.grad(logdet.sum(), case.params + [x0], allow_unused=True))
    ]
    exact[-1] = exact[-1][0]
    copies = [t.detach().expand(rows, *t.shape).clone().requires_grad_(True) for t in case.params]
    w1, b1, w2, b2 = copies
    x = case.rows(rows).requires_grad_(True)

    def g(z: Tensor) -> Tensor:
        hidden = F.elu((w1 @ z.unsqueeze(-1)).squeeze(-1) + b1)
        return (w2 @ hidden.unsqueeze(-1)).squeeze(-1) + b2

    return g, copies + [x], exact, x


@pytest.mark.parametrize("builder", [_per_row_linear, _per_row_mlp], ids=["linear", "mlp"])
def test_neumann_gradient_expectation_matches_exact_gradient(builder: Callable) -> None:
    # n = 30 terms: the Neumann truncation bias of the expected gradient is O(Lip^30) <= 0.5^30 / 0.5 ≈ 2e-9 ·
    # ‖dJ‖, far below the standard errors measured here (>= 1e-3), so only sampling error remains.
    g, leaves, exact, x = builder(ROWS)
    _, logdet = neumann_logdet(g, x, 30, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(logdet.sum(), leaves, allow_unused=True, materialize_grads=True)
    largest_se = 0.0
    for grad, target in zip(grads, exact):
        mean = grad.mean(dim=0)
        se = grad.std(dim=0) / math.sqrt(ROWS)
        # 1e-12: float64 round-off where J does not depend on the parameter (gradient and spread exactly 0).
        assert torch.all((mean - target).abs() <= Z * se + 1e-12), ((mean - target).abs() / se).max()
        largest_se = max(largest_se, float(se.max()))
    # The comparison is informative: the sampling error resolves the gradient to a few percent of its scale.
    assert largest_se <= 0.05 * max(float(t.abs().max()) for t in exact)


# --- gradients, no_grad, dispatch ----------------------------------------------------------------------------------

GRAD_SETTINGS = [
    LogDetSettings("series", n_terms=4, n_samples=2),
    LogDetSettings("series", n_terms=3, probe="rademacher"),
    LogDetSettings("unbiased", n_samples=2),
    LogDetSettings("neumann", n_terms=4, n_samples=2),
    LogDetSettings("exact"),
]


@pytest.mark.parametrize("settings", GRAD_SETTINGS, ids=lambda s: f"{s.estimator}-{s.probe}")
@pytest.mark.parametrize("name", CASES)
def test_estimators_reach_parameters_and_input(name: str, settings: LogDetSettings) -> None:
    case = CASES[name]()
    x = torch.randn(2, *case.x0.shape[1:], dtype=DTYPE, requires_grad=True)
    gx, logdet = estimate_logdet(case.g, x, settings, torch.Generator().manual_seed(6))
    assert gx.shape == x.shape and logdet.shape == (2,)
    # J_g does not depend on x for the linear branch, nor on b2 of the MLP (a shift): no log-det gradient there.
    leaves = case.params + ([] if name == "linear" else [x])
    if name == "mlp":
        leaves = [t for t in leaves if t is not case.params[3]]
    grads = torch.autograd.grad(logdet.sum(), leaves, allow_unused=True)
    for grad in grads:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0


@pytest.mark.parametrize("settings", GRAD_SETTINGS, ids=lambda s: f"{s.estimator}-{s.probe}")
def test_estimators_under_no_grad_give_same_detached_values(settings: LogDetSettings) -> None:
    case = mlp_case()
    x = torch.randn(3, 3, dtype=DTYPE, requires_grad=True)
    gx, logdet = estimate_logdet(case.g, x, settings, torch.Generator().manual_seed(7))
    with torch.no_grad():
        gx_eval, logdet_eval = estimate_logdet(case.g, x, settings, torch.Generator().manual_seed(7))
    assert not gx_eval.requires_grad and not logdet_eval.requires_grad
    torch.testing.assert_close(logdet_eval, logdet.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(gx_eval, gx.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("function", ["series", "unbiased", "exact"])
def test_differentiable_estimators_pass_gradcheck(function: str) -> None:
    # The gradient of a fixed draw (same seed each call) is the derivative of that draw's value.
    w = scaled_to_norm(torch.randn(3, 3, dtype=DTYPE), 0.5)

    def value(weight: Tensor, x: Tensor) -> Tensor:
        def g(z: Tensor) -> Tensor:
            return torch.tanh(z @ weight.T)

        generator = torch.Generator().manual_seed(8)
        if function == "series":
            return power_series_logdet(g, x, 4, n_samples=2, generator=generator)[1]
        if function == "unbiased":
            return unbiased_logdet(g, x, generator=generator)[1]
        return exact_logdet(g, x)[1]

    x = torch.randn(2, 3, dtype=DTYPE)
    assert torch.autograd.gradcheck(value, (w.requires_grad_(True), x.requires_grad_(True)))


def test_estimate_logdet_dispatches_to_each_estimator() -> None:
    case = conv_case()
    x = torch.randn(2, *case.x0.shape[1:], dtype=DTYPE)
    seed = 9
    direct = {
        "series": power_series_logdet(case.g, x, 3, 2, torch.Generator().manual_seed(seed), "rademacher"),
        "unbiased": unbiased_logdet(case.g, x, 1, 0.4, 2, torch.Generator().manual_seed(seed), "rademacher"),
        "neumann": neumann_logdet(case.g, x, 3, 2, torch.Generator().manual_seed(seed), "rademacher"),
        "exact": exact_logdet(case.g, x),
        "none": (case.g(x), torch.zeros(2, dtype=DTYPE)),
    }
    for estimator, (gx_ref, logdet_ref) in direct.items():
        settings = LogDetSettings(estimator, n_terms=3, n_samples=2, probe="rademacher", n_exact_terms=1, p=0.4)
        gx, logdet = estimate_logdet(case.g, x, settings, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
        torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"estimator": "hutchinson"}, "estimator"),
        ({"probe": "uniform"}, "probe"),
        ({"n_terms": 0}, "n_terms"),
        ({"n_terms": 2.0}, "n_terms"),
        ({"n_samples": 0}, "n_samples"),
        ({"n_exact_terms": -1}, "n_exact_terms"),
        ({"p": 0.0}, "p"),
        ({"p": 1.0}, "p"),
    ],
)
def test_settings_reject_bad_values_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"LogDetSettings\.{field} must"):
        LogDetSettings(**kwargs)


def test_bad_inputs_raise_clear_errors() -> None:
    x = torch.randn(2, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match="same shape"):
        power_series_logdet(lambda z: z[:, :2], x, 2)
    with pytest.raises(ValueError, match=r"\(B, \*shape\)"):
        exact_logdet(lambda z: z, torch.randn(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="probe must be one of"):
        neumann_logdet(lambda z: z, x, 2, probe="sobol")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_terms must be an integer >= 1"):
        power_series_logdet(lambda z: z, x, 0)
    with pytest.raises(ValueError, match="probes must have shape"):
        hutchinson_traces(lambda z: z, x, torch.randn(2, 3, dtype=DTYPE), 2)


def test_inference_mode_is_refused_but_its_tensors_are_accepted() -> None:
    case = mlp_case()
    with torch.inference_mode():
        x = torch.randn(2, 3, dtype=DTYPE)
        with pytest.raises(RuntimeError, match="torch.no_grad"):
            power_series_logdet(case.g, x, 2)
    with torch.no_grad():
        _, logdet = exact_logdet(case.g, x)
    torch.testing.assert_close(logdet, jacobian_logdet(case, x.clone()), rtol=0, atol=1e-10)


def test_rademacher_probes_are_signs() -> None:
    v = draw_probe(torch.zeros(50, 4, dtype=DTYPE), torch.Generator().manual_seed(0), "rademacher")
    assert set(v.unique().tolist()) == {-1.0, 1.0}


# --- bounds ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lipschitz", "n_terms"), [(0.3, 1), (0.5, 5), (0.9, 10), (0.99, 3), (0.0, 4)])
def test_truncation_bound_matches_theorem3_formula(lipschitz: float, n_terms: int) -> None:
    formula = -7 * (math.log(1 - lipschitz) + sum(lipschitz**k / k for k in range(1, n_terms + 1)))
    assert truncation_bound(lipschitz, 7, n_terms) == pytest.approx(formula, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("lipschitz", "n_terms"), [(0.5, 60), (0.1, 20), (0.9, 400)])
def test_truncation_bound_tail_is_accurate_where_the_formula_cancels(lipschitz: float, n_terms: int) -> None:
    # The tail Σ_{k>n} L^k/k lies between its first term and first term / (1 - L).
    first = lipschitz ** (n_terms + 1) / (n_terms + 1)
    bound = truncation_bound(lipschitz, 3, n_terms)
    assert 3 * first <= bound <= 3 * first / (1 - lipschitz)
    assert truncation_bound(lipschitz, 3, n_terms + 1) < bound


def test_truncation_bound_rejects_non_contractive_lipschitz() -> None:
    with pytest.raises(ValueError, match=r"lipschitz must lie in \[0, 1\)"):
        truncation_bound(1.0, 3, 5)
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        truncation_bound(0.5, 0, 5)


def test_lemma7_bounds_contain_exact_logdet_of_a_chain() -> None:
    d = 4
    a1 = scaled_to_norm(torch.randn(d, d, dtype=DTYPE), 0.7)
    a2 = scaled_to_norm(torch.randn(d, d, dtype=DTYPE), 0.4)
    eye = torch.eye(d, dtype=DTYPE)
    exact = float(torch.linalg.slogdet((eye + a2) @ (eye + a1)).logabsdet)
    lower, upper = logdet_bounds([0.7, 0.4], d)
    assert lower == pytest.approx(d * (math.log(0.3) + math.log(0.6)), rel=1e-14)
    assert upper == pytest.approx(d * (math.log(1.7) + math.log(1.4)), rel=1e-14)
    assert lower <= exact <= upper
    case = mlp_case()
    _, logdet = exact_logdet(case.g, torch.randn(50, 3, dtype=DTYPE))
    lower, upper = logdet_bounds([case.lipschitz], 3)
    assert torch.all((lower <= logdet) & (logdet <= upper))
    with pytest.raises(ValueError, match=r"lipschitz\[1\] must lie in \[0, 1\)"):
        logdet_bounds([0.5, 1.2], d)


def test_chain_bounds_with_a_dimension_per_block() -> None:
    """Blocks on inputs of different sizes (a multiscale flow): each block counts with its own d_t."""
    lips, dims = [0.7, 0.4, 0.2], [8, 4, 2]
    lower, upper = logdet_bounds(lips, dims)
    singles = [logdet_bounds([lip], d) for lip, d in zip(lips, dims)]
    assert lower == pytest.approx(sum(lo for lo, _ in singles), rel=1e-14)
    assert upper == pytest.approx(sum(up for _, up in singles), rel=1e-14)
    assert logdet_bounds(lips, 4) == pytest.approx(logdet_bounds(lips, [4, 4, 4]), rel=1e-14)
    for n in (0, 3, 12):
        expected = sum(truncation_bound(lip, d, n) for lip, d in zip(lips, dims))
        assert chain_truncation_bound(lips, dims, n) == pytest.approx(expected, rel=1e-14)
    assert chain_truncation_bound([0.5, 1.0], [8, 4], 5) == math.inf  # Theorem 3 needs every L_t < 1
    with pytest.raises(ValueError, match="one dimension per block: got 3 Lipschitz bounds for 2 dims"):
        logdet_bounds(lips, [8, 4])
    with pytest.raises(ValueError, match=r"dims\[1\] must be an integer >= 1"):
        logdet_bounds(lips, [8, 0, 2])
