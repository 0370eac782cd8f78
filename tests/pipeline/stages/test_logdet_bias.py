"""Log-det estimator bias against exact per-block Jacobians (Fig. 4/9): the pieces against brute force, the curve on
a small flow whose exact log-det is computable, and the stage on a tiny project."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import Tensor

from iresnet.blocks import residual_blocks
from iresnet.logdet import LogDetSettings, branch_jacobian, exact_logdet
from iresnet.models import FlowConfig, MultiscaleFlow
from pipeline.files import read_json
from pipeline.outputs import LOGDET_BIAS
from pipeline.params import parse_params
from pipeline.stages import logdet_bias
from tests.pipeline.flow_helpers import linear_flow, trained_project


def _converged_flow(in_shape: tuple[int, int, int], coeff: float = 0.9) -> tuple[MultiscaleFlow, Tensor]:
    """A float64 two-scale flow with ActNorm initialised and the spectral norms converged, and a batch for it."""
    torch.manual_seed(0)
    config = FlowConfig(in_shape=in_shape, n_blocks=(1, 1), strides=(1, 2), channels=(4, 4), coeff=coeff)
    model = MultiscaleFlow(config).double()
    x = torch.rand(5, *in_shape, dtype=torch.float64) - 0.5
    model.train()
    with torch.no_grad():
        for _ in range(60):
            model.encode(x, LogDetSettings("none"))
    return model.eval(), x


def test_per_block_exact_log_dets_give_the_full_flow_log_det() -> None:
    """Σ_b ln det(I + J_g_b) on the real activations + ActNorm terms = slogdet of the whole flow's Jacobian."""
    model, x = _converged_flow((1, 4, 4))
    est = logdet_bias.flow_estimates(model, x, n_probes=2, max_terms=3, advance=lambda: None)
    with torch.no_grad():
        _, actnorm = model.encode(x, LogDetSettings("none"))

    def latent(v: Tensor) -> Tensor:
        return torch.cat([z.flatten() for z in model.encode(v.unsqueeze(0), LogDetSettings("none"))[0]])

    full = torch.stack(
        [torch.linalg.slogdet(torch.autograd.functional.jacobian(latent, xi).reshape(16, 16))[1] for xi in x]
    )
    torch.testing.assert_close(est.exact + actnorm, full, rtol=0, atol=1e-10)
    # and each block's value is the library's brute force on that block's input
    inputs = logdet_bias.block_inputs(model, x)
    library = sum(exact_logdet(block.g, h)[1] for block, h in zip(residual_blocks(model), inputs))
    torch.testing.assert_close(est.exact, library.detach(), rtol=0, atol=1e-12)


def test_bias_curve_decreases_to_zero_within_theorem3() -> None:
    model, x = _converged_flow((1, 8, 8), coeff=0.7)  # Lip(g) <= 0.7³ up to the certificate's slack
    lips = [block.lipschitz_bound() for block in residual_blocks(model)]
    assert max(lips) < 1
    torch.manual_seed(1)
    est = logdet_bias.flow_estimates(model, x, n_probes=64, max_terms=20, advance=lambda: None)
    rows = logdet_bias.bias_curve(est, lips, model.block_dims)
    assert [r["n_terms"] for r in rows] == list(range(1, 21))

    # n = 1, 2 use exact traces only: the bias is exact, with no probe noise, and equals tr J (- tr J²/2) - ln det.
    inputs = logdet_bias.block_inputs(model, x)
    with torch.no_grad():
        jacs = [branch_jacobian(b.g, h)[1] for b, h in zip(residual_blocks(model), inputs)]
    tr1 = sum(j.diagonal(dim1=1, dim2=2).sum(-1) for j in jacs)
    tr2 = sum((j @ j).diagonal(dim1=1, dim2=2).sum(-1) for j in jacs)
    assert rows[0]["bias"] == pytest.approx(float((tr1 - est.exact).mean()), abs=1e-12)
    assert rows[1]["bias"] == pytest.approx(float((tr1 - tr2 / 2 - est.exact).mean()), abs=1e-12)
    assert rows[0]["bias_stderr"] == rows[1]["bias_stderr"] == 0.0

    for r in rows:  # Theorem 3 (certified Lipschitz bounds), up to the probe noise that remains from k >= 3
        assert r["abs_bias"] <= r["theorem3_bound"] + 4 * r["bias_stderr"], r
        assert r["std"] > 0
    assert all(b["theorem3_bound"] < a["theorem3_bound"] for a, b in zip(rows, rows[1:]))
    assert rows[-1]["theorem3_bound"] < 1e-4 * rows[0]["theorem3_bound"]
    # The bias alternates in sign and shrinks while it is resolved; then it is 0 within the remaining probe noise.
    resolved = [r for r in rows if r["abs_bias"] > 10 * r["bias_stderr"]]
    assert len(resolved) >= 2 and [r["n_terms"] for r in resolved] == list(range(1, len(resolved) + 1))
    pairs = list(zip(resolved, resolved[1:]))
    assert all(b["abs_bias"] < a["abs_bias"] and (a["bias"] > 0) != (b["bias"] > 0) for a, b in pairs)
    assert rows[-1]["abs_bias"] <= 4 * rows[-1]["bias_stderr"] < 0.05 * rows[0]["abs_bias"]


