"""Stage ``toy_density`` (Fig. 2, App. C.3): 2-D densities fitted by an i-ResNet flow and a Glow-style flow.

For every dataset in ``toy.datasets`` both flows are trained by maximum likelihood on the same stream of batches
(:func:`pipeline.data.toy2d.sample`): the i-ResNet flow with the exact log-det (closed-form 2x2 Jacobian), the
Glow-style flow with ActNorm, an invertible linear map and an affine coupling per layer, with the same number of
layers and MLP widths (so a similar parameter count). Writes

* ``reports/metrics/toy.json``: per dataset the test NLL (nats per 2-D point) of both flows, their parameter counts and
  training throughput, the probability mass of each density inside the heatmap window (a normalisation check), the
  i-ResNet's certified ``max_t Lip(g_t)`` (exact spectral norms of the trained weights; below 1, every block is
  invertible and the density normalised), and the true density's NLL where it has a closed form. Every NLL comes with
  its standard error over the test points, and the comparisons are paired (the same test points): ``iresnet_minus_glow``
  and ``<model>_minus_reference`` hold the mean difference of the per-point NLLs, its standard error and its ~95%
  interval, so a "lower NLL" is decided on an interval rather than on two point values;
* ``reports/curves/toy.csv``: the training loss of every step (dataset, model, step, loss);
* ``reports/figures/fig2_toy_densities.png``: rows = datasets; columns = data, i-ResNet density, Glow density;
* ``models/toy/<dataset>-<model>.pt``: the trained flows (rebuilt from their stored config).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from iresnet.blocks import lipschitz_bounds
from iresnet.toy import ACTIVATIONS, Flow2d, StackedToyGlow, StackedToyIResNet, toy_glow, toy_iresnet
from pipeline.console import progress
from pipeline.data.toy2d import WINDOW, reference_log_prob, sample, stream_seed
from pipeline.env import device
from pipeline.outputs import TOY_DENSITY, StageRun
from pipeline.params import Params, ToyParams
from pipeline.paths import Paths
from pipeline.plots.toy import Panel, data_histogram, plot_toy_densities
from pipeline.stats import mean_and_stderr, paired_difference
from pipeline.tracking import Tracker
from pipeline.training import check_finite, gradient_norm, n_params, save_model, scheduled_lr, seed_everything

MODELS = ("iresnet", "glow")
LABELS = {"iresnet": "i-ResNet", "glow": "Glow"}
CURVE_COLUMNS = ("dataset", "model", "step", "loss")
MODEL_KIND = "toy_flow"
EVAL_CHUNK = 4096  # points per log-density evaluation
MLFLOW_POINTS = 50  # curve points per model sent to MLflow (each is one request)


def model_config(kind: str, toy: ToyParams) -> dict[str, Any]:
    """The keyword arguments that rebuild a flow of ``kind`` with :func:`build_flow`."""
    width, depth = toy.mlp_shape()
    if kind == "iresnet":
        return {
            "kind": kind,
            "n_blocks": toy.n_blocks,
            "hidden": width,
            "n_hidden_layers": depth,
            "coeff": toy.coeff,
            "n_power_iter": toy.n_power_iter,
            "nonlin": toy.nonlin,
        }
    if kind == "glow":
        return {
            "kind": kind,
            "n_layers": toy.n_blocks,
            "hidden": width,
            "n_hidden_layers": depth,
            "scale_cap": toy.glow_scale_cap,
        }
    raise ValueError(f"unknown toy model {kind!r}; use one of {', '.join(MODELS)}")


def build_flow(config: dict[str, Any]) -> Flow2d:
    """A fresh flow from a :func:`model_config` dict (also how a saved model is rebuilt)."""
    args = {k: v for k, v in config.items() if k != "kind"}
    if config.get("kind") == "iresnet":
        return toy_iresnet(**args)
    if config.get("kind") == "glow":
        return toy_glow(**args)
    raise ValueError(f"unknown toy model {config.get('kind')!r}; use one of {', '.join(MODELS)}")


def _divergence_hint(kind: str, toy: ToyParams) -> str:
    lr_key, lr = ("lr", toy.lr) if kind == "iresnet" else ("glow_lr", toy.glow_lr)
    return (
        f"Lower toy.{lr_key} (now {lr:g})"
        + (f" or toy.coeff (now {toy.coeff:g})" if kind == "iresnet" else "")
        + f", raise toy.warmup_steps (now {toy.warmup_steps})"
        + (", set toy.glow_scale_cap: true" if kind == "glow" and not toy.glow_scale_cap else "")
        + " and re-run `dvc repro toy_density`."
    )


def _learning_rate(kind: str, toy: ToyParams) -> float:
    return toy.lr if kind == "iresnet" else toy.glow_lr


def _set_learning_rate(optimizer: torch.optim.Optimizer, kind: str, toy: ToyParams, step: int) -> None:
    """The rate of optimiser step ``step``: ``toy.warmup_steps`` of linear warm-up to the flow's rate, then
    ``toy.lr_schedule`` (:func:`pipeline.training.scheduled_lr`), the same schedule for both flows."""
    lr = scheduled_lr(step, _learning_rate(kind, toy), toy.warmup_steps, toy.steps, toy.lr_schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_flow(
    model: Flow2d, name: str, kind: str, params: Params, advance: Callable[..., None]
) -> tuple[list[float], float]:
    """Adam (``toy.lr`` for the i-ResNet, ``toy.glow_lr`` for Glow, after a warm-up and with ``toy.lr_schedule``) on
    ``-mean ln p(x)`` over the dataset's fixed batch stream; returns (loss per step, steps per second). One model
    alone: the fallback of :func:`train_flows`.

    Stops with :class:`pipeline.training.TrainingDiverged` when a loss or the gradient norm is not finite.
    """
    toy = params.toy
    optimizer = torch.optim.Adam(model.parameters(), lr=_learning_rate(kind, toy), fused=True)
    hint = _divergence_hint(kind, toy)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(toy.steps):
        x = sample(name, toy.batch_size, params.seed, "train", step).float().to(device())
        loss = -model.log_prob(x).mean()
        where = f"{name} / {LABELS[kind]}, step {step}"
        check_finite(loss, "loss", where, hint)
        _set_learning_rate(optimizer, kind, toy, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        check_finite(gradient_norm(model), "gradient norm", where, hint)
        optimizer.step()
        losses.append(loss.item())
        advance(info=f"loss {losses[-1]:.3f}")
    return losses, toy.steps / (time.perf_counter() - start)


def train_stacked(
    models: list[Flow2d], names: list[str], kind: str, params: Params, advance: Callable[..., None]
) -> tuple[list[list[float]], float]:
    """Train the flows of several datasets together, as one stacked model (:class:`iresnet.toy.StackedToyIResNet`
    or :class:`iresnet.toy.StackedToyGlow`), and copy the result back into ``models``.

    The same as :func:`train_flow` for each model in turn (same batch stream per dataset; the models stay
    independent, and one Adam over the stacked parameters is elementwise, so it is one Adam per model), but every
    tensor op serves all models at once. Returns (loss per step, per model) and steps per second of all together.
    Stops with :class:`pipeline.training.TrainingDiverged` naming the first dataset whose loss or gradient norm is
    not finite.
    """
    toy = params.toy
    stack = (StackedToyIResNet if kind == "iresnet" else StackedToyGlow)(models)
    optimizer = torch.optim.Adam(stack.parameters(), lr=_learning_rate(kind, toy), fused=True)  # one kernel: 4% faster
    hint = _divergence_hint(kind, toy)
    stack.train()
    losses: list[list[float]] = [[] for _ in models]
    start = time.perf_counter()
    for step in range(toy.steps):
        x = torch.stack([sample(name, toy.batch_size, params.seed, "train", step) for name in names]).float()
        x = x.to(device())  # drawn on the CPU on every device
        loss = -stack.log_prob(x).mean(dim=1)  # (M,): one loss per dataset
        _check_each(loss, "loss", names, kind, step, hint)
        _set_learning_rate(optimizer, kind, toy, step)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # model m's parameters get exactly the gradient of its own loss
        _check_each(_gradient_norms(stack), "gradient norm", names, kind, step, hint)
        optimizer.step()
        for per_model, value in zip(losses, loss.tolist()):
            per_model.append(value)
        advance(info="loss " + " ".join(f"{per_model[-1]:.3f}" for per_model in losses))
    stack.write_to(models)
    return losses, toy.steps / (time.perf_counter() - start)


def _gradient_norms(stack: torch.nn.Module) -> Tensor:
    """``‖∇θ_m‖₂`` of every model m of a stacked model (parameters ``(M, ...)``), as :func:`gradient_norm` per model."""
    return torch.stack([p.grad.flatten(1).norm(dim=1) for p in stack.parameters() if p.grad is not None]).norm(dim=0)


def _check_each(values: Tensor, what: str, names: list[str], kind: str, step: int, hint: str) -> None:
    """:func:`check_finite` for each model's value ``(M,)``, in dataset order (one cheap test when all are finite)."""
    if not bool(torch.isfinite(values).all()):
        for name, value in zip(names, values):
            check_finite(value, what, f"{name} / {LABELS[kind]}, step {step}", hint)


