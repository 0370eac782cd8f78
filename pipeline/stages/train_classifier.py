"""One run of stage ``train_classifier`` (``train_classifier@<label>-<seed>``): a classifier of Table 2 / Fig. 6
(App. C.2), trained from one seed. The stage runs one per (label, seed), side by side (``iresnet train-classifiers``,
:mod:`pipeline.processes`).

The seed is the run's entry of ``classifier.seeds`` (not the global ``seed``): it sets the initial weights, the data
order and the augmentation, so each (label, seed) is one independent training run.

Momentum SGD with weight decay and a step schedule (``classifier.milestones``, ``gamma``), random shifts (and flips)
on the ``[0, 1]`` images, then normalisation by the train split's per-channel mean and std. Each epoch logs train
loss/accuracy, validation loss/error (the test split is not read while training), the learning rate and the running
power-iteration estimate ``sigma~`` of every convolution to MLflow, and saves a resume checkpoint (model, optimiser,
scheduler, RNG; :class:`EpochLoop`), so a killed run continues where it stopped and ends with the same numbers. A
NaN/inf loss stops with :class:`TrainingDiverged` naming the model, epoch and batch.

Once trained, the final model is evaluated once on the test split, by :func:`evaluate`, the function that measures
the validation split every epoch. Writes ``models/classifier/<label>/seed<k>/model.pt``,
``reports/metrics/classifier/<label>/seed<k>.json`` (the final validation and test error, with the per-image
correctness on the test split, ``test_correct``, for paired comparisons) and
``reports/curves/classifier/<label>/seed<k>.csv`` (per epoch: train and validation numbers only).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iresnet.models import IResNetClassifier
from pipeline.console import progress
from pipeline.data.batches import augment, batch_indices, n_batches
from pipeline.data.preprocess import ChannelStats
from pipeline.data.store import load_channel_stats, load_prepared, load_stats, split_file
from pipeline.distributed import check_divides, global_mean, shard, sync_rng, wrap
from pipeline.env import device, world
from pipeline.models.classifiers import MODEL_KIND, conv_layers, resnet_config
from pipeline.models.specs import ClassifierSpec, reference_seed, resolve_seed, resolve_spec
from pipeline.outputs import TRAIN_CLASSIFIER, StageRun
from pipeline.params import Params, check_spatial, params_hash
from pipeline.paths import Paths
from pipeline.stats import outcomes_text
from pipeline.tracking import Tracker
from pipeline.training import (
    EpochLoop,
    ResumeFile,
    build_optimizer,
    check_finite,
    config_to_dict,
    save_model,
    seed_everything,
)

# Unconstrained layers never use their sigma~; a few power iterations per epoch keep it a current norm estimate
# for monitoring (starting from the previous vectors, it converges over the epochs).
_MONITOR_ITERS = 10
_HINT = (
    "Lower classifier.lr or add a warm-up; an unconstrained (vanilla) network can blow up where the "
    "Lipschitz-constrained ones do not."
)


def running_sigmas(model: IResNetClassifier) -> dict[str, float]:
    """The stored power-iteration estimate ``sigma~`` of each convolution's raw weight, keyed ``sigma.BB.I``."""
    return {f"sigma.{b:02d}.{i}": float(layer.sigma) for b, i, layer in conv_layers(model)}


def binomial_stderr(error: float, n: int) -> float:
    """Standard error ``sqrt(p (1 - p) / n)`` of an error rate ``p`` measured on ``n`` independent (test) images.

    The test images are a sample of the data distribution, so the measured error is a binomial proportion; at
    ``n = 1000`` and ``p = 0.05`` it is 0.0069 (0.69 points), which is what a difference between models is judged by.
    """
    if n < 1:
        raise ValueError(f"need at least one image, got n={n}")
    return math.sqrt(error * (1.0 - error) / n)


@torch.no_grad()
def init_actnorm(model: IResNetClassifier, x: Tensor) -> None:
    """Data-dependent ActNorm initialisation on a fixed batch ``x`` (normalised inputs).

    Deterministic (no random numbers, unlike the first augmented training batch), so a resumed run initialises
    identically. Constant channels, such as the injective padding's zeros, keep scale 1 (``ActNorm``'s rule).
    """
    model.train()
    model(x)