def test_bias_curve_of_linear_blocks_matches_the_closed_form() -> None:
    """Linear branches ``A_b`` (‖A_b‖₂ = 0.9, 0.8): the bias of n terms is
    ``Σ_b pixels_b (Σ_{k<=n} (-1)^{k+1} tr(A_b^k) / k - ln det(I + A_b))`` exactly; it shrinks towards 0 with n."""
    model, maps = linear_flow((0.9, 0.8))
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5
    torch.manual_seed(3)
    est = logdet_bias.flow_estimates(model, x, n_probes=200, max_terms=25, advance=lambda: None)
    lips = [block.lipschitz_bound() for block in residual_blocks(model)]
    rows = logdet_bias.bias_curve(est, lips, model.block_dims)

    def true_bias(n: int) -> float:
        total = 0.0
        for a, pixels in maps:
            powers = [torch.linalg.matrix_power(a, k) for k in range(1, n + 1)]
            series = sum((-1) ** (k + 1) * torch.trace(p) / k for k, p in enumerate(powers, start=1))
            total += pixels * float(series - torch.linalg.slogdet(torch.eye(len(a), dtype=a.dtype) + a)[1])
        return total

    truth = [true_bias(n) for n in range(1, 26)]
    for r, t in zip(rows, truth):
        assert abs(r["bias"] - t) <= 4 * r["bias_stderr"] + 1e-10, (r, t)
        assert abs(t) <= r["theorem3_bound"]
    assert rows[0]["bias_stderr"] == rows[1]["bias_stderr"] == 0.0  # exact traces of A and A²: no probe noise
    assert abs(truth[-1]) < 1e-2 * abs(truth[0]) and rows[-1]["bias_stderr"] < 1e-2 * abs(truth[0])
    assert rows[-1]["abs_bias"] < 1e-2 * rows[0]["abs_bias"]


def test_eigenvalue_bias_equals_trace_power_sums() -> None:
    """``Σ_i [Σ_{k<=n} (-1)^{k+1} λ_i^k / k - ln(1 + λ_i)]`` from the eigenvalues equals the series of traces of
    matrix powers minus slogdet (brute force), for every n, on a small float64 branch's exact Jacobians."""
    model, x = _converged_flow((1, 4, 4))
    block = residual_blocks(model)[0]
    h = logdet_bias.block_inputs(model, x)[0]
    with torch.no_grad():
        _, jac = branch_jacobian(block.g, h)  # (5, 16, 16), non-symmetric: complex eigenvalues
    assert bool((torch.linalg.eigvals(jac).imag.abs() > 1e-6).any())
    got = logdet_bias.eigenvalue_series_bias(jac, 30)
    eye = torch.eye(jac.shape[-1], dtype=torch.float64)
    for b, j in enumerate(jac):
        logdet = torch.linalg.slogdet(eye + j)[1]
        series = torch.cumsum(
            torch.stack([(-1) ** (k + 1) * torch.trace(torch.linalg.matrix_power(j, k)) / k for k in range(1, 31)]), 0
        )
        torch.testing.assert_close(got[b], series - logdet, rtol=0, atol=1e-12)


def test_terms_below_is_the_n_from_which_every_example_stays_below() -> None:
    bias = torch.tensor([[1.0, -0.5, 0.05, -0.2, 0.01, 0.001], [0.3, 0.02, 0.01, 0.0, -0.001, 0.0]])
    assert logdet_bias.terms_below(bias, 0.1) == 5  # n = 3 is below, n = 4 is not again (-0.2)
    assert logdet_bias.terms_below(bias, 1e-4) is None


def test_stage_outputs(tiny_project: Path, tiny_params: dict) -> None:
    params, paths, _ = trained_project(tiny_project, tiny_params, epochs=1)
    metrics = logdet_bias.run(params, paths)
    assert read_json(LOGDET_BIAS.metrics_path(paths)) == metrics
    assert metrics["method"].startswith("exact: per-block brute-force Jacobians")
    assert metrics["n_examples"] == 6 and metrics["n_samples"] == 4 and metrics["block_dims"] == [64, 32]
    curve = pd.read_csv(LOGDET_BIAS.curve_path(paths, "terms"))
    assert tuple(curve.columns) == LOGDET_BIAS.curves["terms"].columns and curve["n_terms"].tolist() == list(
        range(1, 13)
    )
    assert (curve["abs_bias"] == curve["bias"].abs()).all() and (curve["std"] > 0).all()
    assert metrics["abs_bias_last"] == curve["abs_bias"].iloc[-1] and math.isfinite(metrics["exact_logdet_mean"])
    # the exact bias shrinks with n, and the stated n is where every example's bias falls below 1e-4 bits/dim
    exact = curve["exact_bias_max"].tolist()
    assert exact[-1] < exact[0] and (curve["exact_bias"].abs() <= curve["exact_bias_max"]).all()
    assert metrics["exact_bias_target_bpd"] == 1e-4 and metrics["exact_bias_terms_to_target"] is not None
    assert (LOGDET_BIAS.figure_path(paths, "fig4")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_probe_is_rejected(repo_params: dict) -> None:
    raw = {**repo_params, "logdet_bias": {**repo_params["logdet_bias"], "n_samples": 1}}
    with pytest.raises(Exception, match="logdet_bias.n_samples"):
        parse_params(raw)


def test_eigenvalues_split_over_threads_are_the_same_bytes() -> None:
    """The batch split over Python threads (one LAPACK thread each) gives exactly torch.linalg.eigvals."""
    torch.manual_seed(0)
    jac = torch.randn(5, 30, 30, dtype=torch.float64) * 0.1
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = logdet_bias._eigenvalues(jac)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, torch.linalg.eigvals(jac))