def train_flows(kind: str, params: Params) -> dict[str, tuple[Flow2d, list[float], float]]:
    """The ``kind`` flow of every dataset, trained: ``{dataset: (model, loss per step, steps per second)}``.

    Each model is initialised from its own seed (as if built alone). They train together
    (:func:`train_stacked`) unless the i-ResNet's nonlinearity has no closed-form Jacobian ("sorting",
    "lipswish"); then one after the other (:func:`train_flow`, autograd log-det).
    """
    toy = params.toy
    config = model_config(kind, toy)
    models: dict[str, Flow2d] = {}
    for name in toy.datasets:
        torch.manual_seed(stream_seed(params.seed, name, f"init/{kind}"))  # same init whatever ran before
        models[name] = build_flow(config).to(device())  # built on the CPU (the same init everywhere), then moved
    if kind == "iresnet" and toy.nonlin not in ACTIVATIONS:
        trained = {}
        for name, model in models.items():
            with progress(f"{name} {LABELS[kind]}", toy.steps) as advance:
                trained[name] = (model, *train_flow(model, name, kind, params, advance))
        return trained
    names = list(models)
    with progress(f"{LABELS[kind]}: {', '.join(names)}", toy.steps) as advance:
        losses, steps_per_s = train_stacked(list(models.values()), names, kind, params, advance)
    return {name: (models[name], per_model, steps_per_s) for name, per_model in zip(names, losses)}


