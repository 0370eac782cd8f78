"""Volume-tracking building blocks around the residual blocks, and the 1-Lipschitz nonlinearities of ``g``.

* ``ActNorm``: per-channel affine map with data-dependent initialisation (Kingma & Dhariwal 2018), placed before
  each residual block (App. C.2); its "initialised" flag is a buffer, so a loaded model never re-initialises.
* ``Squeeze``: invertible space-to-depth used for downsampling (spatial / f, channels x f^2).
* ``InjectivePad``: appends zero channels (the classifier's ``inj_pad``).
* ``Logit``: maps dequantised pixels in ``[-1/2, 1/2)`` to the real line (Real NVP / Glow preprocessing).
* ``make_nonlinearity``: the 1-Lipschitz ``phi`` of Sec. 2.1 (ELU, softplus, ReLU, max-min sorting, LipSwish).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iresnet.base import Invertible, zero_logdet

if TYPE_CHECKING:
    from iresnet.logdet import LogDetSettings

__all__ = [
    "ActNorm",
    "ELU",
    "InjectivePad",
    "LipSwish",
    "Logit",
    "MaxMin",
    "NONLINEARITIES",
    "Softplus",
    "Squeeze",
    "elu",
    "make_nonlinearity",
    "softplus",
]


class ActNorm(Invertible):
    """``y = (x + bias) * exp(log_scale)`` per channel (dim 1), for ``(B, C)`` or ``(B, C, H, W)`` inputs.

    On the first forward in training mode while ``initialized`` is False, ``bias`` and ``log_scale`` are set from
    the batch (without gradient) so that every output channel has zero mean and unit (population) standard
    deviation. ``logdet`` is ``H * W * sum(log_scale)`` per example (``sum(log_scale)`` for 2-D inputs), shape ``(B,)``.
    """

    initialized: Tensor  # a buffer: whether the data-dependent initialisation has run

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.eps = eps  # a channel whose batch std is at most eps counts as constant and keeps scale 1
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        return p.view(1, -1, *([1] * (x.ndim - 2)))

    def _check(self, x: Tensor) -> None:
        if x.ndim not in (2, 4) or x.shape[1] != self.num_features:
            raise ValueError(
                f"ActNorm({self.num_features}) expects (B, {self.num_features}) or (B, {self.num_features}, H, W), "
                f"got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def _initialise(self, x: Tensor) -> None:
        dims = [d for d in range(x.ndim) if d != 1]
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False)
        self.bias.copy_(-mean)
        # A constant channel (e.g. injective zero padding) cannot be standardised: dividing by a floored std would
        # scale it by ~1/eps and blow up the first gradient steps, so it keeps the identity scale.
        self.log_scale.copy_(torch.where(std > self.eps, -torch.log(std.clamp_min(self.eps)), torch.zeros_like(std)))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        if self.training and not bool(self.initialized):
            self._initialise(x)
        y = (x + self._view(self.bias, x)) * self._view(self.log_scale, x).exp()
        pixels = math.prod(x.shape[2:])  # H * W for images, 1 for vectors
        logdet = (pixels * self.log_scale.sum()).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        return y * self._view(-self.log_scale, y).exp() - self._view(self.bias, y)


class Squeeze(Invertible):
    """Space-to-depth ``(B, C, H, W) -> (B, C f^2, H / f, W / f)``; a permutation, so ``logdet = 0``.

    Output channel ``c f^2 + i f + j`` at ``(h, w)`` holds input channel ``c`` at ``(h f + i, w f + j)``
    (``torch.nn.functional.pixel_unshuffle``).
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor}")
        self.factor = factor

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(
                f"Squeeze({self.factor}) needs (B, C, H, W) with H and W divisible by {self.factor}, "
                f"got {tuple(x.shape)}; pad or crop the input first"
            )
        return F.pixel_unshuffle(x, self.factor), zero_logdet(x)

    def inverse(self, y: Tensor) -> Tensor:
        if y.ndim != 4 or y.shape[1] % (self.factor**2):
            raise ValueError(
                f"Squeeze({self.factor}).inverse needs (B, C, H, W) with C divisible by {self.factor**2}, "
                f"got {tuple(y.shape)}"
            )
        return F.pixel_shuffle(y, self.factor)


