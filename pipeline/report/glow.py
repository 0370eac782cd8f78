"""Table 3 (Sec. 5.2): Glow used as a classifier against i-ResNets, from the ``train_glow_classifier`` metrics files
and Table 2's classifier files; and the two findings the paper draws from it, each decided by a stated rule.

The verdicts on them are decided in :mod:`pipeline.report.verdicts` (``table3_accuracy``, ``table3_training``) from
the data this module gathers:

**Accuracy**: "every i-ResNet is more accurate than every Glow". Each Glow trained with the
paper's optimiser (Adam / Adamax) is compared with each i-ResNet (the Glow-style one of Table 3, and Table 2's with
the largest c) by the paired difference of their per-image errors on the same test images, seed by seed, with its 95%
interval (:func:`pipeline.report.classifiers.seed_summaries`, Table 2's code). A pair is *i-ResNet better* when every
seed's interval of Glow − i-ResNet lies above 0, *Glow better* when every one lies below, else *unresolved*. The claim
is reproduced when every pair is i-ResNet better, not reproduced when any is Glow better, partly reproduced when some
are i-ResNet better and the rest unresolved, and not resolved at this scale when none is resolved.

**Optimiser**: "i-ResNets train with momentum SGD at a large learning rate, while every
Glow needed Adam / Adamax with a much smaller one to avoid diverging". Every Glow run with SGD (Table 2's settings)
counts: diverged means a NaN/inf training loss on a seed. Reproduced when every Glow SGD run diverged on every seed
and no i-ResNet SGD run did; not reproduced when none diverged; partly reproduced otherwise.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.models.glow_specs import MODEL_NAMES, OPTIMIZER_NAMES, GlowRun
from pipeline.report.claims import finding
from pipeline.report.classifiers import SeedSummary, seed_summaries
from pipeline.report.inputs import ReportInputs
from pipeline.report.tables import MISSING, ReportTable, difference_cell, in_points, num, percent
from pipeline.stats import Z95

REFERENCE = "iresnet-sgd"  # the Glow-style i-ResNet with the paper's optimiser: every difference is against it
TABLE2 = "table2"  # the key of Table 2's i-ResNet among the compared runs
PAPER_NOTE = "\nThe paper's own Table 3 numbers (CIFAR10) are not carried here; see Behrmann et al. 2019, Table 3.\n"


@dataclass(frozen=True)
class Row:
    """One model of Table 3: what it is, and its runs (seed -> metrics)."""

    key: str  # a glow_classifier run label, or TABLE2
    model: str
    optimizer: str
    by_seed: dict[int, dict[str, Any]]
    papers_optimizer: bool
    is_glow: bool


def table2_iresnet(inputs: ReportInputs) -> str | None:
    """The label of Table 2's i-ResNet set beside Table 3: the one with the largest c (the paper's 0.9), if any."""
    found = [(float(m["coeff"]), label) for label, m in inputs.classifiers.items() if m.get("coeff") is not None]
    return max(found)[1] if found else None


def rows(inputs: ReportInputs) -> list[Row]:
    """Table 3's models: every run of ``glow_classifier.runs`` in its order, then Table 2's i-ResNet."""
    out = []
    for label, by_seed in inputs.glow_runs.items():
        run = GlowRun.of(label)
        out.append(Row(label, MODEL_NAMES[run.model], run.optimizer, by_seed, run.papers_optimizer, run.is_glow))
    label = table2_iresnet(inputs)
    if label is not None:
        model = f"i-ResNet (Table 2, c = {label})"
        out.append(Row(TABLE2, model, "sgd", inputs.classifier_runs[label], True, False))
    return out


def summaries(table: list[Row]) -> dict[str, SeedSummary]:
    """Every row's test error over its seeds and its paired differences to the Glow-style i-ResNet (:data:`REFERENCE`)
    seed by seed, on the same test images."""
    return seed_summaries({row.key: row.by_seed for row in table}, reference=REFERENCE)


def error_cell(s: SeedSummary, n_test: int) -> tuple[float | None, str, str]:
    """``(uncertainty in points, its kind, the cell)``: over several seeds the seed std; with one seed the half-width
    of the test images' ~95% binomial interval (normal approximation), and "1 seed" said."""
    if s.std is not None:
        spread = 100 * s.std
        return spread, "seed std", f"{100 * s.mean:.2f} ± {spread:.2f} (seed std, {len(s.errors)} seeds)"
    p = s.mean
    spread = 100 * Z95 * math.sqrt(p * (1 - p) / n_test)
    return spread, "95% binomial", f"{100 * p:.2f} ± {spread:.2f} (95% binomial, 1 seed)"


def outcome(by_seed: dict[int, dict[str, Any]]) -> str:
    """``trained``, or where each diverged seed stopped."""
    stops = [(seed, m.get("diverged_at")) for seed, m in by_seed.items() if m.get("diverged")]
    if not stops:
        return "trained"
    return "; ".join(
        f"seed {seed}: diverged at epoch {at['epoch']}, batch {at['batch']} (step {at['step']})"
        if at
        else f"seed {seed}: diverged"
        for seed, at in stops
    )


def _lr(by_seed: dict[int, dict[str, Any]]) -> float | None:
    values = {m.get("optimizer_lr") for m in by_seed.values()}
    return values.pop() if len(values) == 1 else None


