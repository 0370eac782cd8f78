"""Table 3 (:mod:`pipeline.report.glow`) on synthetic metrics: uncertainty over seeds or test images, paired
differences to the Glow-style i-ResNet (Table 2's code), and both verdicts decided by their stated rules."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.errors import DataError
from pipeline.params import parse_params
from pipeline.report import verdicts
from pipeline.report.glow import table3, table3_finding
from pipeline.report.inputs import ReportInputs
from pipeline.stages import report
from pipeline.stats import outcomes, paired_difference
from tests.pipeline.report.test_report import GLOW_ERRORS, _classifier_run, glow_run, write_fixture

RUNS = list(GLOW_ERRORS)  # affine-adamax, additive-adamax, iresnet-sgd, affine-sgd (diverged), additive-sgd


def inputs(glow_runs: dict[str, dict[int, dict[str, Any]]], table2: bool = True) -> ReportInputs:
    """Only what Table 3 reads: the Table 3 runs and Table 2's i-ResNets (c = 0.9 and 0.7, three seeds)."""
    runs = {label: {seed: _classifier_run(label, seed) for seed in (0, 1, 2)} for label in ("vanilla", "0.9", "0.7")}
    runs = runs if table2 else {"vanilla": runs["vanilla"]}
    empty: dict[str, Any] = {}
    return ReportInputs(
        stats=empty,
        prepare=empty,
        classifiers={label: by_seed[0] for label, by_seed in runs.items()},
        classifier_runs=runs,
        singular_values=empty,
        reconstruction=empty,
        flow=empty,
        evaluate_flow=empty,
        logdet_bias=empty,
        logdet_curve=[],
        toy=empty,
        glow_runs=glow_runs,
    )


def one_seed(errors: dict[str, float] | None = None, diverged: tuple[str, ...] = ("affine-sgd",)) -> dict:
    out = {}
    for run in RUNS:
        m = glow_run(run, 0, error=(errors or {}).get(run))
        m["diverged"] = run in diverged
        m["diverged_at"] = {"epoch": 2, "batch": 17, "step": 142, "message": "diverged"} if run in diverged else None
        out[run] = {0: m}
    return out


def test_one_seed_rows_intervals_and_differences() -> None:
    data = inputs(one_seed())
    t = table3(data)
    assert list(t.data["run"]) == [*RUNS, "table2"]
    row = t.data.set_index("run").loc["affine-adamax"]
    assert row["test_error_pct"] == 3.0 and row["n_params"] == 28654 and row["seeds"] == 1
    assert row["uncertainty"] == "95% binomial"
    assert row["uncertainty_points"] == pytest.approx(100 * 1.96 * math.sqrt(0.03 * 0.97 / 1000))
    # The paired difference is pipeline.stats.paired_difference of the per-image errors, as in Table 2.
    glow, iresnet = (1 - outcomes(data.glow_runs[r][0]["test_correct"]) for r in ("affine-adamax", "iresnet-sgd"))
    d = paired_difference(glow, iresnet)
    assert row["seed 0: − iresnet-sgd, low (points)"] == pytest.approx(100 * d["low"])
    table2 = t.data.set_index("run").loc["table2"]
    assert table2["model"] == "i-ResNet (Table 2, c = 0.9)" and table2["uncertainty"] == "seed std"
    assert table2["seeds"] == 3 and table2["seed 0: − iresnet-sgd, mean (points)"] == pytest.approx(-0.2)

    md = t.markdown()
    assert "| 3.00 ± 1.06 (95% binomial, 1 seed)" in md and "1.40 ± 0.20 (seed std, 3 seeds)" in md
    assert "SGD, lr 0.05 (not the paper's)" in md and "seed 0: diverged at epoch 2, batch 17 (step 142)" in md
    assert "+1.40 (+0.67, +2.13)" in md  # 14 more of 1,000 images wrong than the Glow-style i-ResNet
    assert "| seed 0: −0.20 (−0.48, +0.08)" in md  # Table 2's row, 3 seeds, paired on the one both have
    assert "\\begin{tabular}" in t.latex() and t.data.to_csv(index=False).startswith("run,model,optimizer,lr")

    text = table3_finding(data)
    assert "test error (seed 0) Glow (1x1 conv, affine) + Adamax 3.00%" in text
    assert "Glow (1x1 conv, affine) − i-ResNet, Glow-style: +1.40 (+0.67, +2.13) (i-ResNet better)" in text
    # Table 2's i-ResNet has 3 seeds, Glow one: the pair is on seed 0 (14 wrong there), and the text says so.
    assert "Glow (reverse, additive) − i-ResNet (Table 2, c = 0.9): seed 0 +1.40" in text
    assert "i-ResNet (Table 2, c = 0.9) + SGD 1.40% ± 0.20 (3 seeds)" in text
    assert "Glow (reverse, additive) + SGD: trained, test error 2.50%" in text
    assert verdicts.table3_accuracy(data).verdict == "reproduced"  # the verdicts: the verdict table's rules
    assert verdicts.table3_training(data).verdict == "partly"


