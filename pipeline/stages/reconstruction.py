"""Stage ``reconstruction``: invert each classifier's final features back to its input (Fig. 3/7/8, App. D).

``reconstruction.n_images`` test images, evenly spaced over the test split, are encoded to the final features. For
every count ``n`` of ``reconstruction.iterations``, every residual block runs exactly ``n`` fixed-point steps
(Algorithm 1 with ``atol = 0``) and the result is compared with the original test images in pixel units (``[0, 1]``,
after undoing the normalisation): mean and max absolute error. This runs in float64, so the geometric decay of
Eq. 1 is visible far below float32's rounding floor. ``iterations_to[tol]`` is the smallest tested count whose max
error is ``<= tol`` (null if none). ``converged`` says whether the largest count reached the smallest tolerance
with finite values; a model that does not (e.g. an unconstrained baseline whose blocks are not contractions) is
reported as measured. ``seconds_per_100`` times one float32 reconstruction of the first 100 test images (repeated
when the test split is smaller) for each of ``reconstruction.timing_iterations``. ``iteration_ratios`` sets the
iterations of ``c - 0.2`` against those of ``c`` at every tolerance (the paper: about half); they are exact when
``reconstruction.iterations`` holds every count up to the largest one needed. One model per coefficient: the one
trained from the first entry of ``classifier.seeds`` (:func:`pipeline.models.specs.reference_seed`).

Writes ``reports/curves/reconstruction.csv``, ``reports/metrics/reconstruction.json`` and the figures
``fig8_reconstruction_error.png`` and ``fig3_reconstructions.png``.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from iresnet.blocks import inverse_settings_as, residual_blocks
from iresnet.inverse import InverseSettings
from pipeline.console import track
from pipeline.data.batches import evenly_spaced
from pipeline.data.store import load_prepared
from pipeline.env import device, synchronize
from pipeline.errors import DataError
from pipeline.files import finite_or_none
from pipeline.models.classifiers import LoadedClassifier, load_classifier
from pipeline.models.specs import classifier_specs, reference_seed
from pipeline.outputs import RECONSTRUCTION, StageRun
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.plots.classifier import plot_reconstruction_error, plot_reconstructions
from pipeline.tracking import Tracker
from pipeline.training import seed_everything

TIMING_BATCH = 100
N_SHOWN = 10  # images per row of Fig. 3


def tolerance_key(tol: float) -> str:
    """``1e-3 -> "1e-03"``: the JSON key of a tolerance."""
    return f"{tol:.0e}"


@torch.no_grad()
def reconstruct(loaded: LoadedClassifier, x: Tensor, iterations: int) -> tuple[Tensor, float]:
    """``x`` (normalised inputs) -> (reconstruction from its final features with ``iterations`` steps per block,
    the largest last-step residual over the blocks). Runs in ``x``'s dtype; the model must match it."""
    with inverse_settings_as(loaded.model, InverseSettings(max_iter=iterations, atol=0.0)):
        x_rec = loaded.model.reconstruct(loaded.model.features(x))
    infos = [block.last_inverse_info for block in residual_blocks(loaded.model)]
    residual = max(info.residual for info in infos if info is not None)
    return x_rec, residual


def error_curve(loaded: LoadedClassifier, images: Tensor, iterations: tuple[int, ...]) -> tuple[list[dict], Tensor]:
    """Rows of the CSV for one model (float64), and its pixel-space reconstruction at the largest count."""
    model64 = LoadedClassifier(loaded.spec, copy.deepcopy(loaded.model).double(), loaded.stats, loaded.path)
    x = loaded.stats.normalize(images.double())
    rows, pixels = [], images
    for n in iterations:
        x_rec, residual = reconstruct(model64, x, n)
        pixels = loaded.stats.denormalize(x_rec)
        error = (pixels - images.double()).abs()
        rows.append(
            {
                "model": loaded.spec.label,
                "iterations": n,
                "mean_error": float(error.mean()),
                "max_error": float(error.max()),
                "max_residual": residual,
            }
        )
    return rows, pixels


