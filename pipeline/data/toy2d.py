"""The 2-D densities of Fig. 2: samplers, and the deterministic train stream / test set drawn from them.

Every sampler is ``sampler(n, generator) -> (n, 2)`` float64, centred near the origin with a spread of a few units
(the heatmaps use one shared window, :data:`WINDOW`). Each one's mean and ``E‖x‖²`` follow in closed form from its
construction (:data:`SECOND_MOMENTS`), which the tests compare against.

Determinism: a batch is a function of ``(seed, dataset, purpose, step)`` only (:func:`stream_seed` hashes them), so
the i-ResNet and the Glow-style flow see exactly the same training points at every step, and the test set of a
dataset is fixed by the seed whatever was drawn before.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import Tensor

Sampler = Callable[[int, torch.Generator], Tensor]
WINDOW = 4.0  # heatmaps and the grid integral cover [-WINDOW, WINDOW]^2

_DTYPE = torch.float64


def _uniform(n: int, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g, dtype=_DTYPE)


def _normal(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g, dtype=_DTYPE)


def _polar(radius: Tensor, angle: Tensor) -> Tensor:
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)


# Constants of each density (also used by the closed-form moments below).
MOONS_NOISE = 0.1
GAUSS8_RADIUS, GAUSS8_STD = 2.5, 0.3
SPIRAL_TURNS_RAD, SPIRAL_SCALE, SPIRAL_NOISE = 3.0 * math.pi, 3.0, 0.1
RINGS_RADII, RINGS_NOISE = (0.75, 1.5, 2.25, 3.0), 0.08
CIRCLES_RADII, CIRCLES_NOISE = (1.0, 2.5), 0.1
PINWHEEL_ARMS, PINWHEEL_RADIAL_STD, PINWHEEL_TANGENTIAL_STD, PINWHEEL_RATE, PINWHEEL_SCALE = 5, 0.3, 0.1, 0.25, 2.0
SWISS_T0, SWISS_T1, SWISS_SCALE, SWISS_NOISE = 1.5 * math.pi, 4.5 * math.pi, 5.0, 0.1


def moons(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved half circles (upper ``(cos t, sin t)``, lower ``(1 - cos t, 1/2 - sin t)``, ``t ~ U(0, π)``)
    with ``N(0, 0.1²)`` noise, shifted by their exact mean ``(1/2, 1/4)`` and scaled by 2."""
    t = math.pi * _uniform(n, g)
    lower = torch.rand(n, generator=g) < 0.5
    upper_pts = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    lower_pts = torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
    x = torch.where(lower[:, None], lower_pts, upper_pts) + MOONS_NOISE * _normal((n, 2), g)
    return 2.0 * (x - torch.tensor([0.5, 0.25], dtype=_DTYPE))


def eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    """Equal mixture of 8 isotropic Gaussians (std 0.3) centred on a circle of radius 2.5."""
    k = torch.randint(0, 8, (n,), generator=g)
    return _polar(torch.full((n,), GAUSS8_RADIUS, dtype=_DTYPE), k.to(_DTYPE) * (math.pi / 4)) + GAUSS8_STD * _normal(
        (n, 2), g
    )


def checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the 8 unit squares ``[i, i+1) x [j, j+1)`` of ``[-2, 2)²`` with ``i + j`` even."""
    x = 4.0 * _uniform(n, g) - 2.0
    column = torch.floor(x)
    # Of the 4 rows, those with the column's parity are -2 + (column mod 2) and that + 2: pick one of the two.
    row = -2.0 + torch.remainder(column, 2.0) + 2.0 * torch.randint(0, 2, (n,), generator=g).to(_DTYPE)
    return torch.stack([x, row + _uniform(n, g)], dim=1)


def two_spirals(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved spirals: ``ρ = 3π·sqrt(u)``, point ``±ρ(-cos ρ, sin ρ) / 3`` plus ``N(0, 0.1²)`` noise."""
    rho = SPIRAL_TURNS_RAD * torch.sqrt(_uniform(n, g))
    sign = 1.0 - 2.0 * torch.randint(0, 2, (n,), generator=g).to(_DTYPE)
    arm = torch.stack([-torch.cos(rho) * rho, torch.sin(rho) * rho], dim=1) / SPIRAL_SCALE
    return sign[:, None] * arm + SPIRAL_NOISE * _normal((n, 2), g)


