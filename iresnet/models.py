"""The i-ResNet classifier (Sec. 5.1, App. C.2), its vanilla / BatchNorm baselines, and the multiscale flow
(App. C.3)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from iresnet.base import Invertible, InvertibleSequential
from iresnet.blocks import InvertibleResidualBlock, conv_branch
from iresnet.layers import ActNorm, InjectivePad, Logit, Squeeze
from iresnet.logdet import LogDetSettings
from iresnet.priors import ConditionalGaussian, DiagonalGaussian

__all__ = [
    "FLOW_PRIORS",
    "FlowConfig",
    "IResNetClassifier",
    "MultiscaleFlow",
    "ResNetConfig",
    "bits_per_dim",
    "classifier_head",
]


@dataclass(frozen=True)
class ResNetConfig:
    """Options shared by the classifier and the flow; named after the paper's command line.

    ``n_blocks`` / ``strides`` / ``channels`` are per stage (``--nBlocks --nStrides --nChannels``): a stride of 2
    squeezes (spatial /2, channels x4) before the stage; ``channels`` is the hidden width of the residual branch.
    ``coeff`` is the Lipschitz coefficient c (``--coeff``); ``None`` removes the constraint (vanilla baseline).
    ``init_ds`` squeezes the input by that factor first (1: none); ``inj_pad`` appends zero channels (classifier).
    """

    in_shape: tuple[int, int, int]
    n_blocks: tuple[int, ...] = (7, 7, 7)
    strides: tuple[int, ...] = (1, 2, 2)
    channels: tuple[int, ...] = (32, 64, 128)
    coeff: float | None = 0.9
    n_power_iter: int = 1
    nonlin: str = "elu"
    init_ds: int = 1
    inj_pad: int = 0
    actnorm: bool = True
    batchnorm: bool = False
    kernel_sizes: tuple[int, ...] = (3, 1, 3)

    def __post_init__(self) -> None:
        if not (len(self.n_blocks) == len(self.strides) == len(self.channels)) or not self.n_blocks:
            raise ValueError(
                f"n_blocks {self.n_blocks}, strides {self.strides} and channels {self.channels} must be non-empty "
                "and of equal length (one entry per stage)"
            )
        if any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"strides must be 1 or 2 (2 squeezes), got {self.strides}")
        if self.init_ds not in (1, 2):
            raise ValueError(f"init_ds must be 1 (no squeeze) or 2, got {self.init_ds}")
        if self.coeff is not None and not 0 < self.coeff < 1:
            raise ValueError(
                f"coeff must lie in (0, 1) for an invertible network, or be None (vanilla); got {self.coeff}"
            )
        if self.inj_pad < 0 or any(n < 1 for n in self.n_blocks) or any(c < 1 for c in self.channels):
            raise ValueError("inj_pad must be >= 0, and every n_blocks and channels entry >= 1")


def _squeezed(shape: tuple[int, int, int], factor: int, where: str) -> tuple[int, int, int]:
    c, h, w = shape
    if h % factor or w % factor:
        raise ValueError(
            f"{where}: spatial size {h}x{w} is not divisible by the squeeze factor {factor}; "
            "pad the input (e.g. data.pad_to_32) or use fewer stride-2 stages"
        )
    return (c * factor * factor, h // factor, w // factor)


def _stage_blocks(
    config: ResNetConfig, stage: int, shape: tuple[int, int, int], logdet: LogDetSettings
) -> list[Invertible]:
    """``n_blocks[stage]`` units of (ActNorm, residual block) on tensors of ``shape``."""
    c, h, w = shape
    layers: list[Invertible] = []
    for _ in range(config.n_blocks[stage]):
        if config.actnorm:
            layers.append(ActNorm(c))
        branch = conv_branch(
            c,
            config.channels[stage],
            (h, w),
            config.coeff,
            config.n_power_iter,
            config.nonlin,
            config.kernel_sizes,
            batchnorm=config.batchnorm,
        )
        layers.append(InvertibleResidualBlock(branch, logdet))
    return layers


def classifier_head(channels: int, n_classes: int) -> nn.Sequential:
    """The classification head on an invertible body's final features (App. C.2): BatchNorm -> ReLU -> global average
    pool -> linear. ``(B, channels, H, W) -> (B, n_classes)``; shared by the i-ResNet and the Glow classifier."""
    return nn.Sequential(
        nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes)
    )


class IResNetClassifier(nn.Module):
    """i-ResNet classifier: invertible body -> BN -> ReLU -> global average pool -> linear (App. C.2).

    The body (``init_ds`` squeeze, injective padding, stages of ActNorm + residual blocks with squeezes between)
    is an ``InvertibleSequential``, so the input can be reconstructed from the final features (Fig. 3/7/8).
    ``x: (B, *in_shape) -> logits: (B, n_classes)``.

    >>> config = ResNetConfig(in_shape=(1, 8, 8), n_blocks=(1, 1), strides=(1, 2), channels=(8, 8), inj_pad=3)
    >>> model = IResNetClassifier(config).eval()
    >>> x = torch.randn(2, 1, 8, 8)
    >>> model(x).shape, bool((model.reconstruct(model.features(x)) - x).abs().max() < 1e-4)
    (torch.Size([2, 10]), True)
    """

    def __init__(self, config: ResNetConfig, n_classes: int = 10) -> None:
        super().__init__()
        self.config = config
        no_logdet = LogDetSettings(estimator="none")
        shape = config.in_shape
        layers: list[Invertible] = []
        if config.init_ds > 1:
            shape = _squeezed(shape, config.init_ds, "init_ds")
            layers.append(Squeeze(config.init_ds))
        if config.inj_pad:
            layers.append(InjectivePad(config.inj_pad))
            shape = (shape[0] + config.inj_pad, shape[1], shape[2])
        for stage, stride in enumerate(config.strides):
            if stride == 2:
                shape = _squeezed(shape, 2, f"stage {stage}")
                layers.append(Squeeze(2))
            layers.extend(_stage_blocks(config, stage, shape, no_logdet))
        self.body = InvertibleSequential(layers)
        self.feature_shape = shape
        self.head = classifier_head(shape[0], n_classes)

    def features(self, x: Tensor) -> Tensor:
        """Final features ``(B, *feature_shape)`` of the invertible body."""
        return self.body(x)[0]

    def reconstruct(self, features: Tensor) -> Tensor:
        """Invert the body (Algorithm 1 in every block, with each block's ``inverse_settings``)."""
        return self.body.inverse(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


FLOW_PRIORS: tuple[str, ...] = ("diagonal", "conditional")


@dataclass(frozen=True)
class FlowConfig(ResNetConfig):
    """A multiscale flow (App. C.3): after every stage but the last, half the channels are factored out.

    Defaults follow the seed's density command (``--nBlocks 16 16 16 --nStrides 1 2 2 --nChannels 512 512 512
    --coeff 0.9 --numSeriesTerms 5``) with an initial squeeze. ``learned_prior`` selects a learned diagonal Gaussian
    per factored-out part instead of the standard normal.

    Options whose defaults keep the paper's flow: ``logit_alpha`` (None: none) puts a :class:`~iresnet.layers.Logit`
    layer with that ``α`` first, so the flow models ``logit`` space while its log-det keeps every likelihood in pixel
    space; ``prior="conditional"`` replaces the factored-out parts' priors by Glow's
    :class:`~iresnet.priors.ConditionalGaussian` given the kept half (``"diagonal"``: ``learned_prior`` decides; the
    last scale's prior always follows ``learned_prior``); ``factor_out=False`` keeps every channel to the end, with one
    prior over the last stage's output (single scale).
    """

    n_blocks: tuple[int, ...] = (16, 16, 16)
    channels: tuple[int, ...] = (512, 512, 512)
    init_ds: int = 2
    learned_prior: bool = True
    logdet: LogDetSettings = field(default_factory=LogDetSettings)
    logit_alpha: float | None = None
    prior: str = "diagonal"
    factor_out: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logit_alpha is not None and not 0 < self.logit_alpha < 0.5:
            raise ValueError(f"logit_alpha must lie in (0, 1/2), or be None (no logit layer); got {self.logit_alpha}")
        if self.prior not in FLOW_PRIORS:
            raise ValueError(f"prior must be one of {', '.join(map(repr, FLOW_PRIORS))}, got {self.prior!r}")
        if self.prior == "conditional" and (not self.factor_out or len(self.strides) < 2):
            raise ValueError("prior 'conditional' needs factored-out parts: factor_out=True and at least 2 stages")
        if self.inj_pad:
            raise ValueError("a flow must be bijective: inj_pad must be 0 for the multiscale flow")
        if self.coeff is None:
            raise ValueError("a flow needs the Lipschitz constraint: coeff must lie in (0, 1), not None")


class MultiscaleFlow(nn.Module):
    """Multiscale i-ResNet flow like Glow / Real NVP: ``ln p(x) = Σ_i ln p(z_i) + ln|det J_F(x)|`` (Eq. 3).

    ``x: (B, *in_shape)`` (dequantised, in ``[-0.5, 0.5]``) ``-> zs``: one latent per scale; ``log_prob(x): (B,)``.
    ``block_dims[i]`` is the dimension of the input of ``residual_blocks(self)[i]`` (the ``d`` of Theorem 3).

    >>> flow = MultiscaleFlow(FlowConfig(in_shape=(1, 4, 4), n_blocks=(1, 1), strides=(1, 2), channels=(8, 8)))
    >>> x = torch.rand(3, 1, 4, 4) - 0.5
    >>> bits_per_dim(flow.log_prob(x), flow.n_dims).shape  # in train mode: ActNorm initialises on this batch
    torch.Size([3])
    >>> flow = flow.eval()  # fixed weights: no power-iteration step between encoding and decoding
    >>> bool((flow.decode(flow.encode(x)[0]) - x).abs().max() < 1e-4)
    True

    With ``factor_out`` (the default), ``zs[i]`` for ``i`` below the last stage is the first half of stage ``i``'s
    output channels, and ``priors[i]`` its prior (conditional on the second, kept half with ``prior="conditional"``);
    without it, ``zs`` and ``priors`` hold a single entry.
    """

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        shape = config.in_shape
        self.n_dims = math.prod(shape)
        self.stages = nn.ModuleList()
        self.priors = nn.ModuleList()
        self.block_dims: list[int] = []
        for stage, stride in enumerate(config.strides):
            layers: list[Invertible] = []
            if stage == 0 and config.logit_alpha is not None:
                layers.append(Logit(config.logit_alpha))
            squeeze = config.init_ds if stage == 0 else 1
            squeeze *= stride
            if squeeze > 1:
                shape = _squeezed(shape, squeeze, f"stage {stage}")
                layers.append(Squeeze(squeeze))
            layers.extend(_stage_blocks(config, stage, shape, config.logdet))
            self.block_dims.extend([math.prod(shape)] * config.n_blocks[stage])
            self.stages.append(InvertibleSequential(layers))
            last = stage == len(config.strides) - 1
            if last:
                self.priors.append(DiagonalGaussian(shape, learned=config.learned_prior))
            elif config.factor_out:
                if shape[0] % 2:
                    raise ValueError(f"stage {stage}: {shape[0]} channels cannot be split in half for factor-out")
                shape = (shape[0] // 2, shape[1], shape[2])
                if config.prior == "conditional":
                    self.priors.append(ConditionalGaussian(shape, shape[0]))
                else:
                    self.priors.append(DiagonalGaussian(shape, learned=config.learned_prior))

    def _factors(self, stage: int) -> bool:
        """Whether half of stage ``stage``'s output is factored out."""
        return self.config.factor_out and stage < len(self.stages) - 1

    def _encode(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """``x -> (zs, kept, logdet)``; ``kept[i]`` is the half of stage ``i``'s output that goes on (``zs[i]``'s
        condition), for every factored-out ``zs[i]``. ``settings``: the log-det estimator of this call (``None``:
        the configured one)."""
        zs: list[Tensor] = []
        kept: list[Tensor] = []
        logdet = x.new_zeros(x.shape[0])
        h = x
        for stage, layers in enumerate(self.stages):
            h, stage_logdet = layers(h, settings)
            logdet = logdet + stage_logdet
            if self._factors(stage):
                z, h = h.chunk(2, dim=1)
                zs.append(z)
                kept.append(h)
        zs.append(h)
        return zs, kept, logdet

    def encode(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[list[Tensor], Tensor]:
        """``x -> (zs, logdet)``: the latents of every scale and ``ln|det J_F(x)|`` of shape ``(B,)``, estimated with
        ``settings`` (``None``: the configured estimator; ``LogDetSettings("none")``: no log-det, zeros)."""
        zs, _, logdet = self._encode(x, settings)
        return zs, logdet

    def _decode(self, top: Tensor, factored: Callable[[int, Tensor], Tensor]) -> Tensor:
        """Invert from the last latent ``top``; ``factored(stage, kept)`` gives the factored-out part of ``stage``."""
        h = top
        for stage in reversed(range(len(self.stages))):
            if self._factors(stage):
                h = torch.cat([factored(stage, h), h], dim=1)
            h = cast(Invertible, self.stages[stage]).inverse(h)
        return h

    def decode(self, zs: list[Tensor]) -> Tensor:
        """Inverse of ``encode`` (fixed-point inverse in every block)."""
        return self._decode(zs[-1], lambda stage, _: zs[stage])

    def log_prob_parts(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        """``(ln p(z), ln|det J_F(x)|)``, each ``(B,)``: the two terms of Eq. 3, whose sum is :meth:`log_prob`."""
        zs, kept, logdet = self._encode(x, settings)
        priors = self._priors()
        if self.config.prior == "conditional":
            factored = sum(prior.log_prob(z, h) for prior, z, h in zip(priors[:-1], zs[:-1], kept))
            return factored + priors[-1].log_prob(zs[-1]), logdet
        return cast(Tensor, sum(prior.log_prob(z) for prior, z in zip(priors, zs))), logdet

    def _priors(self) -> list[Any]:
        """The prior of each scale: a DiagonalGaussian, or a ConditionalGaussian for the factored-out parts."""
        return list(self.priors)

    def log_prob(self, x: Tensor, settings: LogDetSettings | None = None) -> Tensor:
        """``ln p(x)`` per example, shape ``(B,)`` (Eq. 3), the log-det estimated with ``settings`` (``None``: the
        configured estimator, ``FlowConfig.logdet``)."""
        logpz, logdet = self.log_prob_parts(x, settings)
        return logpz + logdet

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> Tensor:
        return self.log_prob(x, settings)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``(n, *in_shape)`` drawn from the priors and pushed through the inverse.

        With the conditional prior, the last scale's latent is drawn first and each factored-out part given the kept
        half that the inverse has reached (coarse to fine); otherwise every prior is drawn in order, then inverted.
        """
        priors = self._priors()
        if self.config.prior == "conditional":
            top = priors[-1].sample(n, temperature, generator)
            return self._decode(top, lambda stage, h: priors[stage].sample(h, temperature, generator))
        return self.decode([prior.sample(n, temperature, generator) for prior in priors])


def bits_per_dim(log_prob: Tensor, n_dims: int, n_bins: int = 256) -> Tensor:
    """Bits per dimension of discrete data from the density of its dequantised version.

    With data scaled to bins of width ``1/n_bins``, ``P(x) ≈ p(x) / n_bins^D``, so
    ``bpd = (-ln p(x) + D ln n_bins) / (D ln 2)``. ``n_dims`` (``D``) must be stated: MNIST counts 784 dimensions,
    but 3072 once padded to 32x32 and repeated to 3 channels as in the authors' code. ``(B,) -> (B,)``.
    """
    return (-log_prob + n_dims * math.log(n_bins)) / (n_dims * math.log(2))
