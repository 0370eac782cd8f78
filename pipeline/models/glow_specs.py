"""Which Table 3 runs a params file asks for, and their labels (no torch: the report reads these too).

A run is named ``<model>-<optimizer>`` (an entry of ``glow_classifier.runs``): ``affine-adamax`` is Glow with learned
1x1 convolutions and affine couplings trained with Adamax at ``glow_classifier.lr``; ``iresnet-sgd`` the i-ResNet with
Glow's layout trained with Table 2's SGD settings (``classifier.lr``, ``momentum``, ``weight_decay``). Each run is
trained once per entry of ``glow_classifier.seeds``, as DVC's ``train_glow_classifier@<label>-<seed>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ParamsError
from pipeline.params import GlowClassifierParams, split_glow_run

STAGE = "train_glow_classifier"
MODEL_NAMES = {
    "affine": "Glow (1x1 conv, affine)",
    "additive": "Glow (reverse, additive)",
    "iresnet": "i-ResNet, Glow-style",
}
OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam", "adamax": "Adamax"}


@dataclass(frozen=True)
class GlowRun:
    """One entry of ``glow_classifier.runs``."""

    label: str
    model: str  # "affine" | "additive" | "iresnet"
    optimizer: str  # "sgd" | "adam" | "adamax"

    @classmethod
    def of(cls, label: str) -> GlowRun:
        model, optimizer = split_glow_run(label)
        return cls(label, model, optimizer)

    @property
    def is_glow(self) -> bool:
        return self.model != "iresnet"

    @property
    def papers_optimizer(self) -> bool:
        """Whether this is the optimiser the paper trained the model with: SGD for the i-ResNet, Adam or Adamax
        (with a much smaller learning rate) for Glow (Sec. 5.2)."""
        return (self.optimizer == "sgd") != self.is_glow

    @property
    def name(self) -> str:
        """``Glow (1x1 conv, affine) + Adamax``."""
        return f"{MODEL_NAMES[self.model]} + {OPTIMIZER_NAMES[self.optimizer]}"


def glow_runs(params: GlowClassifierParams) -> list[GlowRun]:
    return [GlowRun.of(label) for label in params.runs]


def resolve_run(params: GlowClassifierParams, label: str | None) -> GlowRun:
    """The entry of ``glow_classifier.runs`` that the CLI's ``--run`` names."""
    if label not in params.runs:
        raise ParamsError("--run", label, f"one of the entries of glow_classifier.runs ({', '.join(params.runs)})")
    return GlowRun.of(label)


def resolve_seed(params: GlowClassifierParams, seed: int) -> int:
    if seed not in params.seeds:
        seeds = ", ".join(map(str, params.seeds))
        raise ParamsError("--seed", seed, f"one of the entries of glow_classifier.seeds ({seeds}); add it there")
    return seed


def run_name(label: str, seed: int) -> str:
    """The name of one run of the ``train_glow_classifier`` stage (its MLflow run, its run-cost row):
    ``train_glow_classifier@affine-adamax-0``."""
    return f"{STAGE}@{label}-{seed}"
