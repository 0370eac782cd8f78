"""Which classifiers a params file asks for, and their labels (no torch: the report reads these too).

A model is named by its *label*: ``"vanilla"`` (the i-ResNet with the spectral normalisation removed, Table 2),
``"batchnorm"`` (the same network with BatchNorm before each nonlinearity, Fig. 6) or the Lipschitz coefficient
``c`` written as Python writes the float (``"0.9"``), which is also how DVC writes ``${item.coeff}`` in the
``train_classifier@<label>-<seed>`` stage names and paths. Each model is trained once per entry of
``classifier.seeds``; the stages that need one model (singular values, reconstruction, the sample classifier) use
the first entry, :func:`reference_seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ParamsError
from pipeline.params import BASELINES, ClassifierParams


@dataclass(frozen=True)
class ClassifierSpec:
    """One entry of ``classifier.coeffs``: its label, coefficient (None for a baseline) and kind."""

    label: str
    coeff: float | None
    kind: str  # "iresnet" | "vanilla" | "batchnorm"

    @classmethod
    def of(cls, value: float | str) -> ClassifierSpec:
        """From an entry of ``classifier.coeffs`` or a label: ``"vanilla"``, ``"batchnorm"``, ``0.9`` or ``"0.9"``."""
        if isinstance(value, str) and value in BASELINES:
            return cls(value, None, value)
        try:
            c = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"unknown model {value!r}; expected {', '.join(BASELINES)} or a coefficient c") from None
        if not 0.0 < c < 1.0:
            raise ValueError(f"a Lipschitz coefficient must lie in (0, 1), got {value!r}")
        return cls(str(c), c, "iresnet")


def classifier_specs(params: ClassifierParams) -> list[ClassifierSpec]:
    """Every model ``classifier.coeffs`` asks for, in its order."""
    return [ClassifierSpec.of(value) for value in params.coeffs]


def coeff_label(text: str) -> str:
    """The label a ``--coeff`` names: a number in canonical form (``"0.90"``, ``"０.９"`` -> ``"0.9"``), a baseline as
    given."""
    try:
        return str(float(text))
    except ValueError:
        return text


def resolve_spec(params: ClassifierParams, text: str | float | None) -> ClassifierSpec:
    """The entry of ``classifier.coeffs`` that the CLI's ``--coeff`` names (``"vanilla"``, ``"0.9"``, ``0.9``)."""
    specs = classifier_specs(params)
    labels = [spec.label for spec in specs]
    if text is None:
        raise ParamsError("--coeff", None, f"one of the entries of classifier.coeffs: {', '.join(labels)}")
    label = coeff_label(str(text))
    for spec in specs:
        if spec.label == label:
            return spec
    raise ParamsError("--coeff", text, f"one of the entries of classifier.coeffs ({', '.join(labels)}); add it there")


def run_name(label: str, seed: int) -> str:
    """The name of one (label, seed) run of the ``train_classifier`` stage, its MLflow run and its row of the run-cost
    table: ``train_classifier@0.9-1``."""
    return f"train_classifier@{label}-{seed}"


def reference_seed(params: ClassifierParams) -> int:
    """The seed of the model that the single-model stages (``singular_values``, ``reconstruction``, ``evaluate_flow``'s
    sample classifier) read: the first entry of ``classifier.seeds``."""
    return params.seeds[0]


def resolve_seed(params: ClassifierParams, seed: int) -> int:
    """``seed`` when it is an entry of ``classifier.seeds`` (its outputs are where the report looks), else an error."""
    if seed not in params.seeds:
        seeds = ", ".join(map(str, params.seeds))
        raise ParamsError("--seed", seed, f"one of the entries of classifier.seeds ({seeds}); add it there")
    return seed