class InjectivePad(Invertible):
    """Append ``pad_channels`` zero channels: ``(B, C, ...) -> (B, C + pad_channels, ...)``.

    The map is injective, not bijective: ``inverse`` drops the padded channels and is only a left inverse (it
    ignores whatever they hold). Its Jacobian is an isometric embedding, ``sqrt(det(J^T J)) = 1``, so the volume
    term is ``logdet = 0``. The paper's classifier pads 3 -> 16 channels (13 zeros).
    """

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        if pad_channels < 0:
            raise ValueError(f"pad_channels must be >= 0, got {pad_channels}")
        self.pad_channels = pad_channels

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        if x.ndim < 2:
            raise ValueError(f"InjectivePad needs (B, C, ...), got {tuple(x.shape)}")
        zeros = x.new_zeros(x.shape[0], self.pad_channels, *x.shape[2:])
        return torch.cat([x, zeros], dim=1), zero_logdet(x)

    def inverse(self, y: Tensor) -> Tensor:
        if y.ndim < 2 or y.shape[1] < self.pad_channels:
            raise ValueError(f"InjectivePad({self.pad_channels}).inverse got {tuple(y.shape)}: too few channels")
        return y[:, : y.shape[1] - self.pad_channels]


class Logit(Invertible):
    """``y = logit(p)`` with ``p = α + (1 - 2α)(x + 1/2)``, for dequantised inputs ``x`` in ``[-1/2, 1/2)``.

    ``α`` keeps ``p`` inside ``(0, 1)`` (Real NVP uses 0.05, 1e-6 is nearly the plain logit). Elementwise, so the
    Jacobian is diagonal: ``logdet = Σ_i [ln(1 - 2α) - ln p_i - ln(1 - p_i)]`` per example, shape ``(B,)``. ``1 - p``
    is computed as ``α + (1 - 2α)(1/2 - x)``, not by subtraction, to keep its precision near ``x = 1/2``. Inputs
    outside ``[-1/2, 1/2]`` (beyond the margin ``α``) give non-finite values. Any shape ``(B, ...)``.

    >>> layer = Logit(1e-6)
    >>> x = torch.tensor([[-0.5, 0.0, 0.25]], dtype=torch.float64)
    >>> y, logdet = layer(x)
    >>> bool((layer.inverse(y) - x).abs().max() < 1e-12), y[0, 1].item()
    (True, 0.0)
    """

    def __init__(self, alpha: float = 1e-6) -> None:
        super().__init__()
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 1/2), got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        scale = 1 - 2 * self.alpha
        p = self.alpha + scale * (x + 0.5)
        q = self.alpha + scale * (0.5 - x)  # 1 - p
        log_p, log_q = torch.log(p), torch.log(q)
        logdet = (math.log(scale) - log_p - log_q).flatten(1).sum(1)
        return log_p - log_q, logdet

    def inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha) - 0.5


class MaxMin(nn.Module):
    """ "Sorting" nonlinearity: split dim 1 into halves ``a, b`` and return ``cat(max(a, b), min(a, b))``.

    It permutes coordinates locally, so it is 1-Lipschitz (and norm preserving); needs an even channel count.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x.shape[1] % 2:
            raise ValueError(
                f"the sorting (max-min) nonlinearity needs an even number of channels, got {tuple(x.shape)}"
            )
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


# --- fast smooth nonlinearities ---------------------------------------------------------------------------------
# On the CPU build this project runs on, F.elu, F.softplus, torch.expm1 and torch.log1p are 7-9x slower than
# torch.exp, torch.log and torch.sigmoid (not vectorised), and ELU was two thirds of the classifier's time. So on the
# CPU, ELU and softplus are autograd Functions whose forward uses only the fast ops, and whose backward is one cheap
# formula of what the forward saved. Each backward is written in differentiable torch ops of the saved tensors, so
# double backward (the log-det series differentiates through VJPs with create_graph=True) is exact. On other devices
# (fused kernels) torch's own functions are used.


class _ELU(torch.autograd.Function):
    """``elu(x) = max(x, exp(min(x, 0)) - 1)`` (alpha = 1): for ``x <= 0``, ``e^x - 1 >= x``; for ``x > 0`` it is 0.

    ``exp(x) - 1`` instead of ``expm1`` costs up to one float ulp of 1 in absolute error near 0 (6e-8 in float32).
    The derivative is ``1`` for ``x > 0`` and ``e^x = elu(x) + 1`` otherwise, i.e. ``1 + min(elu(x), 0)``: only the
    output is saved, and differentiating that formula again goes back through this Function (double backward).
    """

    generate_vmap_rule = True  # usable under torch.func transforms (vmap, jacrev)

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clamp(max=0).exp_().sub_(1).clamp_(min=x)  # max(e^min(x,0) - 1, x), in place

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return _ELUBackward.apply(grad, out)


class _ELUBackward(torch.autograd.Function):
    """``grad · (1 + min(out, 0))`` as a Function of ``(grad, out)``, so that a VJP taken with ``create_graph``
    (the log-det series) keeps only ``grad`` and ``out`` alive, not the factor as well (as composite ops would).

    Its own derivatives: ``1 + min(out, 0)`` in ``grad`` and ``grad · [out < 0]`` in ``out``, written in ops of the
    saved inputs, so they are differentiable in turn.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: Tensor, out: Tensor) -> Tensor:
        return grad * out.clamp(max=0).add_(1)  # out of place in grad: under vmap grad may be batched, out not

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad_grad: Tensor) -> tuple[Tensor, Tensor]:
        grad, out = ctx.saved_tensors
        return grad_grad * (out.clamp(max=0) + 1), grad_grad * grad * (out < 0)


