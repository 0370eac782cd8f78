"""The toy flows' closed-form log-det and stacked training against brute force (float64, tiny shapes).

* :func:`iresnet.toy.mlp_logdet` (forward-mode Jacobian, hand-written backward) against ``slogdet`` of the autograd
  Jacobian: values, and gradients with respect to the input and every parameter;
* :class:`iresnet.toy.ToyResidualBlock` against the library's brute-force ``exact_logdet`` on the same branch, the
  same spectral normalisation as before, and its inverse;
* :class:`iresnet.toy.StackedToyIResNet` / :class:`iresnet.toy.StackedToyGlow` against the separate flows they stack:
  log-densities, gradients, and the state after a few Adam steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from iresnet.blocks import InvertibleResidualBlock, set_inverse_settings
from iresnet.inverse import InverseSettings
from iresnet.logdet import exact_logdet
from iresnet.spectral_norm import LipschitzLinear
from iresnet.toy import (
    ACTIVATIONS,
    Flow2d,
    StackedToyGlow,
    StackedToyIResNet,
    ToyResidualBlock,
    mlp_logdet,
    normalised_weight,
    power_iterate,
    toy_glow,
    toy_iresnet,
)

PHI: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": torch.nn.functional.elu,
    "softplus": torch.nn.functional.softplus,
    "relu": torch.relu,
}


def _random_mlps(m: int, widths: list[int], generator: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    """``m`` stacked MLPs with the given widths: weights ``(m, out, in)`` and biases ``(m, out)`` that require grad."""
    weights = [
        (torch.randn(m, o, i, generator=generator, dtype=torch.float64) / i**0.5).requires_grad_()
        for i, o in zip(widths[:-1], widths[1:])
    ]
    biases = [(0.3 * torch.randn(m, o, generator=generator, dtype=torch.float64)).requires_grad_() for o in widths[1:]]
    return weights, biases


def _reference(x: Tensor, weights: list[Tensor], biases: list[Tensor], nonlin: str) -> tuple[Tensor, Tensor]:
    """``g(x)`` and ``ln|det(I + J_g)|`` from autograd's Jacobian of each example, twice differentiable."""

    def g(v: Tensor, m: int) -> Tensor:
        for k, (w, b) in enumerate(zip(weights, biases)):
            v = (PHI[nonlin](v) if k > 0 else v) @ w[m].T + b[m]
        return v

    values, logdets = [], []
    for m in range(x.shape[0]):
        values.append(g(x[m], m))
        jac = torch.stack(
            [torch.autograd.functional.jacobian(lambda v, m=m: g(v[None], m)[0], xb, create_graph=True) for xb in x[m]]
        )
        logdets.append(torch.linalg.slogdet(torch.eye(2, dtype=x.dtype) + jac).logabsdet)
    return torch.stack(values), torch.stack(logdets)


@pytest.mark.parametrize("nonlin", sorted(ACTIVATIONS))
@pytest.mark.parametrize("widths", [[2, 6, 2], [2, 6, 5, 6, 2]])
def test_mlp_logdet_values_and_gradients_equal_brute_force(nonlin: str, widths: list[int]) -> None:
    generator = torch.Generator().manual_seed(0)
    weights, biases = _random_mlps(2, widths, generator)
    x = torch.randn(2, 5, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    probe_g = torch.randn(2, 5, 2, generator=generator, dtype=torch.float64)
    probe_l = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    params = [x, *weights, *biases]
    results = []
    for fn in (mlp_logdet, _reference):
        gx, logdet = fn(x, weights, biases, nonlin)
        grads = torch.autograd.grad((gx * probe_g).sum() + (logdet * probe_l).sum(), params)
        results.append((gx, logdet, grads))
    (gx, logdet, grads), (gx_ref, logdet_ref, grads_ref) = results
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=1e-12)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10)


def test_mlp_logdet_passes_gradcheck() -> None:
    generator = torch.Generator().manual_seed(1)
    weights, biases = _random_mlps(2, [2, 4, 4, 2], generator)
    x = torch.randn(2, 3, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: mlp_logdet(x, p[:3], p[3:], "elu"), (x, *weights, *biases))


def test_mlp_logdet_rejects_other_dimensions() -> None:
    weights, biases = _random_mlps(1, [3, 4, 3], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="2-D MLP branches"):
        mlp_logdet(torch.zeros(1, 2, 3, dtype=torch.float64), weights, biases, "elu")


