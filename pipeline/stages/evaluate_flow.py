"""Stage ``evaluate_flow``: test bits/dim of the trained flow by the protocol of App. C.3 (Table 4).

1. Bias. Every block's ``Lip(g)`` is certified from above (``lipschitz_bound()``: exact norms of its convolutions),
   and the number of series terms n is the smallest whose Theorem 3 bound, summed over the blocks,
   ``Σ_b d_b Σ_{k>n} L_b^k / k / (D ln 2)``, is below ``evaluate_flow.max_bias_bits`` (else ``max_terms``, stated
   by ``bias_target_met: false``). The bound holds for every example, so it bounds the bias of the mean too.
2. Variance. Rounds of one Hutchinson probe per example (a full pass over the test examples each) are added until
   the standard error of the mean bits/dim *over the probes* falls below ``max_stderr_bits`` (or ``max_samples``
   rounds). That is the error this protocol controls: of the value on this fixed set of examples (with their fixed
   dequantisation noise). The spread over examples, what another test set of the same size would change, does not
   shrink with more probes; it is reported beside it as ``stderr_examples``.
3. Baselines (:mod:`pipeline.models.baselines`): a full-covariance Gaussian on logit-transformed pixels and an
   independent 256-bin histogram per pixel, fitted in closed form to the dequantised train split and scored on the
   same test examples with the same dequantisation noise as the flow (the flow's space, never the ZCA-whitened one).
   Each comes with the standard error over the test examples, and ``flow_minus`` with the paired difference (flow
   minus baseline, example by example), whose standard error is smaller than either because the examples are shared.
4. Context: Lemma 7 bounds the residual blocks' log-det by ``Σ_b d_b ln(1 ± L_b)`` for every input; with the exact
   remainder of Eq. 3 (prior and ActNorm terms) they bound the bits/dim from both sides.
5. Samples (Fig. 5 in numbers, :mod:`pipeline.models.sample_quality`): the classifier ``sample_classifier`` (trained
   on the same data; its model from the first entry of ``classifier.seeds``) scores ``n_scored_samples`` flow
   samples and as many test images: how confidently it reads each as one digit, and how the predicted classes spread.
   Samples that look like the data score as the test images do.

Writes ``reports/metrics/evaluate_flow.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from iresnet.blocks import lipschitz_bounds
from iresnet.logdet import LogDetSettings, chain_truncation_bound, logdet_bounds
from iresnet.models import MultiscaleFlow, bits_per_dim
from pipeline.console import progress
from pipeline.data.batches import batch_indices, evenly_spaced
from pipeline.data.preprocess import dequantize
from pipeline.data.store import load_prepared
from pipeline.env import device
from pipeline.errors import DataError
from pipeline.models.baselines import LOGIT_ALPHA, LogitGaussian, PixelHistogram
from pipeline.models.classifiers import LoadedClassifier, load_classifier
from pipeline.models.flows import FlowSpace, TrainedFlow, dims_text, load_flow_with_test_inputs
from pipeline.models.sample_quality import CONFIDENT, class_probabilities, classifier_view
from pipeline.models.specs import ClassifierSpec, reference_seed
from pipeline.outputs import EVALUATE_FLOW, TRAIN_CLASSIFIER, StageRun
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.stats import mean_and_stderr, paired_difference
from pipeline.tracking import Tracker
from pipeline.training import seed_everything

_MIN_ROUNDS = 2  # a standard error needs two probes per example


def bias_bound_bits(lipschitz: Sequence[float], dims: Sequence[int], n_dims: int, n_terms: int) -> float | None:
    """Theorem 3 summed over the blocks, in bits/dim: ``Σ_b truncation_bound(L_b, d_b, n) / (D ln 2)``.

    None when some ``L_b >= 1``: the series need not converge and Theorem 3 says nothing.
    """
    nats = chain_truncation_bound(lipschitz, dims, n_terms)
    return None if math.isinf(nats) else nats / (n_dims * math.log(2))


def choose_terms(
    lipschitz: Sequence[float], dims: Sequence[int], n_dims: int, max_bias_bits: float, max_terms: int
) -> tuple[int, float | None]:
    """The smallest ``n <= max_terms`` whose bias bound is ``< max_bias_bits``, else ``max_terms``; and its bound."""
    if max_terms < 1:
        raise ValueError(f"max_terms must be >= 1, got {max_terms}")
    bound = None
    for n in range(1, max_terms + 1):
        bound = bias_bound_bits(lipschitz, dims, n_dims, n)
        if bound is None or bound < max_bias_bits:
            return (max_terms, None) if bound is None else (n, bound)
    return max_terms, bound


def probe_stderr(samples: Tensor) -> float:
    """Standard error over the probes of the mean of ``samples`` ``(N examples, S probes)``, the examples fixed.

    ``Var(mean) = Σ_i σ_i² / (S N²)`` with each example's probe variance ``σ_i²`` estimated with ``S - 1`` dof.
    """
    n, s = samples.shape
    if s < 2:
        raise ValueError(f"need at least 2 probes per example for a standard error, got {s}")
    return float(samples.double().var(dim=1, correction=1).sum().div(s).sqrt() / n)


def examples_stderr(samples: Tensor) -> float:
    """Standard error of the mean of ``samples`` ``(N, S)`` over the examples (per-example means; ``N >= 2``)."""
    means = samples.double().mean(dim=1)
    if len(means) < 2:
        return float("nan")
    return float(means.std(correction=1) / math.sqrt(len(means)))


@torch.no_grad()
def _per_example(
    model: MultiscaleFlow, x: Tensor, space: FlowSpace, batch_size: int, settings: LogDetSettings
) -> Tensor:
    """Bits/dim ``(N,)`` of ``x``, the residual blocks' log-det estimated with ``settings``."""
    batches = batch_indices(len(x), batch_size, shuffle=False)
    return torch.cat([space.bpd(model.log_prob(x[idx], settings)) for idx in batches])


