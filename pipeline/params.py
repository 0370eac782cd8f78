"""``params.yaml`` as frozen dataclasses, one per section, validated when loaded and before any compute.

Every key is required (``params.yaml`` is the single source of defaults, and DVC tracks its leaf keys), unknown keys
are rejected (a typo must not silently fall back to a default), and every bad value raises :class:`ParamsError`
naming the key path, the value and what is allowed. Cross-field rules live in each section's ``check``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ParamsError
from pipeline.schema import (
    boolean,
    build,
    choice,
    integer,
    list_of,
    one_of,
    optional,
    param,
    real,
    section,
    string,
    to_dict,
)

DATASETS = ("mnist-5k", "mnist", "fashion-mnist", "cifar10", "cifar100")
IDX_PREFIX = "idx:"
BASELINES = ("vanilla", "batchnorm")  # unconstrained classifiers of Table 2 / Fig. 6
TOY_DATASETS = ("moons", "8gaussians", "checkerboard", "2spirals", "rings", "circles", "pinwheel", "swissroll")
# Native spatial size (height = width) of each named dataset; an ``idx:`` folder is only known once loaded.
NATIVE_SIZE = {"mnist-5k": 28, "mnist": 28, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32}

_positive_int = integer(lo=1)
_per_stage_ints = list_of(_positive_int)
_open_unit = real(0.0, 1.0, lo_open=True, hi_open=True)


def _dataset(value: Any, key: str) -> str:
    allowed = ", ".join(repr(d) for d in DATASETS) + f", or '{IDX_PREFIX}<folder of IDX files>'"
    if isinstance(value, str) and (value in DATASETS or (value.startswith(IDX_PREFIX) and len(value) > 4)):
        return value
    raise ParamsError(key, value, f"one of {allowed}")


def _nonlinearity(value: Any, key: str) -> str:
    """A name of the library's 1-Lipschitz nonlinearities (imported here, not at start-up: ``iresnet --help`` and
    the params check need no torch until a stage runs)."""
    from iresnet.layers import NONLINEARITIES

    return choice(*NONLINEARITIES)(value, key)


_coeff = one_of(_open_unit, choice(*BASELINES))


def _check_stages(section_key: str, n_blocks: tuple, strides: tuple, channels: tuple) -> None:
    """Per-stage lists describe the same stages, so their lengths must agree."""
    if not len(n_blocks) == len(strides) == len(channels):
        lengths = f"n_blocks {len(n_blocks)}, strides {len(strides)}, channels {len(channels)}"
        raise ParamsError(f"{section_key}.strides", list(strides), f"lists of equal length ({lengths})")


def squeeze_factor(init_ds: int, strides: tuple[int, ...]) -> int:
    """Total spatial down-sampling: each stride-2 stage and an ``init_ds`` of 2 is one invertible squeeze (/2)."""
    return init_ds * 2 ** sum(1 for s in strides if s == 2)


@dataclass(frozen=True)
class ZCAParams:
    enabled: bool = param(boolean(), "fit ZCA whitening on the train split")
    epsilon: float = param(real(0.0, lo_open=True), "regulariser added to the covariance eigenvalues")


@dataclass(frozen=True)
class DataParams:
    dataset: str = param(_dataset, "dataset name")
    root: str = param(string(), "folder holding torchvision-layout datasets")
    download: bool = param(boolean(), "allow torchvision to download a missing dataset")
    split_seed: int = param(integer(lo=0), "seed of the mnist-5k stratified split and of subsampling")
    test_fraction: float = param(_open_unit, "fraction of mnist-5k held out as the test split")
    max_train: int | None = param(optional(_positive_int), "keep at most this many training images")
    max_test: int | None = param(optional(_positive_int), "keep at most this many test images")
    pad_to_32: bool = param(boolean(), "zero-pad images to 32x32")
    zca: ZCAParams = param(section(ZCAParams), "ZCA whitening")

    def input_size(self) -> int | None:
        """Height = width of the prepared images, or None for an ``idx:`` folder (known only once loaded)."""
        if self.pad_to_32:
            return 32
        return NATIVE_SIZE.get(self.dataset)


@dataclass(frozen=True)
class ClassifierParams:
    coeffs: tuple[float | str, ...] = param(list_of(_coeff, unique=True), "Lipschitz coefficients c and baselines")
    n_blocks: tuple[int, ...] = param(_per_stage_ints, "residual blocks per stage")
    strides: tuple[int, ...] = param(list_of(choice(1, 2)), "stride per stage (2 = invertible squeeze)")
    channels: tuple[int, ...] = param(_per_stage_ints, "hidden channels of g per stage")
    init_ds: int = param(choice(1, 2), "initial squeeze (2) or none (1)")
    inj_pad: int = param(integer(lo=0), "zero channels appended to the input (injective padding)")
    nonlin: str = param(_nonlinearity, "1-Lipschitz nonlinearity")
    n_power_iter: int = param(_positive_int, "spectral-norm power iterations per training step")
    actnorm: bool = param(boolean(), "ActNorm before each residual block")
    epochs: int = param(_positive_int, "training epochs")
    batch_size: int = param(_positive_int, "training batch size")
    eval_batch_size: int = param(_positive_int, "evaluation batch size")
    optimizer: str = param(choice("sgd", "adam", "adamax"), "optimiser")
    lr: float = param(real(0.0, lo_open=True), "learning rate")
    momentum: float = param(real(0.0, 1.0, hi_open=True), "SGD momentum")
    weight_decay: float = param(real(0.0), "weight decay")
    milestones: tuple[int, ...] = param(list_of(_positive_int, min_len=0, increasing=True), "lr decay epochs")
    gamma: float = param(real(0.0, 1.0, lo_open=True), "lr factor at each milestone")
    shift_px: int = param(integer(lo=0), "random shift augmentation, pixels")
    hflip: bool = param(boolean(), "random horizontal flips")
    max_train_batches: int | None = param(optional(_positive_int), "cap on batches per epoch (CPU profile)")

    def check(self, key: str) -> None:
        _check_stages(key, self.n_blocks, self.strides, self.channels)


@dataclass(frozen=True)
class SingularValuesParams:
    project: bool = param(boolean(), "project trained weights onto the constraint and re-measure")
    lower_iters: int = param(_positive_int, "block power iterations for each layer's lower bound (more: tighter)")


@dataclass(frozen=True)
class ReconstructionParams:
    iterations: tuple[int, ...] = param(list_of(_positive_int, increasing=True), "fixed-point iteration counts")
    n_images: int = param(_positive_int, "test images reconstructed")
    tolerances: tuple[float, ...] = param(list_of(real(0.0, lo_open=True)), "errors whose iteration count is found")
    timing_iterations: tuple[int, ...] = param(list_of(_positive_int), "iteration counts timed per batch")


@dataclass(frozen=True)
class FlowParams:
    n_blocks: tuple[int, ...] = param(_per_stage_ints, "residual blocks per scale")
    strides: tuple[int, ...] = param(list_of(choice(1, 2)), "stride per scale (2 = squeeze)")
    channels: tuple[int, ...] = param(_per_stage_ints, "hidden channels of g per scale")
    init_ds: int = param(choice(1, 2), "initial squeeze (2) or none (1)")
    coeff: float = param(_open_unit, "Lipschitz coefficient c")
    nonlin: str = param(_nonlinearity, "1-Lipschitz nonlinearity (smooth: elu, softplus, lipswish)")
    n_power_iter: int = param(_positive_int, "spectral-norm power iterations per training step")
    actnorm: bool = param(boolean(), "ActNorm before each residual block")
    n_terms: int = param(_positive_int, "power-series terms while training (unbiased: terms always evaluated)")
    n_samples: int = param(_positive_int, "Hutchinson probes per example while training")
    estimator: str = param(choice("truncated", "unbiased"), "log-det estimator")
    memory_efficient: bool = param(boolean(), "Neumann-series gradient instead of backprop through the series")
    prior: str = param(choice("learned", "fixed"), "Gaussian prior with learned or fixed (N(0, I)) parameters")
    epochs: int = param(_positive_int, "training epochs")
    batch_size: int = param(_positive_int, "training batch size")
    eval_batch_size: int = param(_positive_int, "evaluation batch size")
    optimizer: str = param(choice("adamax", "adam"), "optimiser")
    lr: float = param(real(0.0, lo_open=True), "learning rate")
    warmup_epochs: int = param(integer(lo=0), "linear learning-rate warm-up epochs")
    weight_decay: float = param(real(0.0), "weight decay")
    use_zca: bool = param(boolean(), "train on ZCA-whitened data (needs data.zca.enabled)")
    n_generated: int = param(_positive_int, "samples drawn for the samples grid")
    max_train_batches: int | None = param(optional(_positive_int), "cap on batches per epoch (CPU profile)")

    def check(self, key: str) -> None:
        _check_stages(key, self.n_blocks, self.strides, self.channels)
        if self.memory_efficient and self.estimator != "truncated":
            raise ParamsError(
                f"{key}.memory_efficient", True, "false with estimator unbiased (the Neumann gradient is for truncated)"
            )


@dataclass(frozen=True)
class EvaluateFlowParams:
    max_bias_bits: float = param(real(0.0, lo_open=True), "bound on the truncation bias, bits/dim")
    max_stderr_bits: float = param(real(0.0, lo_open=True), "target standard error, bits/dim")
    max_terms: int = param(_positive_int, "most power-series terms the budget allows")
    max_samples: int = param(integer(lo=2), "most Hutchinson probes per example (>= 2 for a standard error)")
    n_examples: int | None = param(optional(_positive_int), "test examples evaluated (null = all)")
    batch_size: int = param(_positive_int, "evaluation batch size")


@dataclass(frozen=True)
class LogdetBiasParams:
    n_examples: int = param(_positive_int, "test examples averaged over")
    max_terms: int = param(_positive_int, "largest number of series terms")
    n_samples: int = param(integer(lo=2), "Hutchinson probes per example (>= 2 for a standard deviation)")


@dataclass(frozen=True)
class ToyParams:
    datasets: tuple[str, ...] = param(list_of(choice(*TOY_DATASETS), unique=True), "2-D densities")
    n_blocks: int = param(_positive_int, "residual blocks (coupling layers for the Glow-style flow)")
    hidden: tuple[int, ...] = param(_per_stage_ints, "hidden widths of each block's MLP (all equal)")
    coeff: float = param(_open_unit, "Lipschitz coefficient c")
    nonlin: str = param(_nonlinearity, "1-Lipschitz nonlinearity")
    n_power_iter: int = param(_positive_int, "spectral-norm power iterations per training step")
    steps: int = param(_positive_int, "optimiser steps")
    batch_size: int = param(_positive_int, "samples per step")
    lr: float = param(real(0.0, lo_open=True), "Adam learning rate of the i-ResNet flow")
    glow_lr: float = param(real(0.0, lo_open=True), "Adam learning rate of the Glow-style flow")
    n_test: int = param(_positive_int, "test samples for the NLL")
    grid_size: int = param(integer(lo=2), "heatmap resolution per axis")

    def check(self, key: str) -> None:
        if len(set(self.hidden)) != 1:
            raise ParamsError(f"{key}.hidden", list(self.hidden), "equal widths (the toy MLPs have one hidden width)")

    def mlp_shape(self) -> tuple[int, int]:
        """``(width, n_hidden_layers)`` of each block's MLP, e.g. ``[64, 64, 64]`` -> ``(64, 3)``."""
        return self.hidden[0], len(self.hidden)


