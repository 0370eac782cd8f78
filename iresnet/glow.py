"""Glow (Kingma & Dhariwal 2018) used as a classifier: the baseline of Table 3 (Sec. 5.2).

The paper takes Glow's code, drops its generative part (no factor-out, no prior) and puts the i-ResNet's
classification head on the final features. This module builds that network from the library's invertible layers:

* :class:`InvertibleConv1x1`: Glow's learned channel mixing ``y = W x`` at every pixel, LU-parametrised;
* :class:`ReversePermutation`: Real NVP's fixed alternative, the channels in reverse order;
* :class:`AdditiveCoupling` / :class:`AffineCoupling`: the coupling layers, each with Glow's small conv net
  (3x3 -> ReLU -> 1x1 -> ReLU -> 3x3, last layer zero-initialised) on the first half of the channels;
* :class:`GlowClassifier`: scales of (squeeze, steps of ActNorm -> mixing -> coupling), then the same head as
  :class:`iresnet.models.IResNetClassifier` (BatchNorm, ReLU, global average pool, linear).

Every layer follows the contract of :mod:`iresnet.base`: ``forward(x) -> (y, logdet)`` with ``logdet: (B,)``, and an
analytic ``inverse(y) -> x``. The classifier never uses the log-determinants (they are cheap: closed forms), but they
make the layers reusable in a flow and testable against brute force like every other layer.

The 2-D toy flow of Fig. 2 (:mod:`iresnet.toy`) has its own coupling and linear map: MLP couplings on ``(B, 2)`` and a
plain 2x2 weight, whose shapes its stacked trainer relies on. They share the ActNorm layer with this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from iresnet.base import Invertible, InvertibleSequential, zero_logdet
from iresnet.layers import ActNorm, InjectivePad, Squeeze
from iresnet.models import _squeezed, classifier_head

if TYPE_CHECKING:
    from iresnet.logdet import LogDetSettings

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "COUPLINGS",
    "GlowClassifier",
    "GlowConfig",
    "InvertibleConv1x1",
    "PERMUTATIONS",
    "ReversePermutation",
    "SCALE_OFFSET",
    "coupling_net",
    "glow_step",
]

COUPLINGS: tuple[str, ...] = ("affine", "additive")
PERMUTATIONS: tuple[str, ...] = ("conv1x1", "reverse")
SCALE_OFFSET = 2.0  # Glow's affine scale is sigmoid(s + 2): 0.88 for s = 0, a near-identity start


def _pixels(x: Tensor) -> int:
    """``H * W`` for images ``(B, C, H, W)``, 1 for vectors ``(B, C)``."""
    return math.prod(x.shape[2:])


def _mix(x: Tensor, weight: Tensor) -> Tensor:
    """``W x`` at every position of ``(B, C, H, W)`` (a 1x1 convolution, as one batched matrix product
    ``W (B, C, H W)``) or of ``(B, C)``."""
    if x.ndim == 2:
        return x @ weight.T
    return torch.matmul(weight, x.flatten(2)).view(x.shape[0], weight.shape[0], *x.shape[2:])


class InvertibleConv1x1(Invertible):
    """Glow's invertible 1x1 convolution ``y[:, :, h, w] = W x[:, :, h, w]``, with ``W = P L (U + diag(s))``.

    ``P`` is a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper triangular and
    ``s = sign · exp(log|s|)`` with fixed signs (Glow, Sec. 3.2). Why LU and not a plain weight with ``slogdet``:
    the map stays invertible for any parameter values (``|s_i| = exp(log|s_i|) > 0``), which matters when the
    optimiser claim of Sec. 5.2 is tested by training this layer with large SGD steps; and ``ln|det W| = Σ_i log|s_i|``
    costs ``O(C)`` instead of an ``O(C³)`` factorisation per call. The free parameters are exactly the ``C²`` entries
    of a plain weight (``C(C-1)/2`` below and above the diagonal, ``C`` on it), so parameter counts compare fairly.
    Initialised as Glow: the LU factors of a random rotation.

    Shapes: ``x, y: (B, C, H, W)`` or ``(B, C)``; ``logdet = H W Σ_i log|s_i|``, ``(B,)`` (one pixel for vectors).
    """

    permutation: Tensor  # buffers: P, the signs of s, and where L's free entries sit
    sign: Tensor
    lower_index: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        self.channels = channels
        rotation = torch.linalg.qr(torch.randn(channels, channels))[0]
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        rows, cols = torch.tril_indices(channels, channels, offset=-1)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign", torch.sign(diagonal))
        self.register_buffer("lower_index", torch.stack([rows, cols]))  # where the free entries of L sit
        self.lower = nn.Parameter(lower[rows, cols].clone())  # (C(C-1)/2,)
        self.upper = nn.Parameter(upper[cols, rows].clone())  # (C(C-1)/2,): U's free entries, the mirror positions
        self.log_scale = nn.Parameter(diagonal.abs().log())  # (C,): log|s|

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(P, L, U + diag(s))``, each ``(C, C)``."""
        c = self.channels
        rows, cols = self.lower_index
        eye = torch.eye(c, dtype=self.lower.dtype, device=self.lower.device)
        lower = eye.index_put((rows, cols), self.lower)
        upper = torch.diag(self.sign * self.log_scale.exp()).index_put((cols, rows), self.upper)
        return self.permutation, lower, upper

    def weight(self) -> Tensor:
        """``W = P L (U + diag(s))``, ``(C, C)``."""
        permutation, lower, upper = self.factors()
        return permutation @ lower @ upper

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        logdet = (_pixels(x) * self.log_scale.sum()).expand(x.shape[0])
        return _mix(x, self.weight()), logdet

    def inverse(self, y: Tensor) -> Tensor:
        # W⁻¹ = (U + diag s)⁻¹ L⁻¹ Pᵀ by two triangular solves, never a general inverse.
        permutation, lower, upper = self.factors()
        partial = torch.linalg.solve_triangular(lower, permutation.T, upper=False, unitriangular=True)
        return _mix(y, torch.linalg.solve_triangular(upper, partial, upper=True))


