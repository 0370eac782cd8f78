"""The report's GPU section (pipeline.report.gpu): one line before any GPU run, the run's numbers beside the paper's
runtime claims after."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.report.gpu import NOT_RUN, gpu_section


def test_no_gpu_run_is_one_line(tmp_path: Path) -> None:
    assert gpu_section(tmp_path / "gpu") == "## GPU\n\n" + NOT_RUN + "\n"
    (tmp_path / "gpu").mkdir()
    assert NOT_RUN in gpu_section(tmp_path / "gpu")
    assert "not yet run on a gpu" in NOT_RUN.lower()


def _write(folder: Path, name: str, data: dict) -> None:
    (folder / f"{name}.json").write_text(json.dumps(data))


def test_gpu_results_beside_the_paper(tmp_path: Path) -> None:
    folder = tmp_path / "gpu"
    folder.mkdir()
    _write(
        folder,
        "env",
        {
            "part": "env",
            "torch": "2.11.0+cu130",
            "cuda": "13.0",
            "gpu": "NVIDIA H200",
            "date": "2027-01-02T03:04:05",
            "tiny": False,
        },
    )
    _write(
        folder,
        "bench",
        {
            "cases": {
                "paper_sn_128": {"step_s": {"median": 0.0312}},
                "paper_plain_128": {"step_s": {"median": 0.0104}},
            },
            "ratios": {"paper_spectral_norm_overhead_128": 3.0, "dens_series_step_over_none_step": 4.37},
        },
    )
    _write(
        folder,
        "flow",
        {
            "step_s_median": 0.21,
            "paper_epoch_s": 90.3,
            "paper_200_epochs_h": 5.02,
            "test_bpd": 1.6543,
            "trained_s": 40.1,
            "steps": 190,
            "dataset": "mnist-5k",
        },
    )
    _write(folder, "toy", {"n_blocks": 100, "profile_steps": 20000, "profile_minutes": {"iresnet": 12.5, "glow": 3.0}})
    _write(folder, "gpu_check", {"pass": True, "failures": []})
    _write(folder, "ddp", {"backend": "nccl", "losses": [1.0, 0.5]})
    _write(folder, "run", {"parts": [{"part": "toy", "rc": 124, "timed_out": True}, {"part": "flow", "rc": 0}]})
    text = gpu_section(folder)
    assert NOT_RUN not in text
    for expected in ("NVIDIA H200", "torch 2.11.0+cu130", "CUDA 13.0", "2027-01-02T03:04:05"):
        assert expected in text, expected
    assert "smoke-test" not in text
    assert "0.5 s / 0.2 s = 2.5x" in text and "0.031 s / 0.010 s = 3.00x" in text
    assert "≈ 4x" in text and "4.37x" in text
    assert "1.654" in text and "5.02 h" in text and "iresnet 12.5" in text
    assert "PASS" in text and "nccl ok" in text
    assert "toy (rc 124, timed out)" in text and "flow (rc" not in text
    assert "| paper_spectral_norm_overhead_128 |" not in text  # flattened keys carry their path
    assert "| ratios.paper_spectral_norm_overhead_128 | 3 |" in text and "| losses | 1, 0.5 |" in text


def test_tiny_runs_are_marked(tmp_path: Path) -> None:
    folder = tmp_path / "gpu"
    folder.mkdir()
    _write(folder, "env", {"torch": "2.14.1", "device": "cpu", "date": "d", "tiny": True})
    assert "tiny CPU smoke-test profile" in gpu_section(folder)


def test_the_report_page_ends_with_the_gpu_section(tmp_path: Path, repo_params: dict) -> None:
    """The report stage's page: the one line before a GPU run, the run's device after its files are copied in."""
    import copy

    from pipeline.params import parse_params
    from pipeline.stages import report
    from tests.pipeline.report.test_report import write_fixture

    raw = copy.deepcopy(repo_params)
    raw["classifier"]["coeffs"] = ["vanilla", 0.9, 0.7, 0.5]
    params = parse_params(raw)
    paths = write_fixture(tmp_path)
    report.run(params, paths)
    page = (paths.reports / "README.md").read_text()
    assert page.endswith("\n## GPU\n\n" + NOT_RUN + "\n")
    (paths.reports / "gpu").mkdir()
    _write(paths.reports / "gpu", "env", {"gpu": "NVIDIA H200", "torch": "2.11.0", "date": "2027-01-02"})
    report.run(params, paths)
    page = (paths.reports / "README.md").read_text()
    assert "## GPU" in page and "NVIDIA H200" in page and NOT_RUN not in page
