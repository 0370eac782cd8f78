"""The seed axis of the classifiers as the rest of the pipeline sees it: the single-model stages read the first entry
of ``classifier.seeds``; the per-image outcomes give paired differences in closed form; the Table 2 rule on both
sides of each of its thresholds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.errors import DataError
from pipeline.files import read_json
from pipeline.outputs import RECONSTRUCTION, SINGULAR_VALUES
from pipeline.params import parse_params
from pipeline.report.classifiers import SEED_STDS, SeedSummary, compare_with_vanilla, seed_summaries
from pipeline.stages import reconstruction, singular_values, train_classifier
from pipeline.stats import Z95, outcomes, outcomes_text
from tests.pipeline.classifier_helpers import classifier_project, tiny_raw


def test_single_model_stages_read_the_first_seed(tmp_path: Path) -> None:
    """Only seed 0 is trained: with seeds [0, 1] both stages run; with [1, 0] they look for seed 1's model."""
    params, paths = classifier_project(tmp_path, coeffs=["vanilla", 0.9], seeds=[0, 1])
    for coeff in params.classifier.coeffs:
        train_classifier.run(params, paths, coeff=coeff, seed=0)
    for stage, outputs in ((singular_values, SINGULAR_VALUES), (reconstruction, RECONSTRUCTION)):
        stage.run(params, paths)
        assert set(read_json(outputs.metrics_path(paths))["models"]) == {"vanilla", "0.9"}
    swapped = parse_params(tiny_raw(coeffs=["vanilla", 0.9], seeds=[1, 0]))
    for stage in (singular_values, reconstruction):
        with pytest.raises(DataError, match=r"no model at .*/vanilla/seed1/model.pt"):
            stage.run(swapped, paths)


def _run(wrong: list[int], n: int) -> dict:
    """A classifier's metrics with the given wrong test images."""
    correct = [i not in wrong for i in range(n)]
    return {"test_error": len(wrong) / n, "test_correct": "".join("1" if c else "0" for c in correct)}


def test_outcomes_round_trip() -> None:
    text = "1101001"
    assert outcomes_text(outcomes(text)) == text and outcomes(text).sum() == 4
    with pytest.raises(ValueError, match="string of 0 and 1"):
        outcomes("10x")


def test_paired_difference_against_its_closed_form() -> None:
    """Model wrong on images {0, 1, 2, 3}, vanilla on {3, 4} of n = 10: per-image differences d = e_model − e_vanilla
    are +1 three times, −1 once, 0 six times; mean 0.2, sample variance (3 + 1 − 10 x 0.2²) / 9 = 0.4, standard
    error sqrt(0.4 / 10) = 0.2, interval 0.2 ± 1.96 x 0.2."""
    runs = {"vanilla": {0: _run([3, 4], 10)}, "0.9": {0: _run([0, 1, 2, 3], 10)}}
    d = seed_summaries(runs)["0.9"].differences[0]
    assert d["mean"] == pytest.approx(0.2, rel=1e-12) and d["stderr"] == pytest.approx(0.2, rel=1e-12)
    assert (d["low"], d["high"]) == pytest.approx((0.2 - Z95 * 0.2, 0.2 + Z95 * 0.2), rel=1e-12)
    # Errors on the same images: d is +1 once, 0 nine times; variance (1 − 10 x 0.1²) / 9 = 0.1, standard error 0.1,
    # where the unpaired binomial errors give sqrt(0.3 x 0.7 / 10 + 0.2 x 0.8 / 10) = 0.19.
    same_images = {"vanilla": {0: _run([0, 1], 10)}, "0.9": {0: _run([0, 1, 2], 10)}}
    d = seed_summaries(same_images)["0.9"].differences[0]
    assert (d["mean"], d["stderr"]) == pytest.approx((0.1, math.sqrt(0.1 / 10)), rel=1e-12)


def test_a_different_test_split_is_refused() -> None:
    with pytest.raises(DataError, match="same test split"):
        seed_summaries({"vanilla": {0: _run([1], 10)}, "0.9": {0: _run([1], 12)}})


def _summary(errors: dict[int, float], diffs: dict[int, tuple[float, float]]) -> SeedSummary:
    """A model with test ``errors`` per seed and paired differences ``(mean, stderr)`` per seed."""
    paired = {s: {"mean": m, "stderr": se, "low": m - Z95 * se, "high": m + Z95 * se} for s, (m, se) in diffs.items()}
    return SeedSummary("0.9", errors, paired)


VANILLA = SeedSummary("vanilla", {0: 0.010, 1: 0.012, 2: 0.014})  # seed std 0.002


def test_rule_test_image_clause_on_both_sides() -> None:
    """A seed whose paired interval lies just above 0 makes the model worse; just touching 0 does not."""
    errors = {0: 0.011, 1: 0.013, 2: 0.015}  # seed std 0.002: the seed clause passes for a 0.001 mean
    inside = _summary(errors, {0: (0.001, 0.001 / Z95 * (1 + 1e-9)), 1: (0.001, 0.01), 2: (0.001, 0.01)})
    outside = _summary(errors, {0: (0.001, 0.001 / Z95 * (1 - 1e-9)), 1: (0.001, 0.01), 2: (0.001, 0.01)})
    assert compare_with_vanilla(inside, VANILLA) == "same"
    assert compare_with_vanilla(outside, VANILLA) == "worse"


def test_rule_seed_clause_on_both_sides() -> None:
    """Every seed's interval includes 0, but the mean difference may exceed 2 pooled seed stds (0.002 here)."""
    errors = {0: 0.020, 1: 0.022, 2: 0.024}  # seed std 0.002, as vanilla's: pooled 0.002
    limit = SEED_STDS * 0.002
    wide = 1.0  # paired standard errors so large that the test-image clause never decides
    within = _summary(errors, {s: (limit * (1 - 1e-9), wide) for s in range(3)})
    beyond = _summary(errors, {s: (limit * (1 + 1e-9), wide) for s in range(3)})
    assert compare_with_vanilla(within, VANILLA) == "same"
    assert compare_with_vanilla(beyond, VANILLA) == "worse"
    # one seed: no spread, the seed clause is skipped
    single = SeedSummary("0.9", {0: 0.02}, {0: {"mean": 1.0, "stderr": wide, "low": -1.0, "high": 3.0}})
    assert compare_with_vanilla(single, SeedSummary("vanilla", {0: 0.01})) == "same"


def test_rule_better_needs_every_seed_below_zero() -> None:
    errors = {0: 0.008, 1: 0.009, 2: 0.010}
    assert compare_with_vanilla(_summary(errors, {s: (-0.003, 0.001) for s in range(3)}), VANILLA) == "better"
    mixed = {0: (-0.003, 0.001), 1: (-0.003, 0.001), 2: (-0.001, 0.001)}
    assert compare_with_vanilla(_summary(errors, mixed), VANILLA) == "same"