class _Softplus(torch.autograd.Function):
    """``softplus(x) = ln(1 + e^x) = max(x, 0) + ln(1 + e^{-|x|})``: no overflow for any ``x``.

    ``ln(1 + t)`` instead of ``log1p(t)`` (slow here) costs up to one ulp of 1 in absolute error (6e-8 in float32;
    so values below that, at ``x < -17``, come out as 0). The derivative is ``sigmoid(x)`` of the saved input.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        # In-place on fresh temporaries: one allocation instead of five (this forward records no graph).
        return x.abs().neg_().exp_().add_(1).log_().add_(x.clamp(min=0))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def elu(x: Tensor) -> Tensor:
    """ELU with alpha = 1, equal to ``F.elu`` (to 6e-8 absolute in float32); fast on CPU. Any shape."""
    return _ELU.apply(x) if x.device.type == "cpu" else F.elu(x)


def softplus(x: Tensor) -> Tensor:
    """``ln(1 + e^x)``, equal to ``F.softplus`` (beta = 1) to rounding; fast on CPU, stable for large ``|x|``."""
    return _Softplus.apply(x) if x.device.type == "cpu" else F.softplus(x)


class ELU(nn.Module):
    """``elu(x)`` (alpha = 1), 1-Lipschitz and continuously differentiable. Any shape."""

    def forward(self, x: Tensor) -> Tensor:
        return elu(x)


class Softplus(nn.Module):
    """``softplus(x) = ln(1 + e^x)``, 1-Lipschitz and smooth. Any shape."""

    def forward(self, x: Tensor) -> Tensor:
        return softplus(x)


class LipSwish(nn.Module):
    """``x * sigmoid(beta x) / 1.1`` with ``beta = softplus(raw_beta) > 0`` learnable (Chen et al. 2019).

    The derivative of ``x sigmoid(beta x)`` peaks at about 1.0998 for every ``beta``, so dividing by 1.1 makes the
    map 1-Lipschitz. ``raw_beta`` starts at 0.5 as in Residual Flows. Plain autograd ops: unlike ELU, ``sigmoid``
    is fast on this build (forward on 64x32x32x32 float32: 2.8 ms against 18.8 ms for F.elu, 1 thread).
    """

    def __init__(self) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(F.softplus(self.raw_beta) * x) / 1.1


NONLINEARITIES: tuple[str, ...] = ("elu", "softplus", "relu", "sorting", "lipswish")


def make_nonlinearity(name: str) -> nn.Module:
    """A fresh 1-Lipschitz nonlinearity by name, one of ``NONLINEARITIES``.

    ELU (alpha = 1) and softplus have derivatives in (0, 1] and are continuously differentiable, as the log-det
    estimator needs (App. C.3); ReLU and sorting are 1-Lipschitz but not smooth.
    """
    if name == "elu":
        return ELU()
    if name == "softplus":
        return Softplus()
    if name == "relu":
        return nn.ReLU()
    if name == "sorting":
        return MaxMin()
    if name == "lipswish":
        return LipSwish()
    raise ValueError(f"unknown nonlinearity {name!r}; choose one of {', '.join(NONLINEARITIES)}")
