"""The App. C.3 evaluation protocol: term choice from Theorem 3, probe standard error, closed-form flows, the stage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from iresnet.blocks import residual_blocks
from iresnet.layers import ActNorm
from iresnet.logdet import LogDetSettings
from iresnet.models import FlowConfig, MultiscaleFlow
from iresnet.spectral_norm import DENSE_MARGIN, LipschitzConv2d
from pipeline.errors import DataError, ParamsError
from pipeline.files import read_json
from pipeline.models.flows import FlowSpace
from pipeline.models.sample_quality import CONFIDENT, classifier_view
from pipeline.outputs import EVALUATE_FLOW
from pipeline.params import parse_params
from pipeline.stages import evaluate_flow
from tests.pipeline.flow_helpers import linear_flow, trained_project, with_section

LN2 = math.log(2)


def tail(lip: float, n: int) -> float:
    """``Σ_{k>n} L^k / k`` summed directly (independent of the library's closed form)."""
    return math.fsum(lip**k / k for k in range(n + 1, 5000))


def test_choose_terms_is_the_smallest_n_below_the_target() -> None:
    lips, dims, n_dims, target = [0.5, 0.8, 0.3], [64, 32, 32], 64, 1e-4

    def bound(n: int) -> float:
        return sum(d * tail(lip, n) for lip, d in zip(lips, dims)) / (n_dims * LN2)

    n, got = evaluate_flow.choose_terms(lips, dims, n_dims, target, max_terms=200)
    assert got == pytest.approx(bound(n), rel=1e-9) and bound(n) < target <= bound(n - 1)
    n_small, got_small = evaluate_flow.choose_terms(lips, dims, n_dims, target, max_terms=n - 1)
    assert n_small == n - 1 and got_small == pytest.approx(bound(n - 1), rel=1e-9) and got_small >= target
    assert evaluate_flow.choose_terms([0.5, 1.02], [4, 4], 8, target, max_terms=30) == (30, None)
    assert evaluate_flow.bias_bound_bits([0.0, 0.0], [4, 4], 8, 1) == 0.0


def test_probe_stderr_closed_form() -> None:
    a = torch.arange(5, dtype=torch.float64)[:, None]  # examples differ a lot; probes by ±e
    e = 0.3
    samples = torch.cat([a + e, a - e], dim=1)  # per-example sample variance 2e², so stderr = e / sqrt(N)
    assert evaluate_flow.probe_stderr(samples) == pytest.approx(e / math.sqrt(5), rel=1e-12)
    assert evaluate_flow.examples_stderr(samples) == pytest.approx(float(a.std()) / math.sqrt(5), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 probes"):
        evaluate_flow.probe_stderr(samples[:, :1])


def _flow(n_blocks: tuple[int, int]) -> MultiscaleFlow:
    config = FlowConfig(in_shape=(1, 8, 8), n_blocks=n_blocks, strides=(1, 2), channels=(4, 4))
    return MultiscaleFlow(config).double().eval()


@torch.no_grad()
def test_actnorm_flow_bits_per_dim_equal_the_closed_form() -> None:
    """Residual branches g = 0 and every ActNorm scaling by s: on a constant image the flow is two scalings.

    1x8x8 -> 4x4x4 (stage 0: n0 ActNorms) -> half (32 dims) factored out at κ s^n0 -> 8x2x2 (stage 1: n1 ActNorms)
    -> 32 dims at κ s^(n0+n1). ln p = Σ ln N(z; 0, 1) + 64 n0 ln s + 32 n1 ln s (standard-normal priors at init).
    """
    n0, n1, s, kappa = 2, 1, 1.7, 0.31
    model = _flow((n0, n1))
    for module in model.modules():
        if isinstance(module, LipschitzConv2d):
            module.weight.zero_()
            module.bias.zero_()
        if isinstance(module, ActNorm):
            module.log_scale.fill_(math.log(s))
            module.bias.zero_()
            module.initialized.fill_(True)
    x = torch.full((3, 1, 8, 8), kappa, dtype=torch.float64)
    z0, z1 = kappa * s**n0, kappa * s ** (n0 + n1)
    log_p = -0.5 * 32 * (z0**2 + z1**2) - 32 * math.log(2 * math.pi) + (64 * n0 + 32 * n1) * math.log(s)
    expected = (-log_p + 64 * math.log(256)) / (64 * LN2)

    space = FlowSpace((1, 8, 8))
    lips = [block.lipschitz_bound() for block in residual_blocks(model)]
    assert lips == [0.0] * 3
    n_terms, bound = evaluate_flow.choose_terms(lips, model.block_dims, 64, 1e-4, 40)
    assert (n_terms, bound) == (1, 0.0)
    samples = evaluate_flow.hutchinson_rounds(model, x, space, n_terms, 2, max_samples=5, max_stderr_bits=1e-3)
    assert samples.shape == (3, 2)  # zero variance: the first standard error (after 2 rounds) meets the target
    torch.testing.assert_close(samples, torch.full_like(samples, expected), rtol=0, atol=1e-12)
    assert evaluate_flow.probe_stderr(samples) == 0.0
    lower, upper = evaluate_flow.lemma7_bpd(model, x, space, lips, model.block_dims, 2)
    assert lower == pytest.approx(expected, abs=1e-12) and upper == pytest.approx(expected, abs=1e-12)


def _linear_case(norms: tuple[float, float], n: int) -> tuple[MultiscaleFlow, Tensor, Tensor, Tensor]:
    """A :func:`linear_flow` with residual norms ``norms``, ``n`` inputs ``x: (n, 1, 8, 8)`` in ``[-0.5, 0.5)``, and
    the two parts of their exact ``ln p(x)``, each ``(n,)``: ``ln p(z)`` and the residual blocks' exact log-det."""
    model, maps = linear_flow(norms)
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.5
    with torch.no_grad():
        logpz, actnorm = model.log_prob_parts(x, LogDetSettings("none"))
    assert actnorm.abs().max() == 0  # the ActNorms are the identity: ln p(z) and the blocks make up all of ln p(x)
    exact_logdet = sum(pixels * torch.linalg.slogdet(torch.eye(len(a), dtype=a.dtype) + a)[1] for a, pixels in maps)
    return model, x, logpz, exact_logdet


def test_linear_residual_flow_matches_its_exact_log_density() -> None:
    """Linear residual maps with known log-dets: the protocol's value lies within its bias bound + 4 standard errors,
    its Lemma 7 bounds enclose the exact value, and the certified Lipschitz bounds are the exact ‖A‖₂."""
    model, x, logpz, exact_logdet = _linear_case((0.5, 0.6), 16)
    space = FlowSpace((1, 8, 8))
    expected = float(space.bpd(logpz + exact_logdet).mean())

    lips = [block.lipschitz_bound() for block in residual_blocks(model)]
    assert lips == pytest.approx([0.5 * (1 + DENSE_MARGIN), 0.6 * (1 + DENSE_MARGIN)], rel=1e-12)  # + rounding margin
    n_terms, bound = evaluate_flow.choose_terms(lips, model.block_dims, 64, 1e-4, 60)
    torch.manual_seed(0)
    samples = evaluate_flow.hutchinson_rounds(model, x, space, n_terms, 8, max_samples=400, max_stderr_bits=3e-3)
    stderr = evaluate_flow.probe_stderr(samples)
    assert stderr < 3e-3 and samples.shape[1] < 400
    assert abs(float(samples.mean()) - expected) <= bound + 4 * stderr
    lower, upper = evaluate_flow.lemma7_bpd(model, x, space, lips, model.block_dims, 8)
    assert lower <= expected <= upper


def test_lemma7_without_a_certificate_keeps_only_the_lower_bound() -> None:
    """A block with Lip(g) = 1.2: no Theorem 3 or Lemma 7 lower log-det bound, but |det| <= (1 + L)^d still holds."""
    model, x, logpz, exact_logdet = _linear_case((0.5, 1.2), 4)
    space = FlowSpace((1, 8, 8))
    lips = [block.lipschitz_bound() for block in residual_blocks(model)]
    lower, upper = evaluate_flow.lemma7_bpd(model, x, space, lips, model.block_dims, 4)
    assert lips == pytest.approx([0.5 * (1 + DENSE_MARGIN), 1.2 * (1 + DENSE_MARGIN)], rel=1e-12)
    expected_lower = float(space.bpd(logpz).mean()) - (64 * math.log1p(lips[0]) + 32 * math.log1p(lips[1])) / (64 * LN2)
    assert upper is None and lower == pytest.approx(expected_lower, abs=1e-12)
    assert lower <= float(space.bpd(logpz + exact_logdet).mean())
    assert evaluate_flow.choose_terms(lips, model.block_dims, 64, 1e-4, 30) == (30, None)


def test_stage_metrics_and_chosen_terms(tiny_project: Path, tiny_params: dict) -> None:
    # c = 0.5 keeps the certified bounds (loose on 4x4 and 2x2 inputs: padded to 6x6 and 4x4) well below 1
    params, paths, _ = trained_project(tiny_project, tiny_params, epochs=1, coeff=0.5)
    params = with_section(params, "evaluate_flow", max_bias_bits=1e-3, max_stderr_bits=0.05, max_samples=6)
    metrics = evaluate_flow.run(params, paths)
    assert read_json(EVALUATE_FLOW.metrics_path(paths)) == metrics
    assert metrics["n_dims"] == 64 and metrics["n_examples"] == 12 and metrics["dataset"] == "idx:tiny"
    lips, n = metrics["block_lipschitz"], metrics["n_terms"]
    assert len(lips) == 2 and max(lips) < 1 and metrics["bias_target_met"] is True

    def bound(k: int) -> float:  # blocks on 4x4x4 (d = 64) and 8x2x2 (d = 32)
        return (64 * tail(lips[0], k) + 32 * tail(lips[1], k)) / (64 * LN2)

    assert metrics["bias_bound_bits"] == pytest.approx(bound(n), rel=1e-9) and bound(n) < 1e-3 <= bound(n - 1)
    assert 2 <= metrics["n_samples"] <= 6
    assert metrics["stderr_target_met"] == (metrics["stderr"] < 0.05)
    assert metrics["lemma7_lower_bpd"] <= metrics["bpd"] <= metrics["lemma7_upper_bpd"]
    assert metrics["stderr_examples"] > metrics["stderr"]  # over examples the spread is far larger
    assert "bias_note" not in metrics
    assert metrics["baselines"]["gaussian_logit"] is None  # 30 train images, 64 dims: no full covariance
    histogram = metrics["baselines"]["histogram"]
    # the paired difference's mean is the difference of the means (the same examples on both sides)
    assert histogram["flow_minus"]["mean"] == pytest.approx(metrics["bpd"] - histogram["bpd"], rel=1e-9)
    assert histogram["stderr_examples"] > 0 and histogram["flow_minus"]["stderr"] > 0
    assert histogram["flow_minus"]["low"] < histogram["flow_minus"]["mean"] < histogram["flow_minus"]["high"]

    short = evaluate_flow.run(with_section(params, "evaluate_flow", max_terms=n - 1), paths)
    assert short["n_terms"] == n - 1 and short["bias_target_met"] is False and "raise max_terms" in short["bias_note"]
    assert short["bias_bound_bits"] == pytest.approx(bound(n - 1), rel=1e-9)


def test_samples_are_scored_by_a_trained_classifier(tiny_project: Path, tiny_params: dict) -> None:
    """The classifier's view of the flow's samples and of test images: probabilities that sum to 1, statistics in
    their ranges and equal to their definitions; a missing classifier stops the stage before any compute."""
    from pipeline.stages import train_classifier
    from tests.pipeline.classifier_helpers import TINY_CLASSIFIER

    raw = {**tiny_params, "classifier": {**tiny_params["classifier"], **TINY_CLASSIFIER, "coeffs": [0.9]}}
    params, paths, _ = trained_project(tiny_project, raw, epochs=1, coeff=0.5)
    params = with_section(params, "evaluate_flow", max_samples=2, sample_classifier=0.9, n_scored_samples=7)
    expected = r"sample_classifier is 0.9, .* `dvc repro train_classifier` \(or `iresnet train-classifier --coeff 0.9"
    with pytest.raises(DataError, match=expected):
        evaluate_flow.run(params, paths)
    assert not EVALUATE_FLOW.metrics_path(paths).exists()
    train_classifier.run(params, paths, coeff=0.9)
    metrics = evaluate_flow.run(params, paths)
    unscored = evaluate_flow.run(with_section(params, "evaluate_flow", sample_classifier=None), paths)
    assert metrics["bpd"] == unscored["bpd"] and "sample_quality" not in unscored  # scoring leaves the probes alone
    quality = metrics["sample_quality"]
    assert quality["classifier"] == "0.9" and quality["confident_above"] == CONFIDENT
    assert quality["samples"]["n_images"] == 7 and quality["test_images"]["n_images"] == 7  # 12 test images
    n_classes = read_json(paths.prepared / "stats.json")["n_classes"]
    for view in (quality["samples"], quality["test_images"]):
        mix = torch.tensor(view["class_mix"], dtype=torch.float64)
        assert len(mix) == n_classes and float(mix.sum()) == pytest.approx(1.0, abs=1e-12)
        entropy = -sum(p * math.log2(p) for p in view["class_mix"] if p > 0)
        assert view["class_entropy_bits"] == pytest.approx(entropy, rel=1e-12)
        assert 1.0 - 1e-12 <= view["classifier_score"] <= n_classes
        assert 1 / n_classes <= view["mean_confidence"]["mean"] <= 1.0
        assert 0.0 <= view["confident_fraction"]["mean"] <= 1.0


def test_classifier_view_closed_forms() -> None:
    """Uniform predictions: score 1, confidence 1/K, entropy log2 K; confident predictions spread evenly over K
    classes: score K (the Inception score's maximum), entropy log2 K; all one class: score 1, entropy 0."""
    k = 4
    uniform = classifier_view(torch.full((8, k), 1 / k, dtype=torch.float64))
    assert uniform["classifier_score"] == pytest.approx(1.0, rel=1e-12)
    assert uniform["mean_confidence"]["mean"] == pytest.approx(1 / k) and uniform["confident_fraction"]["mean"] == 0
    assert uniform["class_entropy_bits"] == pytest.approx(math.log2(k), rel=1e-12)
    spread = classifier_view(torch.eye(k, dtype=torch.float64).repeat(2, 1))
    assert spread["classifier_score"] == pytest.approx(k, rel=1e-12)
    assert spread["class_entropy_bits"] == pytest.approx(math.log2(k), rel=1e-12)
    assert spread["confident_fraction"] == {"mean": 1.0, "stderr": 0.0}
    one_class = classifier_view(torch.eye(k, dtype=torch.float64)[[0, 0, 0]])
    assert one_class["classifier_score"] == pytest.approx(1.0, rel=1e-12) and one_class["class_entropy_bits"] == 0
    # a 3:1 mix of two confident classes: KL = ln(1/p(y)) per image, score = exp(0.75 ln(4/3) + 0.25 ln 4)
    mixed = classifier_view(torch.eye(k, dtype=torch.float64)[[0, 0, 0, 1]])
    assert mixed["classifier_score"] == pytest.approx(math.exp(0.75 * math.log(4 / 3) + 0.25 * math.log(4)))


def test_sample_classifier_must_be_one_of_the_trained_classifiers(repo_params: dict) -> None:
    raw = {**repo_params, "evaluate_flow": {**repo_params["evaluate_flow"], "sample_classifier": 0.3}}
    with pytest.raises(ParamsError, match=r"evaluate_flow.sample_classifier.*an entry of classifier.coeffs"):
        parse_params(raw)


def test_max_samples_below_two_is_rejected(repo_params: dict) -> None:
    raw = {**repo_params, "evaluate_flow": {**repo_params["evaluate_flow"], "max_samples": 1}}
    with pytest.raises(Exception, match="evaluate_flow.max_samples"):
        parse_params(raw)
