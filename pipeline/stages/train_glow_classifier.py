"""One run of stage ``train_glow_classifier`` (``train_glow_classifier@<run>-<seed>``): a classifier of Table 3
(Sec. 5.2), trained from one seed; the stage runs one per (run, seed), side by side, as ``train_classifier``.

``<run>`` is an entry of ``glow_classifier.runs``, ``<model>-<optimizer>`` (:mod:`pipeline.models.glow_specs`):
Glow with 1x1 convolutions and affine couplings (``affine``), Glow with reverse permutations and additive couplings
(``additive``), or the i-ResNet in Glow's layout (``iresnet``, :mod:`pipeline.models.glow`); trained with SGD at
Table 2's settings (``classifier.lr``, ``momentum``, ``weight_decay``) or with Adam / Adamax at
``glow_classifier.lr`` and ``weight_decay``. Everything else is Table 2's (``classifier``): data, augmentation,
epochs, batch sizes, the step schedule (``milestones``, ``gamma``), and the epoch itself, which is
:func:`pipeline.stages.train_classifier.train_epoch` (shuffled, augmented, normalised batches; a NaN/inf loss stops
it with :class:`~pipeline.training.TrainingDiverged`). Resumable like ``train_classifier`` (:class:`EpochLoop`).

**Divergence is a result here, not a failure.** Sec. 5.2 claims that Glow trained with the i-ResNet's SGD settings
diverges. When the loss becomes NaN or infinite, training stops, the epoch is recorded with the batch it stopped at,
and the stage writes its outputs as usual: the metrics hold ``diverged: true`` and ``diverged_at`` (epoch, batch,
optimiser step, message), and the test error and ``test_correct`` of the model as it was when it diverged, so
``dvc repro`` goes on. A non-finite loss at the very first batch (before any optimiser step) is not divergence but
bad data or initialisation, and stays an error.

Writes ``models/glow_classifier/<run>/seed<k>/model.pt``, ``reports/metrics/glow_classifier/<run>/seed<k>.json``
(with the per-image correctness on the test split, ``test_correct``, for paired comparisons with the other models of
Table 3 and Table 2) and ``reports/curves/glow_classifier/<run>/seed<k>.csv`` (validation loss and error per epoch;
the test split is read once, by the final evaluation).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from iresnet.layers import ActNorm
from pipeline.console import progress
from pipeline.data.batches import n_batches
from pipeline.data.store import load_channel_stats, load_prepared, load_stats, split_file
from pipeline.env import device
from pipeline.files import finite_or_none
from pipeline.models.glow import MODEL_KIND, build_model
from pipeline.models.glow_specs import GlowRun, resolve_run, resolve_seed
from pipeline.outputs import TRAIN_GLOW_CLASSIFIER, StageRun
from pipeline.params import Params, check_spatial, params_hash
from pipeline.paths import Paths
from pipeline.stages.train_classifier import binomial_stderr, evaluate, init_actnorm, train_epoch
from pipeline.stats import outcomes_text
from pipeline.tracking import Tracker
from pipeline.training import (
    EpochLoop,
    ResumeFile,
    TrainingDiverged,
    build_optimizer,
    config_to_dict,
    save_model,
    seed_everything,
)

# The classifier keys these runs read (not coeffs / seeds, which pick Table 2's models).
CLASSIFIER_KEYS = (
    "epochs",
    "batch_size",
    "eval_batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "milestones",
    "gamma",
    "shift_px",
    "hflip",
    "max_train_batches",
    "bf16",
    "nonlin",
    "n_power_iter",
    "actnorm",
)


def optimizer_settings(params: Params, run: GlowRun) -> dict[str, float]:
    """``lr``, ``momentum`` and ``weight_decay`` of ``run``'s optimiser: Table 2's for SGD, Glow's otherwise."""
    if run.optimizer == "sgd":
        c = params.classifier
        return {"lr": c.lr, "momentum": c.momentum, "weight_decay": c.weight_decay}
    g = params.glow_classifier
    return {"lr": g.lr, "momentum": 0.0, "weight_decay": g.weight_decay}


def run_fingerprint(params: Params, run: GlowRun, seed: int, data_summary: dict[str, Any]) -> str:
    """Hash of everything that defines this run (not the lists of other runs and seeds), keying its resume file."""
    glow = {
        k: v for k, v in params.section_dict("glow_classifier")["glow_classifier"].items() if k not in ("runs", "seeds")
    }
    classifier = {k: v for k, v in params.section_dict("classifier")["classifier"].items() if k in CLASSIFIER_KEYS}
    return params_hash(
        {"seed": seed, "run": run.label, "glow_classifier": glow, "classifier": classifier, "data": data_summary}
    )


def diverged_at(history: list[dict[str, Any]], per_epoch: int) -> dict[str, Any] | None:
    """Where training stopped, from the epoch records (None when it did not): the epoch, the batch within it and the
    optimiser step (1-based over the run) whose loss was not finite, and a sentence saying so. Read from the records,
    so that a run resumed after its divergence reports it alike."""
    last = history[-1]
    if not last["diverged_batch"]:
        return None
    epoch, batch = int(last["epoch"]), int(last["diverged_batch"])
    step = (epoch - 1) * per_epoch + batch
    return {
        "epoch": epoch,
        "batch": batch,
        "step": step,
        "message": f"diverged at epoch {epoch}, batch {batch} (optimiser step {step}): the training loss became "
        "NaN or infinite",
    }


