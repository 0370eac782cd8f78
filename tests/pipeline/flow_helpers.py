"""Shared by the flow stages' tests: tiny projects (an 8x8 IDX dataset, prepared, a flow trained on it) and a flow
with linear residual branches, whose log-det is known in closed form."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from iresnet.blocks import residual_blocks
from iresnet.layers import ActNorm
from iresnet.models import FlowConfig, MultiscaleFlow
from iresnet.spectral_norm import LipschitzConv2d
from pipeline.params import Params, load_params, parse_params
from pipeline.paths import Paths

# A two-scale flow on 8x8 images: 4x4x4 (d = 64) after the initial squeeze, 8x2x2 (d = 32) after factor-out.
TINY_FLOW = {
    "n_blocks": [1, 1],
    "strides": [1, 2],
    "channels": [4, 4],
    "init_ds": 2,
    "epochs": 2,
    "batch_size": 8,
    "eval_batch_size": 12,
    "n_generated": 4,
    "n_terms": 3,
    "warmup_epochs": 1,
    # the flow options off, whatever params.yaml's profile uses: tests that need one set it
    "prior": "learned",
    "factor_out": True,
    "logit_alpha": None,
    "actnorm_init_images": None,
    "lr_schedule": "constant",
}


def tiny_flow_params(raw: dict[str, Any], **flow: Any) -> dict[str, Any]:
    """``raw`` (the tiny project's params) with the tiny flow, ``flow`` overrides and small evaluation settings."""
    out = copy.deepcopy(raw)
    out["flow"].update({**TINY_FLOW, **flow})
    out["evaluate_flow"].update(  # no classifier is trained in a flow project: the sample scoring has its own test
        {"n_examples": None, "batch_size": 12, "max_terms": 40, "max_samples": 8, "sample_classifier": None}
    )
    out["logdet_bias"].update({"n_examples": 6, "max_terms": 12, "n_samples": 4})
    out["tracking"]["enabled"] = False
    return out


def prepared_project(root: Path, raw: dict[str, Any]) -> tuple[Params, Paths]:
    """Write ``raw`` as ``root/params.yaml`` and run ``prepare`` there (the IDX files must be in ``root/tiny``)."""
    from pipeline.stages import prepare

    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    paths = Paths.at(root)
    params = load_params(paths.params_file)
    prepare.run(params, paths)
    return params, paths


def trained_project(root: Path, raw: dict[str, Any], **flow: Any) -> tuple[Params, Paths, dict[str, Any]]:
    """A prepared tiny project with a trained tiny flow; returns its params, paths and ``train_flow`` metrics."""
    from pipeline.stages import train_flow

    params, paths = prepared_project(root, tiny_flow_params(raw, **flow))
    return params, paths, train_flow.run(params, paths)


def with_section(params: Params, section: str, **values: Any) -> Params:
    """A copy of ``params`` with ``section``'s keys changed (validated again)."""
    raw = params.to_dict()
    raw[section].update(values)
    return parse_params(raw)


class LinearBranch(nn.Module):
    """``g(x) = A x`` at every pixel (a 1x1 convolution without bias): ``J_g = A ⊗ I``, ``Lip(g) = ‖A‖₂``."""

    def __init__(self, matrix: Tensor, hw: tuple[int, int]) -> None:
        super().__init__()
        c = matrix.shape[0]
        self.conv = LipschitzConv2d(c, c, 1, hw, coeff=None, bias=False).to(matrix.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(matrix[:, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def linear_flow(norms: tuple[float, float], seed: int = 0) -> tuple[MultiscaleFlow, list[tuple[Tensor, int]]]:
    """A float64 two-scale flow on 1x8x8 whose residual branches are linear maps ``A_b`` (``‖A_b‖₂ = norms[b]``)
    and whose ActNorms are the identity; returns it and ``(A_b, pixels)`` per block: ``ln det = pixels · ln det(I+A)``.
    """
    gen = torch.Generator().manual_seed(seed)
    model = MultiscaleFlow(FlowConfig(in_shape=(1, 8, 8), n_blocks=(1, 1), strides=(1, 2), channels=(4, 4)))
    model = model.double().eval()
    maps = []
    for block, norm, (channels, hw) in zip(residual_blocks(model), norms, ((4, (4, 4)), (8, (2, 2)))):
        a = torch.randn(channels, channels, generator=gen, dtype=torch.float64)
        a *= norm / torch.linalg.matrix_norm(a, ord=2)
        block.g = LinearBranch(a, hw)
        maps.append((a, hw[0] * hw[1]))
    for module in model.modules():
        if isinstance(module, ActNorm):
            module.initialized.fill_(True)  # bias 0, log-scale 0: the identity
    return model, maps
