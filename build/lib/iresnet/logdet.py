"""Log-determinant of a residual block ``F(x) = x + g(x)``: estimators and bounds (Sec. 3 of the paper).

Every estimator is a plain function of a callable ``g`` mapping ``(B, *shape) -> (B, *shape)`` (a conv branch on
``(B, C, H, W)`` or an MLP on ``(B, 2)``) and returns ``(g(x), logdet)`` with ``logdet`` of shape ``(B,)`` holding
``ln det(I + J_g(x_b))`` per example. ``g`` must treat the examples of a batch independently (true for convolutions,
MLPs and normalisations in eval mode; not for BatchNorm in training mode): the Jacobian-vector products below are taken
through the batch sum.

Gradient mode decides what is returned: with gradients enabled the log-det is differentiable with respect to ``x``
and the parameters of ``g`` (the series is built with ``create_graph``); under ``torch.no_grad()`` the VJPs still run
(on a detached copy of ``x``) and detached results come back, so evaluation needs no special code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Branch = Callable[[Tensor], Tensor]
Estimator = Literal["series", "unbiased", "neumann", "exact", "none"]
Probe = Literal["gaussian", "rademacher"]
ESTIMATORS: tuple[str, ...] = ("series", "unbiased", "neumann", "exact", "none")
PROBES: tuple[str, ...] = ("gaussian", "rademacher")


@dataclass(frozen=True)
class LogDetSettings:
    """Which log-det estimator a residual block uses, and its knobs.

    ``estimator``: ``"series"`` (Algorithm 2, truncated Eq. 4), ``"unbiased"`` (Russian-roulette series length,
    Residual Flows), ``"neumann"`` (series value with the memory-saving Neumann gradient), ``"exact"`` (brute-force
    Jacobian, small inputs only) or ``"none"`` (zeros: classifiers do not need it).
    ``n_terms``: series terms n; ``n_samples``: Hutchinson probes per example (averaged); ``probe``: their law.
    ``n_exact_terms`` and ``p``: the unbiased estimator always evaluates the first ``n_exact_terms`` terms and then
    ``Geometric(p)`` more (``p`` is the stopping probability, so ``(1 - p) / p`` extra terms on average).
    """

    estimator: Estimator = "series"
    n_terms: int = 5
    n_samples: int = 1
    probe: Probe = "gaussian"
    n_exact_terms: int = 2
    p: float = 0.5

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"LogDetSettings.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.probe not in PROBES:
            raise ValueError(f"LogDetSettings.probe must be one of {PROBES}, got {self.probe!r}")
        _check_count("LogDetSettings.n_terms", self.n_terms, minimum=1)
        _check_count("LogDetSettings.n_samples", self.n_samples, minimum=1)
        _check_count("LogDetSettings.n_exact_terms", self.n_exact_terms, minimum=0)
        _check_probability("LogDetSettings.p", self.p)


def power_series_logdet(
    g: Branch,
    x: Tensor,
    n_terms: int,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    probe: Probe = "gaussian",
) -> tuple[Tensor, Tensor]:
    """Truncated power series of Eq. 4 with Hutchinson traces (Algorithm 2).

    ``logdet_b = mean_s Σ_{k=1..n} (-1)^{k+1} / k · v_sᵀ J_g(x_b)^k v_s``, each ``v_sᵀ J^k`` by k vector-Jacobian
    products, ``E[v] = 0``, ``Cov(v) = I``. Biased by at most ``truncation_bound(Lip(g), d, n)`` (Theorem 3).
    Shapes: ``x: (B, *shape)`` -> ``(g(x): (B, *shape), logdet: (B,))``.

    For a linear ``g(x) = a x`` in 1-D a ±1 probe gives the trace exactly, so the series is ``ln(1 + a)`` up to its
    truncation:

    >>> import math, torch
    >>> x = torch.ones(3, 1, dtype=torch.float64)
    >>> _, logdet = power_series_logdet(lambda x: 0.5 * x, x, n_terms=30, probe="rademacher")
    >>> abs(float(logdet[0]) - math.log(1.5)) < 1e-9
    True
    """
    _check_count("n_terms", n_terms, minimum=1)
    _check_hutchinson(x, n_samples, probe)
    with _branch_graph(g, x) as (x_in, gx, differentiable):
        coefficients = series_coefficients(n_terms, x)
        total = x.new_zeros(x.shape[0])
        for _ in range(n_samples):
            v = draw_probe(x, generator, probe)
            traces = _traces(gx, x_in, v, n_terms, differentiable)
            total = total + traces @ coefficients
    return _finish(gx, total / n_samples, differentiable)


def unbiased_logdet(
    g: Branch,
    x: Tensor,
    n_exact_terms: int = 2,
    p: float = 0.5,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    probe: Probe = "gaussian",
) -> tuple[Tensor, Tensor]:
    """Unbiased log-det with a random series length ("Russian roulette", Residual Flows, Chen et al. 2019).

    Per example and probe, ``N = n_exact_terms + G`` with ``G ~ Geometric(p)`` on ``{0, 1, ...}``, and
    ``logdet = Σ_{k=1..N} (-1)^{k+1} / k · vᵀ J^k v / P(N >= k)``, where
    ``P(N >= k) = (1 - p)^{max(0, k - n_exact_terms)}``.
    Its expectation is the full series of Eq. 4 when ``‖J_g‖₂ < 1``; its variance is finite when also
    ``Lip(g)² < 1 - p``. Shapes as in :func:`power_series_logdet`.
    """
    _check_count("n_exact_terms", n_exact_terms, minimum=0)
    _check_probability("p", p)
    _check_hutchinson(x, n_samples, probe)
    with _branch_graph(g, x) as (x_in, gx, differentiable):
        total = x.new_zeros(x.shape[0])
        for _ in range(n_samples):
            v = draw_probe(x, generator, probe)
            extra = torch.empty(x.shape[0], dtype=torch.float64, device=x.device).geometric_(p, generator=generator)
            length = n_exact_terms + extra.long() - 1  # geometric_ counts trials (>= 1); G counts failures (>= 0)
            n_max = int(length.max())
            if n_max == 0:
                continue
            k = torch.arange(1, n_max + 1, device=x.device)
            survival = (1.0 - p) ** (k - n_exact_terms).clamp(min=0).to(x.dtype)  # P(N >= k)
            weights = (k[None, :] <= length[:, None]).to(x.dtype) * (series_coefficients(n_max, x) / survival)
            traces = _traces(gx, x_in, v, n_max, differentiable)
            total = total + (traces * weights).sum(dim=1)
    return _finish(gx, total / n_samples, differentiable)


def neumann_logdet(
    g: Branch,
    x: Tensor,
    n_terms: int,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    probe: Probe = "gaussian",
) -> tuple[Tensor, Tensor]:
    """Truncated-series value with a memory-saving Neumann-series gradient (Residual Flows' trick).

    Value: exactly :func:`power_series_logdet` for the same probes (so logged bits/dim stay true).
    Gradient: ``∂/∂θ ln det(I + J) = tr((I + J)^{-1} ∂J/∂θ) ≈ wᵀ (∂J/∂θ) v`` with
    ``wᵀ = vᵀ Σ_{k=0}^{n-1} (-J)^k`` (likewise for ``x``). The n VJPs run without a graph; only one extra VJP,
    ``wᵀ J v`` with ``w`` held constant, is differentiated, so memory does not grow with n. The surrogate
    ``value.detach() + (s - s.detach())`` carries that gradient. Shapes as in :func:`power_series_logdet`.
    """
    _check_count("n_terms", n_terms, minimum=1)
    _check_hutchinson(x, n_samples, probe)
    with _branch_graph(g, x) as (x_in, gx, differentiable):
        coefficients = series_coefficients(n_terms, x)
        value = x.new_zeros(x.shape[0])
        surrogate = x.new_zeros(x.shape[0])
        for _ in range(n_samples):
            v = draw_probe(x, generator, probe)
            w, traces = v, []
            for k, u in enumerate(_vjp_powers(gx, x_in, v, n_terms, create_graph=False), start=1):
                traces.append(_dot(u, v))
                if k < n_terms:  # w = vᵀ Σ_{k=0}^{n-1} (-J)^k
                    w = w + (-1) ** k * u
            value = value + torch.stack(traces, dim=1) @ coefficients
            if differentiable:
                # d/dθ (wᵀ J v) with w, v constant = wᵀ (dJ/dθ) v: the Neumann estimate of tr((I+J)^{-1} dJ/dθ).
                surrogate = surrogate + _dot(_vjp(gx, x_in, w.detach(), create_graph=True), v)
    value = value / n_samples
    if not differentiable:
        return gx.detach(), value.detach()
    surrogate = surrogate / n_samples
    return gx, value.detach() + (surrogate - surrogate.detach())


# Elements of the basis vectors in one batched backward pass of branch_jacobian (16 MiB in float64).
_JACOBIAN_CHUNK = 1 << 21


def branch_jacobian(g: Branch, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(g(x), J)`` with ``J[b, i, j] = ∂g(x_b)_i / ∂x_b_j``, built from d vector-Jacobian products (basis vectors).

    ``g`` must treat examples independently (each VJP through the batch sum gives row i for all of them). Costs d
    backward passes and ``B·d²`` memory: small inputs only. Differentiable when gradients are enabled; without
    gradients the VJPs run as batches of basis vectors (``is_grads_batched``, :data:`_JACOBIAN_CHUNK` elements a
    pass: on a flow block 4x faster than a pass per row, and the same bytes). The batched passes are not used for a
    differentiable Jacobian: their double backward through the library's custom ELU was measured wrong by 1%.
    Shapes: ``x: (B, *shape)`` -> ``(g(x): (B, *shape), J: (B, d, d))``, ``d = prod(shape)``.
    """
    _check_input(x)
    with _branch_graph(g, x) as (x_in, gx, differentiable):
        batch, dim = x.shape[0], x[0].numel()
        per_pass = 1 if differentiable or not gx.requires_grad else max(1, _JACOBIAN_CHUNK // (batch * dim))
        eye = torch.eye(dim, dtype=x.dtype, device=x.device)
        rows = []
        for start in range(0, dim, per_pass):
            basis = eye[start : start + per_pass, None, :].expand(-1, batch, -1)  # (k, B, d): e_i for every example
            if per_pass == 1:
                row = _vjp(gx, x_in, basis[0].reshape(x.shape), differentiable).reshape(1, batch, dim)
            else:
                (row,) = torch.autograd.grad(gx, x_in, basis.reshape(-1, *x.shape), True, is_grads_batched=True)
            rows.append(row.reshape(-1, batch, dim))  # rows start .. start + k of every example's J
    return _finish(gx, torch.cat(rows).transpose(0, 1), differentiable)


def exact_logdet(g: Branch, x: Tensor) -> tuple[Tensor, Tensor]:
    """Brute-force ``ln|det(I + J_g(x_b))|`` per example from the full Jacobian (Eq. 3; the 2-D toy flows, tests).

    ``slogdet`` of ``I + J`` from :func:`branch_jacobian` (small inputs only). Differentiable when gradients are
    enabled. Shapes: ``x: (B, *shape)`` -> ``(g(x): (B, *shape), logdet: (B,))``.
    """
    gx, jacobian = branch_jacobian(g, x)
    eye = torch.eye(jacobian.shape[-1], dtype=x.dtype, device=x.device)
    return gx, torch.linalg.slogdet(eye + jacobian).logabsdet


def estimate_logdet(
    g: Branch, x: Tensor, settings: LogDetSettings, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``(g(x), logdet)`` with the estimator named in ``settings``; ``"none"`` gives ``(g(x), zeros(B))``."""
    s = settings
    if s.estimator == "series":
        return power_series_logdet(g, x, s.n_terms, s.n_samples, generator, s.probe)
    if s.estimator == "unbiased":
        return unbiased_logdet(g, x, s.n_exact_terms, s.p, s.n_samples, generator, s.probe)
    if s.estimator == "neumann":
        return neumann_logdet(g, x, s.n_terms, s.n_samples, generator, s.probe)
    if s.estimator == "exact":
        return exact_logdet(g, x)
    _check_input(x)
    gx = g(x)
    return gx, x.new_zeros(x.shape[0])


def hutchinson_traces(g: Branch, x: Tensor, probes: Tensor, n_powers: int) -> tuple[Tensor, Tensor]:
    """Per-probe Hutchinson estimates ``vᵀ J_g^k v`` for ``k = 1..n_powers`` from one chain of VJPs.

    Every truncation of Eq. 4 follows from these (useful to study bias and variance against n, Fig. 4/9), and basis
    vectors as probes give exact traces. Shapes: ``x: (B, *shape)``, ``probes: (S, B, *shape)`` ->
    ``(g(x): (B, *shape), traces: (S, B, n_powers))``. Gradient behaviour as in :func:`power_series_logdet`.
    """
    _check_count("n_powers", n_powers, minimum=1)
    _check_input(x)
    if probes.dim() != x.dim() + 1 or probes.shape[1:] != x.shape:
        raise ValueError(f"probes must have shape (S, *x.shape) = (S, {tuple(x.shape)}), got {tuple(probes.shape)}")
    with _branch_graph(g, x) as (x_in, gx, differentiable):
        traces = torch.stack([_traces(gx, x_in, v, n_powers, differentiable) for v in probes.to(x.dtype)])
    return _finish(gx, traces, differentiable)


def truncation_bound(lipschitz: float, dim: int, n_terms: int) -> float:
    """Theorem 3: ``|PS(J_g, n) - ln det(I + J_g)| <= -d (ln(1 - L) + Σ_{k=1..n} L^k / k) = d Σ_{k>n} L^k / k``.

    ``lipschitz`` is an upper bound on ``‖J_g‖₂`` in [0, 1); ``dim`` is d, the number of input dimensions.
    """
    _check_lipschitz("lipschitz", lipschitz)
    _check_count("dim", dim, minimum=1)
    _check_count("n_terms", n_terms, minimum=0)
    lip = float(lipschitz)
    if lip == 0.0:
        return 0.0
    closed_form = -math.log1p(-lip) - sum(lip**k / k for k in range(1, n_terms + 1))
    if closed_form > 1e-6 * -math.log1p(-lip):
        return dim * closed_form
    # The closed form cancels catastrophically when the tail is tiny: sum the tail directly instead.
    tail, k = 0.0, n_terms + 1
    term = lip**k / k
    while term > 0.0 and term / (1.0 - lip) > 1e-17 * tail:
        tail += term
        k += 1
        term = lip**k / k
    return dim * tail


def chain_truncation_bound(lipschitz: Sequence[float], dims: int | Sequence[int], n_terms: int) -> float:
    """Theorem 3 for a chain of blocks: the n-term estimates of all blocks together are off by at most
    ``Σ_t truncation_bound(L_t, d_t, n)`` nats; ``inf`` when some ``L_t >= 1`` (the series need not converge).

    ``dims``: the input dimension of each block, or one for all of them.
    """
    per_block = _per_block_dims(lipschitz, dims)
    if any(lip >= 1.0 for lip in lipschitz):
        return math.inf
    return sum(truncation_bound(lip, d, n_terms) for lip, d in zip(lipschitz, per_block))


def logdet_bounds(lipschitz: Sequence[float], dims: int | Sequence[int]) -> tuple[float, float]:
    """Lemma 7: ``Σ_t d_t ln(1 - L_t) <= ln|det J_F(x)| <= Σ_t d_t ln(1 + L_t)``.

    For a chain of residual blocks with ``Lip(g_t) <= L_t < 1`` on ``d_t``-dimensional inputs (``dims``: one per
    block, or one for all); returns ``(lower, upper)``.
    """
    per_block = _per_block_dims(lipschitz, dims)
    for t, (lip, d) in enumerate(zip(lipschitz, per_block)):
        _check_lipschitz(f"lipschitz[{t}]", lip)
        _check_count(f"dims[{t}]", d, minimum=1)
    lower = sum(d * math.log1p(-float(lip)) for lip, d in zip(lipschitz, per_block))
    upper = sum(d * math.log1p(float(lip)) for lip, d in zip(lipschitz, per_block))
    return lower, upper


def draw_probe(x: Tensor, generator: torch.Generator | None = None, probe: Probe = "gaussian") -> Tensor:
    """One Hutchinson probe shaped like ``x`` with ``E[v] = 0``, ``Cov(v) = I`` (Gaussian or Rademacher).

    ``generator``, when given, must live on ``x``'s device (as for ``torch.randn``).
    """
    _check_probe(probe)
    if probe == "gaussian":
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    signs = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
    return (2 * signs - 1).to(x.dtype)


def series_coefficients(n: int, like: Tensor) -> Tensor:
    """``(-1)^{k+1} / k`` for ``k = 1..n`` (Eq. 4), ``(n,)`` in the dtype and device of ``like``."""
    k = torch.arange(1, n + 1, dtype=like.dtype, device=like.device)
    return torch.where(k % 2 == 1, 1.0, -1.0).to(like.dtype) / k


# --- internals -------------------------------------------------------------------------------------------------


@contextmanager
def _branch_graph(g: Branch, x: Tensor) -> Iterator[tuple[Tensor, Tensor, bool]]:
    """``(x_in, g(x_in), differentiable)``, with autograd on inside the ``with`` whatever the caller's gradient mode.

    The VJPs need a graph of ``g`` even under ``torch.no_grad()``; ``differentiable`` is the caller's mode, i.e.
    whether the results keep their graph (:func:`_finish`). ``x_in`` is ``x`` or a detached copy (:func:`_tracked`);
    ``x_in`` and ``g(x_in)`` are both ``(B, *shape)``.
    """
    differentiable = torch.is_grad_enabled()
    with torch.enable_grad():
        x_in = _tracked(x, differentiable)
        yield x_in, _apply(g, x_in), differentiable


def _tracked(x: Tensor, differentiable: bool) -> Tensor:
    """``x`` itself when gradients should reach it, else a detached copy that requires grad (VJPs need a graph)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "log-det estimators need autograd for their vector-Jacobian products: evaluate under torch.no_grad(), "
            "not torch.inference_mode()"
        )
    if differentiable and x.requires_grad:
        return x
    # An inference-mode tensor cannot require grad; its clone (made here, outside inference mode) can.
    return (x.clone() if x.is_inference() else x.detach()).requires_grad_(True)


def _apply(g: Branch, x_in: Tensor) -> Tensor:
    gx = g(x_in)
    if not isinstance(gx, Tensor) or gx.shape != x_in.shape:
        shape = tuple(gx.shape) if isinstance(gx, Tensor) else type(gx).__name__
        raise ValueError(f"g must map (B, *shape) to the same shape; x has shape {tuple(x_in.shape)}, g(x) {shape}")
    return gx


def _vjp(gx: Tensor, x_in: Tensor, u: Tensor, create_graph: bool) -> Tensor:
    """``uᵀ J_g`` through the batch sum (examples are independent), zeros where ``g`` ignores ``x``."""
    if not gx.requires_grad:
        return torch.zeros_like(u)
    (out,) = torch.autograd.grad(
        gx, x_in, u, retain_graph=True, create_graph=create_graph, allow_unused=True, materialize_grads=True
    )
    return out


def _traces(gx: Tensor, x_in: Tensor, v: Tensor, n: int, create_graph: bool) -> Tensor:
    """Hutchinson traces ``vᵀ J^k v`` for ``k = 1..n``, ``(B, n)``, from one chain of VJPs."""
    return torch.stack([_dot(u, v) for u in _vjp_powers(gx, x_in, v, n, create_graph)], dim=1)


def _vjp_powers(gx: Tensor, x_in: Tensor, v: Tensor, n: int, create_graph: bool) -> Iterator[Tensor]:
    """Yield ``vᵀ J^k`` for ``k = 1..n`` (Algorithm 2's repeated vector-Jacobian products)."""
    u = v
    for _ in range(n):
        u = _vjp(gx, x_in, u, create_graph)
        yield u


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """Per-example inner product: ``(B, *shape), (B, *shape) -> (B,)``."""
    return (u * v).flatten(1).sum(dim=1)


def _finish(gx: Tensor, logdet: Tensor, differentiable: bool) -> tuple[Tensor, Tensor]:
    return (gx, logdet) if differentiable else (gx.detach(), logdet.detach())


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor of shape (B, *shape) with at least 2 dims, got {shape}")


def _check_hutchinson(x: Tensor, n_samples: int, probe: str) -> None:
    """The arguments every Hutchinson estimator takes: the input, the number of probes and their law."""
    _check_count("n_samples", n_samples, minimum=1)
    _check_probe(probe)
    _check_input(x)


def _check_probe(probe: str) -> None:
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")


def _per_block_dims(lipschitz: Sequence[float], dims: int | Sequence[int]) -> list[int]:
    per_block = [dims] * len(lipschitz) if isinstance(dims, int) else list(dims)
    if len(per_block) != len(lipschitz):
        raise ValueError(f"one dimension per block: got {len(lipschitz)} Lipschitz bounds for {len(per_block)} dims")
    return per_block


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_probability(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a probability in (0, 1) (geometric stopping probability), got {value!r}")


def _check_lipschitz(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1): the series of Eq. 4 and the bounds need Lip(g) < 1, got {value!r}"
        )