@dataclass(frozen=True)
class TrackingParams:
    enabled: bool = param(boolean(), "log runs to MLflow (env IRESNET_TRACKING=0 also disables)")


@dataclass(frozen=True)
class Params:
    """All of ``params.yaml``."""

    seed: int = param(integer(lo=0), "global seed of every training stage")
    data: DataParams = param(section(DataParams))
    classifier: ClassifierParams = param(section(ClassifierParams))
    singular_values: SingularValuesParams = param(section(SingularValuesParams))
    reconstruction: ReconstructionParams = param(section(ReconstructionParams))
    flow: FlowParams = param(section(FlowParams))
    evaluate_flow: EvaluateFlowParams = param(section(EvaluateFlowParams))
    logdet_bias: LogdetBiasParams = param(section(LogdetBiasParams))
    toy: ToyParams = param(section(ToyParams))
    tracking: TrackingParams = param(section(TrackingParams))

    def check(self, key: str) -> None:
        if self.flow.use_zca and not self.data.zca.enabled:
            raise ParamsError("flow.use_zca", True, "false unless data.zca.enabled is true (no ZCA is prepared)")
        size = self.data.input_size()
        if size is not None:
            check_spatial(self, size, size)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def section_dict(self, *names: str) -> dict[str, Any]:
        """The named top-level sections as plain data (what a stage logs and hashes)."""
        return {name: to_dict(getattr(self, name)) for name in names}


