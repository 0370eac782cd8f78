"""The verdict rules (:mod:`pipeline.report.verdicts`) on small synthetic metrics dicts, each on both sides of its
threshold and without the metrics it needs; the verdict table's files; the page opening with it."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_report import _metrics, write_fixture

from pipeline.params import Params, parse_params
from pipeline.report import verdicts as v
from pipeline.stages import report
from pipeline.stats import mean_interval, t95

R, P, N, T = v.REPRODUCED, v.PARTLY, v.NOT_REPRODUCED, v.NOT_TESTABLE
N_TEST = 1000
SHIFT = {0: 0, 1: 2, 2: -2}  # wrong images per seed away from a model's mean: a seed std of 0.2 points


def _run(wrong: int, seed: int, coeff: float | None, **extra: Any) -> dict[str, Any]:
    """One classifier run wrong on the first ``wrong`` test images (so more errors include fewer ones: every paired
    difference is 0 or +1)."""
    wrong += SHIFT[seed]
    return {
        "coeff": coeff,
        "seed": seed,
        "test_error": wrong / N_TEST,
        "test_correct": "0" * wrong + "1" * (N_TEST - wrong),
        "throughput_img_s": 100.0,
        **extra,
    }


def _runs(wrong: dict[str, int]) -> dict[str, dict[int, dict[str, Any]]]:
    """label -> seed -> run; ``wrong``: label -> wrong images per 1,000 (vanilla: a baseline)."""
    return {
        label: {seed: _run(n, seed, None if label == "vanilla" else float(label)) for seed in SHIFT}
        for label, n in wrong.items()
    }


# 3 more wrong of 1,000: each seed's paired interval contains 0 and 0.3 points < 2 x 0.2 seed std; 15 more: worse
SAME, WORSE = 3, 15


def test_band_and_share() -> None:
    assert v.band_verdict(0.4, 0.6, (1 / 3, 2 / 3)) == R
    assert v.band_verdict(0.7, 0.9, (1 / 3, 2 / 3)) == N and v.band_verdict(0.1, 0.3, (1 / 3, 2 / 3)) == N
    assert v.band_verdict(0.5, 0.8, (1 / 3, 2 / 3)) == P
    assert [v.share_verdict(k, 3) for k in (3, 2, 0)] == [R, P, N]
    with pytest.raises(ValueError, match="unknown verdict"):
        v.Finding("x", "maybe")


def test_mean_interval_uses_student_t() -> None:
    assert t95(2) == 4.303 and t95(1000) == t95(30) and mean_interval([1.0]) is None
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["high"] - iv["mean"] == pytest.approx(4.303 * 1.0 / math.sqrt(3))


@pytest.mark.parametrize(
    ("wrong", "verdict"),
    [
        ({"vanilla": 40, "0.9": 40 + SAME, "0.7": 40 + SAME}, R),
        ({"vanilla": 40, "0.9": 40 + SAME, "0.7": 40 + WORSE}, P),
        ({"vanilla": 40, "0.9": 40 + WORSE, "0.7": 40 + WORSE}, N),
        ({"0.9": 40, "0.7": 40}, T),  # no vanilla
        ({"vanilla": 40, "0.5": 40}, T),  # no c >= 0.7
    ],
)
def test_table2_close(wrong: dict[str, int], verdict: str) -> None:
    assert v.table2_close(_runs(wrong)).verdict == verdict


@pytest.mark.parametrize(
    ("wrong", "verdict"),
    [
        ({"vanilla": 40, "0.9": 40, "0.5": 40 + WORSE}, R),  # worse than vanilla and than c = 0.9
        ({"vanilla": 40, "0.9": 40 + WORSE, "0.5": 40 + WORSE + SAME}, P),  # worse than vanilla only
        ({"vanilla": 40, "0.9": 40, "0.5": 40 + SAME}, N),
        ({"vanilla": 40, "0.9": 40}, T),  # no small c
    ],
)
def test_table2_small_c(wrong: dict[str, int], verdict: str) -> None:
    finding = v.table2_small_c(_runs(wrong))
    assert finding.verdict == verdict
    if verdict != T:
        assert "c = 0.5 − vanilla" in finding.found and "− c = 0.9" in finding.found


def _certs(certified: dict[str, bool]) -> dict[str, Any]:
    return {
        "models": {k: {"guaranteed_inverse": c, "max_block_bound": 0.8 if c else 3.0} for k, c in certified.items()}
    }


@pytest.mark.parametrize(
    ("certified", "verdict"),
    [
        ({"vanilla": False, "0.9": True, "0.5": True}, R),
        ({"vanilla": True, "0.9": True, "0.5": True}, P),
        ({"vanilla": False, "0.9": False, "0.5": True}, N),
        ({"vanilla": False}, T),
    ],
)
def test_table2_guarantee(certified: dict[str, bool], verdict: str) -> None:
    coeffs = {k: None if k == "vanilla" else float(k) for k in certified}
    assert v.table2_guarantee(_certs(certified), coeffs).verdict == verdict


# A flow at the paper's CIFAR10 scale: 3,072 dims, 50,000 train images, 96 blocks, 200 epochs.
PAPER_SCALE = (
    {"dataset": "cifar10", "n_dims": 3072, "zca": False, "block_lipschitz": [0.9] * 96},
    {"epochs": 200, "n_params": 10**6},
    {"n_train": 50_000},
)


@pytest.mark.parametrize(("bpd", "verdict"), [(3.46, R), (3.30, R), (3.60, N)])
def test_table4_at_the_papers_scale(bpd: float, verdict: str) -> None:
    ev, flow, stats = copy.deepcopy(PAPER_SCALE)
    ev.update(bpd=bpd, stderr_examples=0.01)  # 3.46 is within 1.96 x 0.01 of 3.45; 3.60 is not
    assert v.table4_bpd(ev, flow, stats).verdict == verdict


def test_table4_is_not_testable_on_another_count_or_scale() -> None:
    ev, flow, stats = copy.deepcopy(PAPER_SCALE)
    ev.update(bpd=3.45, stderr_examples=0.01)
    small = {**flow, "epochs": 15}
    finding = v.table4_bpd(ev, small, stats)
    assert finding.verdict == T and "15 epochs (the paper: 200)" in finding.found
    mnist = {**ev, "dataset": "mnist-5k", "n_dims": 784}
    assert "784 dims, the paper's 1.06 counts 3,072" in v.table4_bpd(mnist, flow, {"n_train": 60_000}).found
    assert v.table4_bpd({**ev, "dataset": "fashion-mnist"}, flow, stats).verdict == T


def _toy(outcomes: list[str]) -> dict[str, Any]:
    means = {"iresnet": -0.1, "glow": 0.1, "neither": 0.0}
    return {
        "seeds": [0, 1, 2],
        "datasets": {
            f"set{k}": {"lower_nll": o, "iresnet_minus_glow": {"mean": means[o], "low": -1.0, "high": 1.0}}
            for k, o in enumerate(outcomes)
        },
    }


@pytest.mark.parametrize(
    ("outcomes", "verdict"),
    [
        (["iresnet"] * 4, R),
        (["iresnet"] * 3 + ["neither"], P),
        (["iresnet", "iresnet", "glow", "glow"], N),
        (["neither"] * 4, N),
    ],
)
def test_fig2_toy_reads_the_stages_verdict(outcomes: list[str], verdict: str) -> None:
    assert v.fig2_toy(_toy(outcomes)).verdict == verdict


def test_fig2_toy_without_intervals_is_not_testable() -> None:
    toy = {"datasets": {"moons": {"iresnet_nll": 1.0, "glow_nll": 2.0}}}  # point values decide nothing
    assert v.fig2_toy(toy).verdict == T


def _recon(errors: dict[str, float | None], converged: bool = True) -> dict[str, Any]:
    return {
        "models": {
            k: {"final_max_error": e, "converged": converged and e is not None, "iterations_to": {}}
            for k, e in errors.items()
        }
    }


C = {"vanilla": None, "0.9": 0.9, "0.5": 0.5}


@pytest.mark.parametrize(
    ("errors", "verdict"),
    [
        ({"0.9": 1.9e-3, "0.5": 1e-15}, R),  # below half a grey level (1.96e-3)
        ({"0.9": 1e-15, "0.5": 2.0e-3}, P),  # a smaller c fails
        ({"0.9": 2.0e-3, "0.5": 1e-15}, N),  # the paper's c fails
    ],
)
def test_fig3_iresnet(errors: dict[str, float], verdict: str) -> None:
    assert v.fig3_iresnet(_recon({"vanilla": None, **errors}), C).verdict == verdict


@pytest.mark.parametrize(
    ("dataset", "error", "verdict"),
    [("mnist-5k", 1e-4, R), ("mnist-5k", None, N), ("mnist", 0.3, N), ("cifar10", 0.3, R), ("cifar10", 1e-4, N)],
)
def test_fig7_vanilla_tests_the_half_for_its_data(dataset: str, error: float | None, verdict: str) -> None:
    finding = v.fig7_vanilla(_recon({"vanilla": error, "0.9": 1e-15}), C, dataset)
    assert finding.verdict == verdict


def test_fig7_vanilla_elsewhere_or_absent() -> None:
    assert v.fig7_vanilla(_recon({"vanilla": 1e-4}), C, "fashion-mnist").verdict == T
    assert v.fig7_vanilla(_recon({"0.9": 1e-4}), {"0.9": 0.9}, "mnist").verdict == T


@pytest.mark.parametrize(("counts", "verdict"), [((20, 5), R), ((21, 5), P), ((None, 21), N)])
def test_fig8_iterations(counts: tuple[int | None, int | None], verdict: str) -> None:
    recon = _recon({"0.9": 1e-15, "0.5": 1e-15})
    for label, n in zip(("0.9", "0.5"), counts):
        recon["models"][label]["iterations_to"] = {"1e-02": 1, "1e-03": n, "1e-10": None}  # 1e-02 is above 1/510
    assert v.fig8_iterations(recon, C).verdict == verdict


def _ratios(pairs: list[tuple[int | None, int | None]]) -> dict[str, Any]:
    rows = [
        {"coeff": 0.9 - 0.1 * k, "coeff_lower": 0.7 - 0.1 * k, "tolerance": tol, "iterations": n, "iterations_lower": m}
        for k, (n, m) in enumerate(pairs)
        for tol in ("1e-03", "1e-10")
    ]
    return {"iteration_ratios": rows, "iterations_tested": list(range(1, 31)) + [50, 100]}


@pytest.mark.parametrize(
    ("pairs", "verdict"),
    [
        ([(10, 5), (20, 11)], R),  # ratios in [0.4, 0.56] and [0.5, 0.58]: within [1/3, 2/3]
        ([(10, 5), (8, 8)], P),  # 8 -> 8: [0.88, 1.14], outside
        ([(8, 8), (9, 8)], N),  # 9 -> 8: [0.78, 1.0]: outside as well
        ([(6, 4), (9, 6)], P),  # [0.5, 0.8] and [0.56, 0.75]: across 2/3, undecided
        ([(30, None)], N),  # the smaller c never converged: ratio > 50 / 30
    ],
)
def test_fig8_halving(pairs: list[tuple[int | None, int | None]], verdict: str) -> None:
    assert v.fig8_halving(_ratios(pairs)).verdict == verdict


def test_fig8_halving_without_pairs() -> None:
    assert v.fig8_halving({"iteration_ratios": []}).verdict == T


def _bias(b10: float, to_target: int | None, above_bound: bool = False) -> tuple[dict[str, Any], list[dict]]:
    lb = {
        "exact_bias_bpd": {"5": 0.02, "10": b10, "20": 1e-5},
        "exact_bias_target_bpd": 1e-4,
        "exact_bias_terms_to_target": to_target,
        "n_examples": 50,
    }
    curve = [{"exact_bias_max": 0.2 if above_bound else 0.05, "theorem3_bound": 0.1}]
    return lb, curve


@pytest.mark.parametrize(
    ("args", "verdict"),
    [((0.0049, 20), R), ((0.0051, 20), P), ((0.001, 21), P), ((0.0051, None, True), N)],
)
def test_fig4_bias(args: tuple, verdict: str) -> None:
    assert v.fig4_bias(*_bias(*args)).verdict == verdict


def test_fig4_bias_needs_10_and_20_terms() -> None:
    lb, curve = _bias(0.001, 19)
    del lb["exact_bias_bpd"]["20"]
    assert v.fig4_bias(lb, curve).verdict == T


def _quality(samples: float, test: float, stderr: float = 0.01) -> dict[str, Any]:
    return {
        "sample_quality": {
            "samples": {"confident_fraction": {"mean": samples, "stderr": stderr}},
            "test_images": {"confident_fraction": {"mean": test, "stderr": stderr}},
        }
    }


@pytest.mark.parametrize(
    ("samples", "converged", "verdict"),
    [
        (0.85, True, R),  # −5 ± 2.8 points: above −10
        (0.70, True, N),  # −20 ± 2.8
        (0.80, True, P),  # −10 ± 2.8: across
        (0.85, False, N),  # the inverse failed on a sample
    ],
)
def test_fig5_samples(samples: float, converged: bool, verdict: str) -> None:
    assert v.fig5_samples({"samples_converged": converged}, _quality(samples, 0.90)).verdict == verdict


def test_fig5_without_a_sample_classifier() -> None:
    assert v.fig5_samples({"samples_converged": True}, {}).verdict == T
    assert v.fig5_samples({}, _quality(0.9, 0.9, stderr=math.nan)).verdict == T  # one image: no standard error


def _sv(exact: dict[str, float], above: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "models": {
            k: {
                "max_layer_exact": e,
                "max_layer_upper": e * 1.02,
                "frac_layers_above_1": (above or {}).get(k, 0.0),
                "n_layers": 18,
            }
            for k, e in exact.items()
        }
    }


@pytest.mark.parametrize(
    ("exact", "verdict"),
    [
        ({"0.9": 0.95, "0.5": 0.46}, R),  # below 1, within 10% of c
        ({"0.9": 0.90, "0.5": 0.40}, P),  # 0.5: 20% below c
        ({"0.95": 1.01, "0.5": 0.50}, P),  # above 1 (within 10% of c)
        ({"0.95": 1.20, "0.5": 0.50}, N),
    ],
)
def test_fig6_iresnet(exact: dict[str, float], verdict: str) -> None:
    assert v.fig6_iresnet(_sv(exact), {label: float(label) for label in exact}).verdict == verdict


@pytest.mark.parametrize(("share", "verdict"), [(0.5, R), (0.45, N)])
def test_fig6_vanilla(share: float, verdict: str) -> None:
    assert v.fig6_vanilla(_sv({"vanilla": 7.0, "0.9": 0.9}, {"vanilla": share}), C).verdict == verdict
    assert v.fig6_vanilla(_sv({"0.9": 0.9}), {"0.9": 0.9}).verdict == T


def _timed(per_forward: list[float], a: float = 0.1) -> dict[str, Any]:
    """One i-ResNet per ratio b/a: t(n) = a + n b at 5 and 20 iterations."""
    models = {
        f"0.{k + 5}": {"seconds_per_100": {"5": a + 5 * a * r, "20": a + 20 * a * r}} for k, r in enumerate(per_forward)
    }
    return {"models": models, "made_with": {"device": "cpu"}}


@pytest.mark.parametrize(
    ("ratios", "verdict"),
    [([0.9, 1.0, 1.1], R), ([0.1, 0.12, 0.11], N), ([0.5, 0.6, 0.4], P), ([1.0], T)],
)
def test_runtime_inverse(ratios: list[float], verdict: str) -> None:
    recon = _timed(ratios)
    assert v.runtime_inverse(recon, {label: float(label) for label in recon["models"]}).verdict == verdict


def _timed_runs(vanilla: list[float], iresnet: list[float], device: str) -> dict[str, dict[int, dict[str, Any]]]:
    made = {"made_with": {"device": device}}
    return {
        "vanilla": {s: {**_run(40, s, None), **made, "throughput_img_s": t} for s, t in enumerate(vanilla)},
        "0.9": {s: {**_run(40, s, 0.9), **made, "throughput_img_s": t} for s, t in enumerate(iresnet)},
    }


@pytest.mark.parametrize(
    ("vanilla", "device", "verdict"),
    [
        ([250.0, 245.0, 255.0], "cuda", R),  # 2.5x, against 2.5 within a factor 1.5
        ([100.0, 102.0, 98.0], "cuda", N),  # no slower
        ([250.0, 245.0, 255.0], "cpu", T),  # the paper's 2.5x is a GPU timing
    ],
)
def test_runtime_constraint(vanilla: list[float], device: str, verdict: str) -> None:
    assert v.runtime_constraint(_timed_runs(vanilla, [100.0] * 3, device)).verdict == verdict


@pytest.mark.parametrize(
    ("classifier", "n_terms", "verdict"),
    [([400.0, 390.0, 410.0], 5, R), ([120.0, 118.0, 122.0], 5, N), ([400.0, 390.0, 410.0], 10, T)],
)
def test_runtime_logdet(classifier: list[float], n_terms: int, verdict: str) -> None:
    runs = _timed_runs([1.0] * 3, classifier, "cpu")
    flow = {"n_terms": n_terms, "throughput_img_s": 100.0, "made_with": {"device": "cpu"}}
    assert v.runtime_logdet(runs, flow).verdict == verdict


def test_runtime_logdet_compares_only_runs_on_as_many_threads() -> None:
    """Classifiers trained on one thread beside each other, the flow on two alone: not testable, whatever the ratio."""
    runs = _timed_runs([1.0] * 3, [400.0, 390.0, 410.0], "cpu")
    for seeds in runs.values():
        for metrics in seeds.values():
            metrics["made_with"] = {**metrics.get("made_with", {}), "threads": 1}
    flow = {"n_terms": 5, "throughput_img_s": 100.0, "made_with": {"device": "cpu", "threads": 2}}
    finding = v.runtime_logdet(runs, flow)
    assert finding.verdict == T and "different numbers of torch threads (1, 2)" in finding.found
    flow["made_with"]["threads"] = 1
    assert v.runtime_logdet(runs, flow).verdict == R


@pytest.fixture
def params(repo_params: dict) -> Params:
    raw = copy.deepcopy(repo_params)
    raw["classifier"]["coeffs"] = ["vanilla", 0.9, 0.7, 0.5]
    return parse_params(raw)


def test_page_opens_with_the_verdict_table(tmp_path: Path, params: Params) -> None:
    """The report writes verdicts.{md,tex,csv} with one row per claim, the page's first table is that one, and each
    section repeats its claims' verdicts from the table (a "not reproduced" reads so)."""
    files = _metrics(["vanilla", "0.9", "0.7", "0.5"])
    files["reconstruction.json"]["models"]["0.9"]["final_max_error"] = 0.01  # c = 0.9's inverse is off by 2.5 levels
    paths = write_fixture(tmp_path, files=files)
    report.run(params, paths)
    data = pd.read_csv(paths.tables / "verdicts.csv")
    assert list(data["id"]) == [c.id for c in v.CLAIMS] and set(data["verdict"]) <= set(v.VERDICTS)
    assert (paths.tables / "verdicts.tex").read_text().startswith("\\begin{tabular}")
    page = (paths.reports / "README.md").read_text()
    first_table = page.index("\n|")
    assert page.startswith("# Results\n\n## Verdicts\n") and first_table < page.index("**Profile:**")
    assert page[first_table + 1 :].startswith((paths.tables / "verdicts.md").read_text())
    by_id = dict(zip(data["id"], data["verdict"]))
    assert by_id["fig3-iresnet"] == N and by_id["table3-accuracy"] == R  # the fixture's Glows err more
    assert "the i-ResNet inverse reconstructs exactly — not reproduced" in page


def test_the_claims_file_and_the_rules_match() -> None:
    """Every claim of claims.yaml has its rule in code and every rule its claim; every claim belongs to a section of
    the page, and the sections are distinct."""
    from pipeline.report.claims import load_claims

    data = load_claims()
    keys = [section["key"] for section in data["sections"]]
    assert len(keys) == len(set(keys))
    assert [claim["id"] for claim in data["claims"]] == list(v.JUDGES)
    assert {claim["section"] for claim in data["claims"]} <= set(keys)
