"""The classifiers of Table 2 / Fig. 6: how each is built, and loading a trained one back.

Which models a params file asks for, and their labels, are in :mod:`pipeline.models.specs`. Model files are rebuilt
from the config stored in them, so an analysis stage never depends on the training params still matching.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from iresnet.blocks import residual_blocks
from iresnet.models import IResNetClassifier, ResNetConfig
from iresnet.spectral_norm import LipschitzConv2d
from pipeline.data.preprocess import ChannelStats
from pipeline.env import device
from pipeline.errors import DataError, brief
from pipeline.models.specs import ClassifierSpec
from pipeline.outputs import TRAIN_CLASSIFIER
from pipeline.params import ClassifierParams
from pipeline.paths import Paths
from pipeline.training import config_from_dict, load_model_file, load_state_checked

MODEL_KIND = "classifier"


def resnet_config(params: ClassifierParams, spec: ClassifierSpec, in_shape: tuple[int, int, int]) -> ResNetConfig:
    """The network of App. C.2 for ``spec``: constrained to ``c``, unconstrained (vanilla), or with BatchNorm."""
    return ResNetConfig(
        in_shape=tuple(in_shape),  # type: ignore[arg-type]
        **params.network(),
        coeff=spec.coeff,
        inj_pad=params.inj_pad,
        batchnorm=spec.kind == "batchnorm",
    )


def conv_layers(model: IResNetClassifier) -> list[tuple[int, int, LipschitzConv2d]]:
    """``(block, index within the block, layer)`` for every convolution of every residual block, in order."""
    return [
        (b, i, layer)
        for b, block in enumerate(residual_blocks(model))
        for i, layer in enumerate(m for m in block.g.modules() if isinstance(m, LipschitzConv2d))
    ]


@dataclass
class LoadedClassifier:
    """A trained classifier in eval mode, with what its training stored about it."""

    spec: ClassifierSpec
    model: IResNetClassifier
    stats: ChannelStats  # the train mean/std its inputs were normalised with
    path: Path


def load_classifier(paths: Paths, spec: ClassifierSpec, seed: int) -> LoadedClassifier:
    """Rebuild the model of ``spec`` trained from ``seed`` from ``models/classifier/<label>/seed<seed>/model.pt``;
    eval mode, float32, on the stages' device (:func:`pipeline.env.device`). The stages that need one model per
    coefficient pass :func:`pipeline.models.specs.reference_seed` (the first entry of ``classifier.seeds``)."""
    path = TRAIN_CLASSIFIER.model_path(paths, spec.label, seed)
    state = load_model_file(path, MODEL_KIND)
    if state.get("label") != spec.label:
        raise DataError(f"{path} holds model {state.get('label')!r}, not {spec.label!r}; re-run train_classifier.")
    try:
        config = config_from_dict(ResNetConfig, state["config"])
    except (TypeError, ValueError) as err:
        raise DataError(f"{path} holds an unusable config ({brief(err)}); re-run train_classifier.") from None
    model = IResNetClassifier(config, n_classes=int(state["n_classes"]))
    load_state_checked(model, state["state_dict"], path)
    model.to(device()).eval()  # loaded on the CPU, then moved to the stage's device
    mean, std = (torch.tensor(state[key], dtype=torch.float64) for key in ("mean", "std"))
    return LoadedClassifier(spec, model, ChannelStats(mean, std), path)
