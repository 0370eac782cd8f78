"""Stage ``toy_density`` (Fig. 2, App. C.3): 2-D densities fitted by an i-ResNet flow and a Glow-style flow.

For every dataset in ``toy.datasets`` both flows are trained by maximum likelihood on the same stream of batches
(:func:`pipeline.data.toy2d.sample`): the i-ResNet flow with the exact log-det (closed-form 2x2 Jacobian), the
Glow-style flow with ActNorm, an invertible linear map and an affine coupling per layer, with the same number of
layers and MLP widths (so a similar parameter count). Writes

* ``reports/metrics/toy.json``: per dataset the test NLL (nats per 2-D point) of both flows, their parameter counts and
  training throughput, the probability mass inside the heatmap window of the densities Fig. 2 shows (a normalisation
  check), the i-ResNet's certified ``max_t Lip(g_t)`` (exact spectral norms of the trained weights; below 1, every
  block is invertible and the density normalised), and the true density's NLL where it has a closed form. Every NLL
  comes with its standard error over the test points, and the comparisons are paired (the same test points):
  ``iresnet_minus_glow`` and ``<model>_minus_reference`` hold the mean difference of the per-point NLLs, its standard
  error and its ~95% interval, so a "lower NLL" is decided on an interval rather than on two point values;
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
from pipeline.stats import mean_and_stderr, paired_difference, seed_std
from pipeline.tracking import Tracker, flatten
from pipeline.training import check_finite, gradient_norm, n_params, save_model, scheduled_lr, seed_everything

MODELS = ("iresnet", "glow")
LABELS = {"iresnet": "i-ResNet", "glow": "Glow"}
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


Fit = tuple[int, str]  # one flow to train: (training seed, dataset)


def fit_name(fit: Fit) -> str:
    """``"moons, seed 1"``: how messages and progress bars name one fit."""
    return f"{fit[1]}, seed {fit[0]}"


def train_flow(
    model: Flow2d, fit: Fit, kind: str, params: Params, advance: Callable[..., None]
) -> tuple[list[float], float]:
    """Adam (``toy.lr`` for the i-ResNet, ``toy.glow_lr`` for Glow, after a warm-up and with ``toy.lr_schedule``) on
    ``-mean ln p(x)`` over the fit's fixed batch stream; returns (loss per step, steps per second). One model
    alone: the fallback of :func:`train_flows`.

    Stops with :class:`pipeline.training.TrainingDiverged` when a loss or the gradient norm is not finite.
    """
    toy = params.toy
    seed, name = fit
    optimizer = torch.optim.Adam(model.parameters(), lr=_learning_rate(kind, toy), fused=True)
    hint = _divergence_hint(kind, toy)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(toy.steps):
        x = sample(name, toy.batch_size, seed, "train", step).float().to(device())
        loss = -model.log_prob(x).mean()
        where = f"{fit_name(fit)} / {LABELS[kind]}, step {step}"
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
    models: list[Flow2d], fits: list[Fit], kind: str, params: Params, advance: Callable[..., None]
) -> tuple[list[list[float]], float]:
    """Train the flows of several fits (datasets and seeds) together, as one stacked model
    (:class:`iresnet.toy.StackedToyIResNet` or :class:`iresnet.toy.StackedToyGlow`), and copy the result back into
    ``models``.

    The same as :func:`train_flow` for each model in turn (same batch stream per fit; the models stay independent,
    and one Adam over the stacked parameters is elementwise, so it is one Adam per model; measured: each model's
    weights are byte-identical whichever others share its stack), but every tensor op serves all models at once.
    Returns (loss per step, per model) and steps per second of all together. Stops with
    :class:`pipeline.training.TrainingDiverged` naming the first fit whose loss or gradient norm is not finite.
    """
    toy = params.toy
    stack = (StackedToyIResNet if kind == "iresnet" else StackedToyGlow)(models)
    optimizer = torch.optim.Adam(stack.parameters(), lr=_learning_rate(kind, toy), fused=True)  # one kernel: 4% faster
    hint = _divergence_hint(kind, toy)
    stack.train()
    losses: list[list[float]] = [[] for _ in models]
    start = time.perf_counter()
    for step in range(toy.steps):
        x = torch.stack([sample(name, toy.batch_size, seed, "train", step) for seed, name in fits]).float()
        x = x.to(device())  # drawn on the CPU on every device
        loss = -stack.log_prob(x).mean(dim=1)  # (M,): one loss per fit
        _check_each(loss, "loss", fits, kind, step, hint)
        _set_learning_rate(optimizer, kind, toy, step)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # model m's parameters get exactly the gradient of its own loss
        _check_each(_gradient_norms(stack), "gradient norm", fits, kind, step, hint)
        optimizer.step()
        for per_model, value in zip(losses, loss.tolist()):
            per_model.append(value)
        advance(info=f"mean loss {sum(loss.tolist()) / len(fits):.3f}")
    stack.write_to(models)
    return losses, toy.steps / (time.perf_counter() - start)


def _gradient_norms(stack: torch.nn.Module) -> Tensor:
    """``‖∇θ_m‖₂`` of every model m of a stacked model (parameters ``(M, ...)``), as :func:`gradient_norm` per model."""
    return torch.stack([p.grad.flatten(1).norm(dim=1) for p in stack.parameters() if p.grad is not None]).norm(dim=0)


def _check_each(values: Tensor, what: str, fits: list[Fit], kind: str, step: int, hint: str) -> None:
    """:func:`check_finite` for each model's value ``(M,)``, in fit order (one cheap test when all are finite)."""
    if not bool(torch.isfinite(values).all()):
        for fit, value in zip(fits, values):
            check_finite(value, what, f"{fit_name(fit)} / {LABELS[kind]}, step {step}", hint)


