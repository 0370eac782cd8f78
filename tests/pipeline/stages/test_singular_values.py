"""Stage ``singular_values``: ``sigma_exact`` is the dense operator's norm and the bounds bracket it, block bounds and
certificates follow from the bounds and the counts from the exact norms, an inflated layer breaks the certificate and
projection repairs it, bad input is explained."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from iresnet.blocks import residual_blocks
from iresnet.spectral_norm import EXACT_DENSE_LIMIT, conv_norm_upper_bound, operator_norm
from pipeline.errors import DataError, ParamsError
from pipeline.files import save_torch
from pipeline.models.classifiers import conv_layers, load_classifier
from pipeline.models.specs import ClassifierSpec
from pipeline.outputs import SINGULAR_VALUES, TRAIN_CLASSIFIER
from pipeline.params import Params, parse_params
from pipeline.paths import Paths
from pipeline.stages import singular_values
from tests.pipeline.classifier_helpers import classifier_project, tiny_raw, trained_project

LABELS = ["vanilla", "batchnorm", "0.9", "0.5"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Paths, dict]:
    params, paths = trained_project(tmp_path_factory.mktemp("sv"), coeffs=["vanilla", "batchnorm", 0.9, 0.5], epochs=1)
    return params, paths, singular_values.run(params, paths)


def _exact_norm(weight: torch.Tensor, shape: tuple[int, int, int], padding: int) -> float:
    w = weight.detach().double()
    return operator_norm(lambda z: F.conv2d(z, w, padding=padding), (1, *shape))


def test_exact_norm_of_every_convolution_and_bounds_around_it(measured: tuple) -> None:
    params, paths, _ = measured
    frame = pd.read_csv(SINGULAR_VALUES.curve_path(paths, "layers"))
    assert list(frame.columns) == list(SINGULAR_VALUES.curves["layers"].columns)
    assert frame["model"].tolist() == [label for label in LABELS for _ in range(6)]  # 2 blocks x 3 convs
    assert set(frame["weights"]) == {"trained"}
    for label in LABELS:
        model = load_classifier(paths, ClassifierSpec.of(label), 0).model
        rows = frame[frame["model"] == label].to_dict("records")
        for row, (block, index, layer) in zip(rows, conv_layers(model)):
            assert (row["block"], row["layer"], row["kernel_size"]) == (block, index, layer.kernel_size)
            assert row["input_hw"] == f"{layer.input_hw[0]}x{layer.input_hw[1]}"
            exact = _exact_norm(layer.effective_weight(), (layer.in_channels, *layer.input_hw), layer.padding)
            assert row["sigma_exact"] == pytest.approx(exact, rel=1e-10)
            assert row["exact_method"] == (
                "dense" if layer.in_channels * math.prod(layer.input_hw) <= EXACT_DENSE_LIMIT else "lanczos"
            )
            assert row["sigma_lower"] <= exact * (1 + 1e-12) and exact <= row["sigma_upper"] * (1 + 1e-12)
            assert row["sigma_lower"] >= exact * (1 - 1e-12)  # 200 iterations: converged (measured gap <= 3e-14)
            if layer.kernel_size == 1:  # no padding: the circular operator is the operator
                assert row["sigma_upper"] == pytest.approx(exact, rel=1e-10)
            with torch.no_grad():
                s = float((layer.u * F.conv2d(layer.v, layer.weight, padding=layer.padding)).sum())
            assert row["sigma_running"] == pytest.approx(s if layer.coeff is None else min(s, layer.coeff), rel=1e-6)


def test_block_bounds_and_certificates_follow_from_the_layers(measured: tuple) -> None:
    params, paths, flat = measured
    frame = pd.read_csv(SINGULAR_VALUES.curve_path(paths, "layers"))
    result = json.loads((SINGULAR_VALUES.metrics_path(paths)).read_text())
    assert set(result["models"]) == set(LABELS) and result["wall_time_s"] > 0
    for label in LABELS:
        summary, rows = result["models"][label], frame[frame["model"] == label]
        model = load_classifier(paths, ClassifierSpec.of(label), 0).model
        for b, block in enumerate(residual_blocks(model)):
            product = math.prod(rows[rows["block"] == b]["sigma_upper"])
            for m in block.g.modules():
                if isinstance(m, torch.nn.BatchNorm2d):  # eval-mode BatchNorm: a per-channel affine map
                    product *= float((m.weight.detach().abs() / (m.running_var + m.eps).sqrt()).max())
            assert summary["block_bounds"][b] == pytest.approx(product, rel=1e-12)
        assert summary["guaranteed_inverse"] == all(b < 1 for b in summary["block_bounds"])
        assert summary["max_block_bound"] == max(summary["block_bounds"])
        assert summary["max_layer_upper"] == pytest.approx(rows["sigma_upper"].max(), rel=1e-15)
        assert summary["max_layer_exact"] == rows["sigma_exact"].max()
        assert summary["max_layer_lower"] == rows["sigma_lower"].max()
        assert summary["frac_layers_above_1"] == pytest.approx((rows["sigma_exact"] > 1).mean(), rel=1e-15)
        assert summary["exact_methods"] == rows["exact_method"].value_counts().to_dict()
        coeff = None if label in ("vanilla", "batchnorm") else float(label)
        above = None if coeff is None else int((rows["sigma_exact"] > coeff).sum())
        uncertified = None if coeff is None else int((rows["sigma_upper"] > coeff).sum())
        assert summary["layers_above_coeff"] == above and summary["layers_uncertified_at_coeff"] == uncertified
        assert summary["coeff"] == coeff
        assert (summary["n_layers"], summary["n_blocks"]) == (6, 2)
        assert flat[f"{label}/guaranteed_inverse"] == summary["guaranteed_inverse"]
        assert flat[f"{label}/max_layer_exact"] == summary["max_layer_exact"]
        if coeff is not None:
            tol = summary["coeff_rtol"]
            assert summary["layers_above_coeff_tol"] == int((rows["sigma_exact"] > coeff * (1 + tol)).sum())
            assert summary["max_excess_over_coeff"] == pytest.approx(rows["sigma_exact"].max() / coeff - 1, abs=1e-15)
    # Every i-ResNet is certified; the estimate that training used never exceeds c.
    assert result["models"]["0.9"]["guaranteed_inverse"] and result["models"]["0.5"]["guaranteed_inverse"]
    assert (frame[frame["model"] == "0.5"]["sigma_running"] <= 0.5).all()
    assert (SINGULAR_VALUES.figure_path(paths, "fig6")).read_bytes()[:4] == b"\x89PNG"


def test_counts_and_largest_norm_use_the_exact_norm_not_a_bound(measured: tuple) -> None:
    """A layer whose lower bound stays at c but whose exact norm is above c(1 + 1e-4) is counted above c, and one
    whose lower bound is below 1 but exact norm above it is counted above 1: the counts follow the exact norms."""
    params, paths, _ = measured
    model = load_classifier(paths, ClassifierSpec.of(0.9), 0).model
    row = {"sigma_lower": 0.9, "sigma_exact": 0.9 * (1 + 2e-4), "sigma_upper": 0.95, "sigma_running": 0.9}
    rows = [{**row, "exact_method": "lanczos"}, {**row, "sigma_exact": 0.8, "exact_method": "dense"}]
    summary = singular_values.certificate(model, rows, 0.9)
    assert summary["layers_above_coeff_tol"] == 1 and summary["layers_above_coeff"] == 1
    assert summary["max_layer_exact"] == 0.9 * (1 + 2e-4) and summary["max_layer_lower"] == 0.9
    assert summary["max_excess_over_coeff"] == pytest.approx(2e-4, rel=1e-9)
    assert summary["max_lag"] == pytest.approx(1 + 2e-4, rel=1e-12)  # exact over running, not lower over running
    assert summary["exact_methods"] == {"dense": 1, "lanczos": 1}
    above_1 = [{**row, "sigma_lower": 0.99, "sigma_exact": 1.01, "sigma_upper": 1.02, "exact_method": "dense"}]
    assert singular_values.certificate(model, above_1, None)["frac_layers_above_1"] == 1.0


def test_inflated_layer_breaks_the_certificate_and_projection_repairs_it(tmp_path: Path) -> None:
    params, paths = trained_project(tmp_path, coeffs=[0.9], epochs=1)
    path = TRAIN_CLASSIFIER.model_path(paths, "0.9", 0)
    state = torch.load(path, weights_only=True)
    model = load_classifier(paths, ClassifierSpec.of(0.9), 0).model
    _, _, layer = conv_layers(model)[0]
    name = next(n for n, m in model.named_modules() if m is layer)
    # A stale u orthogonal to W v makes the estimate 0, so Eq. 2 leaves the raw weight, scaled here to norm 3.
    state["state_dict"][f"{name}.u"] = torch.zeros_like(layer.u)
    inflated = (layer.weight * (3.0 / conv_norm_upper_bound(layer.weight, layer.input_hw, 1))).detach()
    state["state_dict"][f"{name}.weight"] = inflated
    save_torch(path, state)
    before = path.read_bytes()

    raw = tiny_raw(coeffs=[0.9], epochs=1)
    raw["singular_values"]["project"] = True
    flat = singular_values.run(parse_params(raw), paths)
    summary = json.loads((SINGULAR_VALUES.metrics_path(paths)).read_text())["models"]["0.9"]
    assert summary["guaranteed_inverse"] is False and flat["0.9/guaranteed_inverse"] is False
    inflated_norm = conv_norm_upper_bound(inflated, layer.input_hw, 1)  # 3 up to the float32 rounding of W
    assert summary["max_layer_upper"] == pytest.approx(inflated_norm, rel=1e-12) and summary["max_block_bound"] > 1
    assert summary["max_lag"] is None  # the estimate is 0: the lag is infinite, written as null
    projected = summary["projected"]
    assert projected["guaranteed_inverse"] is True and flat["0.9/projected_guaranteed_inverse"] is True
    assert projected["n_layers_projected"] >= 1 and projected["max_layer_upper"] <= 0.9
    frame = pd.read_csv(SINGULAR_VALUES.curve_path(paths, "layers"))
    after = frame[frame["weights"] == "projected"]
    assert len(after) == 6 and (after["sigma_upper"] <= 0.9).all()
    assert path.read_bytes() == before  # the model file itself is not changed


def test_missing_models_and_bad_params_are_explained(tmp_path: Path) -> None:
    params, paths = classifier_project(tmp_path)
    with pytest.raises(DataError, match=r"no model at .*vanilla.*run the stage"):
        singular_values.run(params, paths)
    raw = tiny_raw()
    raw["singular_values"]["lower_iters"] = 0
    with pytest.raises(ParamsError, match=r"singular_values\.lower_iters.*>= 1"):
        parse_params(raw)


def test_dvc_stage_tracks_exactly_what_it_reads() -> None:
    from dataclasses import fields

    import yaml

    from pipeline.params import SingularValuesParams
    from tests.pipeline.classifier_helpers import REPO

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["singular_values"]
    read = {"seed", "classifier.coeffs", "classifier.seeds"} | {
        f"singular_values.{f.name}" for f in fields(SingularValuesParams)
    }
    assert set(stage["params"]) == read
    deps = {"pipeline/stages/singular_values.py", "pipeline/models/classifiers.py", "iresnet", "models/classifier"}
    assert deps <= set(stage["deps"])
    assert {"reports/metrics/singular_values.json": {"cache": False, "persist": True}} in stage["outs"]


def test_dvc_fig6_plot_draws_the_exact_norm() -> None:
    """`dvc plots` Fig. 6 draws a column the stage writes, the exact norm, and its label says so."""
    import yaml

    from tests.pipeline.classifier_helpers import REPO

    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    (fig6,) = [entry[name] for entry in plots if isinstance(entry, dict) for name in entry if "Fig. 6" in name]
    assert fig6["y"] == {"reports/curves/singular_values.csv": "sigma_exact"}
    assert "sigma_exact" in SINGULAR_VALUES.curves["layers"].columns and "exact" in fig6["y_label"]