def hutchinson_rounds(
    model: MultiscaleFlow,
    x: Tensor,
    space: FlowSpace,
    n_terms: int,
    batch_size: int,
    max_samples: int,
    max_stderr_bits: float,
    advance: Callable[..., None] = lambda *a, **k: None,
) -> Tensor:
    """Bits/dim samples ``(N, S)``: round s evaluates every example of ``x`` with its own fresh probe and the
    ``n_terms``-term series (Algorithm 2); rounds stop once :func:`probe_stderr` ``< max_stderr_bits`` (at least 2)
    or after ``max_samples``. Probes come from the global RNG (seeded by the stage)."""
    columns: list[Tensor] = []
    series = LogDetSettings("series", n_terms=n_terms, n_samples=1)
    for _ in range(max_samples):
        columns.append(_per_example(model, x, space, batch_size, series))
        samples = torch.stack(columns, dim=1)
        stderr = probe_stderr(samples) if len(columns) >= _MIN_ROUNDS else math.inf
        advance(info=f"{float(samples.mean()):.4f} ± {stderr:.1e} bits/dim")
        if stderr < max_stderr_bits:
            break
    return samples


def lemma7_bpd(
    model: MultiscaleFlow, x: Tensor, space: FlowSpace, lipschitz: Sequence[float], dims: Sequence[int], batch_size: int
) -> tuple[float, float | None]:
    """Mean bits/dim bounds ``(lower, upper)`` from Lemma 7 (upper is None when some ``L_b >= 1``).

    The prior and ActNorm terms of Eq. 3 are exact (a pass with the residual log-det switched off); the residual
    blocks add at most ``Σ_b d_b ln(1 + L_b)`` and at least ``Σ_b d_b ln(1 - L_b)`` nats to every ``ln p(x)``.
    """
    rest = _per_example(model, x, space, batch_size, LogDetSettings(estimator="none"))  # without the blocks' log-det
    per_nat = 1.0 / (space.n_dims * math.log(2))  # more nats of log-density = fewer bits/dim
    mean_rest = float(rest.double().mean())
    if any(lip >= 1.0 for lip in lipschitz):
        # Lip(F) <= 1 + L (Lemma 2) still caps |det J_F| by (1 + L)^d; nothing bounds it from below.
        return mean_rest - sum(d * math.log1p(lip) for lip, d in zip(lipschitz, dims)) * per_nat, None
    lower_logdet, upper_logdet = logdet_bounds(lipschitz, dims)
    return mean_rest - upper_logdet * per_nat, mean_rest - lower_logdet * per_nat