def train_flows(kind: str, params: Params) -> dict[Fit, tuple[Flow2d, list[float], float]]:
    """The ``kind`` flow of every (seed, dataset), trained: ``{fit: (model, loss per step, steps per second)}``.

    Each model is initialised from its own seed (as if built alone). They train together
    (:func:`train_stacked`) unless the i-ResNet's nonlinearity has no closed-form Jacobian ("sorting",
    "lipswish"); then one after the other (:func:`train_flow`, autograd log-det).
    """
    toy = params.toy
    config = model_config(kind, toy)
    models: dict[Fit, Flow2d] = {}
    for seed in toy.seeds:
        for name in toy.datasets:
            torch.manual_seed(stream_seed(seed, name, f"init/{kind}"))  # same init whatever ran before
            models[seed, name] = build_flow(config).to(device())  # built on the CPU (same init everywhere), then moved
    if kind == "iresnet" and toy.nonlin not in ACTIVATIONS:
        trained = {}
        for fit, model in models.items():
            with progress(f"{fit_name(fit)} {LABELS[kind]}", toy.steps) as advance:
                trained[fit] = (model, *train_flow(model, fit, kind, params, advance))
        return trained
    fits = list(models)
    what = f"{LABELS[kind]}: {len(toy.datasets)} datasets x {len(toy.seeds)} seeds"
    with progress(what, toy.steps) as advance:
        losses, steps_per_s = train_stacked(list(models.values()), fits, kind, params, advance)
    return {fit: (models[fit], per_model, steps_per_s) for fit, per_model in zip(fits, losses)}


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


Trained = dict[str, dict[int, tuple[Flow2d, list[float], float]]]  # kind -> seed -> (model, losses, steps/s)


def evaluate_seed(
    kind: str,
    fit: Fit,
    trained: tuple[Flow2d, list[float], float],
    points: dict[str, Tensor],
    cells: tuple[Tensor, float] | None,
    params: Params,
    paths: Paths,
) -> tuple[dict[str, Any], Tensor, Tensor | None]:
    """Score one trained flow on the dataset's ``points`` (``"test"``, ``"val"``: drawn once per dataset) and, for
    the seed whose densities Fig. 2 shows, on the heatmap ``cells`` (:func:`grid`): ``(metrics, per-point test NLL
    (N,), density on the grid (size, size) or None)``; saves the model."""
    toy = params.toy
    seed, name = fit
    model, losses, steps_per_s = trained
    config = model_config(kind, toy)
    test_nll = -log_density(model, points["test"])
    nll = float(test_nll.mean())
    check_finite(torch.tensor(nll), "test NLL", f"{fit_name(fit)} / {LABELS[kind]}", "Train longer or lower toy.lr.")
    result = {
        "nll": nll,
        "val_nll": float(-log_density(model, points["val"]).mean()),
        "final_train_loss": losses[-1],
        "steps_per_s": steps_per_s,
        "params": n_params(model),
    }
    density = None
    if cells is not None:
        centres, area = cells
        density = log_density(model, centres).exp()
        result["grid_mass"] = float(density.sum() * area)
        density = density.reshape(toy.grid_size, toy.grid_size)
    if kind == "iresnet":
        # Certified max_t Lip(g_t) of the trained weights: it can exceed coeff (one power iteration per step
        # lags the weights), but below 1 every block is invertible (Theorem 1) and ln p a normalised density.
        result["lipschitz_max"] = max(lipschitz_bounds(model))
    save_model(
        paths.models / "toy" / f"{name}-{kind}-seed{seed}.pt", MODEL_KIND, config, model, dataset=name, seed=seed
    )
    return result, test_nll, density