class ReversePermutation(Invertible):
    """The channels in reverse order (Real NVP's fixed mixing, the alternative to a learned 1x1 convolution).

    A permutation: volume preserving, ``logdet = 0``; it is its own inverse. ``(B, C, ...) -> (B, C, ...)``.
    """

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        return x.flip(1), zero_logdet(x)

    def inverse(self, y: Tensor) -> Tensor:
        return y.flip(1)


def coupling_net(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """Glow's coupling network: conv 3x3 -> ReLU -> conv 1x1 -> ReLU -> conv 3x3, the last one zero-initialised so
    that every coupling starts near the identity. ``(B, in, H, W) -> (B, out, H, W)``.

    (Glow normalises the two hidden layers with ActNorm and scales the last one by a learned ``exp(3 · logs)``; here
    the convolutions carry biases instead. The classifier's ActNorm between steps stays.)
    """
    last = nn.Conv2d(hidden, out_channels, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(cast(Tensor, last.bias))
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(),
        last,
    )


class _Coupling(Invertible):
    """Split ``x`` into ``x_a`` (the first ``⌊C/2⌋`` channels, passed through) and ``x_b`` (the rest, transformed
    given ``x_a``); ``C >= 2``. Subclasses say how ``x_b`` changes and how many outputs ``net`` needs per channel."""

    outputs_per_channel = 1

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling splits the channels in two and needs at least 2, got {channels}")
        self.channels, self.split = channels, channels // 2
        self.net = coupling_net(self.split, hidden, self.outputs_per_channel * (channels - self.split))

    def _halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} expects (B, {self.channels}, H, W), got {tuple(x.shape)}")
        return x[:, : self.split], x[:, self.split :]


