"""What the three flow stages share: the flow built from params or from its model file, and the space it models.

The flow models dequantised pixels ``x = (k + u) / 256 - 0.5`` in ``[-0.5, 0.5)^D`` (:func:`pipeline.data.preprocess.
dequantize`), or with ``flow.use_zca`` their ZCA-whitened version ``z = W (x + 0.5 - mean)``. Since
``ln p_x(x) = ln p_flow(z) + ln|det W|``, adding the stored ZCA log-det reports every likelihood in the original
space's units, so bits/dim always count ``D = C·H·W`` dimensions of 256 bins (784 for 28x28 MNIST); a ZCA result is
still marked † (the model saw whitened data, as in the paper's Table 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from iresnet.logdet import LogDetSettings
from iresnet.models import FlowConfig, MultiscaleFlow, bits_per_dim
from pipeline.data.batches import evenly_spaced
from pipeline.data.preprocess import ZCA, dequantize
from pipeline.data.store import load_prepared, load_zca
from pipeline.env import device
from pipeline.errors import DataError, brief
from pipeline.outputs import TRAIN_FLOW
from pipeline.params import FlowParams
from pipeline.paths import Paths
from pipeline.training import config_from_dict, load_model_file, load_state_checked

MODEL_KIND = "flow"


def logdet_settings(flow: FlowParams) -> LogDetSettings:
    """``flow.estimator`` x ``flow.memory_efficient`` -> the library's estimator while training.

    truncated -> ``series`` (Algorithm 2, backprop through the series) or ``neumann`` (same value, memory-saving
    gradient); unbiased -> ``unbiased`` (Russian roulette; ``n_terms`` terms always evaluated, then Geometric(1/2)
    more). The params check rejects unbiased + memory_efficient.
    """
    if flow.estimator == "unbiased":
        return LogDetSettings("unbiased", n_samples=flow.n_samples, n_exact_terms=flow.n_terms)
    return LogDetSettings("neumann" if flow.memory_efficient else "series", flow.n_terms, flow.n_samples)


def flow_config(flow: FlowParams, in_shape: tuple[int, int, int]) -> FlowConfig:
    """The library config of the flow that ``flow.*`` describes, for images of ``in_shape = (C, H, W)``."""
    return FlowConfig(
        in_shape=tuple(in_shape),
        **flow.network(),
        coeff=flow.coeff,
        learned_prior=flow.prior != "fixed",  # conditional: the last scale's prior is learned too (Glow)
        logdet=logdet_settings(flow),
        logit_alpha=flow.logit_alpha,
        prior="conditional" if flow.prior == "conditional" else "diagonal",
        factor_out=flow.factor_out,
    )


def dims_text(shape: tuple[int, ...]) -> str:
    """``"784 = 1x28x28"``: the dimension count a bits/dim value divides by, and where it comes from."""
    return f"{math.prod(shape)} = {'x'.join(map(str, shape))}"


@dataclass(frozen=True)
class FlowSpace:
    """Pixels in ``[0, 1]`` <-> the flow's input space, and bits/dim in the original space.

    ``zca``: the whitening the flow was trained with (None: dequantised pixels directly). ``shape``: ``(C, H, W)``.
    """

    shape: tuple[int, int, int]
    zca: ZCA | None = None

    @property
    def n_dims(self) -> int:
        return math.prod(self.shape)

    @property
    def log_det_correction(self) -> float:
        """``ln|det W|`` of the whitening (0 without ZCA), added to the flow's ``ln p`` (nats per example)."""
        return self.zca.logdet if self.zca is not None else 0.0

    def to_model(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """``(B, C, H, W)`` pixels ``k/255`` -> dequantised (fresh uniform noise from ``generator``), whitened."""
        x = dequantize(images, generator)
        return x if self.zca is None else self.zca.whiten(x + 0.5)

    def to_images(self, x: Tensor) -> Tensor:
        """Flow inputs (e.g. samples) -> pixels, clamped to ``[0, 1]`` for display."""
        pixels = x + 0.5 if self.zca is None else self.zca.unwhiten(x)
        return pixels.clamp(0.0, 1.0)

    def bpd(self, log_prob: Tensor) -> Tensor:
        """Bits/dim ``(B,)`` of the discrete data from the flow's ``ln p`` ``(B,)`` in its input space."""
        return bits_per_dim(log_prob + self.log_det_correction, self.n_dims)


@dataclass(frozen=True)
class TrainedFlow:
    """A flow loaded from ``models/flow/model.pt`` in eval mode, its data space and the file's metadata."""

    model: MultiscaleFlow
    space: FlowSpace
    dataset: str
    meta: dict[str, Any]


def load_trained_flow(paths: Paths) -> TrainedFlow:
    """Rebuild the flow from the config stored with it (training params need not match any more).

    A flow trained on whitened data needs the very ZCA it was trained with: its log-det is stored in the model file
    and checked against ``data/prepared/zca.pt``.
    """
    path = TRAIN_FLOW.model_path(paths)
    state = load_model_file(path, MODEL_KIND)
    try:
        config = config_from_dict(FlowConfig, state["config"])
    except (TypeError, ValueError) as err:
        raise DataError(f"{path} holds an unusable config ({brief(err)}); re-run train_flow.") from None
    model = MultiscaleFlow(config)
    load_state_checked(model, state["state_dict"], path)
    model.to(device()).eval()  # loaded on the CPU, then moved to the stage's device
    zca = None
    if state["zca"]:
        zca = load_zca(paths).to(device())
        if not math.isclose(zca.logdet, state["zca_logdet"], rel_tol=1e-12, abs_tol=1e-9):
            raise DataError(
                f"{path} was trained on data whitened with a ZCA of log-det {state['zca_logdet']}, but "
                f"data/prepared/zca.pt has {zca.logdet}: the data were prepared again since. "
                "Re-run `dvc repro train_flow`."
            )
    space = FlowSpace(tuple(state["image_shape"]), zca)
    return TrainedFlow(model, space, state["dataset"], {k: v for k, v in state.items() if k != "state_dict"})


def fixed_noise_inputs(space: FlowSpace, images: Tensor, seed: int) -> Tensor:
    """Every image dequantised once with noise from a generator seeded with ``seed``: the evaluation stages' inputs."""
    return space.to_model(images, torch.Generator().manual_seed(seed))


def load_flow_with_test_inputs(
    paths: Paths, n_examples: int | None, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[TrainedFlow, Tensor]:
    """The trained flow (:func:`load_trained_flow`) in ``dtype``, and what the evaluation stages feed it: ``n_examples``
    evenly spaced test images (all when None) dequantised with noise seeded by ``seed``, ``(N, C, H, W)`` in ``dtype``.

    The images are cast before the noise is drawn, so float64 inputs carry float64 noise, not widened float32 noise.
    """
    flow = load_trained_flow(paths)
    flow.model.to(dtype)
    images, _ = load_prepared(paths, "test")
    chosen = images[evenly_spaced(len(images), n_examples)].to(device=device(), dtype=dtype)
    return flow, fixed_noise_inputs(flow.space, chosen, seed)