def test_several_seeds_use_the_seed_spread_and_pair_seed_by_seed() -> None:
    runs = {run: {s: glow_run(run, s, error=GLOW_ERRORS[run] + s / 1000) for s in (0, 1, 2)} for run in RUNS}
    t = table3(inputs(runs))
    row = t.data.set_index("run").loc["additive-adamax"]
    assert row["uncertainty"] == "seed std" and row["uncertainty_points"] == pytest.approx(0.1)
    assert row["test_error_pct"] == pytest.approx(2.9)
    md = t.markdown()
    assert "2.90 ± 0.10 (seed std, 3 seeds)" in md
    assert "seed 0: +1.20 (+0.52, +1.88); seed 1: +1.20" in md
    assert "mean ± std over 3 seeds" in table3_finding(inputs(runs))


@pytest.mark.parametrize(
    ("errors", "table2", "verdict"),
    [
        ({}, True, "reproduced"),  # both Glows (3.0%, 2.8%) above both i-ResNets (1.6%, 1.4%) on the same images
        ({"affine-adamax": 0.005}, True, "not reproduced"),  # a Glow more accurate than the i-ResNets
        ({"affine-adamax": 0.016, "additive-adamax": 0.016}, False, "not reproduced"),  # ties: nothing decided
        ({"additive-adamax": 0.016}, False, "partly"),  # one pair decided for the i-ResNet, one undecided
    ],
)
def test_accuracy_verdict_follows_its_rule(errors: dict[str, float], table2: bool, verdict: str) -> None:
    assert verdicts.table3_accuracy(inputs(one_seed(errors), table2=table2)).verdict == verdict


@pytest.mark.parametrize(
    ("diverged", "verdict"),
    [
        (("affine-sgd", "additive-sgd"), "reproduced"),  # every Glow with SGD diverged, the i-ResNet did not
        (("affine-sgd",), "partly"),
        ((), "not reproduced"),
        (("affine-sgd", "additive-sgd", "iresnet-sgd"), "not reproduced"),  # the i-ResNet diverged with SGD too
    ],
)
def test_optimizer_verdict_follows_its_rule(diverged: tuple[str, ...], verdict: str) -> None:
    assert verdicts.table3_training(inputs(one_seed(diverged=diverged))).verdict == verdict


def test_table3_verdicts_without_their_runs_are_not_testable() -> None:
    no_sgd = {run: by_seed for run, by_seed in one_seed().items() if not run.endswith("sgd") or "iresnet" in run}
    assert verdicts.table3_training(inputs(no_sgd)).verdict == "not testable at this scale"
    assert verdicts.table3_accuracy(inputs({}, table2=False)).verdict == "not testable at this scale"
    assert verdicts.table3_training(inputs({})).verdict == "not testable at this scale"


def test_report_writes_table3_and_names_a_missing_run(tmp_path: Path, repo_params: dict) -> None:
    raw = copy.deepcopy(repo_params)
    raw["classifier"]["coeffs"] = ["vanilla", 0.9, 0.7, 0.5]
    params = parse_params(raw)
    paths = write_fixture(tmp_path)
    report.run(params, paths)
    csv = pd.read_csv(paths.tables / "table3.csv")
    assert list(csv["run"]) == [*RUNS, "table2"] and (paths.tables / "table3.tex").is_file()
    assert "## Table 3: i-ResNets vs Glow as classifiers" in (paths.reports / "README.md").read_text()
    (paths.metrics / "glow_classifier" / "additive-sgd" / "seed0.json").unlink()
    with pytest.raises(DataError, match=r"`train_glow_classifier` writes reports/metrics/glow_"):
        report.run(params, paths)