def table3(inputs: ReportInputs) -> ReportTable:
    """Table 3: per model its optimiser (and learning rate), parameters, test error (%) ± its uncertainty (seed std
    over several seeds; with one seed the 95% binomial interval over the test images), how training ended, and the
    paired difference to the Glow-style i-ResNet trained with SGD on the same test images (points, 95% interval) per
    seed. A table of the paper's claims comes with the findings (:func:`table3_finding`)."""
    table = rows(inputs)
    s = summaries(table)
    records, shown = [], []
    for row in table:
        x = s[row.key]
        n_test = int(next(iter(row.by_seed.values()))["n_test"])
        spread, kind, cell = error_cell(x, n_test)
        n_params = {int(m["n_params"]) for m in row.by_seed.values()}
        lr = _lr(row.by_seed) if row.key != TABLE2 else None
        diverged = sum(bool(m.get("diverged")) for m in row.by_seed.values())
        record: dict[str, Any] = {
            "run": row.key,
            "model": row.model,
            "optimizer": row.optimizer,
            "lr": lr,
            "papers_optimizer": row.papers_optimizer,
            "n_params": n_params.pop() if len(n_params) == 1 else None,
            "seeds": len(x.errors),
            "test_error_pct": percent(x.mean),
            "uncertainty_points": spread,
            "uncertainty": kind,
            "diverged_seeds": diverged,
        }
        for seed, d in x.differences.items():
            for key in ("mean", "low", "high"):
                record[f"seed {seed}: − {REFERENCE}, {key} (points)"] = 100 * d[key]
        record[f"mean − {REFERENCE} (points)"] = None if x.mean_difference is None else 100 * x.mean_difference
        records.append(record)
        optimiser = OPTIMIZER_NAMES[row.optimizer] + (f", lr {lr:g}" if lr is not None else "")
        if row.key == TABLE2:
            optimiser += ", Table 2's settings"
        differences = "; ".join(
            (f"seed {seed}: " if len(x.errors) > 1 else "")  # a row with more seeds than it is paired on says which
            + difference_cell(in_points(d), ".2f")
            for seed, d in x.differences.items()
        )
        shown.append(
            {
                "model": row.model,
                "optimiser": optimiser + ("" if row.papers_optimizer else " (not the paper's)"),
                "parameters": num(record["n_params"], ",.0f", MISSING),
                "test error (%)": cell,
                "training": outcome(row.by_seed),
                "− i-ResNet Glow-style + SGD, points (95% interval)": differences or MISSING,
            }
        )
    data = pd.DataFrame.from_records(records)
    return ReportTable("table3", data, pd.DataFrame(shown), index=False)


def side(diffs: dict[int, dict[str, float]]) -> str:
    """``"i-ResNet"`` when every seed's 95% interval of Glow − i-ResNet lies above 0, ``"Glow"`` when every one lies
    below, else (or with no shared seed) ``"unresolved"``."""
    if diffs and all(d["low"] > 0 for d in diffs.values()):
        return "i-ResNet"
    if diffs and all(d["high"] < 0 for d in diffs.values()):
        return "Glow"
    return "unresolved"


def accuracy_pairs(inputs: ReportInputs) -> list[tuple[Row, Row, dict[int, dict[str, float]], str]]:
    """Every (Glow with the paper's optimiser, i-ResNet with SGD) pair: the paired differences Glow − i-ResNet per
    seed (on the same test images) and the pair's verdict (see the module docstring)."""
    table = rows(inputs)
    glows = [r for r in table if r.is_glow and r.papers_optimizer]
    iresnets = [r for r in table if not r.is_glow and r.optimizer == "sgd"]
    out = []
    for iresnet in iresnets:
        paired = seed_summaries({r.key: r.by_seed for r in [*glows, iresnet]}, reference=iresnet.key)
        for glow in glows:
            diffs = paired[glow.key].differences
            out.append((glow, iresnet, diffs, side(diffs)))
    return out


def sgd_outcomes(inputs: ReportInputs) -> list[tuple[GlowRun, bool, bool, str]]:
    """Every run trained with Table 2's SGD: ``(run, diverged on every seed, diverged on any seed, how it ended)``."""
    out = []
    for label, by_seed in inputs.glow_runs.items():
        run = GlowRun.of(label)
        if run.optimizer != "sgd":
            continue
        every = all(bool(m.get("diverged")) for m in by_seed.values())
        any_ = any(bool(m.get("diverged")) for m in by_seed.values())
        errors = statistics.fmean(100 * float(m["test_error"]) for m in by_seed.values())
        out.append((run, every, any_, outcome(by_seed) if any_ else f"trained, test error {errors:.2f}%"))
    return out


def table3_finding(inputs: ReportInputs) -> str:
    """What this run found for Table 3: the test errors, each Glow against each i-ResNet (paired, 95% intervals) and
    the two verdicts with their rules."""
    table = rows(inputs)
    s = summaries(table)
    seeds = sorted({seed for row in table if row.key != TABLE2 for seed in row.by_seed})
    shown = [
        {
            "model": row.model,
            "optimizer": OPTIMIZER_NAMES[row.optimizer],
            "mean": 100 * s[row.key].mean,
            "std": None if s[row.key].std is None else 100 * s[row.key].std,
            "n_seeds": None if sorted(row.by_seed) == seeds else len(row.by_seed),
        }
        for row in table
    ]
    pairs = [
        {
            "glow": glow.model,
            "iresnet": iresnet.model,
            "differences": [(seed, in_points(d)) for seed, d in diffs.items()],
            "name_seeds": len(seeds) > 1 or len(iresnet.by_seed) > 1,
            "verdict": verdict,
        }
        for glow, iresnet, diffs, verdict in accuracy_pairs(inputs)
    ]
    sgd = [(run.name, state) for run, _, _, state in sgd_outcomes(inputs)]
    return finding("table3", seeds=seeds, rows=shown, pairs=pairs, sgd=sgd)