def seconds_per_batch(loaded: LoadedClassifier, images: Tensor, counts: tuple[int, ...]) -> dict[str, float]:
    """Wall seconds of one float32 reconstruction of a ``TIMING_BATCH``-image batch, per iteration count."""
    batch = images[:TIMING_BATCH]
    batch = batch.repeat(-(-TIMING_BATCH // len(batch)), 1, 1, 1)[:TIMING_BATCH]
    x = loaded.stats.normalize(batch)
    reconstruct(loaded, x[:2], 1)  # warm-up: first-call allocations are not part of the cost
    timings = {}
    for n in counts:
        synchronize()
        t0 = time.perf_counter()
        reconstruct(loaded, x, n)
        synchronize()
        timings[str(n)] = time.perf_counter() - t0
    return timings


def summarise(rows: list[dict[str, Any]], tolerances: tuple[float, ...]) -> dict[str, Any]:
    """``iterations_to`` each tolerance, the final errors, and whether the strictest tolerance was reached."""
    final = rows[-1]
    return {
        "iterations_to": {
            tolerance_key(tol): next((r["iterations"] for r in rows if r["max_error"] <= tol), None)
            for tol in tolerances
        },
        "final_mean_error": finite_or_none(final["mean_error"]),
        "final_max_error": finite_or_none(final["max_error"]),
        "final_max_residual": finite_or_none(final["max_residual"]),
        "converged": math.isfinite(final["max_error"]) and final["max_error"] <= min(tolerances),
    }


def iteration_ratios(models: dict[str, dict[str, Any]], step: float = 0.2) -> list[dict[str, Any]]:
    """For every pair of i-ResNets ``c`` and ``c - step`` and every tolerance: the iterations each needs and the
    ratio ``iterations(c - step) / iterations(c)`` (null when either never reached it). The paper: lowering c by
    0.2 roughly halves the iterations (ratio about 0.5). ``models``: the per-model summaries (``coeff``,
    ``iterations_to``)."""
    by_coeff = {float(m["coeff"]): m for m in models.values() if m["coeff"] is not None}
    out = []
    for c, model in sorted(by_coeff.items(), reverse=True):
        lower = next((m for c2, m in by_coeff.items() if math.isclose(c2, c - step, abs_tol=1e-9)), None)
        if lower is None:
            continue
        for tol, n in model["iterations_to"].items():
            n_lower = lower["iterations_to"][tol]
            out.append(
                {
                    "coeff": c,
                    "coeff_lower": float(lower["coeff"]),
                    "tolerance": tol,
                    "iterations": n,
                    "iterations_lower": n_lower,
                    "ratio": n_lower / n if n and n_lower else None,
                }
            )
    return out


def run(params: Params, paths: Paths, tracker: Tracker | None = None) -> dict[str, Any]:
    """Reconstruct ``reconstruction.n_images`` test images with every model; write CSV, JSON, Fig. 3 and Fig. 8."""
    out = StageRun(RECONSTRUCTION, paths, tracker)
    seed_everything(params.seed)  # convention; the measurements themselves draw no random numbers
    p = params.reconstruction
    test, _ = load_prepared(paths, "test")
    if len(test) < p.n_images:
        raise DataError(
            f"reconstruction.n_images = {p.n_images} but the test split holds {len(test)} images; "
            "lower reconstruction.n_images or prepare more test data."
        )
    test = test.to(device())  # on the CPU the very tensor
    images = test[evenly_spaced(len(test), p.n_images)]
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    show = evenly_spaced(p.n_images, min(N_SHOWN, p.n_images))
    shown: dict[str, Tensor] = {"original": images[show].cpu()}
    for spec in track(classifier_specs(params.classifier), "reconstruction"):
        loaded = load_classifier(paths, spec, reference_seed(params.classifier))
        model_rows, pixels = error_curve(loaded, images, p.iterations)
        rows += model_rows
        shown[spec.label] = pixels[show].cpu()
        models[spec.label] = {
            "kind": spec.kind,
            "coeff": spec.coeff,
            **summarise(model_rows, p.tolerances),
            "seconds_per_100": seconds_per_batch(loaded, test, p.timing_iterations),
        }

    out.write_curve("errors", rows)
    plot_reconstruction_error(
        out.figure("fig8"), pd.DataFrame(rows, columns=list(RECONSTRUCTION.curves["errors"].columns)), p.tolerances
    )
    # Fig. 3 rows: originals, the i-ResNets, then the baselines.
    order = ["original"] + [s.label for s in classifier_specs(params.classifier) if s.coeff is not None]
    order += [label for label in shown if label not in order]
    plot_reconstructions(out.figure("fig3"), {label: shown[label] for label in order}, p.iterations[-1])
    result = out.finish(
        {
            "models": models,
            "iteration_ratios": iteration_ratios(models),
            "iterations_tested": list(p.iterations),
            "n_images": p.n_images,
            "error_units": "pixels in [0, 1]",
            "dtype": "float64",
        }
    )
    flat: dict[str, Any] = {}
    for label, summary in models.items():
        flat[f"{label}/final_max_error"] = summary["final_max_error"]
        flat[f"{label}/converged"] = summary["converged"]
        for key, n in summary["iterations_to"].items():
            flat[f"{label}/iterations_to_{key}"] = n
        for key, seconds in summary["seconds_per_100"].items():
            flat[f"{label}/seconds_per_100_at_{key}"] = seconds
    flat["wall_time_s"] = result["wall_time_s"]
    return flat
