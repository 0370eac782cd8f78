"""Stage ``train_flow``: the multiscale i-ResNet flow on dequantised images (Table 4, Fig. 5; App. C.3).

Each step draws fresh dequantisation noise from a seeded generator of its own (optionally ZCA-whitens) and minimises
the bits/dim of Eq. 3 with the configured log-det estimator (``flow.estimator``, ``flow.memory_efficient``), with
Adamax and a linear warm-up, then a constant or cosine-decaying rate (:func:`pipeline.training.scheduled_lr`).
ActNorm initialises on the first training batch, or with ``flow.actnorm_init_images`` on that many evenly spaced train
images before training (:func:`initialise_actnorm`). After each epoch: validation bits/dim (same estimator, fixed noise
and probes), mean ``ln p(z)`` and log-det, and the fixed-point reconstruction error of a validation batch go to MLflow
and ``reports/curves/flow.csv``; a resume checkpoint (model, optimiser, both RNG streams; :class:`EpochLoop`) makes a
killed run continue bit-identically. A NaN stops with a diagnosis (certified ``Lip(g)`` of the blocks at that point).

Writes ``models/flow/model.pt``, ``reports/metrics/flow.json`` (the final validation bits/dim among them) and
``reports/figures/fig5_samples.png`` (samples through the inverse beside validation images, with its convergence
report in the metrics). The test split is not read here: ``evaluate_flow`` computes the test bits/dim once, with the
App. C.3 protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from iresnet.blocks import lipschitz_bounds, residual_blocks
from iresnet.layers import ActNorm
from iresnet.logdet import LogDetSettings
from iresnet.models import MultiscaleFlow
from iresnet.spectral_norm import LipschitzConv2d
from pipeline.console import progress
from pipeline.data.batches import batch_indices, evenly_spaced, n_batches
from pipeline.data.store import load_prepared, load_stats, load_zca, split_file
from pipeline.distributed import Method, check_divides, global_mean, shard, sync_rng, wrap
from pipeline.env import device, seeded_rng, world
from pipeline.models.flows import (
    MODEL_KIND,
    FlowSpace,
    dims_text,
    fixed_noise_inputs,
    flow_config,
)
from pipeline.outputs import TRAIN_FLOW, ZCA_MARK, StageRun
from pipeline.params import Params, check_spatial, params_hash
from pipeline.paths import Paths
from pipeline.plots.flow import plot_samples
from pipeline.tracking import Tracker
from pipeline.training import (
    EpochLoop,
    GeneratorState,
    ResumeFile,
    build_optimizer,
    check_finite,
    config_to_dict,
    gradient_norm,
    save_model,
    scheduled_lr,
    seed_everything,
)

RECON_BATCH = 64  # validation images reconstructed after every epoch
# Power iterations run once on the fresh weights: from random vectors a few iterations per step would lag the weights
# for hundreds of steps, with norms above c meanwhile (and certified Lip(g) >= 1 after short runs).
_INIT_POWER_ITERS = 100
_EVAL_SEED_OFFSET = 1  # the per-epoch validation's noise and probes: fixed, and apart from the training streams
_ACTNORM_SEED_OFFSET = 2  # the dequantisation noise of the ActNorm initialisation images (flow.actnorm_init_images)


@torch.no_grad()
def initialise_actnorm(model: MultiscaleFlow, x: Tensor) -> None:
    """Data-initialise every ActNorm layer on the model inputs ``x`` (one forward, in order, like the first training
    batch would), changing nothing else: the other modules stay in eval mode (no power-iteration step) and the
    log-det is not computed (no probes drawn). Leaves the model in eval mode."""
    model.eval()
    for module in model.modules():
        if isinstance(module, ActNorm):
            module.train()
    model.encode(x, LogDetSettings(estimator="none"))
    model.eval()


@torch.no_grad()
def first_batch_inputs(
    images: Tensor, space: FlowSpace, noise: torch.Generator, batch_size: int, max_batches: int | None
) -> Tensor:
    """The model inputs of the first training step, drawn without moving any RNG: under torchrun, ActNorm initialises
    on them before the model is wrapped (one process initialises in that step itself, on the same batch)."""
    with torch.random.fork_rng(devices=[]):
        idx = next(iter(batch_indices(len(images), batch_size, True, max_batches)))
    peek = torch.Generator(device=noise.device)
    peek.set_state(noise.get_state())
    return space.to_model(images[idx], peek)


def divergence_hint(model: MultiscaleFlow) -> str:
    """What to try after a NaN, with the certified ``Lip(g)`` of the blocks right now (>= 1 breaks Eq. 4)."""
    try:
        worst = max(lipschitz_bounds(model))
        state = f"The largest certified Lip(g) of a block is now {worst:.3f}"
        state += " (>= 1: the log-det series diverges). " if worst >= 1 else " (< 1). "
    except (RuntimeError, ValueError):  # NaN weights break the SVD: that is the diagnosis then
        state = "The weights themselves are no longer finite. "
    return state + (
        "Lower flow.lr, raise flow.warmup_epochs or flow.n_power_iter (the spectral norm lags the weights), or lower "
        "flow.coeff."
    )


def converge_spectral_norms(model: MultiscaleFlow, n_iter: int = _INIT_POWER_ITERS) -> None:
    """Run ``n_iter`` power iterations in every spectrally normalised convolution (their ``u``, ``v``, ``sigma``)."""
    for module in model.modules():
        if isinstance(module, LipschitzConv2d):
            module.power_iterate(n_iter)


def train_epoch(
    model: MultiscaleFlow,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    space: FlowSpace,
    noise: torch.Generator,
    params: Params,
    epoch: int,
    advance: Callable[..., None],
    net: nn.Module | None = None,
) -> tuple[float, int]:
    """One pass over the shuffled train split; returns (mean training bits/dim, images seen).

    ``net``: under torchrun, the DDP wrapper of ``model.log_prob`` (:func:`pipeline.distributed.wrap`); the bits/dim
    are then rank 0's part's, the images the global batches'."""
    p = params.flow
    here = world()
    per_epoch = n_batches(len(images), p.batch_size, p.max_train_batches)
    warmup_steps = p.warmup_epochs * per_epoch
    model.train()
    total, mine, seen = 0.0, 0, 0  # mine: this rank's examples; seen: the global batches'
    for k, idx in enumerate(batch_indices(len(images), p.batch_size, True, p.max_train_batches)):
        lr = scheduled_lr((epoch - 1) * per_epoch + k, p.lr, warmup_steps, p.epochs * per_epoch, p.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = space.to_model(images[idx], noise)  # the global batch's noise, the same on every rank
        if net is not None:  # torchrun: this rank's part of the global batch, gradients averaged by DDP
            x = x[shard(torch.arange(len(idx)), here)]
            loss = global_mean(space.bpd(net(x)).sum(), len(idx), here)
        else:
            loss = space.bpd(model.log_prob(x)).mean()
        where = f"epoch {epoch}, batch {k + 1}"
        check_finite(loss, "training loss (bits/dim)", where, lambda: divergence_hint(model))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        check_finite(gradient_norm(model), "gradient norm", where, lambda: divergence_hint(model))
        optimizer.step()
        total += loss.item() * len(x)  # under torchrun: rank 0's part, as an estimate of the global batch's mean
        mine += len(x)
        seen += len(idx)
        advance(info=f"{loss.item():.3f} bits/dim")
    return total / mine, seen


@torch.no_grad()
def evaluate_epoch(model: MultiscaleFlow, space: FlowSpace, x: Tensor, batch_size: int, seed: int) -> dict[str, float]:
    """Bits/dim with the training estimator (``bpd``), mean ``ln p(z)`` (``logpz``) and ``ln|det J_F|`` (``logdet``;
    nats per example, the flow's own log-det without the ZCA term) on the model inputs ``x`` (:func:`fixed_noise_inputs`
    of a split's images, made once per run: the validation images after every epoch); the probes come from ``seed``
    and leave the training streams untouched."""
    model.eval()
    with seeded_rng(seed):  # on CUDA the device's generator is restored too
        logpz, logdet = [], []
        for idx in batch_indices(len(x), batch_size, shuffle=False):
            a, b = model.log_prob_parts(x[idx])
            logpz.append(a)
            logdet.append(b)
    logpz_all, logdet_all = torch.cat(logpz), torch.cat(logdet)
    return {
        "bpd": float(space.bpd(logpz_all + logdet_all).mean()),
        "logpz": float(logpz_all.mean()),
        "logdet": float(logdet_all.mean()),
    }


def inverse_report(model: MultiscaleFlow) -> dict[str, float]:
    """How the last inversion went in every block: fraction converged, largest final residual, most iterations."""
    infos = [block.last_inverse_info for block in residual_blocks(model)]
    return {
        "converged_fraction": sum(bool(info.converged) for info in infos) / len(infos),
        "max_residual": max(float(info.residual) for info in infos),
        "max_iterations": max(int(info.iterations) for info in infos),
    }


@torch.no_grad()
def reconstruction_error(model: MultiscaleFlow, x: Tensor) -> float:
    """``max |F⁻¹(F(x)) - x|`` over a batch, inverting every block by Algorithm 1 (the log-det is not needed)."""
    model.eval()
    zs, _ = model.encode(x, LogDetSettings(estimator="none"))
    return float((model.decode(zs) - x).abs().max())


def run(params: Params, paths: Paths, tracker: Tracker | None = None) -> dict[str, Any]:
    """Train the flow ``flow.*`` describes on the prepared data; returns the metrics (the content of ``flow.json``)."""
    out = StageRun(TRAIN_FLOW, paths, tracker)
    tracker = out.tracker
    p = params.flow
    seed_everything(params.seed)
    dev, here = device(), world()
    if here.distributed:
        check_divides(p.batch_size, "flow.batch_size", here.size)
    # Moved to the device once (on the CPU, .to() returns the very tensors: today's code path).
    train_images = load_prepared(paths, "train")[0].to(dev)
    val_images = load_prepared(paths, "val")[0].to(dev)
    summary = load_stats(paths)
    shape = tuple(train_images.shape[1:])
    check_spatial(params, shape[1], shape[2])
    space = FlowSpace(shape, load_zca(paths).to(dev) if p.use_zca else None)  # type: ignore[arg-type]
    config = flow_config(p, shape)  # type: ignore[arg-type]
    model = MultiscaleFlow(config).to(dev)  # built on the CPU (the same initial weights everywhere), then moved
    converge_spectral_norms(model)
    if p.actnorm_init_images is not None:  # else ActNorm initialises on the first training batch
        init_images = train_images[evenly_spaced(len(train_images), p.actnorm_init_images)]
        initialise_actnorm(model, fixed_noise_inputs(space, init_images, params.seed + _ACTNORM_SEED_OFFSET))
    optimizer = build_optimizer(p.optimizer, model.parameters(), p.lr, weight_decay=p.weight_decay)
    # Dequantisation noise of the training batches: on the CPU on every device (see preprocess.dequantize).
    noise = torch.Generator().manual_seed(params.seed)
    net = None
    if here.distributed:
        if p.actnorm and p.actnorm_init_images is None:
            initialise_actnorm(model, first_batch_inputs(train_images, space, noise, p.batch_size, p.max_train_batches))
        net = wrap(Method(model, "log_prob"), dev)  # broadcasts rank 0's weights and buffers (ActNorm's init too)
    data_summary = {k: summary[k] for k in ("dataset", "n_train", "n_val", "shape", "zca")}
    fingerprint = params_hash({"seed": params.seed, "flow": params.section_dict("flow")["flow"], "data": data_summary})
    resume = ResumeFile.for_run(paths, "flow", fingerprint, "train_flow")
    stateful = {"model": model, "optimizer": optimizer, "noise": GeneratorState(noise)}
    loop = EpochLoop(resume, p.epochs, stateful, tracker)
    val_x = fixed_noise_inputs(space, val_images, params.seed + _EVAL_SEED_OFFSET)  # the same inputs every epoch
    recon_x = fixed_noise_inputs(
        space, val_images[evenly_spaced(len(val_images), RECON_BATCH)], params.seed + _EVAL_SEED_OFFSET
    )

    per_epoch = n_batches(len(train_images), p.batch_size, p.max_train_batches)
    with progress("train flow", p.epochs * per_epoch) as advance:
        for epoch in loop:
            loop.replay(advance, per_epoch)
            t0 = time.perf_counter()
            sync_rng(here)  # every rank draws the same permutation (a no-op in one process)
            train_bpd, seen = train_epoch(model, optimizer, train_images, space, noise, params, epoch, advance, net)
            train_seconds = time.perf_counter() - t0
            if here.is_main:
                val = evaluate_epoch(model, space, val_x, p.eval_batch_size, params.seed + _EVAL_SEED_OFFSET)
                recon_error = reconstruction_error(model, recon_x)
            else:  # torchrun: only rank 0 records (and writes) the epoch's validation; the others go on training
                val, recon_error = {"bpd": float("nan"), "logpz": float("nan"), "logdet": float("nan")}, float("nan")
            record = {
                "epoch": epoch,
                "train_bpd": train_bpd,
                "val_bpd": val["bpd"],
                "logpz": val["logpz"],
                "logdet": val["logdet"],
                "recon_error": recon_error,
                "lr": optimizer.param_groups[0]["lr"],
                "images": seen,
                "train_seconds": train_seconds,
                "seconds": time.perf_counter() - t0,
            }
            loop.save(epoch, record)

    if not here.is_main:  # rank 0 writes every output; the other ranks hold the same model
        return {}
    model.eval()
    sample_generator = torch.Generator(device=dev).manual_seed(params.seed)
    samples = space.to_images(model.sample(p.n_generated, generator=sample_generator))
    inverse = inverse_report(model)
    history, last = loop.history, loop.history[-1]
    zca_note = f", ZCA-whitened {ZCA_MARK}" if p.use_zca else ""
    title = (
        f"i-ResNet flow on {summary['dataset']}{zca_note}: {last['val_bpd']:.3f} validation bits/dim "
        f"({p.n_terms}-term training estimate; {dims_text(shape)} dims, {len(history)} epochs)\n"
        "samples: fixed-point inverse converged in "
        f"{inverse['converged_fraction']:.0%} of the blocks (max residual {inverse['max_residual']:.1e})"
    )
    shown = val_images[evenly_spaced(len(val_images), p.n_generated)]
    plot_samples(out.figure("fig5"), samples, shown, title, data_name="validation images")
    save_model(
        TRAIN_FLOW.model_path(paths),
        MODEL_KIND,
        config_to_dict(config),
        model,
        dataset=summary["dataset"],
        zca=p.use_zca,
        zca_logdet=space.log_det_correction,
        image_shape=list(shape),
        n_dims=space.n_dims,
        epochs=len(history),
    )
    out.write_curve("epochs", history)
    metrics = {
        "dataset": summary["dataset"],
        "zca": p.use_zca,
        "n_dims": space.n_dims,
        "dims": dims_text(shape),
        "epochs": len(history),
        "train_bpd": last["train_bpd"],
        "val_bpd": last["val_bpd"],
        "val_logpz": last["logpz"],
        "val_logdet": last["logdet"],
        "recon_error": last["recon_error"],
        "estimator": config.logdet.estimator,
        "n_terms": p.n_terms,
        "samples_converged": inverse["converged_fraction"] == 1.0,
        "samples_converged_fraction": inverse["converged_fraction"],
        "samples_max_residual": inverse["max_residual"],
        "samples_max_iterations": inverse["max_iterations"],
    }
    inputs = {split: split_file(paths, split) for split in ("train", "val")}
    return loop.close(out, model, metrics, example=val_x[:2], inputs=inputs)
