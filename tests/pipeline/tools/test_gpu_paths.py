"""The CUDA-only code paths, checked on the CPU (issue 22, findings a-e): plots take device tensors, the seeded
evaluation restores the device's generator, each rank draws its own CUDA stream, NCCL is bound to the rank's GPU,
eigenvalues run on the CPU, and the GPU check tolerates a metric that diverged on both devices."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch

from pipeline import env


class _DeviceTensor:
    """Stands for a tensor on a GPU: ``.numpy()`` fails (as CUDA's does), ``.cpu()`` gives the real one."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value, self.device = value, torch.device("cuda", 0)

    def detach(self) -> _DeviceTensor:
        return self

    def cpu(self) -> torch.Tensor:
        return self.value

    def permute(self, *dims: int) -> Any:
        raise AssertionError("permuted on the device: .numpy() would fail there")

    def numpy(self) -> Any:
        raise TypeError("can't convert cuda:0 device type tensor to numpy")


def test_fig5_takes_device_tensors(tmp_path: Path) -> None:
    from pipeline.plots.flow import plot_samples

    images = torch.rand(4, 1, 8, 8)
    plot_samples(tmp_path / "fig5.png", _DeviceTensor(images), _DeviceTensor(images), "t")  # type: ignore[arg-type]
    assert (tmp_path / "fig5.png").stat().st_size > 0


def test_seeded_rng_on_the_cpu_is_fork_and_manual_seed() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with env.seeded_rng(3):
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(3)
    assert torch.equal(inside, torch.rand(3))


def test_seeded_rng_restores_the_cuda_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the stage device's generator is forked too: ``torch.manual_seed`` reseeds it, and the training probes
    after the per-epoch validation would otherwise repeat one stream every epoch."""
    forked: list[Any] = []

    class Fork:
        def __init__(self, devices: Any) -> None:
            forked.append(list(devices))

        def __enter__(self) -> None:
            return None

        def __exit__(self, *args: object) -> None:
            return None

    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: Fork(devices))
    monkeypatch.setattr(torch, "manual_seed", lambda seed: None)
    monkeypatch.setattr(env, "_current_device", torch.device("cuda", 1))
    with env.seeded_rng(0):
        pass
    monkeypatch.setattr(env, "_current_device", torch.device("cpu"))
    with env.seeded_rng(0):
        pass
    assert forked == [[torch.device("cuda", 1)], []]


def test_train_flow_validation_uses_seeded_rng() -> None:
    import inspect

    from pipeline.stages import train_flow

    source = inspect.getsource(train_flow.evaluate_epoch)
    assert "seeded_rng(seed)" in source and "manual_seed" not in source


def test_each_rank_gets_its_own_cuda_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import distributed

    state = torch.get_rng_state()
    seeds = {distributed.rank_cuda_seed(state, rank) for rank in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert distributed.rank_cuda_seed(state, 1) == distributed.rank_cuda_seed(state.clone(), 1)  # draws nothing
    assert torch.equal(torch.get_rng_state(), state)

    import torch.distributed as dist

    seeded: list[int] = []
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src: None)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: pytest.fail("rank 0's CUDA state copied"))
    monkeypatch.setattr(env, "_current_device", torch.device("cuda", 0))
    distributed.sync_rng(env.World(2, 3, 0))
    assert seeded == [distributed.rank_cuda_seed(torch.get_rng_state(), 2)]


def test_nccl_is_bound_to_the_ranks_gpu_with_a_long_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from pipeline import distributed

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(distributed, "world", lambda: env.World(1, 2, 1))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    distributed.init_process_group(torch.device("cuda", 1))
    distributed.init_process_group(torch.device("cpu"))
    assert calls[0] == (("nccl",), {"device_id": torch.device("cuda", 1), "timeout": distributed.NCCL_TIMEOUT})
    assert distributed.NCCL_TIMEOUT.total_seconds() >= 3600
    assert calls[1] == (("gloo",), {})


def test_eigenvalues_of_device_matrices_run_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.stages import logdet_bias

    jac = torch.randn(1, 3, 3, dtype=torch.float64)
    seen: list[torch.device] = []
    result = mock.MagicMock()

    def eigvals(x: torch.Tensor) -> Any:
        seen.append(x.device)
        return result

    monkeypatch.setattr(torch.linalg, "eigvals", eigvals)
    logdet_bias._eigenvalues(SimpleNamespace(device=torch.device("cuda", 0), cpu=lambda: jac))  # type: ignore[arg-type]
    assert seen == [torch.device("cpu")]
    result.to.assert_called_once_with(torch.device("cuda", 0))


def test_eigenvalues_on_the_cpu_unchanged() -> None:
    from pipeline.stages import logdet_bias

    jac = torch.randn(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(logdet_bias._eigenvalues(jac), torch.linalg.eigvals(jac))


def test_gpu_check_tolerates_a_metric_diverged_on_both_devices() -> None:
    from pipeline.tools.gpu_check import agree

    assert agree("vanilla.recon_error", 1.3e73, 4.1e71, 1e-3)
    assert agree("vanilla.recon_error", float("inf"), 2e70, 1e-3)
    assert not agree("vanilla.recon_error", 1.3e73, 0.5, 1e-3)
    assert not agree("c09.recon_error", 1e-5, 1e70, 1e-3)
    assert agree("x", 1.0, 1.0005, 1e-3) and not agree("x", 1.0, 1.01, 1e-3)
    assert agree("iterations", 7.0, 8.0, 1e-3) and agree("test_error", 0.5, 0.51, 1e-3)
