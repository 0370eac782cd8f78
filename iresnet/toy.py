"""2-D toy flows of Fig. 2 (App. C.3): an i-ResNet flow with exact log-det and a Glow-style coupling baseline."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from iresnet.base import Invertible, InvertibleSequential
from iresnet.blocks import InvertibleResidualBlock, mlp_branch
from iresnet.layers import ActNorm
from iresnet.logdet import LogDetSettings
from iresnet.priors import standard_normal_logprob


class Flow2d(nn.Module):
    """A flow on ``R^2`` with a standard normal base: ``ln p(x) = ln N(f(x)) + ln|det J_f(x)|``. ``(B, 2) -> (B,)``."""

    def __init__(self, transform: Invertible) -> None:
        super().__init__()
        self.transform = transform

    def log_prob(self, x: Tensor) -> Tensor:
        z, logdet = self.transform(x)
        return standard_normal_logprob(z) + logdet

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, 2)`` samples through the inverse."""
        param = next(self.parameters())
        z = torch.randn(n, 2, generator=generator, dtype=param.dtype, device=param.device)
        return self.transform.inverse(z)


def toy_iresnet(
    n_blocks: int = 100, hidden: int = 64, n_hidden_layers: int = 3, coeff: float = 0.9,
    n_power_iter: int = 1, nonlin: str = "elu",
) -> Flow2d:
    """i-ResNet toy flow: ``n_blocks`` residual blocks with MLP branches (2-64-64-64-2, ELU), ActNorm after each.

    The log-det is exact (brute-force 2x2 Jacobian), as in App. C.3.
    """
    exact = LogDetSettings(estimator="exact")
    layers: list[Invertible] = []
    for _ in range(n_blocks):
        branch = mlp_branch(2, hidden, n_hidden_layers, coeff, n_power_iter, nonlin)
        layers += [InvertibleResidualBlock(branch, exact), ActNorm(2)]
    return Flow2d(InvertibleSequential(layers))


class AffineCoupling(Invertible):
    """Glow / Real NVP affine coupling on ``(B, 2)``: ``y1 = x1``, ``y2 = x2 · exp(s(x1)) + t(x1)``.

    ``s`` passes through ``tanh`` to keep early training stable; ``logdet = s(x1)``. The network's last layer
    starts at zero, so the layer starts as the identity.
    """

    def __init__(self, hidden: int = 64, n_hidden_layers: int = 3) -> None:
        super().__init__()
        widths = [1] + [hidden] * n_hidden_layers
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ELU()]
        last = nn.Linear(widths[-1], 2)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def _scale_shift(self, x1: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(x1).chunk(2, dim=1)
        return torch.tanh(s), t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
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

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = torch.linalg.slogdet(self.weight)[1]
        return x @ self.weight.T, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return torch.linalg.solve(self.weight, y.T).T


def toy_glow(n_layers: int = 100, hidden: int = 64, n_hidden_layers: int = 3) -> Flow2d:
    """Glow-style toy flow: ``n_layers`` x (ActNorm, invertible linear map, affine coupling), App. C.3."""
    layers: list[Invertible] = []
    for _ in range(n_layers):
        layers += [ActNorm(2), InvertibleLinear(2), AffineCoupling(hidden, n_hidden_layers)]
    return Flow2d(InvertibleSequential(layers))
