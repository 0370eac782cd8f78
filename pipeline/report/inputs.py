"""What the ``report`` stage reads: every metrics/curves file the experiment stages write, and nothing from MLflow.

DVC's run cache can restore a stage's outputs without running it, so MLflow may lack runs whose results the
workspace holds; the files DVC tracks are the single source of every number in the report.

A missing file is a :class:`DataError` that names the file and the stage that writes it; so is a file without a
key the report needs (written by an older version of that stage).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError, brief
from pipeline.models.specs import ClassifierSpec
from pipeline.outputs import (
    EVALUATE_FLOW,
    LOGDET_BIAS,
    PREPARE,
    RECONSTRUCTION,
    SINGULAR_VALUES,
    TOY_DENSITY,
    TRAIN_CLASSIFIER,
    TRAIN_FLOW,
    TRAIN_GLOW_CLASSIFIER,
    StageOutputs,
    figures,
)
from pipeline.paths import Paths

STATS = "stats.json"  # the prepared data's summary (pipeline.data.store), read without importing torch

# Keys the report reads from each metrics file (a subset of what the stages write).
CLASSIFIER_KEYS = (
    "coeff",
    "kind",
    "seed",
    "dataset",
    "test_error",
    "test_correct",
    "test_error_stderr",
    "n_test",
    "epochs",
    "wall_time_s",
    "n_params",
    "throughput_img_s",
)
GLOW_KEYS = (  # Table 3's runs (train_glow_classifier)
    "kind",
    "optimizer",
    "optimizer_lr",
    "papers_optimizer",
    "seed",
    "dataset",
    "test_error",
    "test_correct",
    "test_error_stderr",
    "n_test",
    "epochs",
    "diverged",
    "diverged_at",
    "wall_time_s",
    "n_params",
    "throughput_img_s",
)
CERTIFICATE_KEYS = (
    "guaranteed_inverse",
    "max_block_bound",
    "block_bounds",
    "max_layer_upper",
    "frac_layers_above_1",
    "n_layers",
    "max_layer_exact",
)
# i-ResNets only (a vanilla model has no c): how close the exact norms sit to c
COEFF_KEYS = ("max_excess_over_coeff", "layers_above_coeff_tol", "coeff_rtol")
RECONSTRUCTION_KEYS = ("iterations_to", "final_mean_error", "final_max_error", "converged")
FLOW_KEYS = ("dataset", "epochs", "zca", "n_dims", "train_bpd", "wall_time_s", "n_params", "throughput_img_s")
EVALUATE_KEYS = (
    "bpd",
    "stderr",
    "stderr_examples",
    "bias_bound_bits",
    "n_terms",
    "n_samples",
    "n_dims",
    "n_examples",
    "dataset",
    "zca",
    "lemma7_lower_bpd",
    "lemma7_upper_bpd",
    "bias_target_met",
    "stderr_target_met",
    "wall_time_s",
    "block_lipschitz",  # one entry per residual block: the flow's block count
)
TOY_KEYS = ("iresnet_nll", "glow_nll", "iresnet_params", "glow_params")
LOGDET_KEYS = (
    "n_examples",
    "exact_bias_bpd",
    "exact_bias_target_bpd",
    "exact_bias_terms_to_target",
    "exact_terms_searched",
)


@dataclass(frozen=True)
class ReportInputs:
    """Every file's contents; ``classifiers`` keeps the order of ``classifier.coeffs`` and holds each model's run at
    the first entry of ``classifier.seeds`` (the model the other stages read); ``classifier_runs`` every run, label ->
    seed -> metrics, in the order of ``classifier.seeds``."""

    stats: dict[str, Any]
    prepare: dict[str, Any]
    classifiers: dict[str, dict[str, Any]]
    classifier_runs: dict[str, dict[int, dict[str, Any]]]
    singular_values: dict[str, Any]
    reconstruction: dict[str, Any]
    flow: dict[str, Any]
    evaluate_flow: dict[str, Any]
    logdet_bias: dict[str, Any]
    logdet_curve: list[dict[str, float]]
    toy: dict[str, Any]
    glow_runs: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # Table 3: run -> seed -> metrics


def required_files(
    paths: Paths,
    labels: list[str],
    seeds: tuple[int, ...],
    glow_runs: tuple[str, ...] = (),
    glow_seeds: tuple[int, ...] = (),
) -> dict[Path, str]:
    """Every input of the report -> the DVC stage that writes it."""
    files = {paths.prepared / STATS: "prepare", PREPARE.metrics_path(paths): "prepare"}
    for label in labels:
        files.update({TRAIN_CLASSIFIER.metrics_path(paths, label, seed): TRAIN_CLASSIFIER.stage for seed in seeds})
    for run in glow_runs:
        files.update(
            {TRAIN_GLOW_CLASSIFIER.metrics_path(paths, run, s): TRAIN_GLOW_CLASSIFIER.stage for s in glow_seeds}
        )
    for outputs in (SINGULAR_VALUES, RECONSTRUCTION, TRAIN_FLOW, EVALUATE_FLOW, LOGDET_BIAS, TOY_DENSITY):
        files[outputs.metrics_path(paths)] = outputs.stage
    files[LOGDET_BIAS.curve_path(paths, "terms")] = LOGDET_BIAS.stage
    files.update({paths.figures / name: stage for name, stage in figures().items()})
    return files


def check_present(
    paths: Paths,
    labels: list[str],
    seeds: tuple[int, ...],
    glow_runs: tuple[str, ...] = (),
    glow_seeds: tuple[int, ...] = (),
) -> None:
    """Raise one :class:`DataError` listing every missing input with the stage that writes it."""
    by_stage: dict[str, list[str]] = {}
    for path, stage in required_files(paths, labels, seeds, glow_runs, glow_seeds).items():
        if not path.is_file():
            by_stage.setdefault(stage, []).append(str(path.relative_to(paths.root)))
    if by_stage:
        lines = "; ".join(f"`{stage}` writes {', '.join(files)}" for stage, files in by_stage.items())
        raise DataError(
            f"the report needs files that do not exist yet ({lines}). Run `dvc repro` to build everything, or the "
            f"missing stages first: `dvc repro {' '.join(by_stage)}`."
        )


def _read(path: Path, stage: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(
            f"{path} is unreadable ({brief(err)}); re-run stage `{stage}`: `dvc repro -f {stage}`."
        ) from None
    _require_keys(data, keys, path, stage)
    return data


def _require_keys(data: Any, keys: tuple[str, ...], path: Path, stage: str, where: str = "") -> None:
    if not isinstance(data, dict):
        raise DataError(f"{path}{where} should hold a JSON object; re-run stage `{stage}`: `dvc repro -f {stage}`.")
    absent = [k for k in keys if k not in data]
    if absent:
        raise DataError(
            f"{path}{where} lacks {', '.join(absent)} (written by an older `{stage}`?); re-run it: "
            f"`dvc repro -f {stage}`."
        )


def _per_model(path: Path, stage: str, labels: list[str], keys: tuple[str, ...]) -> dict[str, Any]:
    data = _read(path, stage, ("models",))
    models = data["models"]
    _require_keys(models, tuple(labels), path, stage, " `models`")
    for label in labels:
        _require_keys(models[label], keys, path, stage, f" `models.{label}`")
    return data


def read_curve(path: Path, stage: str, columns: tuple[str, ...]) -> list[dict[str, float]]:
    """Rows of a numeric CSV curve as dicts of floats, checking the ``columns`` the report needs."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    header = set(rows[0]) if rows else set()
    if not rows or not set(columns) <= header:
        raise DataError(
            f"{path} should have rows with columns {', '.join(columns)}; re-run stage `{stage}`: "
            f"`dvc repro -f {stage}`."
        )
    try:
        return [{c: float(row[c]) for c in columns} for row in rows]
    except (TypeError, ValueError) as err:
        raise DataError(f"{path} holds a non-number ({brief(err)}); re-run stage `{stage}`.") from None