class AdditiveCoupling(_Coupling):
    """NICE / Real NVP additive coupling: ``y_a = x_a``, ``y_b = x_b + t(x_a)``; volume preserving, ``logdet = 0``.

    ``t`` is :func:`coupling_net` with ``C - ⌊C/2⌋`` outputs. Shapes: ``x, y: (B, C, H, W)``, ``logdet: (B,)``.
    """

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        x_a, x_b = self._halves(x)
        return torch.cat([x_a, x_b + self.net(x_a)], dim=1), zero_logdet(x)

    def inverse(self, y: Tensor) -> Tensor:
        y_a, y_b = self._halves(y)
        return torch.cat([y_a, y_b - self.net(y_a)], dim=1)


class AffineCoupling(_Coupling):
    """Glow's affine coupling: ``y_a = x_a``, ``y_b = (x_b + t(x_a)) · σ(s(x_a) + 2)``.

    The scale is bounded, ``0 < σ(s + 2) < 1`` (as in Glow's code): a coupling can shrink ``x_b`` but never blow it
    up. ``(t, s)`` are the two halves of :func:`coupling_net`'s ``2 (C - ⌊C/2⌋)`` outputs.
    ``logdet = Σ_{c, h, w} ln σ(s + 2)``. Shapes: ``x, y: (B, C, H, W)``, ``logdet: (B,)``.
    (The 2-D toy's :class:`iresnet.toy.AffineCoupling` is the MLP version on ``(B, 2)``, with a ``tanh``-capped
    log-scale.)
    """

    outputs_per_channel = 2

    def _shift_scale(self, x_a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, σ(s + 2), s + 2)`` from the network's outputs."""
        shift, raw = self.net(x_a).chunk(2, dim=1)
        z = raw + SCALE_OFFSET
        return shift, torch.sigmoid(z), z

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        x_a, x_b = self._halves(x)
        shift, scale, z = self._shift_scale(x_a)
        # ln σ(z) = min(z, 0) - ln(1 + e^{-|z|}): finite for any z (ln of σ would be -inf once σ underflows), and from
        # exp/log, which the CPU build vectorises (F.logsigmoid it does not: 5% of a training step in a CPU profile).
        log_scale = z.clamp(max=0.0) - torch.log(1.0 + torch.exp(-z.abs()))
        return torch.cat([x_a, (x_b + shift) * scale], dim=1), log_scale.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        y_a, y_b = self._halves(y)
        shift, scale, _ = self._shift_scale(y_a)
        return torch.cat([y_a, y_b / scale - shift], dim=1)


def glow_step(
    channels: int, hidden: int, coupling: str = "affine", permutation: str = "conv1x1"
) -> InvertibleSequential:
    """One step of flow (Glow, Fig. 2a): ActNorm -> 1x1 convolution or reverse permutation -> coupling.
    ``(B, channels, H, W) -> (B, channels, H, W)``; ``hidden``: the width of the coupling's network."""
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {', '.join(map(repr, COUPLINGS))}, got {coupling!r}")
    if permutation not in PERMUTATIONS:
        raise ValueError(f"permutation must be one of {', '.join(map(repr, PERMUTATIONS))}, got {permutation!r}")
    mixing = InvertibleConv1x1(channels) if permutation == "conv1x1" else ReversePermutation()
    layer = AffineCoupling if coupling == "affine" else AdditiveCoupling
    return InvertibleSequential([ActNorm(channels), mixing, layer(channels, hidden)])