def lower_nll(differences: list[dict[str, float]]) -> str:
    """Which flow fits better, decided on every seed's paired 95% interval of i-ResNet − Glow: ``"iresnet"`` when
    each interval lies below 0, ``"glow"`` when each lies above, ``"neither"`` otherwise (a finding must hold for
    every seed, not only on average)."""
    if all(d["high"] < 0 for d in differences):
        return "iresnet"
    if all(d["low"] > 0 for d in differences):
        return "glow"
    return "neither"


def fit_dataset(
    name: str, params: Params, paths: Paths, tracker: Tracker, curve_rows: list[dict[str, Any]], trained: Trained
) -> tuple[dict[str, Any], Panel]:
    """Evaluate both flows of every seed trained on ``name`` (appending their losses to ``curve_rows``); returns the
    dataset's metrics and its figure row (the first seed's densities).

    Across seeds, each NLL is the mean over seeds, its standard error the one over test points of the seed-averaged
    per-point NLL, and ``*_seed_std`` the spread between seeds; ``per_seed`` keeps every seed's own numbers."""
    toy = params.toy
    test = sample(name, toy.n_test, params.seed, "test")
    reference = reference_log_prob(name, test)
    points = {"test": test, "val": sample(name, toy.n_val, params.seed, "val")}
    cells = grid(toy.grid_size)
    titles = {"data": f"{name}: data"}
    images = {"data": data_histogram(name, params.seed, toy.grid_size)}
    per_seed: dict[str, dict[str, Any]] = {}
    test_nll: dict[str, list[Tensor]] = {kind: [] for kind in MODELS}  # per model, per seed: (N,) per test point
    for seed in toy.seeds:
        entry: dict[str, Any] = {}
        for kind in MODELS:
            losses = trained[kind][seed][1]
            curve_rows += [
                {"dataset": name, "seed": seed, "model": kind, "step": step, "loss": f"{loss:.6g}"}
                for step, loss in enumerate(losses)
            ]
            run_params = {"dataset": name, "seed": seed, **model_config(kind, toy)}
            with tracker.child_run(f"{name} {LABELS[kind]} seed {seed}", run_params) as fit:  # nested MLflow run
                for step in range(0, toy.steps, max(1, toy.steps // MLFLOW_POINTS)):
                    fit.log_metrics({"train_loss": losses[step]}, step=step)
            shown = cells if seed == toy.seeds[0] else None  # Fig. 2 shows the first seed: only it needs the grid
            result, nll, density = evaluate_seed(kind, (seed, name), trained[kind][seed], points, shown, params, paths)
            entry.update({f"{kind}_{key}": value for key, value in result.items()})
            test_nll[kind].append(nll)
            if density is not None:
                titles[kind] = f"{LABELS[kind]}: NLL {result['nll']:.3f}"
                images[kind] = density
        entry["iresnet_minus_glow"] = paired_difference(test_nll["iresnet"][-1], test_nll["glow"][-1])
        per_seed[str(seed)] = entry
    seeds = list(per_seed.values())
    averaged = {kind: torch.stack(test_nll[kind]).mean(dim=0) for kind in MODELS}  # seed-averaged, per test point
    result: dict[str, Any] = {"n_test": toy.n_test, "seeds": list(toy.seeds)}
    result["reference_nll"] = None if reference is None else float(-reference.mean())
    for kind in MODELS:
        result.update(
            {
                f"{kind}_nll": float(averaged[kind].mean()),
                f"{kind}_nll_stderr": mean_and_stderr(averaged[kind])["stderr"],
                f"{kind}_nll_seed_std": seed_std([e[f"{kind}_nll"] for e in seeds]),
                f"{kind}_val_nll": sum(e[f"{kind}_val_nll"] for e in seeds) / len(seeds),
                f"{kind}_minus_reference": None if reference is None else paired_difference(averaged[kind], -reference),
                f"{kind}_params": seeds[0][f"{kind}_params"],
                f"{kind}_steps_per_s": seeds[0][f"{kind}_steps_per_s"],
                f"{kind}_final_train_loss": sum(e[f"{kind}_final_train_loss"] for e in seeds) / len(seeds),
                f"{kind}_grid_mass": seeds[0][f"{kind}_grid_mass"],  # the figure's seed
            }
        )
    result["iresnet_lipschitz_max"] = max(e["iresnet_lipschitz_max"] for e in seeds)
    result["iresnet_certified_invertible"] = result["iresnet_lipschitz_max"] < 1.0
    result["iresnet_minus_glow"] = paired_difference(averaged["iresnet"], averaged["glow"])
    result["iresnet_minus_glow_seed_std"] = seed_std([e["iresnet_minus_glow"]["mean"] for e in seeds])
    result["lower_nll"] = lower_nll([e["iresnet_minus_glow"] for e in seeds])
    result["per_seed"] = per_seed
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
    # Every (seed, dataset) of a model kind trains in one stacked model: its matrix products are large enough for
    # threads to pay off, and each model's result is the same bytes whatever else is in the stack.
    trained = {kind: train_flows(kind, params) for kind in MODELS}
    by_seed = {
        name: {kind: {seed: trained[kind][seed, name] for seed in toy.seeds} for kind in MODELS}
        for name in toy.datasets
    }
    for name in toy.datasets:
        per_dataset[name], panel = fit_dataset(name, params, paths, tracker, curve_rows, by_seed[name])
        panels.append(panel)
    # A win holds for every seed, each decided on its paired 95% interval (lower_nll).
    wins = sum(m["lower_nll"] == "iresnet" for m in per_dataset.values())
    losses = sum(m["lower_nll"] == "glow" for m in per_dataset.values())
    summary = {
        "datasets": per_dataset,
        "iresnet_wins": wins,
        "glow_wins": losses,
        "n_params": {kind: per_dataset[toy.datasets[0]][f"{kind}_params"] for kind in MODELS},
        "steps_per_s": {
            kind: sum(m[f"{kind}_steps_per_s"] for m in per_dataset.values()) / len(per_dataset) for kind in MODELS
        },
        "seeds": list(toy.seeds),
        "setup": {
            key: getattr(toy, key)
            for key in (
                "n_blocks",
                "steps",
                "batch_size",
                "lr",
                "glow_lr",
                "warmup_steps",
                "lr_schedule",
                "glow_scale_cap",
            )
        },
        "nll_units": "nats per 2-D point (test set); reference_nll: the true density's, where it is closed-form",
        "window": [-WINDOW, WINDOW],
    }
    out.write_curve("steps", curve_rows)
    cap = "tanh-capped" if toy.glow_scale_cap else "uncapped"
    note = f"{toy.n_blocks} blocks / layers; Glow: {cap} coupling scales; seed {toy.seeds[0]} of {len(toy.seeds)}"
    plot_toy_densities(out.figure("fig2"), panels, ["data", *MODELS], note)
    out.finish(summary)
    shown = {name: _shown(metrics) for name, metrics in per_dataset.items()}
    totals = {"iresnet_params": summary["n_params"]["iresnet"], "glow_params": summary["n_params"]["glow"]}
    totals.update({"iresnet_wins": wins, "glow_wins": losses, "wall_time_s": summary["wall_time_s"]})
    return {**flatten(shown), **totals}


#: What the results table shows of each dataset (its per-seed lists and curves stay in toy.json).
SHOWN = (
    "iresnet_nll",
    "glow_nll",
    "reference_nll",
    "iresnet_grid_mass",
    "glow_grid_mass",
    "iresnet_lipschitz_max",
    "iresnet_certified_invertible",
    "iresnet_steps_per_s",
    "glow_steps_per_s",
)


def _shown(metrics: dict[str, Any]) -> dict[str, Any]:
    """One dataset's numbers for the results table (those it has), the paired difference as mean and stderr."""
    difference = metrics["iresnet_minus_glow"]
    out = {key: metrics[key] for key in SHOWN if metrics[key] is not None}
    out.update(iresnet_minus_glow=difference["mean"], iresnet_minus_glow_stderr=difference["stderr"])
    if metrics["iresnet_minus_glow_seed_std"] is not None:
        out["iresnet_minus_glow_seed_std"] = metrics["iresnet_minus_glow_seed_std"]
    return out