BASELINES = {
    "gaussian_logit": "full-covariance Gaussian on logit(α + (1 - 2α)(x + 0.5)) of dequantised pixels x, "
    f"α = {LOGIT_ALPHA:g}, "
    "with the logit's Jacobian (a density on the pixel space); maximum likelihood on the train split",
    "histogram": "independent 256-bin histogram per pixel (add-one smoothing), fitted on the train split",
}


def baseline_bits(paths: Paths, n_examples: int | None, seed: int, flow_bpd: Tensor) -> dict[str, Any]:
    """Per baseline of :data:`BASELINES`: its mean test bits/dim with its standard error over the examples, and the
    paired difference ``flow - baseline`` (``flow_bpd`` ``(N,)``: the flow's per-example bits/dim). The Gaussian is
    null when the train split has no more images than dimensions (its covariance would be singular).

    The test examples and their noise are exactly the flow's (:func:`load_flow_with_test_inputs` draws the noise
    from a generator seeded with ``seed`` before any whitening); the train split is dequantised with ``seed + 1``.
    """
    train, _ = load_prepared(paths, "train")
    test, _ = load_prepared(paths, "test")
    test = test[evenly_spaced(len(test), n_examples)]
    # float32 draws, as the flow's inputs: the same generator then gives the very same noise; the models fit in float64
    x_train = dequantize(train, torch.Generator().manual_seed(seed + 1)).double()
    x_test = dequantize(test, torch.Generator().manual_seed(seed)).double()
    n_dims = x_test[0].numel()
    models = {"histogram": PixelHistogram.fit(x_train)}
    out: dict[str, Any] = {"gaussian_logit": None}  # null: too few train images for a full covariance
    if len(x_train) > n_dims:
        models["gaussian_logit"] = LogitGaussian.fit(x_train)
    for name, model in models.items():
        bpd = bits_per_dim(model.log_prob(x_test), n_dims)
        stats = mean_and_stderr(bpd)
        out[name] = {
            "bpd": stats["mean"],
            "stderr_examples": stats["stderr"],
            "flow_minus": paired_difference(flow_bpd.double(), bpd),
            "method": BASELINES[name],
            "n_train": len(x_train),
        }
    return out


def load_scorer(paths: Paths, spec: ClassifierSpec, seed: int) -> LoadedClassifier:
    """The classifier that scores the samples (trained from ``seed``: the stage passes the first entry of
    ``classifier.seeds``), loaded before any compute: a missing one stops the stage at once.

    Building the network draws its initial weights from the global RNG, which the Hutchinson probes use next: the
    build runs on a forked RNG, so the bits/dim do not depend on whether samples are scored."""
    path = TRAIN_CLASSIFIER.model_path(paths, spec.label, seed)
    if not path.exists():
        raise DataError(
            f"evaluate_flow.sample_classifier is {spec.label}, but {path} does not exist: run "
            f"`dvc repro {TRAIN_CLASSIFIER.stage}` (or `iresnet train-classifier --coeff {spec.label} --seed {seed}`) "
            "first, or set evaluate_flow.sample_classifier: null."
        )
    with torch.random.fork_rng(devices=[]):
        return load_classifier(paths, spec, seed)


