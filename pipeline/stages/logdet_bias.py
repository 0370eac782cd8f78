"""Stage ``logdet_bias``: bias and standard deviation of the truncated log-det estimator vs series terms (Fig. 4/9).

The exact value. The flow's log-det is the sum of its residual blocks' ``ln det(I + J_g)`` on their actual inputs
plus exact ActNorm terms (chain rule), so per-block brute force on the real activations gives the *exact* flow
log-det: each block's full ``d_b x d_b`` Jacobian (d_b vector-Jacobian products) and its ``slogdet``, in float64.
That costs ``Σ_b d_b`` backward passes, where one Jacobian of the whole input would need a ``D x D`` matrix per
example through every block; the estimator error studied is the same, since the estimator too works block by block.

The estimator. For every example and probe, the chain ``vᵀ J^k v`` for ``k = 1..max_terms`` (Algorithm 2's terms, hence
its estimate for every n at once), computed from each block's dense Jacobian; the library's VJP chain
(:func:`iresnet.logdet.hutchinson_traces`) must give the same terms on the first probe. Reported per n, in
nats per example of the flow's log-det (sum over the blocks, independent probes per block):

- ``std``: the standard deviation of Algorithm 2's one-probe estimate (root mean over examples of its variance);
- ``bias``: ``E_v[estimate] - exact`` averaged over the examples. Its expectation is ``PS(J, n) - ln det``; it is
  measured with the exact traces of ``J`` and ``J²`` (from the Jacobian) in place of their Hutchinson estimates,
  which leaves that expectation unchanged and removes most of the probe noise; ``bias_stderr`` is what remains,
  and ``bias_plain`` the same mean from the plain estimates;
- ``theorem3_bound``: ``Σ_b d_b Σ_{k>n} L_b^k / k`` with each block's certified ``L_b`` (inf if some ``L_b >= 1``);
- ``exact_bias``: the bias itself with no Monte Carlo noise, from the eigenvalues ``λ_i`` of each block's exact
  Jacobian: ``PS(J, n) - ln det(I + J) = Σ_i [Σ_{k<=n} (-1)^{k+1} λ_i^k / k - ln(1 + λ_i)]`` (Eq. 4 with
  ``tr J^k = Σ_i λ_i^k``; complex eigenvalues in conjugate pairs, a real sum), averaged over the examples.
  ``exact_bias_max`` is the largest ``|bias|`` of any one example. The metrics give the fewest terms at which that
  falls below :data:`BIAS_TARGET_BPD` bits/dim, searched up to :data:`EXACT_TERMS` (the eigenvalues make any n free).

Writes the curve per n, the metrics and Fig. 4 (file names in :data:`pipeline.outputs.LOGDET_BIAS`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from iresnet.blocks import InvertibleResidualBlock, lipschitz_bounds, residual_blocks
from iresnet.logdet import (
    LogDetSettings,
    branch_jacobian,
    chain_truncation_bound,
    draw_probe,
    hutchinson_traces,
    series_coefficients,
)
from iresnet.models import MultiscaleFlow
from pipeline.console import progress
from pipeline.env import single_threaded
from pipeline.models.flows import load_flow_with_test_inputs
from pipeline.outputs import LOGDET_BIAS, StageRun
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.plots.flow import plot_logdet_bias
from pipeline.tracking import Tracker
from pipeline.training import seed_everything

METHOD = (
    "exact: per-block brute-force Jacobians (float64 slogdet) on each block's real input, summed over the blocks "
    "(equal to the flow's full log-det minus its exact ActNorm terms); estimator: Algorithm 2 with Gaussian probes"
)
EXACT_TERMS = 200  # the exact bias is computed for every n up to this (the curve shows n <= logdet_bias.max_terms)
BIAS_TARGET_BPD = 1e-4  # "negligible": the metrics state the n at which the exact bias falls below it
TRACE_TOLERANCE = 1e-10  # dense vs VJP-chain Hutchinson terms, relative to |v|² (float64 rounding is ~1e-13)
_JACOBIAN_BYTES = 1 << 28  # memory allowed for one chunk's Jacobians (float64), which sets the chunk size


def block_inputs(model: MultiscaleFlow, x: Tensor) -> list[Tensor]:
    """The input of every residual block (in order) when ``x`` passes through the flow."""
    captured: list[Tensor] = []

    def keep(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        captured.append(args[0].detach())

    handles = [block.register_forward_pre_hook(keep) for block in residual_blocks(model)]
    try:
        with torch.no_grad():
            model.encode(x, LogDetSettings(estimator="none"))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def eigenvalue_series_bias(jac: Tensor, max_terms: int) -> Tensor:
    """Exact bias of the n-term power series (Eq. 4), ``(B, d, d)`` Jacobians ``J`` -> ``(B, max_terms)``, float64.

    Column ``n - 1`` is ``PS(J, n) - ln det(I + J) = Σ_i [Σ_{k<=n} (-1)^{k+1} λ_i^k / k - ln(1 + λ_i)]`` over the
    eigenvalues ``λ_i`` of ``J`` (``tr J^k = Σ_i λ_i^k``). The eigenvalues of a real matrix come in conjugate pairs,
    so the sum over ``i`` is real; its real part drops the rounding's imaginary residue. Needs every ``|λ_i| < 1``
    for the series to converge (Lip(g) < 1 ensures it), but any n is exact as written.
    """
    eigenvalues = _eigenvalues(jac.to(torch.float64))  # (B, d) complex128
    k = torch.arange(1, max_terms + 1, dtype=torch.float64, device=jac.device)
    coefficients = ((-1.0) ** (k + 1) / k).to(eigenvalues.dtype)
    powers = eigenvalues[..., None] ** k.to(eigenvalues.dtype)  # (B, d, K)
    partial_sums = (powers * coefficients).sum(dim=1).real.cumsum(dim=-1)  # (B, K): PS(J, n) for n = 1..K
    logdet = torch.log1p(eigenvalues).sum(dim=1).real  # ln det(I + J)
    return partial_sums - logdet[:, None]


def _eigenvalues(jac: Tensor) -> Tensor:
    """``torch.linalg.eigvals`` of a batch ``(B, d, d)``, split over as many Python threads as torch has threads, each
    running LAPACK on one thread (:func:`pipeline.env.single_threaded`; torch releases the GIL). Each matrix is
    computed alone either way, so the bytes do not depend on the split; the cores share the work (1.7x on 2 cores)."""
    if jac.device.type != "cpu":  # float64 eigenvalues on the CPU's LAPACK whatever the device, then back
        return _eigenvalues(jac.cpu()).to(jac.device)
    workers = torch.get_num_threads()
    if workers == 1 or len(jac) == 1:
        with single_threaded():
            return torch.linalg.eigvals(jac)
    with single_threaded(), ThreadPoolExecutor(workers) as pool:
        return torch.cat(list(pool.map(torch.linalg.eigvals, jac.chunk(workers))))


@dataclass
class Estimates:
    """Per example: ``exact (N,)`` and the eigenvalue bias ``exact_bias (N, EXACT_TERMS)``; per probe, example and
    n: ``plain`` and control-variate ``cv`` ``(S, N, K)``."""

    exact: Tensor
    plain: Tensor
    cv: Tensor
    exact_bias: Tensor

    def __add__(self, other: Estimates) -> Estimates:
        """Sum over blocks: every quantity is additive in the blocks (log-dets and their series)."""
        return Estimates(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @staticmethod
    def concat(parts: list[Estimates]) -> Estimates:
        """Chunks of examples joined along the example dimension (dim 1 of the ``(S, N, K)`` fields, else 0)."""
        return Estimates(
            *(
                torch.cat([getattr(p, f.name) for p in parts], dim=1 if f.name in ("plain", "cv") else 0)
                for f in fields(Estimates)
            )
        )


def dense_traces(jac: Tensor, probes: Tensor, max_terms: int) -> Tensor:
    """Algorithm 2's Hutchinson terms ``vᵀ J^k v`` for ``k = 1..max_terms`` from the dense Jacobians: the chain
    ``vᵀ J^k = (vᵀ J^{k-1}) J`` as batched row-vector products instead of VJPs through ``g`` (the same numbers up to
    float64 rounding, at a fraction of the cost once ``J`` is known). ``jac: (B, d, d)``, ``probes: (S, B, *shape)``
    -> ``(S, B, max_terms)``."""
    v = probes.flatten(2).transpose(0, 1).to(jac.dtype)  # (B, S, d)
    u, traces = v, []
    for _ in range(max_terms):
        u = torch.bmm(u, jac)
        traces.append((u * v).sum(-1))  # (B, S)
    return torch.stack(traces, -1).transpose(0, 1)


def block_estimates(block: InvertibleResidualBlock, x: Tensor, n_probes: int, max_terms: int) -> Estimates:
    """Exact ``ln det(I + J_g)`` of one block on its inputs ``x`` ``(B, *shape)`` and the series estimates.

    ``plain[s, b, n-1]``: Algorithm 2 with probe s and n terms; ``cv``: the same with the exact ``tr J``, ``tr J²``.
    The estimates come from the dense Jacobian (:func:`dense_traces`); the library's VJP chain
    (:func:`iresnet.logdet.hutchinson_traces`) runs on the first probe as a check that both give the same terms.
    """
    with torch.no_grad():  # values only: no graph through the d VJPs
        _, jac = branch_jacobian(block.g, x)
    exact_traces = torch.stack([jac.diagonal(dim1=-2, dim2=-1).sum(-1), torch.einsum("bij,bji->b", jac, jac)], -1)
    exact_bias = eigenvalue_series_bias(jac, EXACT_TERMS)
    probes = torch.stack([draw_probe(x) for _ in range(n_probes)])
    traces = dense_traces(jac, probes, max_terms)  # (S, B, K)
    with torch.no_grad():
        _, chained = hutchinson_traces(block.g, x, probes[:1], max_terms)
    scale = probes[:1].flatten(2).square().sum(-1, keepdim=True)  # |v|², the size of every term (|J| < 1)
    if not bool(((chained - traces[:1]).abs() <= TRACE_TOLERANCE * scale).all()):
        raise RuntimeError("the dense-Jacobian Hutchinson terms differ from the VJP chain's: a Jacobian is wrong")
    jac.diagonal(dim1=-2, dim2=-1).add_(1.0)  # I + J_g, in place: the Jacobians are the largest tensors here
    with single_threaded():
        sign, exact = torch.linalg.slogdet(jac)
    if bool((sign <= 0).any()):
        raise RuntimeError("det(I + J_g) <= 0 for some input: the block is not invertible there (Lemma 6 violated)")
    coefficients = series_coefficients(max_terms, x)  # (-1)^{k+1} / k, Eq. 4
    cv_traces = traces.clone()
    m = min(2, max_terms)
    cv_traces[..., :m] = exact_traces[None, :, :m]
    return Estimates(exact, (traces * coefficients).cumsum(-1), (cv_traces * coefficients).cumsum(-1), exact_bias)


def flow_estimates(model: MultiscaleFlow, x: Tensor, n_probes: int, max_terms: int, advance: Any) -> Estimates:
    """:func:`block_estimates` summed over the residual blocks of the flow, for inputs ``x`` ``(N, *in_shape)``."""
    dims = max(model.block_dims)
    chunk = max(1, _JACOBIAN_BYTES // (dims * dims * x.element_size()))
    parts: list[Estimates] = []
    for start in range(0, len(x), chunk):
        inputs = block_inputs(model, x[start : start + chunk])
        total: Estimates | None = None
        for block, h in zip(residual_blocks(model), inputs):
            e = block_estimates(block, h, n_probes, max_terms)
            total = e if total is None else total + e
            advance()
        parts.append(total)  # type: ignore[arg-type]
    return Estimates.concat(parts)


def bias_curve(est: Estimates, lipschitz: list[float], dims: list[int]) -> list[dict[str, float]]:
    """One row per n: bias, |bias|, its standard error, std, Theorem 3 bound, plain bias, and the exact bias (mean
    and largest |.| over the examples, from the eigenvalues), in nats per example."""
    n_probes, n_examples, max_terms = est.plain.shape
    rows = []
    for n in range(1, max_terms + 1):
        cv_error = est.cv[..., n - 1] - est.exact  # (S, N)
        bias = float(cv_error.mean())
        bias_stderr = math.sqrt(float(cv_error.var(dim=0, correction=1).sum()) / n_probes) / n_examples
        std = math.sqrt(float(est.plain[..., n - 1].var(dim=0, correction=1).mean()))
        bound = chain_truncation_bound(lipschitz, dims, n)
        rows.append(
            {
                "n_terms": n,
                "bias": bias,
                "abs_bias": abs(bias),
                "bias_stderr": bias_stderr,
                "std": std,
                "theorem3_bound": bound,
                "bias_plain": float((est.plain[..., n - 1] - est.exact).mean()),
                "exact_bias": float(est.exact_bias[:, n - 1].mean()),
                "exact_bias_max": float(est.exact_bias[:, n - 1].abs().max()),
            }
        )
    return rows


def terms_below(exact_bias: Tensor, target: float) -> int | None:
    """The fewest terms n from which on (every n' >= n up to K) the exact bias ``(N, K)`` is below ``target`` in
    absolute value for every example (same units); None when even n = K is not."""
    below = exact_bias.abs().amax(dim=0) < target  # (K,)
    from_here_on = below.flip(0).cumprod(0).flip(0).bool()  # True where this n and every larger one are below
    return int(from_here_on.nonzero()[0]) + 1 if bool(from_here_on.any()) else None


def run(params: Params, paths: Paths, tracker: Tracker | None = None) -> dict[str, Any]:
    """Measure the estimator's bias and std on ``logdet_bias.n_examples`` test examples; returns the metrics."""
    out = StageRun(LOGDET_BIAS, paths, tracker)
    p = params.logdet_bias
    seed_everything(params.seed)
    # exact log-dets and small biases need float64
    flow, x = load_flow_with_test_inputs(paths, p.n_examples, params.seed, torch.float64)
    model = flow.model
    lipschitz = lipschitz_bounds(model)
    dims = list(model.block_dims)
    chunks = math.ceil(len(x) / max(1, _JACOBIAN_BYTES // (max(dims) ** 2 * 8)))
    with progress("log-det bias (exact Jacobians)", chunks * len(dims)) as advance:
        est = flow_estimates(model, x, p.n_samples, p.max_terms, advance)
    est = Estimates(*(getattr(est, f.name).cpu() for f in fields(est)))  # from the device (the same on the CPU)
    rows = bias_curve(est, lipschitz, dims)
    out.write_curve("terms", rows)
    per_bit = 1.0 / (flow.space.n_dims * math.log(2))
    title = (
        f"truncated log-det estimator vs exact: {len(x)} {flow.dataset} test examples x {p.n_samples} probes\n"
        f"{len(dims)} residual blocks, largest certified Lip(g) {max(lipschitz):.3f}"
    )
    plot_logdet_bias(out.figure("fig4"), rows, title)
    by_n = {int(r["n_terms"]): r for r in rows}
    metrics: dict[str, Any] = {
        "method": METHOD,
        "units": "nats per example of the flow's log-det (sum over residual blocks)",
        "dataset": flow.dataset,
        "n_examples": len(x),
        "n_samples": p.n_samples,
        "max_terms": p.max_terms,
        "n_blocks": len(dims),
        "block_dims": dims,
        "block_lipschitz": lipschitz,
        "exact_logdet_mean": float(est.exact.mean()),
        "abs_bias_first": rows[0]["abs_bias"],
        "abs_bias_last": rows[-1]["abs_bias"],
        "abs_bias_last_bpd": rows[-1]["abs_bias"] * per_bit,
        "std_last": rows[-1]["std"],
        "within_theorem3": all(r["exact_bias_max"] <= r["theorem3_bound"] for r in rows),
        **{f"abs_bias_{n}": by_n[n]["abs_bias"] for n in (5, 10, 20) if n in by_n},
        "exact_bias_bpd": {str(n): by_n[n]["exact_bias"] * per_bit for n in (1, 5, 10, 20) if n in by_n},
        "exact_bias_target_bpd": BIAS_TARGET_BPD,
        # every example's |exact bias| below the target from this many terms on (null: not within EXACT_TERMS)
        "exact_bias_terms_to_target": terms_below(est.exact_bias * per_bit, BIAS_TARGET_BPD),
        "exact_terms_searched": EXACT_TERMS,
    }
    return out.finish(metrics)