def run(
    params: Params,
    paths: Paths,
    tracker: Tracker | None = None,
    run_label: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Train the model ``run_label`` names (an entry of ``glow_classifier.runs``) from ``seed`` (an entry of
    ``glow_classifier.seeds``; None: the first); returns its metrics (the JSON's content)."""
    g, p = params.glow_classifier, params.classifier
    spec = resolve_run(g, run_label)
    seed = g.seeds[0] if seed is None else resolve_seed(g, seed)
    out = StageRun(TRAIN_GLOW_CLASSIFIER, paths, tracker, label=spec.label, seed=seed)
    tracker = out.tracker
    seed_everything(seed)
    dev = device()
    train, val = (tuple(t.to(dev) for t in load_prepared(paths, split)) for split in ("train", "val"))
    summary = load_stats(paths)
    stats = load_channel_stats(paths)
    in_shape = tuple(train[0].shape[1:])
    check_spatial(params, in_shape[1], in_shape[2])
    n_classes = int(summary["n_classes"])
    config, model = build_model(params, spec, in_shape, n_classes)  # type: ignore[arg-type]
    model = model.to(dev)
    settings = optimizer_settings(params, spec)
    optimizer = build_optimizer(spec.optimizer, model.parameters(), **settings)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(p.milestones), p.gamma)
    data_summary = {k: summary[k] for k in ("dataset", "n_train", "n_val", "n_test", "shape", "mean", "std")}
    fingerprint = run_fingerprint(params, spec, seed, data_summary)
    resume = ResumeFile.for_run(paths, f"glow-classifier-{spec.label}-seed{seed}", fingerprint, "train_glow_classifier")
    if any(isinstance(m, ActNorm) for m in model.modules()):
        init_actnorm(model, stats.normalize(train[0][: p.batch_size]))  # type: ignore[arg-type]
    loop = EpochLoop(resume, p.epochs, {"model": model, "optimizer": optimizer, "scheduler": scheduler}, tracker)

    per_epoch = n_batches(len(train[0]), p.batch_size, p.max_train_batches)
    with progress(f"train {spec.label}", p.epochs * per_epoch) as advance:
        for epoch in loop:
            if loop.history and loop.history[-1]["diverged_batch"]:  # resumed after the epoch that diverged
                break
            loop.replay(advance, per_epoch)
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            done, diverged_batch = 0, 0

            def step(*args: Any, **kwargs: Any) -> None:
                nonlocal done
                done += 1  # train_epoch calls this once per optimiser step
                advance(*args, **kwargs)

            where = f"model {spec.label}, epoch {epoch}"
            try:
                train_loss, train_acc, seen = train_epoch(model, optimizer, train, stats, params, where, step)
            except TrainingDiverged:
                if epoch == 1 and done == 0:
                    raise  # no optimiser step yet: the data or the initialisation, not the training, is at fault
                diverged_batch = done + 1
                train_loss, train_acc, seen = math.nan, math.nan, done * p.batch_size
            train_seconds = time.perf_counter() - t0
            scheduler.step()
            val_loss, val_error, _ = evaluate(model, val, stats, p.eval_batch_size)
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "val_loss": val_loss,
                "val_error": val_error,
                "lr": lr,
                "diverged_batch": diverged_batch,
                "images": seen,
                "train_seconds": train_seconds,
                "seconds": time.perf_counter() - t0,
            }
            loop.save(epoch, record)
            if diverged_batch:
                break
    history = loop.history
    stopped = diverged_at(history, per_epoch)
    last = history[-1]
    save_model(
        TRAIN_GLOW_CLASSIFIER.model_path(paths, spec.label, seed),
        MODEL_KIND,
        config_to_dict(config),
        model,
        label=spec.label,
        model_kind=spec.model,
        optimizer=spec.optimizer,
        n_classes=n_classes,
        dataset=summary["dataset"],
        mean=stats.mean.tolist(),
        std=stats.std.tolist(),
    )
    out.write_curve("epochs", history)
    # The final evaluation, the only one that reads the test split: the final model's outcome on each test image.
    test = tuple(t.to(dev) for t in load_prepared(paths, "test"))
    test_loss, test_error, correct = evaluate(model, test, stats, p.eval_batch_size)
    metrics = {
        "model": spec.label,
        "kind": spec.model,
        "optimizer": spec.optimizer,
        **{f"optimizer_{k}": v for k, v in settings.items()},
        "papers_optimizer": spec.papers_optimizer,
        "seed": seed,
        "dataset": summary["dataset"],
        "n_train": len(train[0]),
        "n_val": len(val[0]),
        "n_test": len(test[0]),
        "epochs": len(history),
        "diverged": stopped is not None,
        "diverged_at": stopped,
        "val_error": last["val_error"],
        "val_loss": finite_or_none(last["val_loss"]),
        "test_error": test_error,
        "test_error_stderr": binomial_stderr(test_error, len(test[0])),
        "test_loss": finite_or_none(test_loss),
        "train_loss": finite_or_none(last["train_loss"]),
        "train_accuracy": finite_or_none(last["train_accuracy"]),
        "test_correct": outcomes_text(correct),  # "1": classified correctly; in test-split order
    }
    inputs = {split: split_file(paths, split) for split in ("train", "val", "test")}
    return loop.close(out, model, metrics, example=stats.normalize(val[0][:2]), inputs=inputs)