def _rings(radii: tuple[float, ...], weights: Tensor, noise: float, n: int, g: torch.Generator) -> Tensor:
    k = torch.multinomial(weights, n, replacement=True, generator=g)
    radius = torch.tensor(radii, dtype=_DTYPE)[k]
    return _polar(radius, 2 * math.pi * _uniform(n, g)) + noise * _normal((n, 2), g)


def rings(n: int, g: torch.Generator) -> Tensor:
    """Four concentric circles (radii 0.75 ... 3), each chosen with probability ∝ its radius (uniform along the
    total length), plus ``N(0, 0.08²)`` noise."""
    radii = torch.tensor(RINGS_RADII, dtype=_DTYPE)
    return _rings(RINGS_RADII, radii / radii.sum(), RINGS_NOISE, n, g)


def circles(n: int, g: torch.Generator) -> Tensor:
    """Two concentric circles (radii 1 and 2.5) with equal probability, plus ``N(0, 0.1²)`` noise."""
    return _rings(CIRCLES_RADII, torch.full((2,), 0.5, dtype=_DTYPE), CIRCLES_NOISE, n, g)


def pinwheel(n: int, g: torch.Generator) -> Tensor:
    """Five curved arms: ``(1 + 0.3 a, 0.1 b)``, ``a, b ~ N(0, 1)``, rotated by ``2πk/5 + 0.25 exp(1 + 0.3 a)``
    (the arm bends outwards), scaled by 2."""
    a, b = _normal((n,), g), _normal((n,), g)
    radial = 1.0 + PINWHEEL_RADIAL_STD * a
    k = torch.randint(0, PINWHEEL_ARMS, (n,), generator=g).to(_DTYPE)
    angle = 2 * math.pi * k / PINWHEEL_ARMS + PINWHEEL_RATE * torch.exp(radial)
    c, s = torch.cos(angle), torch.sin(angle)
    tangential = PINWHEEL_TANGENTIAL_STD * b
    return PINWHEEL_SCALE * torch.stack([c * radial - s * tangential, s * radial + c * tangential], dim=1)


def swissroll(n: int, g: torch.Generator) -> Tensor:
    """2-D swiss roll: ``t ~ U(1.5π, 4.5π)``, point ``(t cos t, t sin t) / 5`` plus ``N(0, 0.1²)`` noise."""
    t = SWISS_T0 + (SWISS_T1 - SWISS_T0) * _uniform(n, g)
    return _polar(t, t) / SWISS_SCALE + SWISS_NOISE * _normal((n, 2), g)


SAMPLERS: dict[str, Sampler] = {
    "moons": moons,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "2spirals": two_spirals,
    "rings": rings,
    "circles": circles,
    "pinwheel": pinwheel,
    "swissroll": swissroll,
}


def _mean_sq_uniform(lo: float, hi: float) -> float:
    """``E[t²]`` for ``t ~ U(lo, hi)``."""
    return (hi**3 - lo**3) / (3 * (hi - lo))


_RINGS_P = [r / sum(RINGS_RADII) for r in RINGS_RADII]