def log_density(model: Flow2d, x: Tensor) -> Tensor:
    """``ln p(x)`` ``(N, 2) -> (N,)`` in eval mode, ``EVAL_CHUNK`` points at a time."""
    model.eval()
    with torch.no_grad():
        param = next(model.parameters())
        parts = [model.log_prob(c.to(device=param.device, dtype=param.dtype)) for c in x.split(EVAL_CHUNK)]
        return torch.cat(parts).double().cpu()


def grid(size: int) -> tuple[Tensor, float]:
    """Cell centres ``(size², 2)`` of a ``size x size`` grid on ``[-WINDOW, WINDOW]²`` (row = y, column = x) and the
    cell area; ``sum(p(centres)) * area`` is the midpoint rule for the mass inside the window."""
    h = 2 * WINDOW / size
    axis = -WINDOW + h * (torch.arange(size, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1), h * h


def fit_dataset(
    name: str,
    params: Params,
    paths: Paths,
    tracker: Tracker,
    curve_rows: list[dict[str, Any]],
    trained: dict[str, tuple[Flow2d, list[float], float]],
) -> tuple[dict[str, Any], Panel]:
    """Evaluate both flows trained on ``name`` (``trained[kind]`` from :func:`train_flows`; appending their losses to
    ``curve_rows``); returns its metrics and its figure row."""
    toy = params.toy
    test = sample(name, toy.n_test, params.seed, "test")
    points, area = grid(toy.grid_size)
    result: dict[str, Any] = {"n_test": toy.n_test}
    reference = reference_log_prob(name, test)
    result["reference_nll"] = None if reference is None else float(-reference.mean())
    test_nll: dict[str, Tensor] = {}  # per test point, per model: the paired comparisons need them point by point
    titles = {"data": f"{name}: data"}
    images = {"data": data_histogram(name, params.seed, toy.grid_size)}
    for kind in MODELS:
        config = model_config(kind, toy)
        model, losses, steps_per_s = trained[kind]
        curve_rows += [
            {"dataset": name, "model": kind, "step": step, "loss": f"{loss:.6g}"} for step, loss in enumerate(losses)
        ]
        with tracker.child_run(f"{name} {LABELS[kind]}", {"dataset": name, **config}) as fit:  # nested MLflow run
            for step in range(0, toy.steps, max(1, toy.steps // MLFLOW_POINTS)):
                fit.log_metrics({"train_loss": losses[step]}, step=step)
        if kind == "iresnet":
            # Certified max_t Lip(g_t) of the trained weights: it can exceed coeff (one power iteration per step
            # lags the weights), but below 1 every block is invertible (Theorem 1) and ln p a normalised density.
            result["iresnet_lipschitz_max"] = max(lipschitz_bounds(model))
            result["iresnet_certified_invertible"] = result["iresnet_lipschitz_max"] < 1.0
        test_nll[kind] = -log_density(model, test)
        nll = float(test_nll[kind].mean())
        check_finite(torch.tensor(nll), "test NLL", f"{name} / {LABELS[kind]}", "Train longer or lower toy.lr.")
        density = log_density(model, points).exp()
        result.update(
            {
                f"{kind}_nll": nll,
                f"{kind}_nll_stderr": mean_and_stderr(test_nll[kind])["stderr"],
                f"{kind}_minus_reference": None if reference is None else paired_difference(test_nll[kind], -reference),
                f"{kind}_params": n_params(model),
                f"{kind}_steps_per_s": steps_per_s,
                f"{kind}_final_train_loss": losses[-1],
                f"{kind}_grid_mass": float(density.sum() * area),
            }
        )
        titles[kind] = f"{LABELS[kind]}: NLL {nll:.3f}"
        images[kind] = density.reshape(toy.grid_size, toy.grid_size)
        save_model(paths.models / "toy" / f"{name}-{kind}.pt", MODEL_KIND, config, model, dataset=name)
    result["iresnet_minus_glow"] = paired_difference(test_nll["iresnet"], test_nll["glow"])
    return result, (name, titles, images)


def run(params: Params, paths: Paths, tracker: Tracker | None = None) -> dict[str, Any]:
    """Fit every dataset with both flows; write the metrics JSON, curves CSV, Fig. 2 and models. Returns the metrics
    as a flat dict (``<dataset>.<metric>``) for the results table."""
    out = StageRun(TOY_DENSITY, paths, tracker)
    tracker = out.tracker
    toy = params.toy
    seed_everything(params.seed)
    per_dataset: dict[str, dict[str, Any]] = {}
    panels: list[Panel] = []
    curve_rows: list[dict[str, Any]] = []
    # The stacked models' matrix products are large enough for threads to pay off (measured 1.4x faster per step
    # on 2 threads than on 1), unlike the old per-model steps, which ran on one thread.
    trained = {kind: train_flows(kind, params) for kind in MODELS}  # all datasets at once, per model kind
    for name in toy.datasets:
        per_dataset[name], panel = fit_dataset(
            name, params, paths, tracker, curve_rows, {kind: trained[kind][name] for kind in MODELS}
        )
        panels.append(panel)
    # Decided on the paired 95% intervals of the NLL difference: a win only where the interval excludes 0.
    wins = sum(m["iresnet_minus_glow"]["high"] < 0 for m in per_dataset.values())
    losses = sum(m["iresnet_minus_glow"]["low"] > 0 for m in per_dataset.values())
    summary = {
        "datasets": per_dataset,
        "iresnet_wins": wins,
        "glow_wins": losses,
        "n_params": {kind: per_dataset[toy.datasets[0]][f"{kind}_params"] for kind in MODELS},
        "steps_per_s": {
            kind: sum(m[f"{kind}_steps_per_s"] for m in per_dataset.values()) / len(per_dataset) for kind in MODELS
        },
        "setup": {
            key: getattr(toy, key)
            for key in ("n_blocks", "steps", "batch_size", "warmup_steps", "lr_schedule", "glow_scale_cap")
        },
        "nll_units": "nats per 2-D point (test set); reference_nll: the true density's, where it is closed-form",
        "window": [-WINDOW, WINDOW],
    }
    out.write_curve("steps", curve_rows, CURVE_COLUMNS)
    cap = "tanh-capped" if toy.glow_scale_cap else "uncapped"
    plot_toy_densities(
        out.figure("fig2"), panels, ["data", *MODELS], f"{toy.n_blocks} blocks / layers; Glow: {cap} coupling scales"
    )
    out.finish(summary)
    flat: dict[str, Any] = {}
    for name, metrics in per_dataset.items():
        for key in (
            "iresnet_nll",
            "glow_nll",
            "reference_nll",
            "iresnet_grid_mass",
            "glow_grid_mass",
            "iresnet_lipschitz_max",
            "iresnet_certified_invertible",
            "iresnet_steps_per_s",
            "glow_steps_per_s",
        ):
            if metrics[key] is not None:
                flat[f"{name}.{key}"] = metrics[key]
        flat[f"{name}.iresnet_minus_glow"] = metrics["iresnet_minus_glow"]["mean"]
        flat[f"{name}.iresnet_minus_glow_stderr"] = metrics["iresnet_minus_glow"]["stderr"]
    flat.update(
        {
            "iresnet_params": summary["n_params"]["iresnet"],
            "glow_params": summary["n_params"]["glow"],
            "iresnet_wins": wins,
            "glow_wins": losses,
            "wall_time_s": summary["wall_time_s"],
        }
    )
    return flat
