"""``params.yaml`` as frozen pydantic dataclasses, one per section, validated when loaded and before any compute.

Every key is required (``params.yaml`` is the single source of defaults, and DVC tracks its leaf keys), unknown keys
are rejected (a typo must not silently fall back to a default), and every bad value raises :class:`ParamsError`
naming the key path, the value and what is allowed. Cross-field rules live in each section's ``check``.
"""

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ParamsError
from pipeline.schema import (
    boolean,
    build,
    checked,
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
LR_SCHEDULES = ("constant", "cosine")  # after the warm-up (pipeline.training.scheduled_lr)
OPTIMIZER_NAMES = ("sgd", "adam", "adamax")  # pipeline.training.build_optimizer
# Table 3's models: Glow with learned 1x1 convolutions and affine couplings, Glow with reverse permutations and
# additive couplings, and the i-ResNet with Glow's layout (pipeline.models.glow_specs).
GLOW_MODELS = ("affine", "additive", "iresnet")
# Native spatial size (height = width) of each named dataset; an ``idx:`` folder is only known once loaded.
NATIVE_SIZE = {"mnist-5k": 28, "mnist": 28, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32}

Bool = boolean()
Text = string()
PositiveInt = integer(lo=1)
NonNegativeInt = integer(lo=0)
PositiveReal = real(0.0, lo_open=True)
# Up to 1e9 a rate too large stops training with a diagnosis (tested at 1e8); 1e308 ended in a traceback. Seeds
# within numpy's range.
LearningRate = real(0.0, 1e9, lo_open=True)
Seed = integer(lo=0, hi=2**32 - 1)
OpenUnit = real(0.0, 1.0, lo_open=True, hi_open=True)
HalfOrLess = real(0.0, 0.5, lo_open=True)  # a held-out part that leaves at least as many images for training
PerStage = list_of(PositiveInt)
Strides = list_of(choice(1, 2))
InitDs = choice(1, 2)
LrSchedule = choice(*LR_SCHEDULES)
_DATASET_TEXT = "one of " + ", ".join(repr(d) for d in DATASETS) + f", or '{IDX_PREFIX}<folder of IDX files>'"


def _dataset_problem(value: str) -> str | None:
    return None if value in DATASETS or (value.startswith(IDX_PREFIX) and len(value) > 4) else _DATASET_TEXT


def _nonlinearity_problem(value: str) -> str | None:
    """A name of the library's 1-Lipschitz nonlinearities (imported here, not at start-up: ``iresnet --help`` and
    the params check need no torch until a stage runs)."""
    from iresnet.layers import NONLINEARITIES

    return None if value in NONLINEARITIES else "one of " + ", ".join(repr(n) for n in NONLINEARITIES)


_GLOW_RUN_TEXT = (
    "<model>-<optimizer> with model one of "
    + ", ".join(repr(m) for m in GLOW_MODELS)
    + " and optimizer one of "
    + ", ".join(repr(o) for o in OPTIMIZER_NAMES)
    + ", e.g. 'affine-adamax'"
)


def split_glow_run(value: str) -> tuple[str, str]:
    """``"affine-adamax"`` -> ``("affine", "adamax")``; raises ``ValueError`` for anything else."""
    model, sep, optimizer = value.rpartition("-")
    if not sep or model not in GLOW_MODELS or optimizer not in OPTIMIZER_NAMES:
        raise ValueError(_GLOW_RUN_TEXT)
    return model, optimizer


def _glow_run_problem(value: str) -> str | None:
    try:
        split_glow_run(value)
    except ValueError as err:
        return str(err)
    return None


Dataset = checked(Text, _dataset_problem, _DATASET_TEXT)
GlowRun = checked(Text, _glow_run_problem, _GLOW_RUN_TEXT)
Nonlinearity = checked(Text, _nonlinearity_problem, "a nonlinearity of iresnet.layers.NONLINEARITIES")
Coeff = one_of(OpenUnit, choice(*BASELINES))


def held_out_count(n: int, fraction: float) -> int:
    """How many of ``n`` examples a split holds out: ``fraction * n`` rounded half up (the stratified splits give
    each class its share of this total, :func:`pipeline.data.datasets.stratified_split`)."""
    return math.floor(fraction * n + 0.5)


def _check_stages(n_blocks: tuple, strides: tuple, channels: tuple) -> None:
    """Per-stage lists describe the same stages, so their lengths must agree (key relative to the section)."""
    if not len(n_blocks) == len(strides) == len(channels):
        lengths = f"n_blocks {len(n_blocks)}, strides {len(strides)}, channels {len(channels)}"
        raise ParamsError("strides", list(strides), f"lists of equal length ({lengths})")


def squeeze_factor(init_ds: int, strides: tuple[int, ...]) -> int:
    """Total spatial down-sampling: each stride-2 stage and an ``init_ds`` of 2 is one invertible squeeze (/2)."""
    return init_ds * 2 ** sum(1 for s in strides if s == 2)


@section
class ZCAParams:
    enabled: Bool = param("fit ZCA whitening on the train split")
    epsilon: PositiveReal = param("regulariser added to the covariance eigenvalues")


@section
class DataParams:
    dataset: Dataset = param("dataset name")
    root: Text = param("folder holding torchvision-layout datasets")
    download: Bool = param("allow torchvision to download a missing dataset")
    split_seed: Seed = param("seed of the stratified splits (test of mnist-5k, validation) and subsampling")
    test_fraction: OpenUnit = param("fraction of mnist-5k held out as the test split")
    val_fraction: HalfOrLess = param("fraction of the train part held out (stratified) as the validation split")
    max_train: optional(PositiveInt) = param("keep at most this many images of the train part (train + validation)")
    max_test: optional(PositiveInt) = param("keep at most this many test images")
    pad_to_32: Bool = param("zero-pad images to 32x32")
    zca: ZCAParams = param("ZCA whitening")

    def check(self) -> None:
        if self.max_train is not None:
            n_val = held_out_count(self.max_train, self.val_fraction)
            if n_val < 1:
                raise ParamsError(
                    "val_fraction",
                    self.val_fraction,
                    f"a fraction that holds out at least one of the max_train {self.max_train} images "
                    f"(>= {0.5 / self.max_train:g})",
                )

    def input_size(self) -> int | None:
        """Height = width of the prepared images, or None for an ``idx:`` folder (known only once loaded)."""
        if self.pad_to_32:
            return 32
        return NATIVE_SIZE.get(self.dataset)


@section
class NetworkParams:
    """The architecture that classifier and flow params share, under the names the library's configs give it
    (:class:`iresnet.ResNetConfig`, :class:`iresnet.FlowConfig`): :meth:`network` passes them on. A stage of a
    classifier is a scale of a flow."""

    n_blocks: PerStage = param("residual blocks per stage")
    strides: Strides = param("stride per stage (2 = invertible squeeze)")
    channels: PerStage = param("hidden channels of g per stage")
    init_ds: InitDs = param("initial squeeze (2) or none (1)")
    nonlin: Nonlinearity = param("1-Lipschitz nonlinearity (a flow's: smooth, e.g. elu, softplus, lipswish)")
    n_power_iter: PositiveInt = param("spectral-norm power iterations per training step")
    actnorm: Bool = param("ActNorm before each residual block")

    def check(self) -> None:
        _check_stages(self.n_blocks, self.strides, self.channels)

    def network(self) -> dict[str, Any]:
        """These fields as keyword arguments of a library config."""
        return {name: getattr(self, name) for name in NETWORK_FIELDS}


NETWORK_FIELDS = tuple(NetworkParams.__dataclass_fields__)


@section
class TrainingParams:
    """The training loop's settings that classifier and flow params share."""

    epochs: PositiveInt = param("training epochs")
    batch_size: PositiveInt = param("training batch size")
    eval_batch_size: PositiveInt = param("evaluation batch size")
    lr: LearningRate = param("learning rate")
    weight_decay: real(0.0) = param("weight decay")
    max_train_batches: optional(PositiveInt) = param("cap on batches per epoch (CPU profile)")


@section
class ClassifierParams(TrainingParams, NetworkParams):
    coeffs: list_of(Coeff, unique=True) = param("Lipschitz coefficients c and baselines")
    seeds: list_of(Seed, unique=True) = param(
        "training seeds (init and data order), one model per coefficient and seed; the first feeds the figures"
    )
    inj_pad: NonNegativeInt = param("zero channels appended to the input (injective padding)")
    optimizer: choice(*OPTIMIZER_NAMES) = param("optimiser")
    momentum: real(0.0, 1.0, hi_open=True) = param("SGD momentum")
    milestones: list_of(PositiveInt, min_len=0, increasing=True) = param("lr decay epochs")
    gamma: real(0.0, 1.0, lo_open=True) = param("lr factor at each milestone")
    shift_px: NonNegativeInt = param("random shift augmentation, pixels")
    hflip: Bool = param("random horizontal flips")
    bf16: Bool = param("bfloat16 autocast of the training forward pass")


@section
class GlowChannels:
    affine: PerStage = param("hidden width per scale of the affine Glow's coupling networks")
    additive: PerStage = param("hidden width per scale of the additive Glow's coupling networks")
    iresnet: PerStage = param("hidden width per scale of the Glow-style i-ResNet's residual branches")


@section
class GlowClassifierParams:
    """Table 3 (Sec. 5.2). Data, augmentation, epochs, batch sizes, the lr schedule and the SGD settings come from
    ``classifier`` (Table 2's), so every model here is trained as Table 2's i-ResNet is, except for its optimiser."""

    runs: list_of(GlowRun, unique=True) = param(
        "models trained, <model>-<optimizer>: model affine (Glow: 1x1 conv, affine coupling), additive (Glow: "
        "reverse permutation, additive coupling) or iresnet (Glow-style i-ResNet); optimizer sgd (classifier's lr, "
        "momentum, weight decay) or adam / adamax (glow_classifier.lr and weight_decay)"
    )
    seeds: list_of(Seed, unique=True) = param("training seeds (init and data order), one model per run each")
    n_steps: PerStage = param("steps of flow per scale (the i-ResNet: residual blocks)")
    strides: Strides = param("stride per scale (2 = invertible squeeze)")
    init_ds: InitDs = param("initial squeeze (2) or none (1)")
    inj_pad: NonNegativeInt = param("zero channels appended to the input (a coupling needs >= 2 channels)")
    channels: GlowChannels = param("hidden widths of each model, chosen for matching parameter counts")
    coeff: OpenUnit = param("Lipschitz coefficient c of the Glow-style i-ResNet")
    lr: LearningRate = param("learning rate of the adam / adamax runs (Glow's optimiser)")
    weight_decay: real(0.0) = param("weight decay of the adam / adamax runs")

    def check(self) -> None:
        lists = {"n_steps": self.n_steps, "strides": self.strides}
        lists.update({f"channels.{m}": getattr(self.channels, m) for m in GLOW_MODELS})
        if len({len(v) for v in lists.values()}) != 1:
            lengths = ", ".join(f"{k} {len(v)}" for k, v in lists.items())
            raise ParamsError("strides", list(self.strides), f"lists of equal length ({lengths})")


@section
class SingularValuesParams:
    project: Bool = param("project trained weights onto the constraint and re-measure")
    lower_iters: PositiveInt = param("block power iterations for each layer's lower bound (more: tighter)")


@section
class ReconstructionParams:
    iterations: list_of(PositiveInt, increasing=True) = param("fixed-point iteration counts")
    n_images: PositiveInt = param("test images reconstructed")
    tolerances: list_of(PositiveReal) = param("errors whose iteration count is found")
    timing_iterations: PerStage = param("iteration counts timed per batch")


@section
class FlowParams(TrainingParams, NetworkParams):
    coeff: OpenUnit = param("Lipschitz coefficient c")
    n_terms: PositiveInt = param("power-series terms while training (unbiased: terms always evaluated)")
    n_samples: PositiveInt = param("Hutchinson probes per example while training")
    estimator: choice("truncated", "unbiased") = param("log-det estimator")
    memory_efficient: Bool = param("Neumann-series gradient instead of backprop through the series")
    prior: choice("learned", "fixed", "conditional") = param(
        "Gaussian prior with learned or fixed (N(0, I)) parameters, or Glow's conditional factor-out prior"
    )
    factor_out: Bool = param("factor out half the channels after every scale but the last (false: single scale)")
    logit_alpha: optional(real(0.0, 0.5, lo_open=True, hi_open=True)) = param(
        "logit transform with this alpha as the first layer (null: none)"
    )
    actnorm_init_images: optional(PositiveInt) = param(
        "ActNorm data initialisation on this many evenly spaced train images (null: the first training batch)"
    )
    optimizer: choice("adamax", "adam") = param("optimiser")
    warmup_epochs: NonNegativeInt = param("linear learning-rate warm-up epochs")
    lr_schedule: LrSchedule = param("learning rate after the warm-up: constant or cosine decay to 0")
    use_zca: Bool = param("train on ZCA-whitened data (needs data.zca.enabled)")
    n_generated: PositiveInt = param("samples drawn for the samples grid")

    def check(self) -> None:
        super().check()
        if self.memory_efficient and self.estimator != "truncated":
            raise ParamsError(
                "memory_efficient", True, "false with estimator unbiased (the Neumann gradient is for truncated)"
            )
        if self.prior == "conditional" and (not self.factor_out or len(self.strides) < 2):
            raise ParamsError("prior", "conditional", "learned or fixed unless factor_out is true with >= 2 scales")
        if self.logit_alpha is not None and self.use_zca:
            raise ParamsError(
                "logit_alpha", self.logit_alpha, "null with use_zca (the logit needs pixels in [-1/2, 1/2))"
            )


@section
class EvaluateFlowParams:
    max_bias_bits: PositiveReal = param("bound on the truncation bias, bits/dim")
    max_stderr_bits: PositiveReal = param("target standard error, bits/dim")
    max_terms: PositiveInt = param("most power-series terms the budget allows")
    max_samples: integer(lo=2) = param("most Hutchinson probes per example (>= 2 for a standard error)")
    n_examples: optional(PositiveInt) = param("test examples evaluated (null = all)")
    batch_size: PositiveInt = param("evaluation batch size")
    sample_classifier: optional(Coeff) = param("entry of classifier.coeffs that scores the samples (null = none)")
    n_scored_samples: PositiveInt = param("flow samples scored by that classifier, beside as many test images")


@section
class LogdetBiasParams:
    n_examples: PositiveInt = param("test examples averaged over")
    max_terms: PositiveInt = param("largest number of series terms")
    n_samples: integer(lo=2) = param("Hutchinson probes per example (>= 2 for a standard deviation)")


@section
class ToyParams:
    datasets: list_of(choice(*TOY_DATASETS), unique=True) = param("2-D densities")
    seeds: list_of(Seed, unique=True) = param("training seeds (model init and batch stream), one flow each")
    n_blocks: PositiveInt = param("residual blocks (coupling layers for the Glow-style flow)")
    hidden: PerStage = param("hidden widths of each block's MLP (all equal)")
    coeff: OpenUnit = param("Lipschitz coefficient c")
    nonlin: Nonlinearity = param("1-Lipschitz nonlinearity")
    n_power_iter: PositiveInt = param("spectral-norm power iterations per training step")
    steps: PositiveInt = param("optimiser steps")
    batch_size: PositiveInt = param("samples per step")
    lr: LearningRate = param("Adam learning rate of the i-ResNet flow")
    glow_lr: LearningRate = param("Adam learning rate of the Glow-style flow")
    warmup_steps: NonNegativeInt = param("linear learning-rate warm-up steps (both flows)")
    lr_schedule: LrSchedule = param("learning rate after the warm-up: constant or cosine decay to 0")
    glow_scale_cap: Bool = param("Glow couplings' log-scale through tanh (|s| < 1 per layer)")
    n_test: PositiveInt = param("test samples per dataset for the NLL")
    n_val: PositiveInt = param("validation samples per dataset (the NLL that tuning reads)")
    grid_size: integer(lo=2) = param("heatmap resolution per axis")

    def check(self) -> None:
        if len(set(self.hidden)) != 1:
            raise ParamsError("hidden", list(self.hidden), "equal widths (the toy MLPs have one hidden width)")

    def mlp_shape(self) -> tuple[int, int]:
        """``(width, n_hidden_layers)`` of each block's MLP, e.g. ``[64, 64, 64]`` -> ``(64, 3)``."""
        return self.hidden[0], len(self.hidden)


@section
class TrackingParams:
    enabled: Bool = param("log runs to MLflow (env IRESNET_TRACKING=0 also disables)")


@section
class Params:
    """All of ``params.yaml``."""

    seed: Seed = param("global seed of every training stage")
    data: DataParams = param()
    classifier: ClassifierParams = param()
    glow_classifier: GlowClassifierParams = param()
    singular_values: SingularValuesParams = param()
    reconstruction: ReconstructionParams = param()
    flow: FlowParams = param()
    evaluate_flow: EvaluateFlowParams = param()
    logdet_bias: LogdetBiasParams = param()
    toy: ToyParams = param()
    tracking: TrackingParams = param()

    def check(self) -> None:
        scorer = self.evaluate_flow.sample_classifier
        if scorer is not None and scorer not in self.classifier.coeffs:
            raise ParamsError(
                "evaluate_flow.sample_classifier",
                scorer,
                f"an entry of classifier.coeffs ({', '.join(map(str, self.classifier.coeffs))}), or null",
            )
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
    for name in ("classifier", "glow_classifier", "flow"):
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
    if not value.strip():  # YAML reads nothing as null: say which one is meant rather than guess
        raise ParamsError(key, value, "a value after `=`; to clear a key write KEY=null")
    try:
        return key.strip(), _yaml_load(value)
    except YAMLError as err:
        raise ParamsError(key, value, f"a YAML value ({' '.join(str(err).split())})") from None


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with dotted ``overrides`` set; ``None`` sets the key to null (``-S key=null``)."""
    out = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
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
    return build(Params, raw)


def load_params(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read, override and validate a params file; raises :class:`ParamsError` on the first bad value."""
    raw = read_yaml(Path(path))
    return parse_params(apply_overrides(raw, overrides or {}) if overrides else raw)


def params_hash(data: Mapping[str, Any]) -> str:
    """A short stable hash of parameters (sorted-key JSON), to tag runs and spot identical configurations."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