def load_inputs(
    paths: Paths,
    coeffs: tuple[float | str, ...],
    seeds: tuple[int, ...],
    glow_runs: tuple[str, ...] = (),
    glow_seeds: tuple[int, ...] = (),
) -> ReportInputs:
    """Read and check every input (``coeffs``, ``seeds``: ``classifier.coeffs`` and ``classifier.seeds``, naming the
    classifier files; ``glow_runs``, ``glow_seeds``: ``glow_classifier.runs`` and ``.seeds``, naming Table 3's)."""
    labels = [ClassifierSpec.of(c).label for c in coeffs]
    check_present(paths, labels, seeds, glow_runs, glow_seeds)
    glow = {
        run: {
            s: _read(TRAIN_GLOW_CLASSIFIER.metrics_path(paths, run, s), TRAIN_GLOW_CLASSIFIER.stage, GLOW_KEYS)
            for s in glow_seeds
        }
        for run in glow_runs
    }
    runs = {
        label: {
            seed: _read(TRAIN_CLASSIFIER.metrics_path(paths, label, seed), TRAIN_CLASSIFIER.stage, CLASSIFIER_KEYS)
            for seed in seeds
        }
        for label in labels
    }
    toy_path = TOY_DENSITY.metrics_path(paths)
    toy = _read(toy_path, TOY_DENSITY.stage, ("datasets",))
    for name, entry in toy["datasets"].items():
        _require_keys(entry, TOY_KEYS, toy_path, TOY_DENSITY.stage, f" `datasets.{name}`")

    def per_model(outputs: StageOutputs, keys: tuple[str, ...], top: tuple[str, ...] = ()) -> dict[str, Any]:
        data = _per_model(outputs.metrics_path(paths), outputs.stage, labels, keys)
        _require_keys(data, top, outputs.metrics_path(paths), outputs.stage)
        return data

    def metrics(outputs: StageOutputs, keys: tuple[str, ...] = ()) -> dict[str, Any]:
        return _read(outputs.metrics_path(paths), outputs.stage, keys)

    singular_values = per_model(SINGULAR_VALUES, CERTIFICATE_KEYS)
    for label in labels:
        if ClassifierSpec.of(label).coeff is not None:
            where = f" `models.{label}`"
            _require_keys(
                singular_values["models"][label],
                COEFF_KEYS,
                SINGULAR_VALUES.metrics_path(paths),
                "singular_values",
                where,
            )
    return ReportInputs(
        stats=_read(paths.prepared / STATS, PREPARE.stage, ("dataset", "n_train", "n_val", "n_test", "shape")),
        prepare=metrics(PREPARE, ("wall_time_s",)),
        classifiers={label: by_seed[seeds[0]] for label, by_seed in runs.items()},
        classifier_runs=runs,
        singular_values=singular_values,
        reconstruction=per_model(RECONSTRUCTION, RECONSTRUCTION_KEYS, ("iteration_ratios",)),
        flow=metrics(TRAIN_FLOW, FLOW_KEYS),
        evaluate_flow=metrics(EVALUATE_FLOW, EVALUATE_KEYS),
        logdet_bias=metrics(LOGDET_BIAS, LOGDET_KEYS),
        logdet_curve=read_curve(
            LOGDET_BIAS.curve_path(paths, "terms"), LOGDET_BIAS.stage, LOGDET_BIAS.curves["terms"].columns
        ),
        toy=toy,
        glow_runs=glow,
    )