def refresh_unconstrained(model: IResNetClassifier) -> None:
    """Advance the (unused) power iteration of every unconstrained convolution, so its logged sigma~ is current."""
    for _, _, layer in conv_layers(model):
        if layer.coeff is None:
            layer.power_iterate(_MONITOR_ITERS)


def mixed_precision(enabled: bool, where: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast of the forward pass when ``classifier.bf16`` (convolutions and matmuls in bf16, the
    spectral normalisation and its power iteration in float32: :class:`iresnet.spectral_norm.LipschitzConv2d`);
    otherwise nothing at all (today's float32 code path)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=where.type, dtype=torch.bfloat16)


def train_epoch(
    model: IResNetClassifier | nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[Tensor, Tensor],
    stats: ChannelStats,
    params: Params,
    where: str,
    advance: Callable[..., None],
) -> tuple[float, float, int]:
    """One pass over the (augmented, shuffled) train split; returns (mean loss, accuracy, images seen); under torchrun
    the loss and accuracy are this rank's part's, the images the global batches'.

    ``model``: the classifier, or under torchrun its DDP wrapper (:func:`pipeline.distributed.wrap`); ``data`` on the
    model's device."""
    p = params.classifier
    images, labels = data
    here = world()
    model.train()
    loss_sum, correct, mine, seen = 0.0, 0, 0, 0  # mine: this rank's examples; seen: the global batches'
    for k, idx in enumerate(batch_indices(len(images), p.batch_size, True, p.max_train_batches), start=1):
        # The global batch, augmented as one (the same random numbers on every rank) ...
        x, y = stats.normalize(augment(images[idx], p.shift_px, p.hflip)), labels[idx]
        if here.distributed:  # ... of which this rank trains on its part (pipeline.distributed)
            part = shard(torch.arange(len(idx)), here)
            x, y = x[part], y[part]
        with mixed_precision(p.bf16, x.device):
            logits = model(x)
        if p.bf16:
            logits = logits.float()  # the loss in float32
        if here.distributed:
            loss = global_mean(F.cross_entropy(logits, y, reduction="sum"), len(idx), here)
        else:
            loss = F.cross_entropy(logits, y)
        check_finite(loss, "training loss", f"{where}, batch {k}", _HINT)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()  # under torchrun: rank 0's part, as an estimate of the global batch's mean
        loss_sum += value * len(y)
        correct += int((logits.argmax(1) == y).sum())
        mine += len(y)
        seen += len(idx)
        advance(info=f"loss {value:.3f}")
    return loss_sum / mine, correct / mine, seen


@torch.no_grad()
def evaluate(
    model: IResNetClassifier, data: tuple[Tensor, Tensor], stats: ChannelStats, batch_size: int
) -> tuple[float, float, Tensor]:
    """(mean cross-entropy, error fraction, per-image correctness ``(N,)`` bool in the order of ``data``) in eval
    mode."""
    images, labels = data
    model.eval()
    loss_sum, correct = 0.0, []
    for idx in batch_indices(len(images), batch_size, shuffle=False):
        logits = model(stats.normalize(images[idx]))
        loss_sum += float(F.cross_entropy(logits, labels[idx], reduction="sum"))
        correct.append((logits.argmax(1) == labels[idx]).cpu())
    hits = torch.cat(correct)
    return loss_sum / len(images), (len(images) - int(hits.sum())) / len(images), hits


def run_fingerprint(params: Params, spec: ClassifierSpec, seed: int, data_summary: dict[str, Any]) -> str:
    """Hash of everything that defines this run (not the lists of other coefficients and seeds), keying its resume
    file."""
    section = {k: v for k, v in params.section_dict("classifier")["classifier"].items() if k not in ("coeffs", "seeds")}
    return params_hash({"seed": seed, "label": spec.label, "classifier": section, "data": data_summary})


def run(
    params: Params,
    paths: Paths,
    tracker: Tracker | None = None,
    coeff: str | float | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Train the model ``coeff`` names (an entry of ``classifier.coeffs``) from ``seed`` (an entry of
    ``classifier.seeds``; None: the first); returns its metrics (the JSON's content)."""
    p = params.classifier
    spec = resolve_spec(p, coeff)
    seed = reference_seed(p) if seed is None else resolve_seed(p, seed)
    out = StageRun(TRAIN_CLASSIFIER, paths, tracker, label=spec.label, seed=seed)
    tracker = out.tracker
    seed_everything(seed)  # the run's own seed: initial weights, data order and augmentation
    dev, here = device(), world()
    # Moved to the device once (on the CPU, .to() returns the very tensors: today's code path). The test split is
    # loaded only after training, for the final evaluation.
    train, val = (tuple(t.to(dev) for t in load_prepared(paths, split)) for split in ("train", "val"))
    summary = load_stats(paths)
    stats = load_channel_stats(paths)
    in_shape = tuple(train[0].shape[1:])
    check_spatial(params, in_shape[1], in_shape[2])
    config = resnet_config(p, spec, in_shape)  # type: ignore[arg-type]
    if here.distributed:
        check_divides(p.batch_size, "classifier.batch_size", here.size)
    # Built on the CPU (the same initial weights on every device), then moved.
    model = IResNetClassifier(config, n_classes=int(summary["n_classes"])).to(dev)
    optimizer = build_optimizer(p.optimizer, model.parameters(), p.lr, p.momentum, p.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(p.milestones), p.gamma)
    data_summary = {k: summary[k] for k in ("dataset", "n_train", "n_val", "n_test", "shape", "mean", "std")}
    fingerprint = run_fingerprint(params, spec, seed, data_summary)
    resume = ResumeFile.for_run(paths, f"classifier-{spec.label}-seed{seed}", fingerprint, "train_classifier")
    if p.actnorm:
        init_actnorm(model, stats.normalize(train[0][: p.batch_size]))
    loop = EpochLoop(resume, p.epochs, {"model": model, "optimizer": optimizer, "scheduler": scheduler}, tracker)
    net = wrap(model, dev) if here.distributed else model  # after ActNorm's init, which the wrapping broadcasts

    per_epoch = n_batches(len(train[0]), p.batch_size, p.max_train_batches)
    with progress(f"train {spec.label}", p.epochs * per_epoch) as advance:
        for epoch in loop:
            loop.replay(advance, per_epoch)
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            where = f"model {spec.label}, epoch {epoch}"
            sync_rng(here)  # every rank draws the same permutation and augmentation (a no-op in one process)
            train_loss, train_acc, seen = train_epoch(net, optimizer, train, stats, params, where, advance)
            train_seconds = time.perf_counter() - t0
            scheduler.step()
            refresh_unconstrained(model)
            val_loss, val_error, _ = evaluate(model, val, stats, p.eval_batch_size)
            sigmas = running_sigmas(model)
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "val_loss": val_loss,
                "val_error": val_error,
                "lr": lr,
                "sigma_max": max(sigmas.values()),
                "sigma_mean": sum(sigmas.values()) / len(sigmas),
                "images": seen,
                "train_seconds": train_seconds,
                "seconds": time.perf_counter() - t0,
                **sigmas,
            }
            loop.save(epoch, record)

    if not here.is_main:  # rank 0 writes every output; the other ranks hold the same model
        return {}
    history = loop.history
    last = history[-1]
    save_model(
        TRAIN_CLASSIFIER.model_path(paths, spec.label, seed),
        MODEL_KIND,
        config_to_dict(config),
        model,
        label=spec.label,
        model_kind=spec.kind,
        coeff=spec.coeff,
        n_classes=int(summary["n_classes"]),
        dataset=summary["dataset"],
        mean=stats.mean.tolist(),
        std=stats.std.tolist(),
    )
    out.write_curve("epochs", history)
    # The final evaluation, the only one that reads the test split: the final model's outcome on each test image.
    # (Its validation error equals the last epoch's: the same model and images, evaluated the same way.)
    test = tuple(t.to(dev) for t in load_prepared(paths, "test"))
    test_loss, test_error, correct = evaluate(model, test, stats, p.eval_batch_size)
    metrics = {
        "model": spec.label,
        "coeff": spec.coeff,
        "kind": spec.kind,
        "seed": seed,
        "dataset": summary["dataset"],
        "n_train": len(train[0]),
        "n_val": len(val[0]),
        "n_test": len(test[0]),
        "epochs": len(history),
        "val_error": last["val_error"],
        "val_loss": last["val_loss"],
        "test_error": test_error,
        "test_error_stderr": binomial_stderr(test_error, len(test[0])),
        "test_loss": test_loss,
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "test_correct": outcomes_text(correct),  # "1": classified correctly; in test-split order
    }
    inputs = {split: split_file(paths, split) for split in ("train", "val", "test")}
    return loop.close(out, model, metrics, example=stats.normalize(val[0][:2]), inputs=inputs)
