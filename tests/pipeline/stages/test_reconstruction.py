"""Stage ``reconstruction``: the CSV holds the errors of an independent fixed-point inversion, constrained models
reconstruct with an error that falls with the iterations (faster for smaller c), summaries follow from the curve,
a diverging model is flagged, bad input is explained."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from iresnet.blocks import InvertibleResidualBlock
from pipeline.data.store import load_prepared
from pipeline.errors import DataError
from pipeline.files import save_torch
from pipeline.models.classifiers import conv_layers, load_classifier
from pipeline.models.specs import ClassifierSpec
from pipeline.outputs import RECONSTRUCTION, TRAIN_CLASSIFIER
from pipeline.params import Params, parse_params
from pipeline.paths import Paths
from pipeline.stages import reconstruction
from tests.pipeline.classifier_helpers import TINY_RECONSTRUCTION, classifier_project, tiny_raw, trained_project

LABELS = ["vanilla", "0.9", "0.5"]
COUNTS = TINY_RECONSTRUCTION["iterations"]


def _strict(text: str) -> dict:
    """JSON without NaN / Infinity (which Python writes but strict parsers reject)."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


@pytest.fixture(scope="module")
def reconstructed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Paths, dict]:
    params, paths = trained_project(tmp_path_factory.mktemp("rec"), coeffs=["vanilla", 0.9, 0.5], epochs=1)
    return params, paths, reconstruction.run(params, paths)


def _by_hand(label: str, paths: Paths, n: int) -> tuple[float, float]:
    """Mean and max pixel error of an inversion written out here: every layer's inverse, blocks by x <- y - g(x)."""
    loaded = load_classifier(paths, ClassifierSpec.of(label), 0)
    model = copy.deepcopy(loaded.model).double()
    images = load_prepared(paths, "test")[0][[0, 2, 4, 7, 9, 11]].double()  # 6 of 12, evenly spaced
    with torch.no_grad():
        h = model.features(loaded.stats.normalize(images))
        for layer in reversed(list(model.body.layers)):
            if isinstance(layer, InvertibleResidualBlock):
                x = h
                for _ in range(n):
                    x = h - layer.g(x)
                h = x
            else:
                h = layer.inverse(h)
    error = (loaded.stats.denormalize(h) - images).abs()
    return float(error.mean()), float(error.max())


def test_curve_matches_an_independent_inversion(reconstructed: tuple) -> None:
    _, paths, _ = reconstructed
    frame = pd.read_csv(RECONSTRUCTION.curve_path(paths, "errors"))
    assert list(frame.columns) == list(RECONSTRUCTION.curves["errors"].columns)
    assert frame["model"].tolist() == [label for label in LABELS for _ in COUNTS]
    assert frame["iterations"].tolist() == COUNTS * len(LABELS)
    for label in ("0.9", "vanilla"):
        row = frame[(frame["model"] == label) & (frame["iterations"] == 3)].iloc[0]
        mean, worst = _by_hand(label, paths, 3)
        assert row["mean_error"] == pytest.approx(mean, rel=1e-12, abs=1e-300)
        assert row["max_error"] == pytest.approx(worst, rel=1e-12, abs=1e-300)


def test_constrained_models_converge_geometrically(reconstructed: tuple) -> None:
    _, paths, flat = reconstructed
    frame = pd.read_csv(RECONSTRUCTION.curve_path(paths, "errors"))
    result = _strict((RECONSTRUCTION.metrics_path(paths)).read_text())
    for label in ("0.9", "0.5"):
        errors = frame[frame["model"] == label]["max_error"].tolist()
        # Non-increasing until the float64 floor (~1e-16 of pixel values ~1).
        assert all(b <= a or b < 1e-13 for a, b in zip(errors, errors[1:])), errors
        assert errors[0] > 1e-4 and errors[-1] < 1e-12  # from visibly wrong to exact
    summary = result["models"]
    for label in LABELS:
        rows = frame[frame["model"] == label].to_dict("records")
        for tol in TINY_RECONSTRUCTION["tolerances"]:
            key = reconstruction.tolerance_key(tol)
            expected = next((r["iterations"] for r in rows if r["max_error"] <= tol), None)
            assert summary[label]["iterations_to"][key] == expected
            assert flat[f"{label}/iterations_to_{key}"] == expected
        assert summary[label]["final_max_error"] == rows[-1]["max_error"]
        assert summary[label]["converged"] == (rows[-1]["max_error"] <= 1e-6)
        assert set(summary[label]["seconds_per_100"]) == {"1", "3"}
        assert all(s > 0 for s in summary[label]["seconds_per_100"].values())
    assert summary["0.5"]["converged"] and summary["0.9"]["converged"]
    # A smaller c contracts faster: c = 0.5 needs no more iterations than c = 0.9 for any tolerance.
    for key, n in summary["0.5"]["iterations_to"].items():
        assert n <= summary["0.9"]["iterations_to"][key]
    assert set(result["models"]) == set(LABELS) and result["n_images"] == 6 and result["wall_time_s"] > 0
    assert result["iteration_ratios"] == reconstruction.iteration_ratios(summary)  # no c - 0.2 pair here: empty
    assert result["iterations_tested"] == list(COUNTS)
    for key in ("fig8", "fig3"):
        assert RECONSTRUCTION.figure_path(paths, key).read_bytes()[:4] == b"\x89PNG"


