"""The networks of Table 3: the two Glow classifiers and the i-ResNet with Glow's layout ("Glow-style").

All three share ``glow_classifier``'s layout (steps per scale, strides, initial squeeze, padding), so they have the
same number of invertible steps at the same tensor shapes; each has its own hidden widths
(``glow_classifier.channels.<model>``), chosen so that their parameter counts agree within 10%. The Glow-style
i-ResNet is Table 2's classifier (:func:`pipeline.models.classifiers.resnet_config`'s nonlinearity, power iterations
and ActNorm from ``classifier``) in that layout, with Lipschitz coefficient ``glow_classifier.coeff``.
"""

from __future__ import annotations

from torch import nn

from iresnet.glow import GlowClassifier, GlowConfig
from iresnet.models import IResNetClassifier, ResNetConfig
from pipeline.errors import ParamsError
from pipeline.models.glow_specs import GlowRun
from pipeline.params import Params

MODEL_KIND = "glow_classifier"
VARIANTS = {"affine": ("affine", "conv1x1"), "additive": ("additive", "reverse")}  # model -> (coupling, permutation)


def glow_config(params: Params, model: str, in_shape: tuple[int, int, int]) -> GlowConfig:
    """The Glow classifier ``model`` (``affine`` or ``additive``) on inputs of ``in_shape``."""
    g = params.glow_classifier
    coupling, permutation = VARIANTS[model]
    return GlowConfig(
        in_shape=tuple(in_shape),  # type: ignore[arg-type]
        n_steps=g.n_steps,
        strides=g.strides,
        channels=getattr(g.channels, model),
        coupling=coupling,
        permutation=permutation,
        init_ds=g.init_ds,
        inj_pad=g.inj_pad,
    )


def glow_style_config(params: Params, in_shape: tuple[int, int, int]) -> ResNetConfig:
    """The i-ResNet classifier in Glow's layout: a residual block where Glow has a step of flow."""
    g = params.glow_classifier
    layout = {"n_blocks": g.n_steps, "strides": g.strides, "channels": g.channels.iresnet, "init_ds": g.init_ds}
    return ResNetConfig(
        in_shape=tuple(in_shape),  # type: ignore[arg-type]
        **{**params.classifier.network(), **layout},  # the classifier's blocks, laid out as Glow's steps
        coeff=g.coeff,
        inj_pad=g.inj_pad,
    )


def build_model(
    params: Params, run: GlowRun, in_shape: tuple[int, int, int], n_classes: int
) -> tuple[GlowConfig | ResNetConfig, nn.Module]:
    """``(config, model)`` of ``run``'s network, on the CPU; a layout the library refuses (a scale with one channel,
    which no coupling can split) is a :class:`ParamsError` naming ``glow_classifier``."""
    try:
        if run.model == "iresnet":
            config = glow_style_config(params, in_shape)
            return config, IResNetClassifier(config, n_classes)
        glow = glow_config(params, run.model, in_shape)
        return glow, GlowClassifier(glow, n_classes)
    except ValueError as err:
        raise ParamsError(
            "glow_classifier.inj_pad", params.glow_classifier.inj_pad, f"a valid layout ({err})"
        ) from None
