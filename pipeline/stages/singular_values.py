"""Stage ``singular_values``: the largest singular value of every convolution of every trained classifier (Fig. 6),
each block's certified Lipschitz bound, and a per-model invertibility certificate. One model per coefficient: the
one trained from the first entry of ``classifier.seeds`` (:func:`pipeline.models.specs.reference_seed`).

Per convolution (its weight as used in eval mode, i.e. after Eq. 2), float64:

- ``sigma_upper``: certified upper bound (``conv_norm_upper_bound``): the smallest largest singular value of the
  circular convolution over the grids from ``(H + p) x (W + p)`` to ``(H + 2p) x (W + 2p)`` (Sedghi et al. 2019;
  exact for 1x1 kernels), or the dense operator's exact norm (plus a 1e-10 relative margin) when it is small;
- ``sigma_lower``: ``singular_values.lower_iters`` block power iterations on the exact zero-padded operator (a lower
  bound after any number of iterations, meeting the true norm in the limit);
- ``sigma_running``: what training believed, the norm of the used weight according to the stored power-iteration
  estimate ``s = <u, W v>``: ``min(s, c)`` for a constrained layer, ``s`` for an unconstrained one.

``sigma_lower > sigma_running`` shows that one power iteration per step lags the weights, so training's own
estimate under-states the norm it divides by (why the certificate uses exact norms). A block's bound is
``InvertibleResidualBlock.lipschitz_bound()`` (product of its convolutions' upper bounds, BatchNorm scales included);
``guaranteed_inverse`` holds only when every block's bound is < 1 (Theorem 1). With ``singular_values.project``, the
layers of an i-ResNet whose bound exceeds ``c`` are scaled onto it (``project_to_bound``) and everything is measured
again (rows with ``weights = projected``); the model files are left unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from iresnet.blocks import lipschitz_bounds
from iresnet.models import IResNetClassifier
from iresnet.spectral_norm import LipschitzConv2d, conv_norm_lower_bound, conv_norm_upper_bound, project_to_bound
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

CSV_COLUMNS = (
    "model",
    "weights",
    "block",
    "layer",
    "kernel_size",
    "input_hw",
    "sigma_lower",
    "sigma_upper",
    "sigma_running",
)
METHODS = {
    "sigma_upper": "certified upper bound: the smallest largest singular value of the circular convolution over the "
    "grids from (H+p)x(W+p) to (H+2p)x(W+2p) (2-D FFT + per-frequency SVD, Sedghi et al. 2019; exact for 1x1 "
    "kernels), or the dense operator's exact norm x (1 + 1e-10) when its smaller side has <= 2048 entries",
    "sigma_lower": "block power iteration on the exact zero-padded operator (singular_values.lower_iters steps): "
    "lower bound",
    "sigma_running": "training's power-iteration estimate of the used weight's norm: min(<u, W v>, c), or <u, W v>",
    "block_bound": "product of the block's sigma_upper values (and BatchNorm scales): certified Lip(g)",
}


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
        rows.append(
            {
                "model": label,
                "weights": weights,
                "block": block,
                "layer": index,
                "kernel_size": layer.kernel_size,
                "input_hw": f"{layer.input_hw[0]}x{layer.input_hw[1]}",
                "sigma_lower": conv_norm_lower_bound(weight, layer.input_hw, layer.padding, n_iter=lower_iters),
                "sigma_upper": conv_norm_upper_bound(weight, layer.input_hw, layer.padding),
                "sigma_running": running,
            }
        )
    return rows


def certificate(model: IResNetClassifier, rows: list[dict[str, Any]], coeff: float | None) -> dict[str, Any]:
    """Summary of one model's measurements: block bounds, the certificate, how many layers exceed 1 or ``c``."""
    bounds = lipschitz_bounds(model)
    uppers = [r["sigma_upper"] for r in rows]
    return {
        "guaranteed_inverse": bool(bounds) and all(b < 1.0 for b in bounds),
        "max_block_bound": max(bounds),
        "block_bounds": bounds,
        "max_layer_upper": max(uppers),
        "max_layer_lower": max(r["sigma_lower"] for r in rows),
        # "above 1" only where it is proven: the lower bound exceeds 1.
        "frac_layers_above_1": sum(r["sigma_lower"] > 1.0 for r in rows) / len(rows),
        # Proven above c (the lower bound exceeds it: the power iteration lagged), and not certified below c.
        "layers_above_coeff": None if coeff is None else sum(r["sigma_lower"] > coeff for r in rows),
        "layers_uncertified_at_coeff": None if coeff is None else sum(u > coeff for u in uppers),
        # How far the exact norm (the converged lower bound) exceeds c, relative: Eq. 2 divides by a power-iteration
        # estimate that lags the weights by a little, so a layer at c sits at c (1 + 1e-7 .. 1e-4), not above it.
        "max_excess_over_coeff": None if coeff is None else max(r["sigma_lower"] for r in rows) / coeff - 1.0,
        "layers_above_coeff_tol": None
        if coeff is None
        else sum(r["sigma_lower"] > coeff * (1 + COEFF_RTOL) for r in rows),
        "coeff_rtol": COEFF_RTOL,
        # > 1: the running estimate under-estimated the true norm (the power iteration lagged the weights).
        "max_lag": finite_or_none(max(_ratio(r["sigma_lower"], r["sigma_running"]) for r in rows)),
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
    out.write_curve("layers", rows, CSV_COLUMNS)
    frame = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    plot_singular_values(out.figure("fig6"), frame[frame["weights"] == "trained"], models)
    result = out.finish({"models": models, "methods": METHODS})
    flat: dict[str, Any] = {}
    for label, summary in models.items():
        for key in ("guaranteed_inverse", "max_block_bound", "max_layer_upper", "frac_layers_above_1", "max_lag"):
            flat[f"{label}/{key}"] = summary[key]
        if "projected" in summary:
            flat[f"{label}/projected_guaranteed_inverse"] = summary["projected"]["guaranteed_inverse"]
    flat["wall_time_s"] = result["wall_time_s"]
    return flat
