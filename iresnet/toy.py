"""2-D toy flows of Fig. 2 (App. C.3): an i-ResNet flow with exact log-det and a Glow-style coupling baseline.

The exact log-det of a block ``x + g(x)`` on ``R^2`` (Eq. 3 without truncation) needs the 2x2 Jacobian ``J_g(x)``.
Instead of building it from vector-Jacobian products with ``create_graph`` (second-order autograd when training,
:func:`iresnet.logdet.exact_logdet`), :func:`mlp_logdet` carries the two Jacobian columns through the MLP together
with the value (forward mode by hand: ``J <- W J`` at a linear layer, ``J <- φ'(z) ⊙ J`` at a nonlinearity), takes
``ln|(1 + a)(1 + e) - b c|`` for ``J = [[a, b], [c, e]]``, and backpropagates through that by a hand-written
first-order backward pass.

On a problem this small the cost of a step is mostly per-op overhead and memory traffic, not arithmetic, so the same
code runs ``M`` models at once: weights carry a leading model axis (``(M, out, in)``, batched matrix products).
:class:`StackedToyIResNet` and :class:`StackedToyGlow` hold ``M`` independent flows of one shape as stacked
parameters (each with its own spectral normalisation and ActNorm initialisation) to train them as one model;
``write_to`` copies the result back into the ordinary per-model :class:`Flow2d` modules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from iresnet.base import Invertible, InvertibleSequential
from iresnet.blocks import InvertibleResidualBlock, mlp_branch
from iresnet.layers import ELU, ActNorm
from iresnet.logdet import LogDetSettings
from iresnet.priors import standard_normal_logprob
from iresnet.spectral_norm import LipschitzLinear

__all__ = [
    "ACTIVATIONS",
    "AffineCoupling",
    "Flow2d",
    "InvertibleLinear",
    "StackedToyGlow",
    "StackedToyIResNet",
    "ToyResidualBlock",
    "mlp_logdet",
    "normalised_weight",
    "power_iterate",
    "stacked_mlp",
    "toy_glow",
    "toy_iresnet",
]

_EPS = 1e-12  # as iresnet.spectral_norm: guards the normalisation of an all-zero power-iteration probe
_LOG_2PI = math.log(2 * math.pi)


# --- elementwise nonlinearities with their first and second derivatives ---------------------------------------


def _elu_(z: Tensor, curvature: bool = True) -> tuple[Tensor, Tensor | None]:
    negative = z < 0 if curvature else None  # ELU'' / ELU' = 1 for z < 0, 0 for z > 0
    slope = z.clamp_max(0.0).exp_()  # ELU'(z): exp(z) for z < 0, 1 for z >= 0
    torch.maximum(z, slope - 1.0, out=z)  # ELU(z): e^z - 1 > z for z < 0, and slope - 1 = 0 for z >= 0
    return slope, negative


def _softplus_(z: Tensor, curvature: bool = True) -> tuple[Tensor, Tensor | None]:
    slope = torch.sigmoid(z)
    tail = z.abs().neg_().exp_().add_(1.0).log_()  # softplus(z) = relu(z) + ln(1 + e^{-|z|}), stable for large |z|
    z.relu_().add_(tail)
    return slope, (1.0 - slope) if curvature else None  # σ' / σ = 1 - σ


def _relu_(z: Tensor, curvature: bool = True) -> tuple[Tensor, Tensor | None]:
    slope = (z > 0).to(z.dtype)
    z.relu_()
    return slope, None  # ReLU'' = 0


ACTIVATIONS: dict[str, Callable[..., tuple[Tensor, Tensor | None]]] = {
    "elu": _elu_,
    "softplus": _softplus_,
    "relu": _relu_,
}
"""Nonlinearities (by the names of :func:`iresnet.layers.make_nonlinearity`) that act elementwise, so the Jacobian of
an MLP follows in closed form. Each overwrites ``z`` with ``φ(z)`` (the activations are large, and a fresh tensor
per op costs more than the arithmetic) and returns ``φ'(z)`` and the factor ``φ''(z) / φ'(z)`` (``None`` when 0, or
when called with ``curvature=False``): the log-det's gradient needs ``φ''``, and as a ratio it applies to the tangents
after the nonlinearity; a plain MLP's backward pass needs only ``φ'``. The others
("sorting", "lipswish") fall back to autograd."""


# --- an MLP branch with its exact 2-D log-det, forward mode alongside the value --------------------------------


def mlp_logdet(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], nonlin: str) -> tuple[Tensor, Tensor]:
    """``g(x)`` and ``ln|det(I + J_g(x))|`` (Eq. 3, exact) for ``M`` MLPs ``g = W_L ∘ φ ∘ ... ∘ φ ∘ W_1`` on ``R^2``.

    The two Jacobian columns travel through the MLP with the value (forward mode): the tangent of the first
    pre-activation with respect to ``x_j`` is column j of ``W_1`` for every example, then ``J <- φ'(z) ⊙ J`` at a
    nonlinearity and ``J <- W J`` at a linear layer; for ``J = [[a, b], [c, e]]``,
    ``det(I + J) = (1 + a)(1 + e) - b c`` (positive when ``‖J‖₂ < 1``). The backward pass is written out by hand
    (:class:`_MLPLogDet`): first-order only, and value and tangents share one matrix product per layer.
    Shapes: ``x: (M, B, 2)``, ``weights[l]: (M, out_l, in_l)``, ``biases[l]: (M, out_l)`` (``M`` independent
    models; ``M = 1`` for one) -> ``(g(x): (M, B, 2), logdet: (M, B))``. Not twice differentiable.
    """
    if x.ndim != 3 or x.shape[-1] != 2 or weights[0].shape[-1] != 2 or weights[-1].shape[-2] != 2:
        raise ValueError(f"mlp_logdet is for 2-D MLP branches on (M, B, 2) inputs, got x of shape {tuple(x.shape)}")
    if len(weights) < 2 or len(weights) != len(biases):
        raise ValueError("mlp_logdet needs at least two linear layers, each with a bias")
    return _MLPLogDet.apply(x, nonlin, *weights, *biases)


class _MLPLogDet(torch.autograd.Function):
    """Forward and hand-written backward of :func:`mlp_logdet`.

    Layout: after nonlinearity k, ``Y_k = (M, 3, B, H)`` holds the activations ``φ(z_k)`` (row 0) and the tangent
    columns ``T_k = s_k ⊙ U_k`` (rows 1, 2; ``s_k = φ'(z_k)``, ``U_k`` the tangents of ``z_k``), so one batched
    product ``Y_k W^T`` advances all three rows; the backward pass mirrors it with one product for the weight gradient
    and one for the input gradient per layer, and
    ``Ū_k = s_k ⊙ T̄_k``, ``z̄_k = s_k ⊙ ā_k + (φ''/φ')(z_k) ⊙ Σ_j T̄_kj ⊙ T_kj`` (no need to keep ``U_k``).
    Work happens in place where a tensor is not needed again: allocations cost more than the arithmetic here.
    """

    @staticmethod
    def forward(ctx, x: Tensor, nonlin: str, *params: Tensor) -> tuple[Tensor, Tensor]:
        activation_ = ACTIVATIONS[nonlin]
        n = len(params) // 2
        weights, biases = params[:n], params[n:]
        m, batch = x.shape[:2]
        y = x.new_empty(m, 3, batch, weights[0].shape[1])
        z = torch.baddbmm(biases[0].unsqueeze(1), x, weights[0].mT)  # (M, B, H)
        s, ratio = activation_(z)
        y[:, 0] = z
        torch.mul(s.unsqueeze(1), weights[0].mT.unsqueeze(2), out=y[:, 1:])  # U_1 = ∂z_1/∂x_j = W_1[:, j]
        ys, slopes, ratios = [y], [s], [ratio]
        for w, b in zip(weights[1:-1], biases[1:-1]):
            y = torch.bmm(y.flatten(1, 2), w.mT).unflatten(1, (3, batch))  # (M, 3, B, H): [z - b; U]
            s, ratio = activation_(y[:, 0].add_(b.unsqueeze(1)))  # row 0: z, then φ(z)
            y[:, 1:] *= s.unsqueeze(1)  # rows 1, 2: T = s ⊙ U
            ys.append(y)
            slopes.append(s)
            ratios.append(ratio)
        out = torch.bmm(y.flatten(1, 2), weights[-1].mT).unflatten(1, (3, batch))  # (M, 3, B, 2)
        gx = out[:, 0] + biases[-1].unsqueeze(1)
        (a, c), (b, e) = out[:, 1].unbind(-1), out[:, 2].unbind(-1)  # J = [[a, b], [c, e]], column j in row 1 + j
        det = (1.0 + a) * (1.0 + e) - b * c
        has_ratio = [r is not None for r in ratios]
        ctx.save_for_backward(x, out, det, *weights, *ys, *slopes, *(r for r in ratios if r is not None))
        ctx.nonlin, ctx.n_layers, ctx.has_ratio = nonlin, n, has_ratio
        return gx, det.abs().log()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_g: Tensor | None, grad_logdet: Tensor | None) -> tuple[Tensor | None, ...]:
        n = ctx.n_layers
        x, out, det, *rest = ctx.saved_tensors
        weights, ys, slopes, stored = (
            rest[:n],
            rest[n : 2 * n - 1],
            rest[2 * n - 1 : 3 * n - 2],
            iter(rest[3 * n - 2 :]),
        )
        ratios = [next(stored) if has else None for has in ctx.has_ratio]
        batch = x.shape[1]
        grad_g = torch.zeros_like(x) if grad_g is None else grad_g
        grad_logdet = torch.zeros_like(det) if grad_logdet is None else grad_logdet
        # d ln|det(I + J)| / dJ = (I + J)^{-T} = [[1 + e, -c], [-b, 1 + a]] / det; row 1 + j of out is column j.
        (a, c), (b, e) = out[:, 1].unbind(-1), out[:, 2].unbind(-1)
        scale = (grad_logdet / det).unsqueeze(-1)
        grad = torch.stack([grad_g, torch.stack([1.0 + e, -b], -1) * scale, torch.stack([-c, 1.0 + a], -1) * scale], 1)
        grad_w, grad_b = [], [grad_g.sum(1)]
        for k in range(n - 1, 0, -1):  # linear layer k + 1 (0-based weights[k]) reads Y_k = ys[k - 1]
            y, s, ratio = ys[k - 1], slopes[k - 1], ratios[k - 1]
            grad_w.append(torch.bmm(grad.flatten(1, 2).mT, y.flatten(1, 2)))
            if k == n - 1:  # the last layer has 2 outputs: a K = 2 product is far slower as a bmm than as two terms
                w = weights[k].unsqueeze(2).unsqueeze(2)  # (M, 2, 1, 1, H)
                grad = torch.addcmul(grad[..., :1] * w[:, 0], grad[..., 1:], w[:, 1])  # Ȳ_k: (M, 3, B, H)
            else:
                grad = torch.bmm(grad.flatten(1, 2), weights[k]).unflatten(1, (3, batch))
            # Ȳ_k -> gradient of layer k's output [z_k; U_k], in place.
            grad_z, grad_t = grad[:, 0], grad[:, 1:]
            curvature = (grad_t * y[:, 1:]).sum(1).mul_(ratio) if ratio is not None else None
            grad_z.mul_(s)  # z̄ = s ⊙ ā + (φ''/φ') Σ_j T̄_j ⊙ T_j
            if curvature is not None:
                grad_z.add_(curvature)
            if k > 1:
                grad_t.mul_(s.unsqueeze(1))  # Ū = s ⊙ T̄
                grad_b.append(grad_z.sum(1))
        # First layer: z_1 = x W_1^T + b_1 and U_1 = columns of W_1, so Y_1's tangents s_1 ⊙ W_1[:, j] give W_1 a
        # second gradient term.
        grad_z = grad[:, 0]
        grad_w1t = torch.baddbmm((grad[:, 1:] * slopes[0].unsqueeze(1)).sum(2), x.mT, grad_z)  # (M, 2, H)
        grad_w.append(grad_w1t.mT)
        grad_b.append(grad_z.sum(1))
        grad_x = torch.bmm(grad_z, weights[0]) if ctx.needs_input_grad[0] else None
        return (grad_x, None, *reversed(grad_w), *reversed(grad_b))


def stacked_mlp(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], nonlin: str) -> Tensor:
    """``W_L ∘ φ ∘ ... ∘ φ ∘ W_1 (x)`` for ``M`` MLPs at once (the Glow couplings' networks), with a hand-written
    backward pass (fewer, in-place ops than autograd's through the nonlinearities). Shapes: ``x: (M, B, in)``,
    ``weights[l]: (M, out_l, in_l)``, ``biases[l]: (M, out_l)`` -> ``(M, B, out_L)``. Not twice differentiable."""
    return _StackedMLP.apply(x, nonlin, *weights, *biases)


class _StackedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, nonlin: str, *params: Tensor) -> Tensor:
        activation_ = ACTIVATIONS[nonlin]
        n = len(params) // 2
        weights, biases = params[:n], params[n:]
        a, inputs, slopes = x, [x], []
        for k, (w, b) in enumerate(zip(weights, biases)):
            a = torch.baddbmm(b.unsqueeze(1), a, w.mT)
            if k < n - 1:
                slope, _ = activation_(a, curvature=False)  # a becomes φ(z)
                slopes.append(slope)
                inputs.append(a)
        ctx.save_for_backward(*weights, *inputs, *slopes)
        ctx.n_layers = n
        return a

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        n = ctx.n_layers
        saved = ctx.saved_tensors
        weights, inputs, slopes = saved[:n], saved[n : 2 * n], saved[2 * n :]
        grad_w, grad_b = [], []
        for k in range(n - 1, -1, -1):
            grad_w.append(torch.bmm(grad.mT, inputs[k]))
            grad_b.append(grad.sum(1))
            if k > 0:
                grad = torch.bmm(grad, weights[k]).mul_(slopes[k - 1])  # through layer k, then φ'(z)
            elif ctx.needs_input_grad[0]:
                grad = torch.bmm(grad, weights[0])
        grad_x = grad if ctx.needs_input_grad[0] else None
        return (grad_x, None, *reversed(grad_w), *reversed(grad_b))


# --- batched spectral normalisation (Eq. 2), as iresnet.spectral_norm.LipschitzLinear --------------------------


def _unit(t: Tensor) -> Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _times(row: Tensor, matrix: Tensor) -> Tensor:
    """``rowᵀ M`` for stacks: ``(..., k)``, ``(..., k, n)`` -> ``(..., n)``. As a product of 1-row matrices: for a
    stack of 400 64x64 matrices this is 10-20x faster than the matrix-vector form ``M.mT @ row[..., None]``."""
    return (row.unsqueeze(-2) @ matrix).squeeze(-2)


@torch.no_grad()
def power_iterate(weight: Tensor, u: Tensor, v: Tensor, n_iter: int) -> tuple[Tensor, Tensor, Tensor]:
    """``n_iter`` power iterations on ``Wᵀ W`` for a stack of matrices, exactly as ``LipschitzLinear.power_iterate``.

    Shapes: ``weight: (..., out, in)``, ``u: (..., out)``, ``v: (..., in)`` -> new ``(u, v, sigma: (...))``.
    """
    weight = weight.detach()
    wv = _times(v, weight.mT)
    for _ in range(n_iter):
        v = _unit(_times(u, weight))
        wv = _times(v, weight.mT)
        u = _unit(wv)
    return u, v, (u * wv).sum(-1)


def normalised_weight(weight: Tensor, u: Tensor, v: Tensor, coeff: float | None) -> Tensor:
    """Eq. 2 for a stack of matrices: ``W / max(1, <u, W v> / c)``, differentiable in ``W`` (as
    ``LipschitzLinear.effective_weight``). Shapes: ``(..., out, in)``, ``(..., out)``, ``(..., in)``."""
    if coeff is None:
        return weight
    return _NormalisedWeight.apply(weight, u, v, coeff)


class _NormalisedWeight(torch.autograd.Function):
    """``W / s`` with ``s = max(1, σ / c)``, ``σ = uᵀ W v`` (``u``, ``v`` constants), and its gradient written out:
    ``W̄ = Ḡ / s - [σ / c >= 1] ⟨Ḡ, W⟩ / (c s²) · u vᵀ`` (4 passes over the weights instead of autograd's ~10 and a
    batched outer product; the same value as autograd's up to rounding)."""

    @staticmethod
    def forward(ctx, weight: Tensor, u: Tensor, v: Tensor, coeff: float) -> Tensor:
        ratio = (_times(u, weight) * v).sum(-1) / coeff  # σ / c
        scale = ratio.clamp(min=1.0)
        ctx.save_for_backward(weight, u, v, scale, ratio >= 1.0)  # torch.clamp passes the gradient at equality
        ctx.coeff = coeff
        return weight / scale[..., None, None]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, u, v, scale, active = ctx.saved_tensors
        grad_weight = grad / scale[..., None, None]
        if bool(active.any()):
            grad_sigma = (grad * weight).sum((-2, -1)).div_(scale.square()).mul_(active).div_(-ctx.coeff)
            grad_weight.add_((grad_sigma.unsqueeze(-1) * u).unsqueeze(-1) * v.unsqueeze(-2))
        return grad_weight, None, None, None


# --- per-model flows -----------------------------------------------------------------------------------------------


class Flow2d(nn.Module):
    """A flow on ``R^2`` with a standard normal base: ``ln p(x) = ln N(f(x)) + ln|det J_f(x)|``. ``(B, 2) -> (B,)``.

    >>> import torch
    >>> flow = toy_iresnet(n_blocks=3, hidden=8, n_hidden_layers=1).eval()
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> flow.double().log_prob(x).shape
    torch.Size([5])
    >>> z, _ = flow.transform(x)
    >>> bool((flow.transform.inverse(z) - x).abs().max() < 1e-4)  # fixed-point inverse, to atol 1e-5 a block
    True
    """

    def __init__(self, transform: Invertible) -> None:
        super().__init__()
        self.transform = transform

    def log_prob(self, x: Tensor, settings: LogDetSettings | None = None) -> Tensor:
        """``settings``: the log-det estimator of this call (``None``: each block's own, exact by default)."""
        z, logdet = self.transform(x, settings)
        return standard_normal_logprob(z) + logdet

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> Tensor:
        return self.log_prob(x, settings)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, 2)`` samples through the inverse."""
        param = next(self.parameters())
        z = torch.randn(n, 2, generator=generator, dtype=param.dtype, device=param.device)
        return self.transform.inverse(z)


class ToyResidualBlock(InvertibleResidualBlock):
    """Residual block ``x + g(x)`` with an MLP branch (:func:`iresnet.blocks.mlp_branch`) whose exact log-det comes in
    closed form from the forward pass (:func:`mlp_logdet`, Eq. 3 with the exact ``ln det``).

    Same parameters, state dict, inverse and certificate as :class:`InvertibleResidualBlock`; it falls back to the
    parent's estimator when the call's ``settings`` (or, without them, ``logdet_settings``) ask for another one or
    ``nonlin`` has no elementwise slope.
    The closed-form path is differentiable once (training, Jacobians of the flow), not twice.
    Shapes: ``x, y: (B, 2)``, ``logdet: (B,)``.
    """

    def __init__(self, g: nn.Sequential, nonlin: str, logdet_settings: LogDetSettings | None = None) -> None:
        super().__init__(g, logdet_settings or LogDetSettings(estimator="exact"))
        self.nonlin = nonlin

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        if (settings or self.logdet_settings).estimator != "exact" or self.nonlin not in ACTIVATIONS:
            return super().forward(x, settings)
        linears = [m for m in self.g.children() if isinstance(m, LipschitzLinear)]
        if x.ndim != 2 or x.shape[1] != linears[0].in_features:
            raise ValueError(f"expected input (B, {linears[0].in_features}), got {tuple(x.shape)}")
        # _forward_weight runs the training-mode power iteration, exactly once per forward as LipschitzLinear does.
        weights = [layer._forward_weight().unsqueeze(0) for layer in linears]
        biases = [_bias(layer).unsqueeze(0) for layer in linears]
        gx, logdet = mlp_logdet(x.unsqueeze(0), weights, biases, self.nonlin)
        return x + gx[0], logdet[0]


def _bias(layer: LipschitzLinear | nn.Linear) -> Tensor:
    return layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.weight.shape[0])


def toy_iresnet(
    n_blocks: int = 100,
    hidden: int = 64,
    n_hidden_layers: int = 3,
    coeff: float = 0.9,
    n_power_iter: int = 1,
    nonlin: str = "elu",
) -> Flow2d:
    """i-ResNet toy flow: ``n_blocks`` residual blocks with MLP branches (2-64-64-64-2, ELU), ActNorm after each.

    The log-det is exact, as in App. C.3 (closed-form 2x2 Jacobian, :class:`ToyResidualBlock`).
    """
    layers: list[Invertible] = []
    for _ in range(n_blocks):
        branch = mlp_branch(2, hidden, n_hidden_layers, coeff, n_power_iter, nonlin)
        layers += [ToyResidualBlock(branch, nonlin), ActNorm(2)]
    return Flow2d(InvertibleSequential(layers))


class AffineCoupling(Invertible):
    """Glow / Real NVP affine coupling on ``(B, 2)``: ``y1 = x1``, ``y2 = x2 · exp(s(x1)) + t(x1)``.

    With ``scale_cap`` (the default), ``s`` passes through ``tanh`` (``|s| < 1`` per layer) to keep early training
    stable; without it ``s`` is the network's output as it is. ``logdet = s(x1)``. The network's last layer starts at
    zero, so the layer starts as the identity.
    """

    def __init__(self, hidden: int = 64, n_hidden_layers: int = 3, scale_cap: bool = True) -> None:
        super().__init__()
        self.scale_cap = scale_cap
        widths = [1] + [hidden] * n_hidden_layers
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), ELU()]
        last = nn.Linear(widths[-1], 2)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def _scale_shift(self, x1: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(x1).chunk(2, dim=1)
        return (torch.tanh(s) if self.scale_cap else s), t

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, :1], x[:, 1:]
        s, t = self._scale_shift(x1)
        return torch.cat([x1, x2 * torch.exp(s) + t], dim=1), s.squeeze(1)

    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = y[:, :1], y[:, 1:]
        s, t = self._scale_shift(y1)
        return torch.cat([y1, (y2 - t) * torch.exp(-s)], dim=1)


class InvertibleLinear(Invertible):
    """Glow's invertible linear map (the 1x1 conv of a 2-D input): ``y = x Wᵀ``, ``logdet = ln|det W|``.

    Initialised at a random rotation so that consecutive couplings mix both coordinates.
    """

    def __init__(self, features: int = 2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(features, features))[0])

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        logdet = torch.linalg.slogdet(self.weight)[1]
        return x @ self.weight.T, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return torch.linalg.solve(self.weight, y.T).T


def toy_glow(n_layers: int = 100, hidden: int = 64, n_hidden_layers: int = 3, scale_cap: bool = True) -> Flow2d:
    """Glow-style toy flow: ``n_layers`` x (ActNorm, invertible linear map, affine coupling), App. C.3; ``scale_cap``:
    the couplings' log-scales pass through ``tanh`` (:class:`AffineCoupling`)."""
    layers: list[Invertible] = []
    for _ in range(n_layers):
        layers += [ActNorm(2), InvertibleLinear(2), AffineCoupling(hidden, n_hidden_layers, scale_cap)]
    return Flow2d(InvertibleSequential(layers))


# --- M flows of one shape trained as one model --------------------------------------------------------------------


def _layers(flow: Flow2d) -> list[nn.Module]:
    """The layers of a flow built by :func:`toy_iresnet` or :func:`toy_glow`, in order."""
    return list(cast(InvertibleSequential, flow.transform).layers)


def _stack(tensors: Sequence[Sequence[Tensor]]) -> Tensor:
    """``[[t_{m,n}]]`` (models x blocks, equal shapes) -> ``(M, N, *shape)``, detached."""
    return torch.stack([torch.stack([t.detach() for t in row]) for row in tensors])


class _StackedActNorms(nn.Module):
    """The ``N`` ActNorms of each of ``M`` flows, ``(M, N, 2)`` parameters; data-dependent initialisation as
    :class:`iresnet.layers.ActNorm` (per model, from the batch that reaches it in its first training forward)."""

    initialized: Tensor  # a buffer, (M, N)

    def __init__(self, actnorms: Sequence[Sequence[ActNorm]]) -> None:
        super().__init__()
        self.eps = actnorms[0][0].eps
        self.bias = nn.Parameter(_stack([[a.bias for a in row] for row in actnorms]))
        self.log_scale = nn.Parameter(_stack([[a.log_scale for a in row] for row in actnorms]))
        self.register_buffer("initialized", _stack([[a.initialized for a in row] for row in actnorms]))

    def needs_init(self) -> bool:
        return self.training and not bool(self.initialized.all())

    @torch.no_grad()
    def initialise(self, n: int, h: Tensor) -> None:
        """Set ActNorm ``n`` of every model not yet initialised from its input ``h: (M, B, 2)``."""
        mean, std = h.mean(dim=1), h.std(dim=1, unbiased=False)
        log_scale = torch.where(std > self.eps, -torch.log(std.clamp_min(self.eps)), torch.zeros_like(std))
        keep = self.initialized[:, n, None]
        self.bias[:, n] = torch.where(keep, self.bias[:, n], -mean)
        self.log_scale[:, n] = torch.where(keep, self.log_scale[:, n], log_scale)
        self.initialized[:, n] = True

    @torch.no_grad()
    def write_to(self, actnorms: Sequence[Sequence[ActNorm]]) -> None:
        for m, row in enumerate(actnorms):
            for n, a in enumerate(row):
                a.bias.copy_(self.bias[m, n])
                a.log_scale.copy_(self.log_scale[m, n])
                a.initialized.copy_(self.initialized[m, n])


class _StackedMLPs(nn.Module):
    """The ``N`` MLP branches of each of ``M`` flows: layer ``l`` as ``(M, N, out, in)`` weights, ``(M, N, out)``
    biases and, when spectrally normalised, the power-iteration buffers ``u``, ``v``, ``sigma`` of every layer."""

    def __init__(self, linears: Sequence[Sequence[Sequence[LipschitzLinear | nn.Linear]]]) -> None:
        super().__init__()
        first = linears[0][0]
        self.n_layers = len(first)
        self.normalised = isinstance(first[0], LipschitzLinear)
        self.coeff: float | None = first[0].coeff if isinstance(first[0], LipschitzLinear) else None
        self.n_power_iter: int = first[0].n_power_iter if isinstance(first[0], LipschitzLinear) else 0
        layer = lambda j: [[mlp[j] for mlp in row] for row in linears]  # noqa: E731 - (M, N) modules of layer j
        self.weights = nn.ParameterList(
            [nn.Parameter(_stack([[m.weight for m in r] for r in layer(j)])) for j in range(self.n_layers)]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(_stack([[_bias(m) for m in r] for r in layer(j)])) for j in range(self.n_layers)]
        )
        if self.normalised:
            for j in range(self.n_layers):
                for name in ("u", "v", "sigma"):
                    self.register_buffer(f"{name}{j}", _stack([[getattr(m, name) for m in r] for r in layer(j)]))

    def forward_weights(self) -> list[Tensor]:
        """The weights the forward pass uses, ``(M, N, out, in)`` each: Eq. 2 after ``n_power_iter`` power
        iterations in training mode (as ``LipschitzLinear._forward_weight``, all layers of all blocks at once)."""
        if not self.normalised:
            return list(self.weights)
        weights = []
        for j, weight in enumerate(self.weights):
            u, v = getattr(self, f"u{j}"), getattr(self, f"v{j}")
            if self.training:
                u, v, sigma = power_iterate(weight, u, v, self.n_power_iter)
                for name, value in (("u", u), ("v", v), ("sigma", sigma)):
                    getattr(self, f"{name}{j}").copy_(value)
            weights.append(normalised_weight(weight, u.clone(), v.clone(), self.coeff))
        return weights

    @torch.no_grad()
    def write_to(self, linears: Sequence[Sequence[Sequence[LipschitzLinear | nn.Linear]]]) -> None:
        for m, row in enumerate(linears):
            for n, mlp in enumerate(row):
                for j, layer in enumerate(mlp):
                    layer.weight.copy_(self.weights[j][m, n])
                    if layer.bias is not None:
                        layer.bias.copy_(self.biases[j][m, n])
                    if self.normalised:
                        for name in ("u", "v", "sigma"):
                            getattr(layer, name).copy_(getattr(self, f"{name}{j}")[m, n])


def _check_same_shape(flows: Sequence[Flow2d]) -> None:
    shapes = {tuple((k, tuple(v.shape)) for k, v in flow.state_dict().items()) for flow in flows}
    if not flows or len(shapes) != 1:
        raise ValueError("stacking needs at least one flow, all of the same architecture")


class StackedToyIResNet(nn.Module):
    """``M`` toy i-ResNet flows (:func:`toy_iresnet`, one shape) trained as one model. Training only.

    Parameters are stacked along a leading model axis; the models stay independent: each has its own weights,
    spectral normalisation (its own ``u``, ``v``), ActNorm initialisation and data, and ``log_prob`` of model m
    depends only on model m's parameters, so the gradient of ``sum_m loss_m`` is each model's own gradient, and one
    elementwise optimiser (Adam) over the stacked parameters is ``M`` separate ones. A block costs ~40 ops for all
    models instead of thousands per model (second-order autograd). ``write_to`` copies the state back.
    """

    def __init__(self, flows: Sequence[Flow2d]) -> None:
        super().__init__()
        _check_same_shape(flows)
        blocks = [[layer for layer in _layers(flow) if isinstance(layer, ToyResidualBlock)] for flow in flows]
        nonlin = blocks[0][0].nonlin
        if nonlin not in ACTIVATIONS:
            raise ValueError(
                f"stacked training needs an elementwise nonlinearity ({', '.join(ACTIVATIONS)}), got {nonlin!r}"
            )
        self.nonlin = nonlin
        self.mlps = _StackedMLPs(self._linears(flows))
        self.actnorms = _StackedActNorms(self._actnorms(flows))

    @staticmethod
    def _linears(flows: Sequence[Flow2d]) -> list[list[list[LipschitzLinear]]]:
        return [
            [
                [m for m in layer.g.children() if isinstance(m, LipschitzLinear)]
                for layer in _layers(flow)
                if isinstance(layer, ToyResidualBlock)
            ]
            for flow in flows
        ]

    @staticmethod
    def _actnorms(flows: Sequence[Flow2d]) -> list[list[ActNorm]]:
        return [[layer for layer in _layers(flow) if isinstance(layer, ActNorm)] for flow in flows]

    def log_prob(self, x: Tensor) -> Tensor:
        """``ln p_m(x_m)`` for every model: ``(M, B, 2) -> (M, B)``."""
        weights = self.mlps.forward_weights()
        if self.actnorms.needs_init():
            self._transform(x, weights, initialise=True)
        z, logdet = self._transform(x, weights)
        return (-0.5 * (z.pow(2).sum(-1) + 2 * _LOG_2PI)) + logdet

    def _transform(self, x: Tensor, weights: list[Tensor], initialise: bool = False) -> tuple[Tensor, Tensor]:
        """``f(x)`` and ``ln|det J_f(x)|``, ``(M, B, 2) -> ((M, B, 2), (M, B))``. ``initialise``: a pass without
        gradient that sets every uninitialised ActNorm from the batch reaching it (ActNorm's first forward)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not initialise):
            per_block_w = [w.unbind(1) for w in weights]  # unbind, not indexing: one backward node per layer
            per_block_b = [b.unbind(1) for b in self.mlps.biases]
            shift, log_scale = self.actnorms.bias.unbind(1), self.actnorms.log_scale.unbind(1)
            logdet = self.actnorms.log_scale.sum(dim=(1, 2)).unsqueeze(1)  # the ActNorms' log-dets do not depend on x
            h = x
            for n in range(len(shift)):
                gx, block_logdet = mlp_logdet(h, [w[n] for w in per_block_w], [b[n] for b in per_block_b], self.nonlin)
                logdet = logdet + block_logdet
                h = h + gx
                if initialise:
                    self.actnorms.initialise(n, h)
                    shift, log_scale = self.actnorms.bias.unbind(1), self.actnorms.log_scale.unbind(1)
                h = (h + shift[n].unsqueeze(1)) * log_scale[n].exp().unsqueeze(1)
        return h, logdet

    @torch.no_grad()
    def write_to(self, flows: Sequence[Flow2d]) -> None:
        """Copy every model's parameters and buffers into ``flows`` (of the shape this stack was built from)."""
        self.mlps.write_to(self._linears(flows))
        self.actnorms.write_to(self._actnorms(flows))


class StackedToyGlow(nn.Module):
    """``M`` Glow-style toy flows (:func:`toy_glow`, one shape) trained as one model, as :class:`StackedToyIResNet`.

    Per layer: ActNorm, ``y = x Wᵀ`` (``ln|det W|`` in closed form for 2x2), affine coupling (its scale ``tanh``-capped
    when the flows' couplings are). The x-independent log-dets (ActNorm, linear maps) are summed once for all layers.
    """

    def __init__(self, flows: Sequence[Flow2d]) -> None:
        super().__init__()
        _check_same_shape(flows)
        caps = {c.scale_cap for flow in flows for c in self._layers(flow, AffineCoupling)}
        if len(caps) != 1:
            raise ValueError("stacking needs at least one flow, all of the same architecture")
        self.scale_cap = caps.pop()
        self.mlps = _StackedMLPs(self._linears(flows))
        self.actnorms = _StackedActNorms(self._actnorms(flows))
        self.mixing = nn.Parameter(_stack([[m.weight for m in row] for row in self._mixings(flows)]))  # (M, N, 2, 2)

    @staticmethod
    def _layers(flow: Flow2d, kind: type) -> list:
        return [layer for layer in _layers(flow) if isinstance(layer, kind)]

    @classmethod
    def _linears(cls, flows: Sequence[Flow2d]) -> list[list[list[nn.Linear]]]:
        return [[[m for m in c.net if isinstance(m, nn.Linear)] for c in cls._layers(f, AffineCoupling)] for f in flows]

    @classmethod
    def _actnorms(cls, flows: Sequence[Flow2d]) -> list[list[ActNorm]]:
        return [cls._layers(flow, ActNorm) for flow in flows]

    @classmethod
    def _mixings(cls, flows: Sequence[Flow2d]) -> list[list[InvertibleLinear]]:
        return [cls._layers(flow, InvertibleLinear) for flow in flows]

    def log_prob(self, x: Tensor) -> Tensor:
        """``ln p_m(x_m)`` for every model: ``(M, B, 2) -> (M, B)``."""
        if self.actnorms.needs_init():
            self._transform(x, initialise=True)
        z, logdet = self._transform(x)
        w = self.mixing
        mixing_logdet = (w[..., 0, 0] * w[..., 1, 1] - w[..., 0, 1] * w[..., 1, 0]).abs().log().sum(1)  # (M,)
        constant = self.actnorms.log_scale.sum(dim=(1, 2)) + mixing_logdet
        return (-0.5 * (z.pow(2).sum(-1) + 2 * _LOG_2PI)) + logdet + constant.unsqueeze(1)

    def _transform(self, x: Tensor, initialise: bool = False) -> tuple[Tensor, Tensor]:
        """``f(x)`` and the couplings' log-dets ``(M, B)``; ``initialise`` as in
        :meth:`StackedToyIResNet._transform`."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not initialise):
            per_layer_w = [w.unbind(1) for w in self.mlps.weights]
            per_layer_b = [b.unbind(1) for b in self.mlps.biases]
            mixing = self.mixing.mT.unbind(1)
            shift, scale = self.actnorms.bias.unbind(1), self.actnorms.log_scale.exp().unbind(1)
            logdet = x.new_zeros(x.shape[:2])
            h = x
            for n in range(len(mixing)):
                if initialise:
                    self.actnorms.initialise(n, h)
                    shift, scale = self.actnorms.bias.unbind(1), self.actnorms.log_scale.exp().unbind(1)
                h = torch.bmm((h + shift[n].unsqueeze(1)) * scale[n].unsqueeze(1), mixing[n])
                x1, x2 = h[..., :1], h[..., 1:]
                a = stacked_mlp(x1, [w[n] for w in per_layer_w], [b[n] for b in per_layer_b], "elu")
                s, t = a.unbind(-1)
                if self.scale_cap:
                    s = torch.tanh(s)
                h = torch.stack([x1.squeeze(-1), x2.squeeze(-1) * torch.exp(s) + t], dim=-1)
                logdet = logdet + s
        return h, logdet

    @torch.no_grad()
    def write_to(self, flows: Sequence[Flow2d]) -> None:
        """Copy every model's parameters and buffers into ``flows`` (of the shape this stack was built from)."""
        self.mlps.write_to(self._linears(flows))
        self.actnorms.write_to(self._actnorms(flows))
        for m, row in enumerate(self._mixings(flows)):
            for n, layer in enumerate(row):
                layer.weight.copy_(self.mixing[m, n])