@dataclass(frozen=True)
class GlowConfig:
    """A Glow classifier's layout, named like :class:`iresnet.models.ResNetConfig` where the two share a meaning.

    ``n_steps`` / ``strides`` / ``channels`` are per scale: a stride of 2 squeezes (spatial /2, channels x4) before the
    scale, ``channels`` is the hidden width of each coupling's network. ``init_ds`` squeezes the input first (Glow
    squeezes before every scale: ``init_ds=2, strides=(1, 2, 2)``), ``inj_pad`` appends zero channels (so that an
    image with one channel can be split by a coupling without a squeeze). The paper's two variants:
    ``coupling="affine", permutation="conv1x1"`` (Glow) and ``coupling="additive", permutation="reverse"``
    (Real NVP's permutation with NICE's coupling). Defaults: Glow's CIFAR10 model (3 scales of 32 steps, width 512).
    """

    in_shape: tuple[int, int, int]
    n_steps: tuple[int, ...] = (32, 32, 32)
    strides: tuple[int, ...] = (1, 2, 2)
    channels: tuple[int, ...] = (512, 512, 512)
    coupling: str = "affine"
    permutation: str = "conv1x1"
    init_ds: int = 2
    inj_pad: int = 0

    def __post_init__(self) -> None:
        if not (len(self.n_steps) == len(self.strides) == len(self.channels)) or not self.n_steps:
            raise ValueError(
                f"n_steps {self.n_steps}, strides {self.strides} and channels {self.channels} must be non-empty and "
                "of equal length (one entry per scale)"
            )
        if any(s not in (1, 2) for s in self.strides) or self.init_ds not in (1, 2):
            raise ValueError(f"strides and init_ds must be 1 or 2 (2 squeezes), got {self.strides}, {self.init_ds}")
        if self.inj_pad < 0 or any(n < 1 for n in self.n_steps) or any(c < 1 for c in self.channels):
            raise ValueError("inj_pad must be >= 0, and every n_steps and channels entry >= 1")
        if self.coupling not in COUPLINGS or self.permutation not in PERMUTATIONS:
            raise ValueError(
                f"coupling must be one of {COUPLINGS} and permutation one of {PERMUTATIONS}, "
                f"got {self.coupling!r}, {self.permutation!r}"
            )


class GlowClassifier(nn.Module):
    """Glow without its generative part, as a classifier (Sec. 5.2): invertible body -> BN -> ReLU -> global average
    pool -> linear, the head of :class:`iresnet.models.IResNetClassifier`.

    Body: ``init_ds`` squeeze, injective padding, then per scale an optional squeeze and ``n_steps`` steps of
    :func:`glow_step`; nothing is factored out, so the final features hold every input dimension (as the i-ResNet's).
    ``x: (B, *in_shape) -> logits: (B, n_classes)``.

    >>> config = GlowConfig(in_shape=(1, 8, 8), n_steps=(1, 1), strides=(1, 2), channels=(8, 8), init_ds=1, inj_pad=1)
    >>> model = GlowClassifier(config).eval()
    >>> x = torch.randn(2, 1, 8, 8)
    >>> model(x).shape, bool((model.reconstruct(model.features(x)) - x).abs().max() < 1e-5)
    (torch.Size([2, 10]), True)
    """

    def __init__(self, config: GlowConfig, n_classes: int = 10) -> None:
        super().__init__()
        self.config = config
        shape = config.in_shape
        layers: list[Invertible] = []
        if config.init_ds > 1:
            shape = _squeezed(shape, config.init_ds, "init_ds")
            layers.append(Squeeze(config.init_ds))
        if config.inj_pad:
            layers.append(InjectivePad(config.inj_pad))
            shape = (shape[0] + config.inj_pad, shape[1], shape[2])
        for scale, stride in enumerate(config.strides):
            if stride == 2:
                shape = _squeezed(shape, 2, f"scale {scale}")
                layers.append(Squeeze(2))
            if shape[0] < 2:
                raise ValueError(
                    f"scale {scale} has {shape[0]} channel(s): a coupling needs at least 2; add inj_pad or init_ds 2"
                )
            for _ in range(config.n_steps[scale]):
                layers.append(glow_step(shape[0], config.channels[scale], config.coupling, config.permutation))
        self.body = InvertibleSequential(layers)
        self.feature_shape = shape
        self.head = classifier_head(shape[0], n_classes)

    def features(self, x: Tensor) -> Tensor:
        """Final features ``(B, *feature_shape)`` of the invertible body."""
        return self.body(x)[0]

    def reconstruct(self, features: Tensor) -> Tensor:
        """The input from the final features: every layer's analytic inverse."""
        return self.body.inverse(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