# E‖x‖² of each density, from its construction: isotropic N(0, s²) noise adds 2 s²; a rotation keeps the norm.
SECOND_MOMENTS: dict[str, float] = {
    # Upper arc ‖(cos t, sin t)‖² = 1; lower arc E[(1 - cos t)² + (1/2 - sin t)²] = 3/2 + 3/4 - 2/π (E sin t = 2/π);
    # their mean is (1/2, 1/4), so E‖x‖² = 4 (E‖p‖² - ‖(1/2, 1/4)‖² + 2 s²).
    "moons": 4 * ((1 + 9 / 4 - 2 / math.pi) / 2 - (0.25 + 0.0625) + 2 * MOONS_NOISE**2),
    "8gaussians": GAUSS8_RADIUS**2 + 2 * GAUSS8_STD**2,
    "checkerboard": 2 * 4.0 / 3.0,  # x ~ U(-2, 2), and y is uniform on [-2, 2) too (each column's rows alternate)
    "2spirals": SPIRAL_TURNS_RAD**2 / 2 / SPIRAL_SCALE**2 + 2 * SPIRAL_NOISE**2,  # ‖arm‖ = ρ/3, E ρ² = (3π)² E u
    "rings": sum(p * r**2 for p, r in zip(_RINGS_P, RINGS_RADII)) + 2 * RINGS_NOISE**2,
    "circles": sum(r**2 for r in CIRCLES_RADII) / 2 + 2 * CIRCLES_NOISE**2,
    "pinwheel": PINWHEEL_SCALE**2 * (1 + PINWHEEL_RADIAL_STD**2 + PINWHEEL_TANGENTIAL_STD**2),
    "swissroll": _mean_sq_uniform(SWISS_T0, SWISS_T1) / SWISS_SCALE**2 + 2 * SWISS_NOISE**2,
}

# Exact means where the construction is not symmetric about the origin.
MEANS: dict[str, tuple[float, float]] = {name: (0.0, 0.0) for name in SAMPLERS}
# swissroll: E[t cos t], E[t sin t] over U(t0, t1) by parts: ∫ t cos t = t sin t + cos t, ∫ t sin t = sin t - t cos t.
_span = SWISS_T1 - SWISS_T0
MEANS["swissroll"] = (
    ((SWISS_T1 * math.sin(SWISS_T1) + math.cos(SWISS_T1)) - (SWISS_T0 * math.sin(SWISS_T0) + math.cos(SWISS_T0)))
    / _span
    / SWISS_SCALE,
    ((math.sin(SWISS_T1) - SWISS_T1 * math.cos(SWISS_T1)) - (math.sin(SWISS_T0) - SWISS_T0 * math.cos(SWISS_T0)))
    / _span
    / SWISS_SCALE,
)


def check_dataset(name: str) -> Sampler:
    """The sampler of ``name``; a ValueError lists the known names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown toy dataset {name!r}; use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def stream_seed(seed: int, name: str, purpose: str, step: int = 0) -> int:
    """A 63-bit seed from ``(seed, name, purpose, step)`` via SHA-256 (stable across runs and platforms)."""
    text = f"{seed}/{name}/{purpose}/{step}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def sample(name: str, n: int, seed: int, purpose: str = "train", step: int = 0) -> Tensor:
    """``(n, 2)`` float64 points of dataset ``name``, a function of ``(seed, name, purpose, step)`` only.

    ``purpose`` separates independent streams (``"train"``: one batch per ``step``; ``"test"``: the test set).
    """
    sampler = check_dataset(name)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of points n must be a positive int, got {n!r}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    generator = torch.Generator().manual_seed(stream_seed(seed, name, purpose, step))
    return sampler(n, generator)


def reference_log_prob(name: str, x: Tensor) -> Tensor | None:
    """The true ``ln p(x)`` ``(B, 2) -> (B,)`` where it has a closed form (``8gaussians``, ``checkerboard``), else
    None. The test NLL of the true density is the floor a fitted flow's test NLL sits above (up to sampling noise)."""
    check_dataset(name)
    x = x.to(_DTYPE)
    if name == "8gaussians":
        centres = _polar(torch.full((8,), GAUSS8_RADIUS, dtype=_DTYPE), torch.arange(8, dtype=_DTYPE) * (math.pi / 4))
        sq = ((x[:, None, :] - centres[None]) ** 2).sum(-1)  # (B, 8)
        log_normal = -sq / (2 * GAUSS8_STD**2) - math.log(2 * math.pi * GAUSS8_STD**2)
        return torch.logsumexp(log_normal, dim=1) - math.log(8)
    if name == "checkerboard":
        inside = ((x >= -2) & (x < 2)).all(dim=1) & (torch.remainder(torch.floor(x).sum(dim=1), 2.0) == 0)
        log_p = torch.full((x.shape[0],), -math.log(8.0), dtype=_DTYPE)  # uniform on 8 unit squares
        return log_p.masked_fill(~inside, -math.inf)
    return None
