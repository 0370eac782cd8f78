"""Table 2's numbers from the classifier metrics files: the test error of every coefficient over its seeds, the paired
difference to vanilla seed by seed on the same test images, and the rule that decides "c >= 0.7 classifies as well
as vanilla".

**The rule** (:func:`compare_with_vanilla`), for one model against vanilla over the seeds both have:

1. *test images*: for each seed, the paired difference of the per-image errors (model − vanilla of the same seed,
   on the same test images; :func:`pipeline.stats.paired_difference`) has a 95% interval. The model is **worse** on
   that seed when the interval lies above 0; a seed whose interval includes 0 or lies below 0 is not worse.
2. *seeds*: the mean of those differences over the seeds must be at most ``SEED_STDS`` (2) seed standard deviations,
   ``sqrt((s_model² + s_vanilla²) / 2)`` with ``s`` a model's test-error std over seeds: a gap no larger than what
   retraining from another seed moves a test error by. Needs at least two seeds on both sides (else skipped).

The verdict is ``worse`` when any seed is worse or the seed clause fails, ``better`` when every seed's interval lies
below 0, else ``same``. "c >= 0.7 classifies as well as vanilla" holds when no model with c >= 0.7 is ``worse``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import DataError
from pipeline.stats import outcomes, paired_difference

SEED_STDS = 2.0  # the seed clause: mean difference <= 2 pooled seed standard deviations
CLOSE_COEFF = 0.7  # the paper's claim covers c >= 0.7


@dataclass(frozen=True)
class SeedSummary:
    """One model's test error over its seeds (fractions), and its paired differences to vanilla."""

    label: str
    errors: dict[int, float]  # seed -> test error
    differences: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> paired (model − vanilla)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors.values())

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (n − 1); None for a single seed."""
        return statistics.stdev(self.errors.values()) if len(self.errors) > 1 else None

    @property
    def mean_difference(self) -> float | None:
        """The mean over seeds of the paired differences to vanilla; None without any."""
        return statistics.fmean(d["mean"] for d in self.differences.values()) if self.differences else None


def per_image_errors(metrics: dict[str, Any], where: str) -> Any:
    """The run's 0/1 error per test image (1: misclassified), from its ``test_correct``."""
    try:
        return 1.0 - outcomes(metrics["test_correct"])
    except ValueError as err:
        raise DataError(f"{where}: `test_correct` is unreadable ({err}); re-run that stage.") from None


def seed_summaries(runs: dict[str, dict[int, dict[str, Any]]], reference: str = "vanilla") -> dict[str, SeedSummary]:
    """Every model's :class:`SeedSummary`; ``runs``: label -> seed -> metrics. Differences to the ``reference`` model
    (Table 2: vanilla) are paired per seed, over the seeds both have; with no reference there are none."""
    base = runs.get(reference, {})
    out = {}
    for label, by_seed in runs.items():
        differences = {}
        if label != reference:
            for seed in (s for s in by_seed if s in base):
                a = per_image_errors(by_seed[seed], f"{label} seed {seed}")
                b = per_image_errors(base[seed], f"{reference} seed {seed}")
                if a.shape != b.shape:
                    raise DataError(
                        f"{label} and {reference} (seed {seed}) were scored on {len(a)} and {len(b)} test images: a "
                        "paired comparison needs the same test split; re-run the stages that train both."
                    )
                differences[seed] = paired_difference(a, b)
        errors = {seed: float(m["test_error"]) for seed, m in by_seed.items()}
        out[label] = SeedSummary(label, errors, differences)
    return out


def pooled_seed_std(a: SeedSummary, b: SeedSummary) -> float | None:
    """``sqrt((s_a² + s_b²) / 2)``: one model's test-error spread over seeds; None unless both have >= 2 seeds."""
    if a.std is None or b.std is None:
        return None
    return math.sqrt((a.std**2 + b.std**2) / 2)


def compare_with_vanilla(model: SeedSummary, vanilla: SeedSummary) -> str:
    """``"worse"``, ``"same"`` or ``"better"`` than vanilla by the module's rule (both clauses; see the top)."""
    diffs = list(model.differences.values())
    if not diffs:
        raise ValueError(f"{model.label} shares no seed with vanilla: nothing to compare")
    spread = pooled_seed_std(model, vanilla)
    seeds_fail = spread is not None and model.mean_difference > SEED_STDS * spread  # type: ignore[operator]
    if seeds_fail or any(d["low"] > 0 for d in diffs):
        return "worse"
    return "better" if all(d["high"] < 0 for d in diffs) else "same"


def close_labels(summaries: dict[str, SeedSummary], coeffs: dict[str, float | None]) -> list[str]:
    """The i-ResNets the claim is about (c >= 0.7), by decreasing c; ``coeffs``: label -> c (None: a baseline)."""
    found = [(c, label) for label, c in coeffs.items() if c is not None and c >= CLOSE_COEFF and label in summaries]
    return [label for _, label in sorted(found, reverse=True)]
