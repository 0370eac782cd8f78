"""``--device`` and ``--nproc``: bad input is a one-line error before any compute; the GPU checks (marked ``gpu``,
skipped without CUDA) run every stage on CUDA against the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.env import DeviceError, World, parse_device, world
from pipeline.runner import without_nproc
from tests.pipeline.classifier_helpers import classifier_project

runner = CliRunner()
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


def _invoke(root: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--root", str(root), "--params", str(root / "params.yaml"), *args])
    return result.exit_code, result.output


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line_before_compute(tmp_path: Path, spec: str) -> None:
    _, paths = classifier_project(tmp_path)
    code, output = _invoke(tmp_path, "--device", spec, "train-classifier", "--coeff", "0.9", "--seed", "0")
    assert code == 1 and "no CUDA GPU" in output and "--device cpu" in output
    assert len(output.strip().splitlines()) <= 3 and "Traceback" not in output  # one line, wrapped by the console
    assert not (tmp_path / "models").exists()


def test_unknown_device_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    classifier_project(tmp_path)
    monkeypatch.setenv("IRESNET_DEVICE", "tpu")
    code, output = _invoke(tmp_path, "report")
    assert code == 1 and "unknown device 'tpu'" in output and "cuda:N" in output


def test_auto_is_the_cpu_without_cuda_and_a_local_rank_picks_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        assert parse_device("auto") == torch.device("cpu") == parse_device(None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert parse_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert parse_device("auto", local_rank=2) == torch.device("cuda", 2)
    with pytest.raises(DeviceError, match="GPU 4 does not exist"):
        parse_device("cuda:4")


def test_more_processes_than_gpus_is_an_error_before_compute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    classifier_project(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, output = _invoke(
        tmp_path, "--device", "cuda", "--nproc", "2", "train-classifier", "--coeff", "0.9", "--seed", "0"
    )
    assert code == 1 and "--nproc 2" in output and "1 GPU" in output
    assert not (tmp_path / "models").exists()


def test_a_world_size_that_does_not_divide_the_batch_is_an_error_before_launching(tmp_path: Path) -> None:
    classifier_project(tmp_path)  # classifier.batch_size 8
    code, output = _invoke(tmp_path, "--nproc", "3", "train-classifier", "--coeff", "0.9", "--seed", "0")
    assert code == 1 and "classifier.batch_size" in output and "multiple of the 3 processes" in output
    code, output = _invoke(tmp_path, "train-flow", "--nproc=3")  # global options may follow the command
    assert code == 1 and "flow.batch_size" in output


def test_torchrun_gets_the_command_line_without_nproc() -> None:
    args = ["--nproc", "2", "-S", "a=1", "train-flow", "--nproc=4", "--epochs", "1"]
    assert without_nproc(args) == ["-S", "a=1", "train-flow", "--epochs", "1"]


def test_world_reads_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert world() == World() and not world().distributed
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world() == World(3, 4, 1) and not world().is_main


@pytest.mark.gpu
def test_every_stage_on_cuda_agrees_with_the_cpu(tmp_path: Path) -> None:
    """The GPU check script (``python -m pipeline.tools.gpu_check``) at tiny size: every stage on both devices."""
    from pipeline.tools.gpu_check import main

    assert main(["--keep", str(tmp_path)]) == 0


@pytest.mark.parametrize("command", [["train-classifier", "--coeff", "0.9", "--seed", "0"], ["train-flow"]])
def test_dry_run_measures_and_writes_nothing(tmp_path: Path, command: list[str]) -> None:
    classifier_project(tmp_path)
    code, output = _invoke(tmp_path, *command, "--dry-run", "--nproc", "2")
    assert code == 0, output
    for key in ("n_params", "activation_mb_per_example", "step_s_measured", "epoch_s_estimate", "processes"):
        assert key in output
    assert not (tmp_path / "models").exists() and not (tmp_path / "reports").exists()


def _bf16_certificates(root: Path) -> tuple[dict, dict]:
    from pipeline.outputs import TRAIN_CLASSIFIER
    from pipeline.stages import singular_values
    from tests.pipeline.classifier_helpers import trained_project

    params, paths = trained_project(root / "bf16", coeffs=[0.9, 0.5], bf16=True)
    _, plain = trained_project(root / "fp32", coeffs=[0.9], bf16=False)
    result = singular_values.run(params, paths)
    states = [
        torch.load(TRAIN_CLASSIFIER.model_path(p, "0.9", 0), weights_only=True)["state_dict"] for p in (paths, plain)
    ]
    return result, states  # type: ignore[return-value]


def test_bf16_training_keeps_its_certificates(tmp_path: Path) -> None:
    """classifier.bf16: the forward runs in bfloat16 (the weights end elsewhere than float32 training), the spectral
    normalisation in float32, so the trained models are still certified invertible (every block's Lip < 1)."""
    result, (bf16, fp32) = _bf16_certificates(tmp_path)
    assert result["0.9/guaranteed_inverse"] and result["0.5/guaranteed_inverse"]
    assert result["0.9/max_block_bound"] <= 0.9 * 1.01 and result["0.5/max_block_bound"] <= 0.5 * 1.01
    assert any(not torch.equal(bf16[k], fp32[k]) for k in bf16)


@pytest.mark.gpu
def test_bf16_on_cuda_keeps_its_certificates(tmp_path: Path) -> None:
    from pipeline.env import set_device

    set_device(torch.device("cuda"))
    try:
        result, _ = _bf16_certificates(tmp_path)
    finally:
        set_device(torch.device("cpu"))
    assert result["0.9/guaranteed_inverse"] and result["0.5/guaranteed_inverse"]
