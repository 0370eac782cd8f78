"""The classifiers of Table 2 / Fig. 6: which models a params file asks for, how each is built, where its files live.

A model is named by its *label*: ``"vanilla"`` (the i-ResNet with the spectral normalisation removed, Table 2),
``"batchnorm"`` (the same network with BatchNorm before each nonlinearity, Fig. 6) or the Lipschitz coefficient
``c`` written as Python writes the float (``"0.9"``), which is also how DVC writes ``${item.coeff}`` in the
``train_classifier@<label>`` stage names and paths. Model files are rebuilt from the config stored in them, so an
analysis stage never depends on the training params still matching.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iresnet.blocks import residual_blocks
from iresnet.models import IResNetClassifier, ResNetConfig
from iresnet.spectral_norm import LipschitzConv2d
from pipeline.errors import DataError, ParamsError
from pipeline.params import BASELINES, ClassifierParams
from pipeline.paths import Paths
from pipeline.data.preprocess import ChannelStats
from pipeline.training import load_model_file, load_state_checked

MODEL_KIND = "classifier"


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


def resolve_spec(params: ClassifierParams, text: str | float | None) -> ClassifierSpec:
    """The entry of ``classifier.coeffs`` that the CLI's ``--coeff`` names (``"vanilla"``, ``"0.9"``, ``0.9``)."""
    specs = classifier_specs(params)
    labels = [spec.label for spec in specs]
    if text is None:
        raise ParamsError("--coeff", None, f"one of the entries of classifier.coeffs: {', '.join(labels)}")
    try:
        label = str(float(text))
    except ValueError:
        label = str(text)
    for spec in specs:
        if spec.label == label:
            return spec
    raise ParamsError("--coeff", text, f"one of the entries of classifier.coeffs ({', '.join(labels)}); add it there")


def resnet_config(params: ClassifierParams, spec: ClassifierSpec, in_shape: tuple[int, int, int]) -> ResNetConfig:
    """The network of App. C.2 for ``spec``: constrained to ``c``, unconstrained (vanilla), or with BatchNorm."""
    return ResNetConfig(
        in_shape=tuple(in_shape),  # type: ignore[arg-type]
        n_blocks=params.n_blocks,
        strides=params.strides,
        channels=params.channels,
        coeff=spec.coeff,
        n_power_iter=params.n_power_iter,
        nonlin=params.nonlin,
        init_ds=params.init_ds,
        inj_pad=params.inj_pad,
        actnorm=params.actnorm,
        batchnorm=spec.kind == "batchnorm",
    )


def config_to_dict(config: ResNetConfig) -> dict[str, Any]:
    """Plain data (lists, numbers, strings) that :func:`config_from_dict` turns back into ``config``."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(data: dict[str, Any]) -> ResNetConfig:
    return ResNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def conv_layers(model: IResNetClassifier) -> list[tuple[int, int, LipschitzConv2d]]:
    """``(block, index within the block, layer)`` for every convolution of every residual block, in order."""
    return [
        (b, i, layer)
        for b, block in enumerate(residual_blocks(model))
        for i, layer in enumerate(m for m in block.g.modules() if isinstance(m, LipschitzConv2d))
    ]


def model_file(paths: Paths, label: str) -> Path:
    return paths.models / "classifier" / label / "model.pt"


def metrics_file(paths: Paths, label: str) -> Path:
    return paths.metrics / "classifier" / f"{label}.json"


def curve_file(paths: Paths, label: str) -> Path:
    return paths.curves / "classifier" / f"{label}.csv"


@dataclass
class LoadedClassifier:
    """A trained classifier in eval mode, with what its training stored about it."""

    spec: ClassifierSpec
    model: IResNetClassifier
    stats: ChannelStats  # the train mean/std its inputs were normalised with
    path: Path


def load_classifier(paths: Paths, spec: ClassifierSpec) -> LoadedClassifier:
    """Rebuild the model of ``spec`` from ``models/classifier/<label>/model.pt``; eval mode, float32."""
    path = model_file(paths, spec.label)
    state = load_model_file(path, MODEL_KIND)
    if state.get("label") != spec.label:
        raise DataError(f"{path} holds model {state.get('label')!r}, not {spec.label!r}; re-run train_classifier.")
    try:
        config = config_from_dict(state["config"])
    except (TypeError, ValueError) as err:
        raise DataError(f"{path} holds an unusable config ({err}); re-run train_classifier.") from None
    model = IResNetClassifier(config, n_classes=int(state["n_classes"]))
    load_state_checked(model, state["state_dict"], path)
    model.eval()
    mean, std = (torch.tensor(state[key], dtype=torch.float64) for key in ("mean", "std"))
    return LoadedClassifier(spec, model, ChannelStats(mean, std), path)
