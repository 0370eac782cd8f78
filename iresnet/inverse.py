"""Fixed-point inverse of a residual block ``F(x) = x + g(x)`` (Algorithm 1) with a convergence report.

``F(x) = y`` means ``x = y - g(x)``: a fixed point of ``T(x) = y - g(x)``, a contraction when ``Lip(g) < 1``
(Banach; Theorem 1). The step ``x_{k+1} - x_k = y - F(x_k)`` is exactly the equation residual of ``x_k``, so it is
what the stopping rule and the report use. Nothing here assumes ``Lip(g) < 1``: an expansive ``g`` (the vanilla
baseline) is reported as not converged, never returned silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["InverseInfo", "InverseSettings", "fixed_point_inverse", "lipschitz_error_bound"]


@dataclass(frozen=True)
class InverseSettings:
    """Stopping rule of the fixed-point inverse: at most ``max_iter`` steps, stop once the residual is ``<= atol``.

    ``atol = 0`` never stops early, so exactly ``max_iter`` steps run (error-vs-iterations studies, Fig. 8).
    """

    max_iter: int = 100
    atol: float = 1e-5

    def __post_init__(self) -> None:
        _check_settings("InverseSettings.", self.max_iter, self.atol)


@dataclass
class InverseInfo:
    """What the fixed-point iteration did.

    ``converged``: the last residual is finite and ``<= atol``. ``iterations``: steps taken (evaluations of g).
    ``residual``: the last ``max|x_k - x_{k-1}| = max|y - F(x_{k-1})|`` over the whole batch (NaN or inf when the
    iteration blew up). ``residuals``: the same per step. Readable as ``info.converged`` or ``info["converged"]``.
    """

    converged: bool
    iterations: int
    residual: float
    residuals: list[float] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(f"InverseInfo has no field {key!r}; fields: {[f.name for f in fields(self)]}")
        return getattr(self, key)


def fixed_point_inverse(
    g: Callable[[Tensor], Tensor],
    y: Tensor,
    max_iter: int = 100,
    atol: float = 1e-5,
    differentiable: bool = False,
) -> tuple[Tensor, InverseInfo]:
    """Solve ``x + g(x) = y`` by ``x_0 = y``, ``x_{k+1} = y - g(x_k)`` (Algorithm 1).

    Stops when the residual ``max|x_{k+1} - x_k|`` (the equation residual of ``x_k``) is ``<= atol`` or after
    ``max_iter`` steps; ``atol = 0`` always runs ``max_iter`` steps. The returned ``x`` is the last iterate
    ``x_{k+1}``: for a contraction its own residual is at most ``Lip(g)`` times the reported one and its error at most
    ``Lip(g) / (1 - Lip(g))`` times it. A non-finite iterate stops the iteration as not converged; the last finite
    iterate is returned. Runs under ``torch.no_grad()`` unless ``differentiable``.
    Shapes: ``y: (B, *shape)`` -> ``x: (B, *shape)``.

    >>> import torch
    >>> x, info = fixed_point_inverse(lambda x: 0.5 * torch.sin(x), torch.tensor([[1.0]]), atol=1e-6)
    >>> info.converged, abs(float(x + 0.5 * torch.sin(x)) - 1.0) < 1e-5
    (True, True)
    """
    _check_settings("", max_iter, atol)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        x = y
        residuals: list[float] = []
        for _ in range(max_iter):
            x_next = y - g(x)
            residual = float((x_next - x).detach().abs().max())
            residuals.append(residual)
            if not math.isfinite(residual):  # x is finite, so a NaN/inf anywhere in x_next shows up here
                return x, InverseInfo(False, len(residuals), residual, residuals)
            x = x_next
            if atol > 0 and residual <= atol:
                break
    last = residuals[-1]
    return x, InverseInfo(last <= atol, len(residuals), last, residuals)


def lipschitz_error_bound(lipschitz: float, n: int, first_step: float) -> float:
    """Eq. 1: ``‖x_n - x*‖ <= L^n / (1 - L) · ‖x_1 - x_0‖`` for a contraction with ``Lip(g) <= L < 1``.

    Holds in whichever norm ``L`` and ``first_step`` are measured in (use the same one for the error).
    """
    if not isinstance(lipschitz, (int, float)) or isinstance(lipschitz, bool) or not 0.0 <= lipschitz < 1.0:
        raise ValueError(f"lipschitz must lie in [0, 1) for the fixed-point bound (Eq. 1), got {lipschitz!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n (number of iterations) must be an integer >= 0, got {n!r}")
    if not isinstance(first_step, (int, float)) or not 0.0 <= first_step < math.inf:
        raise ValueError(f"first_step (‖x_1 - x_0‖) must be a finite number >= 0, got {first_step!r}")
    return float(lipschitz) ** n / (1.0 - float(lipschitz)) * float(first_step)


def _check_settings(prefix: str, max_iter: int, atol: float) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{prefix}max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not 0.0 <= atol < math.inf:
        raise ValueError(f"{prefix}atol must be a finite number >= 0 (0 runs all max_iter steps), got {atol!r}")