def _perturbed_block(nonlin: str = "elu") -> ToyResidualBlock:
    torch.manual_seed(0)
    flow = toy_iresnet(n_blocks=1, hidden=8, n_hidden_layers=3, coeff=0.9, nonlin=nonlin).double()
    return flow.transform.layers[0]


@pytest.mark.parametrize("nonlin", ["elu", "sorting"])  # sorting has no elementwise slope: autograd fallback
def test_toy_block_equals_exact_logdet(nonlin: str) -> None:
    """Same value and parameter gradients as the brute-force ``exact_logdet`` on the same branch (eval mode)."""
    block = _perturbed_block(nonlin).eval()
    x = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    y, logdet = block(x)
    gx, logdet_ref = exact_logdet(block.g, x)
    torch.testing.assert_close(y, x + gx, rtol=0, atol=1e-13)
    torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=1e-13)
    params = [x, *block.parameters()]
    grads = torch.autograd.grad(y.sum() + logdet.sum(), params)
    grads_ref = torch.autograd.grad((x + gx).sum() + logdet_ref.sum(), params)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-12)


def test_toy_block_spectral_normalisation_is_unchanged() -> None:
    """In training mode each forward runs the layers' power iteration once and uses the same Eq. 2 weights as the
    library block did (``InvertibleResidualBlock`` with ``exact_logdet``), step after step."""
    block = _perturbed_block().train()
    reference = copy.deepcopy(block)
    x = torch.randn(6, 2, dtype=torch.float64)
    for _ in range(3):
        y, logdet = block(x)
        y_ref, logdet_ref = InvertibleResidualBlock.forward(reference, x)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-13)
        torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=1e-13)
        for name, buffer in block.named_buffers():
            torch.testing.assert_close(buffer, reference.get_buffer(name), rtol=0, atol=0)


def test_toy_iresnet_inverse_and_sampling() -> None:
    torch.manual_seed(0)
    flow = toy_iresnet(n_blocks=3, hidden=8).double()
    set_inverse_settings(flow, InverseSettings(max_iter=500, atol=1e-13))
    flow.train()
    flow.log_prob(torch.randn(64, 2, dtype=torch.float64))  # ActNorm initialisation
    flow.eval()
    x = torch.randn(9, 2, dtype=torch.float64)
    with torch.no_grad():
        z, _ = flow.transform(x)
        torch.testing.assert_close(flow.transform.inverse(z), x, rtol=0, atol=1e-10)
    assert flow.sample(5).shape == (5, 2)


def _flows(make: Callable[[], Flow2d], m: int) -> list[Flow2d]:
    flows = []
    for seed in range(m):
        torch.manual_seed(seed)
        flows.append(make().double())
    return flows


