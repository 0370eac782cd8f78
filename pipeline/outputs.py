"""Every file a stage writes, named once, and the ending every stage's ``run()`` shares.

:data:`STAGES` is the registry: for each DVC stage its metrics JSON (under ``reports/metrics/``), CSV curves
(``reports/curves/``), PNG figures (``reports/figures/``) and other outputs (models, prepared data, tables). The
stages write these files, the report reads them, and a test checks that ``dvc.yaml`` declares exactly them.
``{label}`` and ``{seed}`` stand for a classifier's label and training seed (the runs of ``train_classifier``, and of
``train_glow_classifier`` with an entry of ``glow_classifier.runs`` as the label): each (label, seed) run writes its own
files, ``.../<label>/seed<k>...``, and ``dvc.yaml`` declares their folders (:meth:`StageOutputs.declared`).

:class:`StageRun` is the frame of a stage's ``run()``: it starts the clock, hands out the output paths, writes curves,
and :meth:`StageRun.finish` ends the stage the same way everywhere (wall time, metrics JSON, MLflow artifacts).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.env import device, device_info, made_with, world
from pipeline.files import write_csv, write_json
from pipeline.paths import Paths
from pipeline.tracking import NullTracker, Tracker

LABEL, SEED = "{label}", "{seed}"
ZCA_MARK = "†"  # marks a result on ZCA-whitened data, in figure titles and tables (as the paper's Table 4 does)


class Curve(NamedTuple):
    """A CSV curve: its file under ``reports/curves/`` and its columns, in order (the stage writes exactly these;
    the report and ``dvc plots`` read them)."""

    file: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class StageOutputs:
    """The files one DVC stage writes, relative to their folders under ``reports/`` (``other``: to the root)."""

    stage: str
    metrics: str | None = None
    curves: Mapping[str, Curve] = field(default_factory=dict)  # short key -> file under reports/curves/, columns
    figures: Mapping[str, str] = field(default_factory=dict)  # short key -> file under reports/figures/
    model: str | None = None  # the trained model's file under models/
    other: tuple[str, ...] = ()  # prepared data, folders of models, tables: paths from the project root

    def metrics_path(self, paths: Paths, label: str | None = None, seed: int | None = None) -> Path:
        if self.metrics is None:
            raise ValueError(f"stage {self.stage!r} writes no metrics file of its own")
        return paths.metrics / _fill(self.metrics, label, seed)

    def curve_path(self, paths: Paths, key: str, label: str | None = None, seed: int | None = None) -> Path:
        return paths.curves / _fill(self.curves[key].file, label, seed)

    def figure_path(self, paths: Paths, key: str) -> Path:
        return paths.figures / self.figures[key]

    def model_path(self, paths: Paths, label: str | None = None, seed: int | None = None) -> Path:
        if self.model is None:
            raise ValueError(f"stage {self.stage!r} writes no single model file")
        return paths.models / _fill(self.model, label, seed)

    def other_path(self, paths: Paths, index: int) -> Path:
        return paths.root / self.other[index]

    def files(self) -> list[str]:
        """Every output path from the project root, ``{label}`` and ``{seed}`` unfilled."""
        out = list(self.other) + ([f"models/{self.model}"] if self.model is not None else [])
        out += [f"reports/curves/{curve.file}" for curve in self.curves.values()]
        out += [f"reports/figures/{name}" for name in self.figures.values()]
        if self.metrics is not None:
            out.append(f"reports/metrics/{self.metrics}")
        return out

    def run_files(self, label: str, seed: int) -> list[str]:
        """What one (``label``, ``seed``) run writes: :meth:`files` filled in."""
        return [_fill(name, label, seed) for name in self.files()]

    def declared(self) -> list[str]:
        """What ``dvc.yaml`` declares: :meth:`files`, a path with placeholders as the folder above the first (one
        stage writes every (label, seed) run: ``models/classifier`` for ``models/classifier/{label}/...``)."""
        return [name.split(f"/{LABEL}", 1)[0] for name in self.files()]


def _fill(name: str, label: str | None, seed: int | None) -> str:
    """``name`` with its placeholders filled; each value must be given exactly when ``name`` holds its mark."""
    for mark, value in ((LABEL, label), (SEED, seed)):
        if (mark in name) != (value is not None):
            raise ValueError(f"{name!r} needs a value for {mark} exactly when it holds it; got {value!r}")
        if value is not None:
            name = name.replace(mark, str(value))
    return name


RAW_DATA = StageOutputs("raw_data", other=("data/raw.json",))
PREPARE = StageOutputs("prepare", "prepare.json", figures={"preview": "data_preview.png"}, other=("data/prepared",))
TRAIN_CLASSIFIER = StageOutputs(
    "train_classifier",
    f"classifier/{LABEL}/seed{SEED}.json",
    curves={
        "epochs": Curve(
            f"classifier/{LABEL}/seed{SEED}.csv",
            ("epoch", "train_loss", "train_accuracy", "val_loss", "val_error", "lr", "sigma_max"),
        )
    },
    model=f"classifier/{LABEL}/seed{SEED}/model.pt",
)
TRAIN_GLOW_CLASSIFIER = StageOutputs(  # {label}: an entry of glow_classifier.runs (Table 3)
    "train_glow_classifier",
    f"glow_classifier/{LABEL}/seed{SEED}.json",
    curves={
        "epochs": Curve(
            f"glow_classifier/{LABEL}/seed{SEED}.csv",
            ("epoch", "train_loss", "train_accuracy", "val_loss", "val_error", "lr", "diverged_batch"),
        )
    },
    model=f"glow_classifier/{LABEL}/seed{SEED}/model.pt",
)
SINGULAR_VALUES = StageOutputs(
    "singular_values",
    "singular_values.json",
    curves={
        "layers": Curve(
            "singular_values.csv",
            (
                "model",
                "weights",
                "block",
                "layer",
                "kernel_size",
                "input_hw",
                "sigma_lower",
                "sigma_exact",
                "sigma_upper",
                "sigma_running",
                "exact_method",
            ),
        )
    },
    figures={"fig6": "fig6_singular_values.png"},
)
RECONSTRUCTION = StageOutputs(
    "reconstruction",
    "reconstruction.json",
    curves={"errors": Curve("reconstruction.csv", ("model", "iterations", "mean_error", "max_error", "max_residual"))},
    figures={"fig8": "fig8_reconstruction_error.png", "fig3": "fig3_reconstructions.png"},
)
TRAIN_FLOW = StageOutputs(
    "train_flow",
    "flow.json",
    curves={"epochs": Curve("flow.csv", ("epoch", "train_bpd", "val_bpd", "logpz", "logdet", "recon_error", "lr"))},
    figures={"fig5": "fig5_samples.png"},
    model="flow/model.pt",
)
EVALUATE_FLOW = StageOutputs("evaluate_flow", "evaluate_flow.json")
LOGDET_BIAS = StageOutputs(
    "logdet_bias",
    "logdet_bias.json",
    curves={
        "terms": Curve(
            "logdet_bias.csv",
            (
                "n_terms",
                "bias",
                "abs_bias",
                "bias_stderr",
                "std",
                "theorem3_bound",
                "bias_plain",
                "exact_bias",
                "exact_bias_max",
            ),
        )
    },
    figures={"fig4": "fig4_logdet_bias.png"},
)
TOY_DENSITY = StageOutputs(
    "toy_density",
    "toy.json",
    curves={"steps": Curve("toy.csv", ("dataset", "seed", "model", "step", "loss"))},
    figures={"fig2": "fig2_toy_densities.png"},
    other=("models/toy",),
)
# The report writes no metrics of its own: the summary is the aggregate that `dvc metrics` compares.
SUMMARY, PAGE = "summary.json", "README.md"  # under reports/metrics/ and reports/
REPORT = StageOutputs("report", other=("reports/tables", f"reports/{PAGE}", f"reports/metrics/{SUMMARY}"))

STAGES: dict[str, StageOutputs] = {
    o.stage: o
    for o in (
        RAW_DATA,
        PREPARE,
        TRAIN_CLASSIFIER,
        TRAIN_GLOW_CLASSIFIER,
        SINGULAR_VALUES,
        RECONSTRUCTION,
        TRAIN_FLOW,
        EVALUATE_FLOW,
        LOGDET_BIAS,
        TOY_DENSITY,
        REPORT,
    )
}


def figures() -> dict[str, str]:
    """Every figure file name -> the stage that draws it (what the report page shows)."""
    return {name: o.stage for o in STAGES.values() for name in o.figures.values()}


class StageRun:
    """One execution of a stage: its clock, its tracker, its output paths, and the ending all stages share.

    ::

        out = StageRun(SINGULAR_VALUES, paths, tracker)
        ...                                   # compute
        out.write_curve("layers", rows)
        plot_singular_values(out.figure("fig6"), ...)
        metrics = out.finish({"models": ...})  # + wall_time_s, written to the metrics JSON; artifacts logged
    """

    def __init__(
        self,
        outputs: StageOutputs,
        paths: Paths,
        tracker: Tracker | None = None,
        label: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.outputs, self.paths, self.label, self.seed = outputs, paths, label, seed
        self.tracker = tracker or NullTracker()
        self.start = time.perf_counter()
        self._artifacts: dict[Path, str] = {}

    @property
    def metrics_path(self) -> Path:
        return self.outputs.metrics_path(self.paths, self.label, self.seed)

    def curve_path(self, key: str) -> Path:
        return self.outputs.curve_path(self.paths, key, self.label, self.seed)

    def figure(self, key: str) -> Path:
        """The path of figure ``key``; it is logged as an artifact at :meth:`finish`."""
        path = self.outputs.figure_path(self.paths, key)
        self._artifacts[path] = "figures"
        return path

    def artifact(self, path: Path, folder: str) -> Path:
        """Log ``path`` (a file or folder the stage wrote) under ``folder`` of the MLflow run at :meth:`finish`."""
        self._artifacts[path] = folder
        return path

    def write_curve(self, key: str, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Curve ``key`` as CSV: one line per row, its registered columns in that order (other keys of a row left
        out)."""
        import pandas as pd

        path = self.curve_path(key)
        columns = self.outputs.curves[key].columns
        write_csv(path, pd.DataFrame([{c: row[c] for c in columns} for row in rows], columns=list(columns)))
        self._artifacts[path] = "curves"
        return path

    def elapsed(self, earlier_s: float = 0.0) -> float:
        """Seconds since the stage started, plus ``earlier_s`` (time an interrupted run already spent)."""
        return earlier_s + time.perf_counter() - self.start

    def finish(self, metrics: dict[str, Any], earlier_s: float = 0.0) -> dict[str, Any]:
        """End the stage: add ``wall_time_s`` and ``made_with`` (:func:`pipeline.env.made_with`), write ``metrics``
        to the stage's JSON (when it has one), log every output as an MLflow artifact. Returns ``metrics``."""
        metrics["wall_time_s"] = self.elapsed(earlier_s)
        metrics["made_with"] = made_with()  # byte-identity holds only on the same CPU, torch build and thread count
        # Where it ran, except in the default single CPU process (whose metrics files stay exactly as they were).
        if device().type != "cpu":
            metrics.update(device_info())
        if world().distributed:
            metrics["world_size"] = world().size
        if self.outputs.metrics is not None:
            write_json(self.metrics_path, metrics)
            self._artifacts = {self.metrics_path: "metrics", **self._artifacts}
        for path, folder in self._artifacts.items():
            self.tracker.log_artifact(path, folder)
        return metrics
