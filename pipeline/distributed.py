"""Data-parallel training with ``torchrun``: process group, global batches split across ranks, a DDP-wrapped model.

``iresnet --nproc N <stage>`` (or ``torchrun --nproc-per-node N -m pipeline.cli <stage>``, any number of nodes) starts
N processes of one stage. Each builds the same model from the same seed and walks the same global batches (the
permutation and the augmentation come from the global RNG, identical on every rank, and synchronised from rank 0 at
every epoch); rank ``r`` trains on its contiguous part of each global batch (:func:`shard`), and the gradients are
averaged by :class:`~torch.nn.parallel.DistributedDataParallel`. The losses are scaled so that the average is the
gradient of the global batch's mean (:func:`global_mean`): ``k`` steps on ``N`` ranks end with the weights of ``k``
steps on one process, to float rounding. The global batch size is the params file's, so it must divide by ``N``.

Spectral-norm vectors are buffers computed from the (identical) weights, and DDP broadcasts rank 0's buffers before
every forward, so they stay identical on every rank; ActNorm's data-dependent initialisation happens before the model
is wrapped, and the wrapping broadcasts rank 0's result. Only rank 0 writes (:class:`pipeline.env.World`).

Without torchrun (``WORLD_SIZE`` unset or 1) none of this runs: a stage is today's single-process code.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.env import World, world
from pipeline.errors import ParamsError

#: How long an NCCL collective (the closing barrier among them) waits for the slowest rank.
NCCL_TIMEOUT = timedelta(hours=2)


def init_process_group(device: torch.device, force: bool = False) -> World:
    """Join the torchrun process group (NCCL on CUDA, gloo on the CPU) when there is one (``force``: also in a
    torchrun of one process, as ``scripts/gpu_run.sh`` checks NCCL on one GPU); returns this process's
    :class:`World`. Idempotent."""
    import torch.distributed as dist

    here = world()
    if (here.distributed or force) and not dist.is_initialized():
        if device.type == "cuda":  # bound to this rank's GPU; rank 0 alone writes the outputs (plots, samples,
            # MLflow) while the others wait at the closing barrier: longer than NCCL's default 10 minutes
            dist.init_process_group("nccl", device_id=device, timeout=NCCL_TIMEOUT)
        else:
            dist.init_process_group("gloo")
    return here


def check_divides(batch_size: int, key: str, size: int) -> None:
    """The global batch ``batch_size`` (param ``key``) must split evenly across ``size`` processes."""
    if size > 1 and batch_size % size:
        raise ParamsError(
            key, batch_size, f"a multiple of the {size} processes that share each batch (change it or --nproc)"
        )


def shard(idx: Tensor, here: World) -> Tensor:
    """Rank ``here.rank``'s contiguous part of a global batch's indices (the last batch may leave a part short)."""
    return idx.tensor_split(here.size)[here.rank]


def global_mean(local_sum: Tensor, global_count: int, here: World) -> Tensor:
    """The loss whose DDP-averaged gradient is the gradient of the global batch's mean: each rank's sum over its part,
    divided by the global batch's size, times the number of ranks (DDP divides the summed gradients by it)."""
    return local_sum * (here.size / global_count)


class Method(nn.Module):
    """``module.<name>`` as a module's ``forward``, for DDP, which synchronises only through ``forward`` (a flow
    trains through ``log_prob``)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.module, self.name = module, name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.name)(*args, **kwargs)


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks of a tensor, with the gradient of a sum (each rank's input gets the sum of every rank's
    output gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        import torch.distributed as dist

        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        out = grad.clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the global batch: in training, the per-channel sums of every rank's part are all-reduced (with
    gradients), so each rank normalises with the statistics one
    process would compute on the whole batch. Works with gloo on the CPU and NCCL on CUDA (``nn.SyncBatchNorm`` is
    GPU-only); the same parameters and buffers as ``nn.BatchNorm2d``, so model files do not change.

    The classifier's head (and the BatchNorm baseline's blocks) hold BatchNorm: without this, each rank would
    normalise with its part's statistics and N ranks would not train as one process does.
    """

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        local = x.double()
        count = torch.full((1,), float(local.numel() // local.shape[1]), dtype=torch.float64, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([local.sum((0, 2, 3)), (local * local).sum((0, 2, 3)), count]))
        c, n = x.shape[1], sums[-1]
        mean = sums[:c] / n
        var = (sums[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        y = ((local - mean.view(1, -1, 1, 1)) / torch.sqrt(var + self.eps).view(1, -1, 1, 1)).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        return y


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` inside :class:`DistributedDataParallel` (broadcasting rank 0's parameters and buffers now, and its
    buffers before every forward), its BatchNorm layers normalising over the global batch (:class:`GlobalBatchNorm2d`;
    the module keeps its class otherwise, and its state dict)."""
    from torch.nn.parallel import DistributedDataParallel

    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)  # broadcast_buffers: on by default


def sync_rng(here: World) -> None:
    """Give every rank rank 0's global torch RNG state (CPU, and CUDA when used), so the next permutation and
    augmentation are the same everywhere even if a rank drew a different number of values (e.g. probes for a short
    last part)."""
    import torch.distributed as dist

    if not here.distributed:
        return
    from pipeline.env import device

    dev = device()
    state = torch.get_rng_state()
    cuda = dev.type == "cuda"
    states: list[Any] = [state, None if cuda else (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)]
    dist.broadcast_object_list(states, src=0)
    torch.set_rng_state(states[0])
    if cuda:  # the probes drawn on the GPU: a stream of each rank's own (rank 0's on every rank would give every
        # part of a global batch the same probes), from the synchronised CPU state, the same on every rank
        torch.cuda.manual_seed(rank_cuda_seed(states[0], here.rank))
    elif states[1] is not None:
        torch.cuda.set_rng_state(states[1])


def rank_cuda_seed(cpu_state: Tensor, rank: int) -> int:
    """The seed of rank ``rank``'s CUDA generator for the epoch that starts from the (synchronised) CPU RNG state
    ``cpu_state``: a hash of the state (it moves every epoch), different for every rank; draws nothing."""
    import hashlib

    digest = hashlib.sha256(cpu_state.numpy().tobytes() + rank.to_bytes(4, "little")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def barrier(here: World) -> None:
    import torch.distributed as dist

    if here.distributed and dist.is_initialized():
        dist.barrier()


def close_process_group(here: World) -> None:
    """Wait for every rank (rank 0 writes the outputs last), then leave the process group."""
    import torch.distributed as dist

    if here.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