def check_spatial(params: Params, height: int, width: int) -> None:
    """Raise :class:`ParamsError` unless every model's squeezes divide the input's ``height`` x ``width``.

    Called when params are loaded for datasets of known size, and by stages once an ``idx:`` dataset is loaded.
    """
    for name in ("classifier", "flow"):
        sec = getattr(params, name)
        factor = squeeze_factor(sec.init_ds, sec.strides)
        if height % factor or width % factor:
            raise ParamsError(
                f"{name}.strides",
                list(sec.strides),
                f"squeezes (init_ds {sec.init_ds} and each stride 2, total /{factor}) that divide the "
                f"{height}x{width} input; change the strides, init_ds or data.pad_to_32",
            )


def _yaml_load(text: str) -> Any:
    """Parse YAML as DVC does (ruamel.yaml's safe loader, YAML 1.2), so both read the same values: ``1e-4`` is a
    float, while ``yes``/``on`` stay strings (not booleans) and ``010`` is ten (not octal eight) as in YAML 1.2."""
    from ruamel.yaml import YAML

    return YAML(typ="safe").load(text)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, turning a missing or malformed file into a :class:`ParamsError`."""
    from ruamel.yaml import YAMLError

    if not path.is_file():
        raise ParamsError("--params", str(path), "an existing params file (run from the repository root)")
    try:
        return _yaml_load(path.read_text())
    except YAMLError as err:
        raise ParamsError("--params", str(path), f"valid YAML ({' '.join(str(err).split())})") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", parsed YAML value)``, as in ``dvc exp run -S``."""
    from ruamel.yaml import YAMLError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ParamsError("--set", text, "KEY=VALUE, e.g. data.dataset=cifar10")
    try:
        return key.strip(), _yaml_load(value)
    except YAMLError as err:
        raise ParamsError(key, value, f"a YAML value ({' '.join(str(err).split())})") from None


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with dotted ``overrides`` set (``None`` values are skipped: option not given)."""
    out = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise ParamsError(".".join(parents[: i + 1]), node.get(part), "a section to override a key in")
            node = node[part]
        if leaf not in node:
            raise ParamsError(dotted, value, "an existing key (overrides cannot add keys)")
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return out


def parse_params(raw: Any) -> Params:
    """Validate already-parsed YAML data."""
    return build(Params, raw, "")


def load_params(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read, override and validate a params file; raises :class:`ParamsError` on the first bad value."""
    raw = read_yaml(Path(path))
    return parse_params(apply_overrides(raw, overrides or {}) if overrides else raw)


def params_hash(data: Mapping[str, Any]) -> str:
    """A short stable hash of parameters (sorted-key JSON), to tag runs and spot identical configurations."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
