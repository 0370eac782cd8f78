"""Stage ``singular_values``: the largest singular value of every convolution of every trained classifier (Fig. 6),
each block's certified Lipschitz bound, and a per-model invertibility certificate. One model per coefficient: the
one trained from the first entry of ``classifier.seeds`` (:func:`pipeline.models.specs.reference_seed`).

Per convolution (its weight as used in eval mode, i.e. after Eq. 2), float64:

- ``sigma_upper``: certified upper bound (``conv_norm_upper_bound``): the smallest largest singular value of the
  circular convolution over the grids from ``(H + p) x (W + p)`` to ``(H + 2p) x (W + 2p)`` (Sedghi et al. 2019;
  exact for 1x1 kernels), or the dense operator's exact norm (plus a 1e-10 relative margin) when it is small;
- ``sigma_exact``: the true norm of the zero-padded operator (``conv_norm_exact``): a dense eigen-solve when the
  operator is small, else Lanczos on ``AᵀA`` to a relative residual of 1e-10 (``exact_method`` says which);
- ``sigma_lower``: ``singular_values.lower_iters`` block power iterations on the exact zero-padded operator (a lower
  bound after any number of iterations, meeting the true norm only in the limit: 50 steps stop 1.3e-3 short of it
  in a layer of the default c = 0.9 model, whose top singular values crowd together);
- ``sigma_running``: what training believed, the norm of the used weight according to the stored power-iteration
  estimate ``s = <u, W v>``: ``min(s, c)`` for a constrained layer, ``s`` for an unconstrained one.

``sigma_exact > sigma_running`` shows that one power iteration per step lags the weights, so training's own
estimate under-states the norm it divides by (why the certificate uses certified bounds). The per-model counts
(layers above 1, above ``c``) and the largest norm use ``sigma_exact``. A block's bound is
``InvertibleResidualBlock.lipschitz_bound()`` (product of its convolutions' upper bounds, BatchNorm scales included);
``guaranteed_inverse`` holds only when every block's bound is < 1 (Theorem 1). With ``singular_values.project``, the
layers of an i-ResNet whose bound exceeds ``c`` are scaled onto it (``project_to_bound``) and everything is measured
again (rows with ``weights = projected``); the model files are left unchanged.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from iresnet.blocks import lipschitz_bounds
from iresnet.models import IResNetClassifier
from iresnet.spectral_norm import (
    EXACT_DENSE_LIMIT,
    EXACT_RTOL,
    LipschitzConv2d,
    conv_norm_exact,
    conv_norm_lower_bound,
    conv_norm_upper_bound,
    project_to_bound,
)
from pipeline.console import track
from pipeline.files import finite_or_none
from pipeline.models.classifiers import conv_layers, load_classifier
from pipeline.models.specs import ClassifierSpec, classifier_specs, reference_seed
from pipeline.outputs import SINGULAR_VALUES, StageRun
from pipeline.params import Params, SingularValuesParams
from pipeline.paths import Paths
from pipeline.plots.classifier import plot_singular_values
from pipeline.tracking import Tracker
from pipeline.training import seed_everything

METHODS = {
    "sigma_upper": "certified upper bound: the smallest largest singular value of the circular convolution over the "
    "grids from (H+p)x(W+p) to (H+2p)x(W+2p) (2-D FFT + per-frequency SVD, Sedghi et al. 2019; exact for 1x1 "
    "kernels), or the dense operator's exact norm x (1 + 1e-10) when its smaller side has <= 2048 entries",
    "sigma_exact": "true norm of the zero-padded operator: the dense operator's largest Gram eigenvalue (float64) "
    f"when its smaller side has <= {EXACT_DENSE_LIMIT} entries, else Lanczos on A^T A (conv2d / conv_transpose2d, full "
    f"re-orthogonalisation) until the relative residual is <= {EXACT_RTOL:g} (exact_method says which)",
    "sigma_lower": "block power iteration on the zero-padded operator (singular_values.lower_iters steps): a lower "
    "bound, not converged in general",
    "sigma_running": "training's power-iteration estimate of the used weight's norm: min(<u, W v>, c), or <u, W v>",
    "block_bound": "product of the block's sigma_upper values (and BatchNorm scales): certified Lip(g)",
}


# Per model, logged to MLflow and printed by the CLI.
FLAT_KEYS = (
    "guaranteed_inverse",
    "max_block_bound",
    "max_layer_upper",
    "max_layer_exact",
    "frac_layers_above_1",
    "max_lag",
)
COEFF_RTOL = 1e-4  # "at c": an exact norm within c (1 + 1e-4), the lag of one power iteration per step


@torch.no_grad()
def used_estimate(layer: LipschitzConv2d) -> float:
    """The norm training believes the used weight has: ``min(s, c)`` (or ``s`` unconstrained), where
    ``s = <u, W v>`` is the power-iteration estimate Eq. 2 divides by, from the stored vectors and the final ``W``."""
    s = float((layer.u * F.conv2d(layer.v, layer.weight, padding=layer.padding)).sum())
    return s if layer.coeff is None else min(s, layer.coeff)


def measure_layers(model: IResNetClassifier, label: str, weights: str, lower_iters: int) -> list[dict[str, Any]]:
    """One CSV row per convolution of ``model`` (eval-mode weights); ``lower_iters`` power iterations per layer."""
    rows = []
    for block, index, layer in conv_layers(model):
        weight = layer.effective_weight().detach()
        running = used_estimate(layer)
        exact = conv_norm_exact(weight, layer.input_hw, layer.padding)
        rows.append(
            {
                "model": label,
                "weights": weights,
                "block": block,
                "layer": index,
                "kernel_size": layer.kernel_size,
                "input_hw": f"{layer.input_hw[0]}x{layer.input_hw[1]}",
                "sigma_lower": conv_norm_lower_bound(weight, layer.input_hw, layer.padding, n_iter=lower_iters),
                "sigma_exact": exact.value,
                "sigma_upper": conv_norm_upper_bound(weight, layer.input_hw, layer.padding),
                "sigma_running": running,
                "exact_method": exact.method,
            }
        )
    return rows


def certificate(model: IResNetClassifier, rows: list[dict[str, Any]], coeff: float | None) -> dict[str, Any]:
    """Summary of one model's measurements: block bounds, the certificate, how many layers exceed 1 or ``c``.

    Counts and the largest norm use ``sigma_exact`` (the truth); the certificate uses ``sigma_upper`` (a bound).
    """
    bounds = lipschitz_bounds(model)
    uppers = [r["sigma_upper"] for r in rows]
    exact = [r["sigma_exact"] for r in rows]
    return {
        "guaranteed_inverse": bool(bounds) and all(b < 1.0 for b in bounds),
        "max_block_bound": max(bounds),
        "block_bounds": bounds,
        "max_layer_upper": max(uppers),
        "max_layer_exact": max(exact),
        "max_layer_lower": max(r["sigma_lower"] for r in rows),
        "frac_layers_above_1": sum(e > 1.0 for e in exact) / len(rows),
        # Above c at all (training's lagging estimate let them past), and not certified below c.
        "layers_above_coeff": None if coeff is None else sum(e > coeff for e in exact),
        "layers_uncertified_at_coeff": None if coeff is None else sum(u > coeff for u in uppers),
        # How far the exact norm exceeds c, relative: Eq. 2 divides by a power-iteration estimate that lags the
        # weights by a little, so a layer at c sits at c (1 + 1e-7 .. 1e-4), not meaningfully above it.
        "max_excess_over_coeff": None if coeff is None else max(exact) / coeff - 1.0,
        "layers_above_coeff_tol": None if coeff is None else sum(e > coeff * (1 + COEFF_RTOL) for e in exact),
        "coeff_rtol": COEFF_RTOL,
        # > 1: the running estimate under-estimated the true norm (the power iteration lagged the weights).
        "max_lag": finite_or_none(max(_ratio(e, r["sigma_running"]) for e, r in zip(exact, rows))),
        "exact_methods": dict(sorted(Counter(r["exact_method"] for r in rows).items())),  # how sigma_exact came
        "n_layers": len(rows),
        "n_blocks": len(bounds),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def project_model(model: IResNetClassifier, coeff: float) -> int:
    """Scale every convolution whose certified bound exceeds ``coeff`` onto it; returns how many were changed."""
    return sum(project_to_bound(layer, coeff) != 1.0 for _, _, layer in conv_layers(model))


def analyse(
    paths: Paths, spec: ClassifierSpec, seed: int, params: SingularValuesParams
) -> tuple[list[dict], dict[str, Any]]:
    """Rows and summary of the model of ``spec`` trained from ``seed`` (and of its projection, when asked and
    applicable)."""
    model = load_classifier(paths, spec, seed).model
    rows = measure_layers(model, spec.label, "trained", params.lower_iters)
    summary = {"kind": spec.kind, "coeff": spec.coeff, **certificate(model, rows, spec.coeff)}
    if params.project and spec.coeff is not None:
        changed = project_model(model, spec.coeff)
        projected = measure_layers(model, spec.label, "projected", params.lower_iters)
        rows += projected
        summary["projected"] = {"n_layers_projected": changed, **certificate(model, projected, spec.coeff)}
    return rows, summary


def run(params: Params, paths: Paths, tracker: Tracker | None = None) -> dict[str, Any]:
    """Measure every model of ``classifier.coeffs`` (its first seed's); write the CSV, the JSON and Fig. 6; return flat
    metrics."""
    out = StageRun(SINGULAR_VALUES, paths, tracker)
    seed_everything(params.seed)  # convention; the measurements themselves draw no random numbers
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    for spec in track(classifier_specs(params.classifier), "singular values"):
        model_rows, models[spec.label] = analyse(paths, spec, reference_seed(params.classifier), params.singular_values)
        rows += model_rows
    out.write_curve("layers", rows)
    frame = pd.DataFrame(rows, columns=list(SINGULAR_VALUES.curves["layers"].columns))
    plot_singular_values(out.figure("fig6"), frame[frame["weights"] == "trained"], models)
    result = out.finish({"models": models, "methods": METHODS})
    flat: dict[str, Any] = {}
    for label, summary in models.items():
        for key in FLAT_KEYS:
            flat[f"{label}/{key}"] = summary[key]
        if "projected" in summary:
            flat[f"{label}/projected_guaranteed_inverse"] = summary["projected"]["guaranteed_inverse"]
    flat["wall_time_s"] = result["wall_time_s"]
    return flat