def test_iteration_ratios_pair_c_with_c_minus_0_2() -> None:
    models = {
        "vanilla": {"coeff": None, "iterations_to": {"1e-03": None}},
        "0.9": {"coeff": 0.9, "iterations_to": {"1e-03": 8}},
        "0.7": {"coeff": 0.7, "iterations_to": {"1e-03": 5}},
        "0.5": {"coeff": 0.5, "iterations_to": {"1e-03": None}},
        "0.6": {"coeff": 0.6, "iterations_to": {"1e-03": 3}},  # 0.6 has no partner 0.4: no row
    }
    ratios = reconstruction.iteration_ratios(models)
    assert [(r["coeff"], r["coeff_lower"]) for r in ratios] == [(0.9, 0.7), (0.7, 0.5)]
    assert ratios[0]["ratio"] == 5 / 8 and (ratios[0]["iterations"], ratios[0]["iterations_lower"]) == (8, 5)
    assert ratios[1]["ratio"] is None and ratios[1]["iterations_lower"] is None  # never reached: no ratio


def test_a_diverging_model_is_flagged_not_hidden(tmp_path: Path) -> None:
    params, paths = trained_project(tmp_path, coeffs=["vanilla"], epochs=1)
    path = TRAIN_CLASSIFIER.model_path(paths, "vanilla", 0)
    state = torch.load(path, weights_only=True)
    model = load_classifier(paths, ClassifierSpec.of("vanilla"), 0).model
    for _, _, layer in conv_layers(model):  # every g becomes strongly expansive
        name = next(n for n, m in model.named_modules() if m is layer)
        state["state_dict"][f"{name}.weight"] = state["state_dict"][f"{name}.weight"] * 30.0
    save_torch(path, state)
    flat = reconstruction.run(params, paths)
    summary = _strict((RECONSTRUCTION.metrics_path(paths)).read_text())["models"]["vanilla"]
    assert summary["converged"] is False and flat["vanilla/converged"] is False
    assert summary["iterations_to"] == {"1e-02": None, "1e-06": None}
    final = summary["final_max_error"]
    assert final is None or final > 1.0  # non-finite (null) or far off


def test_bad_input_is_explained(tmp_path: Path) -> None:
    params, paths = classifier_project(tmp_path)
    with pytest.raises(DataError, match=r"no model at .*run the stage"):
        reconstruction.run(params, paths)
    raw = tiny_raw()
    raw["reconstruction"]["n_images"] = 13
    with pytest.raises(DataError, match=r"n_images = 13 but the test split holds 12 images"):
        reconstruction.run(parse_params(raw), paths)
    assert reconstruction.tolerance_key(1e-3) == "1e-03" and math.isclose(float("1e-03"), 1e-3)


def test_dvc_stage_tracks_exactly_what_it_reads() -> None:
    from dataclasses import fields

    import yaml

    from pipeline.params import ReconstructionParams
    from tests.pipeline.classifier_helpers import REPO

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["reconstruction"]
    read = {"seed", "classifier.coeffs", "classifier.seeds"} | {
        f"reconstruction.{f.name}" for f in fields(ReconstructionParams)
    }
    assert set(stage["params"]) == read
    assert {"pipeline/stages/reconstruction.py", "iresnet", "models/classifier", "data/prepared/test.pt"} <= set(
        stage["deps"]
    )
    assert {"reports/metrics/reconstruction.json": {"cache": False, "persist": True}} in stage["outs"]