def sample_quality(
    flow: TrainedFlow, scorer: LoadedClassifier, paths: Paths, n: int, batch_size: int, seed: int
) -> dict[str, Any]:
    """The classifier's view (:mod:`pipeline.models.sample_quality`) of ``n`` flow samples and of ``n`` evenly spaced
    test images (all when fewer). Samples are drawn at temperature 1 with a generator seeded by ``seed`` on the
    stage's device (as Fig. 5's, which uses ``flow.n_generated`` of them) and rounded to 8-bit pixels like the data."""
    generator = torch.Generator(device=device()).manual_seed(seed)
    with torch.no_grad():
        samples = flow.space.to_images(flow.model.sample(n, generator=generator))
    samples = (samples * 255).round() / 255
    test, _ = load_prepared(paths, "test")
    test = test[evenly_spaced(len(test), min(n, len(test)))]
    return {
        "classifier": scorer.spec.label,
        "confident_above": CONFIDENT,
        "samples": classifier_view(class_probabilities(scorer, samples, batch_size)),
        "test_images": classifier_view(class_probabilities(scorer, test, batch_size)),
    }


def run(params: Params, paths: Paths, tracker: Tracker | None = None) -> dict[str, Any]:
    """Evaluate ``models/flow/model.pt`` on the test split; returns the metrics (the content of the JSON)."""
    out = StageRun(EVALUATE_FLOW, paths, tracker)
    p = params.evaluate_flow
    seed_everything(params.seed)
    flow, x = load_flow_with_test_inputs(paths, p.n_examples, params.seed)
    model, space = flow.model, flow.space
    scorer = None
    if p.sample_classifier is not None:
        scorer = load_scorer(paths, ClassifierSpec.of(p.sample_classifier), reference_seed(params.classifier))

    lipschitz = lipschitz_bounds(model)
    dims = model.block_dims
    n_terms, bound = choose_terms(lipschitz, dims, space.n_dims, p.max_bias_bits, p.max_terms)
    lower, upper = lemma7_bpd(model, x, space, lipschitz, dims, p.batch_size)
    with progress(f"evaluate flow ({n_terms} terms)", p.max_samples) as advance:
        samples = hutchinson_rounds(model, x, space, n_terms, p.batch_size, p.max_samples, p.max_stderr_bits, advance)
    samples = samples.cpu()  # from the device (the very tensor on the CPU)
    stderr = probe_stderr(samples)
    baselines = baseline_bits(paths, p.n_examples, params.seed, samples.double().mean(dim=1))

    metrics: dict[str, Any] = {
        "dataset": flow.dataset,
        "zca": bool(flow.meta["zca"]),
        "n_dims": space.n_dims,
        "dims": dims_text(space.shape),
        "n_examples": len(x),
        "bpd": float(samples.double().mean()),
        "stderr": stderr,
        "stderr_kind": "Hutchinson probes, examples fixed (the protocol's target)",
        "stderr_examples": examples_stderr(samples),
        "n_terms": n_terms,
        "n_samples": samples.shape[1],
        "bias_bound_bits": bound,
        "bias_target_met": bound is not None and bound < p.max_bias_bits,
        "stderr_target_met": stderr < p.max_stderr_bits,
        "max_bias_bits": p.max_bias_bits,
        "max_stderr_bits": p.max_stderr_bits,
        "lemma7_lower_bpd": lower,
        "lemma7_upper_bpd": upper,
        "max_block_lipschitz": max(lipschitz),
        "block_lipschitz": lipschitz,
        "flow_epochs": int(flow.meta["epochs"]),
        "baselines": baselines,
    }
    if scorer is not None:
        metrics["sample_quality"] = sample_quality(flow, scorer, paths, p.n_scored_samples, p.batch_size, params.seed)
    if bound is None:
        metrics["bias_note"] = "a block's certified Lip(g) is >= 1: Theorem 3 gives no bound (bias_bound_bits null)"
    elif not metrics["bias_target_met"]:
        metrics["bias_note"] = f"max_terms {p.max_terms} leaves the bound above max_bias_bits; raise max_terms"
    return out.finish(metrics)
