"""``--dry-run`` of the training stages: what a run would cost on this device, measured, before committing to it.

Builds the model the stage would train (from the params, as the stage does), then on the current device: the number
of parameters, the activation memory per example (every tensor autograd saves for the backward pass of a training
step, parameters left out), and the time per epoch from :data:`STEPS` measured training steps (forward, loss,
backward, optimiser step; after a warm-up) times the steps of an epoch, for each process of ``--nproc``. Uses the
prepared data's shape and size when ``data/prepared`` exists, else the dataset's known ones with random images: the
estimate does not need the data. Writes nothing, logs nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.env import device, synchronize
from pipeline.params import Params, held_out_count
from pipeline.paths import Paths

STEPS = 10
# Train-part examples (train + validation) and channels of the named datasets (the dry run needs no data); idx:
# folders need `prepare`.
N_TRAIN = {"mnist-5k": 4000, "mnist": 60000, "fashion-mnist": 60000, "cifar10": 50000, "cifar100": 50000}
CHANNELS = {"mnist-5k": 1, "mnist": 1, "fashion-mnist": 1, "cifar10": 3, "cifar100": 3}
N_CLASSES = {"cifar100": 100}


def data_shape(params: Params, paths: Paths) -> tuple[tuple[int, int, int], int, int]:
    """``((C, H, W), n_train, n_classes)`` of the prepared data, or of ``data.dataset`` when not prepared yet."""
    from pipeline.data.store import load_stats, stats_file
    from pipeline.errors import DataError

    if stats_file(paths).is_file():
        stats = load_stats(paths)
        return tuple(stats["shape"]), int(stats["n_train"]), int(stats.get("n_classes", 10))  # type: ignore[return-value]
    name = params.data.dataset
    if name not in N_TRAIN:
        raise DataError(f"--dry-run on {name} needs the prepared data: run `dvc repro prepare` first.")
    size = params.data.input_size() or 28
    part = N_TRAIN[name] if params.data.max_train is None else min(N_TRAIN[name], params.data.max_train)
    n_train = part - held_out_count(part, params.data.val_fraction)  # the validation split is not trained on
    return (CHANNELS[name], size, size), n_train, N_CLASSES.get(name, 10)


def activation_bytes(step: Callable[[], Tensor], model: nn.Module) -> int:
    """Bytes of the tensors autograd saves for ``step()``'s backward (each storage once, parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def measure(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_of: Callable[[], Tensor], batch: int
) -> dict[str, float]:
    """Activation bytes per example, and the median seconds of :data:`STEPS` training steps after two warm-ups."""
    per_example = activation_bytes(loss_of, model) / batch
    optimizer.zero_grad(set_to_none=True)
    times = []
    for k in range(STEPS + 2):
        synchronize()
        t0 = time.perf_counter()
        loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize()
        if k >= 2:
            times.append(time.perf_counter() - t0)
    return {"activation_mb_per_example": per_example / 2**20, "step_s": statistics.median(times)}


def classifier(params: Params, paths: Paths, coeff: str, nproc: int) -> dict[str, Any]:
    """The dry run of ``train_classifier@coeff``."""
    from iresnet.models import IResNetClassifier
    from pipeline.models.classifiers import resnet_config
    from pipeline.models.specs import resolve_spec
    from pipeline.training import build_optimizer, n_params

    p, dev = params.classifier, device()
    spec = resolve_spec(p, coeff)
    shape, n_train, n_classes = data_shape(params, paths)
    model = IResNetClassifier(resnet_config(p, spec, shape), n_classes=n_classes).to(dev)
    optimizer = build_optimizer(p.optimizer, model.parameters(), p.lr, p.momentum, p.weight_decay)
    batch = max(1, p.batch_size // nproc)
    x, y = torch.rand(batch, *shape, device=dev), torch.randint(0, n_classes, (batch,), device=dev)
    model.train()
    result = measure(model, optimizer, lambda: F.cross_entropy(model(x), y), batch)
    return summary(f"train_classifier@{spec.label}", model, n_params(model), result, n_train, p, nproc)


def flow(params: Params, paths: Paths, nproc: int) -> dict[str, Any]:
    """The dry run of ``train_flow``."""
    from iresnet.models import MultiscaleFlow
    from pipeline.models.flows import FlowSpace, flow_config
    from pipeline.training import build_optimizer, n_params

    p, dev = params.flow, device()
    shape, n_train, _ = data_shape(params, paths)
    model = MultiscaleFlow(flow_config(p, shape)).to(dev)  # type: ignore[arg-type]
    optimizer = build_optimizer(p.optimizer, model.parameters(), p.lr, weight_decay=p.weight_decay)
    space = FlowSpace(shape)  # type: ignore[arg-type]  # ZCA costs one matrix product: left out
    batch = max(1, p.batch_size // nproc)
    x = torch.rand(batch, *shape, device=dev) - 0.5
    model.train()
    result = measure(model, optimizer, lambda: space.bpd(model.log_prob(x)).mean(), batch)
    return summary("train_flow", model, n_params(model), result, n_train, p, nproc)


def summary(
    stage: str, model: nn.Module, count: int, result: dict[str, float], n_train: int, p: Any, nproc: int
) -> dict[str, Any]:
    """The dry run's table: sizes, the measured step, and the epoch and run times it implies."""
    from pipeline.data.batches import n_batches
    from pipeline.env import device_info

    steps = n_batches(n_train, p.batch_size, p.max_train_batches)
    epoch_s = steps * result["step_s"]
    out: dict[str, Any] = {
        "stage": stage,
        **device_info(),
        "processes": nproc,
        "n_params": count,
        "activation_mb_per_example": round(result["activation_mb_per_example"], 4),
        "batch_per_process": max(1, p.batch_size // nproc),
        "activation_mb_per_process": round(result["activation_mb_per_example"] * max(1, p.batch_size // nproc), 1),
        "step_s_measured": round(result["step_s"], 4),
        "steps_per_epoch": steps,
        "epoch_s_estimate": round(epoch_s, 1),
        "epochs": p.epochs,
        "training_h_estimate": round(epoch_s * p.epochs / 3600, 2),
    }
    if device().type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device()) / 2**20, 1)
    return out
