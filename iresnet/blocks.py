"""The invertible residual block ``F(x) = x + g(x)`` (Sec. 2) and the residual branches ``g`` it is built from."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import Tensor, nn

from iresnet.base import Invertible
from iresnet.inverse import InverseInfo, InverseSettings, fixed_point_inverse
from iresnet.layers import make_nonlinearity
from iresnet.logdet import LogDetSettings, estimate_logdet
from iresnet.spectral_norm import LipschitzConv2d, LipschitzLinear, frozen_weights, layer_lipschitz_bound

__all__ = [
    "InvertibleResidualBlock",
    "conv_branch",
    "inverse_settings_as",
    "lipschitz_bounds",
    "mlp_branch",
    "residual_blocks",
    "set_inverse_settings",
]


class InvertibleResidualBlock(Invertible):
    """``y = x + g(x)``, invertible when ``Lip(g) < 1`` (Theorem 1).

    ``forward(x, settings) -> (y, logdet)`` estimates ``ln det(I + J_g(x))`` with the estimator ``settings`` names,
    or this block's default ``logdet_settings`` when it is ``None`` (Eq. 4 / Algorithm 2 by default);
    ``inverse(y)`` runs the fixed-point iteration of Algorithm 1 with ``inverse_settings`` and keeps its
    convergence report in ``last_inverse_info``.
    Shapes: ``x, y: (B, *shape)``, ``logdet: (B,)``.

    >>> import torch
    >>> block = InvertibleResidualBlock(mlp_branch(2, 16, 2, coeff=0.9)).eval()
    >>> x = torch.randn(5, 2)
    >>> y, logdet = block(x)
    >>> logdet.shape, block.lipschitz_bound() < 1, bool((block.inverse(y) - x).abs().max() < 1e-4)
    (torch.Size([5]), True, True)
    """

    def __init__(
        self,
        g: nn.Module,
        logdet_settings: LogDetSettings | None = None,
        inverse_settings: InverseSettings | None = None,
    ) -> None:
        super().__init__()
        self.g = g
        self.logdet_settings = logdet_settings or LogDetSettings()
        self.inverse_settings = inverse_settings or InverseSettings()
        self.last_inverse_info: InverseInfo | None = None

    def forward(self, x: Tensor, settings: LogDetSettings | None = None) -> tuple[Tensor, Tensor]:
        gx, logdet = estimate_logdet(self.g, x, settings or self.logdet_settings)
        return x + gx, logdet

    def inverse(self, y: Tensor) -> Tensor:
        # One set of normalised weights for all steps: no power iteration, spectral-norm buffers left untouched.
        with torch.no_grad(), frozen_weights(self.g):
            x, self.last_inverse_info = fixed_point_inverse(
                self.g, y, max_iter=self.inverse_settings.max_iter, atol=self.inverse_settings.atol
            )
        return x

    def lipschitz_bound(self) -> float:
        """Certified upper bound on ``Lip(g)``: the product of the exact norms of its linear layers.

        The nonlinearities are 1-Lipschitz; a BatchNorm layer (the non-invertible baseline) in eval mode is a
        per-channel affine map and contributes its largest ``|gamma| / sqrt(var + eps)``.
        """
        bound = 1.0
        for module in self.g.modules():
            if isinstance(module, (LipschitzConv2d, LipschitzLinear)):
                bound *= layer_lipschitz_bound(module)
            elif isinstance(module, nn.BatchNorm2d):
                running_var = cast(Tensor, module.running_var)  # tracked: set by BatchNorm2d's defaults
                scale = module.weight.detach().abs() / (running_var + module.eps).sqrt()
                bound *= float(scale.max())
        return bound


def conv_branch(
    channels: int,
    hidden: int,
    input_hw: tuple[int, int],
    coeff: float | None,
    n_power_iter: int = 1,
    nonlin: str = "elu",
    kernel_sizes: Sequence[int] = (3, 1, 3),
    batchnorm: bool = False,
) -> nn.Sequential:
    """Residual branch ``g = W3 ∘ φ ∘ W2 ∘ φ ∘ W1 ∘ φ`` of Eq. 2 (convs 3x3, 1x1, 3x3 by default).

    Maps ``(B, channels, H, W) -> (B, channels, H, W)`` with ``hidden`` channels inside. Every conv is spectrally
    normalised to ``coeff`` on the operator at ``input_hw`` (``coeff=None``: unconstrained, the vanilla baseline).
    The first φ makes the branch pre-activated (as in the classifier); ``batchnorm`` puts BatchNorm before each
    nonlinearity (the non-invertible BatchNorm baseline of Fig. 6).
    """
    widths = [channels] + [hidden] * (len(kernel_sizes) - 1) + [channels]
    layers: list[nn.Module] = []
    for i, kernel_size in enumerate(kernel_sizes):
        if batchnorm:
            layers.append(nn.BatchNorm2d(widths[i]))
        layers.append(make_nonlinearity(nonlin))
        layers.append(
            LipschitzConv2d(widths[i], widths[i + 1], kernel_size, input_hw, coeff=coeff, n_power_iter=n_power_iter)
        )
    return nn.Sequential(*layers)


def mlp_branch(
    features: int,
    hidden: int,
    n_hidden_layers: int,
    coeff: float | None,
    n_power_iter: int = 1,
    nonlin: str = "elu",
) -> nn.Sequential:
    """Residual branch of the 2-D toy flows: an MLP ``features -> hidden x n_hidden_layers -> features``.

    App. C.3 uses ``2-64-64-64-2`` with ELU; every linear layer is spectrally normalised to ``coeff``.
    Maps ``(B, features) -> (B, features)``.
    """
    widths = [features] + [hidden] * n_hidden_layers + [features]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i > 0:
            layers.append(make_nonlinearity(nonlin))
        layers.append(LipschitzLinear(widths[i], widths[i + 1], coeff=coeff, n_power_iter=n_power_iter))
    return nn.Sequential(*layers)


def residual_blocks(module: nn.Module) -> list[InvertibleResidualBlock]:
    """Every residual block inside ``module``, in order."""
    return [m for m in module.modules() if isinstance(m, InvertibleResidualBlock)]


def set_inverse_settings(module: nn.Module, settings: InverseSettings) -> None:
    """Use ``settings`` for the fixed-point inverse of every residual block inside ``module``."""
    for block in residual_blocks(module):
        block.inverse_settings = settings


def lipschitz_bounds(module: nn.Module) -> list[float]:
    """The certified ``Lip(g)`` of every residual block inside ``module``, in order (the ``L_b`` of Theorem 3 and
    Lemma 7; :meth:`InvertibleResidualBlock.lipschitz_bound`)."""
    return [block.lipschitz_bound() for block in residual_blocks(module)]


@contextmanager
def inverse_settings_as(module: nn.Module, settings: InverseSettings) -> Iterator[None]:
    """Every residual block inside ``module`` inverts with ``settings`` within the ``with``; each block's own
    settings come back afterwards, also after an exception.

    >>> import torch
    >>> from iresnet import InverseSettings, InvertibleResidualBlock, mlp_branch
    >>> block = InvertibleResidualBlock(mlp_branch(2, 8, 1, coeff=0.5))
    >>> with inverse_settings_as(block, InverseSettings(max_iter=3, atol=0.0)):
    ...     _ = block.inverse(torch.zeros(4, 2))
    >>> block.last_inverse_info.iterations, block.inverse_settings.max_iter
    (3, 100)
    """
    with _settings_as(module, "inverse_settings", settings):
        yield


@contextmanager
def _settings_as(module: nn.Module, name: str, settings: object) -> Iterator[None]:
    blocks = residual_blocks(module)
    saved = [getattr(block, name) for block in blocks]
    try:
        for block in blocks:
            setattr(block, name, settings)
        yield
    finally:
        for block, own in zip(blocks, saved):
            setattr(block, name, own)
