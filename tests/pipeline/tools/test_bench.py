"""The benchmark's quick mode runs and returns well-formed, finite results (nothing is asserted about time)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console
from rich.table import Table

from pipeline.tools.bench import DEFAULT_FAMILIES, FAMILIES, render, run_benchmarks


def _numbers(tree: object) -> list[float]:
    if isinstance(tree, dict):
        return [n for value in tree.values() for n in _numbers(value)]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return [float(tree)]
    return []


def test_quick_benchmark_structure_and_finite_numbers() -> None:
    results = run_benchmarks(quick=True)
    assert json.loads(json.dumps(results)) == results  # JSON-serialisable as is
    assert set(results) == {"meta", "cases", "one_thread_step_s", "side_by_side_step_s", "ratios"}
    assert list(results["cases"]) == [name for family in DEFAULT_FAMILIES for name in FAMILIES[family]]
    for name, case in results["cases"].items():
        for key in ("step_s", "forward_s", "inverse_fixed_s"):
            stats = case[key]
            assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"], (name, key)
            assert stats["min"] > 0
        assert case["flops_per_step"] > 0 and case["gflops"] > 0 and case["sgemm_gflops"] > 0
        assert case["peak_mem_mb"] >= 0 and case["inverse_step_over_forward"] > 0
        for tol in case["inverse_tol"].values():
            assert 1 <= tol["iterations_max"] <= tol["iterations_total"]
    assert "inverse_tol" in results["cases"]["clf_vanilla"] and not results["cases"]["clf_vanilla"]["inverse_tol"]
    assert all(math.isfinite(n) for n in _numbers(results))
    assert all(value > 0 for value in results["ratios"].values())
    assert {
        "clf_elu_step_over_relu_step",
        "clf_vanilla_step_over_c09_step",
        "toy_100_step_over_16_step",
        "dens_neumann_step_over_none_step",
    } <= set(results["ratios"])
    tables = render(results)
    assert all(isinstance(t, Table) for t in tables)
    Console(file=io.StringIO(), width=200).print(*tables)


def test_the_speedup_over_one_thread_is_measured_in_the_same_run() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the exact mode's count (the suite runs on one thread: conftest.py)
    try:
        results = run_benchmarks(quick=True, only=["TOY"])
    finally:
        torch.set_num_threads(threads)
    assert results["meta"]["threads"] == 2 and list(results["one_thread_step_s"]) == ["toy_100"]
    step_1, step_2 = results["one_thread_step_s"]["toy_100"]["median"], results["cases"]["toy_100"]["step_s"]["median"]
    assert results["ratios"]["toy_100_step_speedup_over_1_thread"] == step_1 / step_2
    single = run_benchmarks(quick=True, only=["TOY"])  # on one thread there is nothing to compare
    assert single["one_thread_step_s"] == {} and not any("speedup" in key for key in single["ratios"])


def test_paper_family_measures_the_spectral_norm_overhead_at_batch_128() -> None:
    results = run_benchmarks(quick=True, only=["PAPER"])
    assert list(results["cases"]) == ["paper_sn_128", "paper_plain_128"]
    assert results["ratios"]["paper_spectral_norm_overhead_128"] > 0
    assert results["meta"]["device"] == "cpu" and results["cases"]["paper_sn_128"]["device"] == "cpu"


@pytest.mark.gpu
def test_benchmark_runs_on_cuda() -> None:
    results = run_benchmarks(quick=True, only=["PAPER", "DENS"], device="cuda")
    assert results["meta"]["gpu"] and results["cases"]["paper_sn_128"]["device"].startswith("cuda")
    assert all(math.isfinite(n) for n in _numbers(results))


def test_only_selects_families_and_rejects_unknown_ones() -> None:
    results = run_benchmarks(quick=True, only=["toy"])
    assert list(results["cases"]) == list(FAMILIES["TOY"])
    with pytest.raises(ValueError, match="unknown benchmark families"):
        run_benchmarks(quick=True, only=["GPU"])


def test_bench_command_writes_json_with_the_default_threads(tmp_path) -> None:
    """``iresnet bench`` without ``--threads`` keeps torch's default thread count (it used to pass None to torch)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--quick", "--only", "TOY", "--json", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert list(results["cases"]) == list(FAMILIES["TOY"])


def test_the_side_by_side_speedup_is_measured_in_the_same_run() -> None:
    """As the classifier stages train: 2 one-thread processes at once, against one process on 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = run_benchmarks(quick=True, only=["CLF"], isolate=True)
    finally:
        torch.set_num_threads(threads)
    beside, step_2 = (
        results["side_by_side_step_s"]["clf_elu"]["median"],
        results["cases"]["clf_elu"]["step_s"]["median"],
    )
    assert results["ratios"]["clf_elu_side_by_side_speedup"] == 2 * step_2 / beside
    assert run_benchmarks(quick=True, only=["CLF"])["side_by_side_step_s"] == {}  # one thread: nothing side by side