def _perturb(flows: list[Flow2d]) -> None:
    """Move the Glow couplings off their zero (identity) initialisation so every parameter matters."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for flow in flows:
            for p in flow.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.mark.parametrize(
    ("make", "stack_type"),
    [
        (lambda: toy_iresnet(n_blocks=3, hidden=8), StackedToyIResNet),
        (lambda: toy_glow(n_layers=3, hidden=8), StackedToyGlow),
        (lambda: toy_glow(n_layers=3, hidden=8, scale_cap=False), StackedToyGlow),
    ],
)
def test_stacked_training_equals_separate_training(make: Callable[[], Flow2d], stack_type: type) -> None:
    """Three flows trained as one stack end in the same state as each trained alone on its own data: log-densities,
    gradients, ActNorm initialisation, power iteration and all.

    Plain SGD, so that the final states can be compared to rounding: an elementwise optimiser such as Adam is the
    same over stacked parameters as per model, but its division by ``sqrt(v)`` magnifies rounding differences of
    near-zero gradients far beyond them.
    """
    m, steps = 3, 4
    separate = _flows(make, m)
    _perturb(separate)
    stacked_flows = copy.deepcopy(separate)
    stack = stack_type(stacked_flows)
    optimisers = [torch.optim.SGD(f.parameters(), lr=1e-2) for f in separate]
    stack_optimiser = torch.optim.SGD(stack.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(m, 16, 2, generator=generator, dtype=torch.float64) * 2
        losses = torch.stack([-f.log_prob(xm).mean() for f, xm in zip(separate, x)])
        for opt in optimisers:
            opt.zero_grad()
        losses.sum().backward()
        for opt in optimisers:
            opt.step()
        stacked_losses = -stack.log_prob(x).mean(dim=1)
        stack_optimiser.zero_grad()
        stacked_losses.sum().backward()
        stack_optimiser.step()
        torch.testing.assert_close(stacked_losses, losses, rtol=0, atol=1e-12)
    stack.write_to(stacked_flows)
    for flow, reference in zip(stacked_flows, separate):
        state, state_ref = flow.state_dict(), reference.state_dict()
        assert state.keys() == state_ref.keys()
        for key in state:
            torch.testing.assert_close(state[key], state_ref[key], rtol=0, atol=1e-12, msg=key)


def test_glow_scale_cap_bounds_each_coupling_logdet() -> None:
    """With the cap every coupling's log-scale is ``tanh(s)`` (``|s| < 1``); without it the network's raw ``s``."""
    flows = _flows(lambda: toy_glow(n_layers=1, hidden=8), 1) + _flows(lambda: toy_glow(1, 8, scale_cap=False), 1)
    flows[1].load_state_dict(flows[0].state_dict())
    with torch.no_grad():
        for flow in flows:
            flow.transform.layers[2].net[-1].bias.copy_(torch.tensor([3.0, 0.0]))  # s = 3 for every input
    x = torch.randn(8, 2, dtype=torch.float64)
    (_, capped), (_, raw) = (flow.transform.layers[2](x) for flow in flows)
    torch.testing.assert_close(capped, torch.full_like(capped, math.tanh(3.0)))
    torch.testing.assert_close(raw, torch.full_like(raw, 3.0))
    for flow in flows:
        torch.testing.assert_close(flow.transform.inverse(flow.transform(x)[0]), x)
    stacks = [StackedToyGlow([flow]) for flow in flows]
    for stack, flow in zip(stacks, flows):
        stack.actnorms.initialized.fill_(True)
        flow.transform.layers[0].initialized.fill_(True)
        torch.testing.assert_close(stack.log_prob(x.unsqueeze(0))[0], flow.log_prob(x))
    with pytest.raises(ValueError, match="same architecture"):
        StackedToyGlow(flows)


def test_stacked_iresnet_needs_an_elementwise_nonlinearity() -> None:
    with pytest.raises(ValueError, match="elementwise nonlinearity"):
        StackedToyIResNet([toy_iresnet(n_blocks=1, hidden=8, nonlin="sorting")])


def test_stacking_needs_one_architecture() -> None:
    with pytest.raises(ValueError, match="same architecture"):
        StackedToyIResNet([toy_iresnet(n_blocks=1, hidden=8), toy_iresnet(n_blocks=2, hidden=8)])


def test_spectral_normalisation_of_the_stack_is_per_model() -> None:
    """Each model's weights are normalised with its own power iteration, as its ``LipschitzLinear`` layers do."""
    flows = _flows(lambda: toy_iresnet(n_blocks=2, hidden=8), 2)
    reference = copy.deepcopy(flows)
    stack = StackedToyIResNet(flows).train()
    weights = stack.mlps.forward_weights()
    for m, flow in enumerate(reference):
        layers = [layer for layer in flow.modules() if isinstance(layer, LipschitzLinear)]
        per_block = len(stack.mlps.weights)
        for i, layer in enumerate(layers):
            expected = layer.train()._forward_weight()
            torch.testing.assert_close(weights[i % per_block][m, i // per_block], expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("coeff", [0.9, 50.0])  # σ > c (scaled down, gradient through σ) and σ < c (unchanged)
def test_normalised_weight_and_its_gradient_equal_autograd_of_eq_2(coeff: float) -> None:
    """The hand-written backward of Eq. 2 for stacked weights equals autograd of ``W / max(1, uᵀ W v / c)`` (its
    matrix-vector form); the power iteration's σ is ``uᵀ W v``."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 2, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    u, v = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    u, v, sigma = power_iterate(weight, u, v, 3)
    grad = torch.randn(3, 2, 5, 4, generator=generator, dtype=torch.float64)
    ours = normalised_weight(weight, u, v, coeff)
    (ours * grad).sum().backward()
    ours_grad, weight.grad = weight.grad, None
    reference = (
        weight / torch.clamp((u * (weight @ v.unsqueeze(-1)).squeeze(-1)).sum(-1) / coeff, min=1.0)[..., None, None]
    )
    (reference * grad).sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-14, atol=0)
    torch.testing.assert_close(ours_grad, weight.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sigma, (u * (weight.detach() @ v.unsqueeze(-1)).squeeze(-1)).sum(-1), rtol=1e-14, atol=0)
    assert (sigma > 0.9).all() and bool((sigma > coeff).all()) == (coeff < 1)
