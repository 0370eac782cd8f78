"""Invertible Residual Networks (Behrmann et al., ICML 2019) in plain PyTorch.

Modules: ``spectral_norm`` (Lipschitz-constrained layers and exact norms), ``layers`` (ActNorm, squeeze, padding,
1-Lipschitz nonlinearities), ``logdet`` (log-determinant estimators and bounds), ``inverse`` (fixed-point inverse),
``blocks`` (the residual block), ``models`` (classifier, multiscale flow), ``glow`` (Glow as a classifier, Table 3),
``toy`` (2-D flows).
"""

from iresnet.base import Invertible, InvertibleSequential
from iresnet.blocks import InvertibleResidualBlock, conv_branch, mlp_branch, residual_blocks
from iresnet.glow import GlowClassifier, GlowConfig
from iresnet.inverse import InverseSettings, fixed_point_inverse
from iresnet.logdet import LogDetSettings, estimate_logdet, exact_logdet, power_series_logdet
from iresnet.models import FlowConfig, IResNetClassifier, MultiscaleFlow, ResNetConfig, bits_per_dim

__all__ = [
    "FlowConfig",
    "GlowClassifier",
    "GlowConfig",
    "IResNetClassifier",
    "InverseSettings",
    "Invertible",
    "InvertibleResidualBlock",
    "InvertibleSequential",
    "LogDetSettings",
    "MultiscaleFlow",
    "ResNetConfig",
    "bits_per_dim",
    "conv_branch",
    "estimate_logdet",
    "exact_logdet",
    "fixed_point_inverse",
    "mlp_branch",
    "power_series_logdet",
    "residual_blocks",
]
