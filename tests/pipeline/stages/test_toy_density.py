"""The ``toy_density`` stage (Fig. 2): outputs on a tiny config, saved models, the normalisation of the i-ResNet toy
density, divergence diagnosis and bad input."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

from iresnet.blocks import InvertibleResidualBlock, lipschitz_bounds, residual_blocks
from iresnet.layers import ActNorm
from iresnet.priors import standard_normal_logprob
from iresnet.spectral_norm import LipschitzLinear
from iresnet.toy import Flow2d, toy_iresnet
from pipeline.data.toy2d import sample
from pipeline.errors import ParamsError
from pipeline.files import read_json
from pipeline.params import Params, parse_params
from pipeline.paths import Paths
from pipeline.stages import toy_density
from pipeline.training import TrainingDiverged, load_model_file, load_state_checked, scheduled_lr

TINY_TOY = {
    "datasets": ["moons", "checkerboard"],
    "seeds": [0, 1],
    "n_blocks": 1,
    "hidden": [8, 8],
    "coeff": 0.9,
    "nonlin": "elu",
    "n_power_iter": 1,
    "steps": 4,
    "batch_size": 32,
    "lr": 1.0e-3,
    "glow_lr": 1.0e-3,
    "warmup_steps": 0,
    "lr_schedule": "constant",
    "glow_scale_cap": True,
    "n_test": 64,
    "n_val": 32,
    "grid_size": 12,
}


@pytest.fixture
def toy_raw(repo_params: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(repo_params)
    raw["toy"] = copy.deepcopy(TINY_TOY)
    return raw


@pytest.fixture
def toy_params(toy_raw: dict[str, Any]) -> Params:
    return parse_params(toy_raw)


def test_stage_writes_metrics_curves_figure_and_models(tmp_path: Path, toy_params: Params) -> None:
    paths = Paths.at(tmp_path)
    flat = toy_density.run(toy_params, paths)
    summary = read_json(paths.metrics / "toy.json")
    assert set(summary["datasets"]) == {"moons", "checkerboard"}
    assert summary["wall_time_s"] > 0 and summary["iresnet_wins"] in (0, 1, 2)
    for name, m in summary["datasets"].items():
        for kind in ("iresnet", "glow"):
            assert math.isfinite(m[f"{kind}_nll"]) and m[f"{kind}_steps_per_s"] > 0
            assert 0 < m[f"{kind}_grid_mass"] <= 1.1  # a density: its mass in the window is at most ~1
            assert flat[f"{name}.{kind}_nll"] == m[f"{kind}_nll"]
        assert m["iresnet_certified_invertible"] == (m["iresnet_lipschitz_max"] < 1)
        # The paired comparison on the same test points: its mean is the difference of the two mean NLLs.
        # Across seeds: the NLL is the mean of the seeds' NLLs, the spread their standard deviation.
        for kind in ("iresnet", "glow"):
            per_seed = [m["per_seed"][str(seed)][f"{kind}_nll"] for seed in TINY_TOY["seeds"]]
            assert m[f"{kind}_nll"] == pytest.approx(sum(per_seed) / len(per_seed), rel=1e-9)
            assert m[f"{kind}_nll_seed_std"] == pytest.approx(
                float(torch.tensor(per_seed, dtype=torch.float64).std()), rel=1e-6
            )
        d = m["iresnet_minus_glow"]
        assert d["mean"] == pytest.approx(m["iresnet_nll"] - m["glow_nll"], rel=1e-9, abs=1e-12)
        per_seed_differences = [m["per_seed"][str(seed)]["iresnet_minus_glow"] for seed in TINY_TOY["seeds"]]
        assert m["lower_nll"] == toy_density.lower_nll(per_seed_differences)
        assert d["stderr"] > 0 and d["low"] < d["mean"] < d["high"]
        assert m["iresnet_nll_stderr"] > 0 and m["glow_nll_stderr"] > 0
        for kind in ("iresnet", "glow"):  # the true density is closed-form on checkerboard, not on moons
            to_reference = m[f"{kind}_minus_reference"]
            if name == "moons":
                assert to_reference is None
            else:
                assert to_reference["mean"] == pytest.approx(m[f"{kind}_nll"] - m["reference_nll"], rel=1e-9)
    wins = sum(m["lower_nll"] == "iresnet" for m in summary["datasets"].values())
    assert summary["iresnet_wins"] == wins and flat["iresnet_wins"] == wins
    # 2-8-8-2 MLP per block; i-ResNet: + ActNorm (4); Glow: 1-8-8-2 coupling MLP + ActNorm (4) + 2x2 linear map (4).
    mlp = 2 * 8 + 8 + 8 * 8 + 8 + 8 * 2 + 2
    glow_mlp = 1 * 8 + 8 + 8 * 8 + 8 + 8 * 2 + 2
    assert summary["n_params"] == {"iresnet": mlp + 4, "glow": glow_mlp + 8}
    assert summary["setup"] == {
        key: TINY_TOY[key]
        for key in ("n_blocks", "steps", "batch_size", "lr", "glow_lr", "warmup_steps", "lr_schedule", "glow_scale_cap")
    }
    assert summary["seeds"] == TINY_TOY["seeds"]
    assert summary["datasets"]["checkerboard"]["reference_nll"] == pytest.approx(math.log(8), abs=1e-12)
    assert summary["datasets"]["moons"]["reference_nll"] is None

    with open(paths.curves / "toy.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * len(TINY_TOY["seeds"]) * TINY_TOY["steps"]
    fits = {(d, str(s), k) for d in TINY_TOY["datasets"] for s in TINY_TOY["seeds"] for k in toy_density.MODELS}
    assert {(r["dataset"], r["seed"], r["model"]) for r in rows} == fits
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    last = [r for r in rows if r["dataset"] == "moons" and r["seed"] == "1" and r["model"] == "glow"][-1]
    assert int(last["step"]) == TINY_TOY["steps"] - 1
    seed1 = summary["datasets"]["moons"]["per_seed"]["1"]
    assert float(last["loss"]) == pytest.approx(seed1["glow_final_train_loss"], rel=1e-5)

    png = paths.figures / "fig2_toy_densities.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A saved model rebuilt from its stored config reproduces the reported test NLL of its seed.
    test = sample("moons", TINY_TOY["n_test"], toy_params.seed, "test")
    for kind in toy_density.MODELS:
        state = load_model_file(paths.models / "toy" / f"moons-{kind}-seed1.pt", toy_density.MODEL_KIND)
        assert state["seed"] == 1
        model = toy_density.build_flow(state["config"])
        load_state_checked(model, state["state_dict"], paths.models / "toy")
        nll = -toy_density.log_density(model, test).mean().item()
        assert nll == pytest.approx(seed1[f"{kind}_nll"], rel=1e-6)
        if kind == "iresnet":
            _check_certificate(model, seed1["iresnet_lipschitz_max"], test.float())


def _check_certificate(model: Flow2d, reported: float, x: torch.Tensor) -> None:
    """The reported bound is max over blocks of the product of the exact spectral norms of the eval-mode weights,
    and no block's Jacobian ‖J_g(x)‖₂ at the test points exceeds it."""
    model.eval()
    per_block = [
        math.prod(
            torch.linalg.matrix_norm(m.effective_weight().detach().double(), ord=2).item()
            for m in block.g.modules()
            if isinstance(m, LipschitzLinear)
        )
        for block in residual_blocks(model)
    ]
    assert reported == pytest.approx(max(per_block), rel=1e-6)
    h = x
    for layer in model.transform.layers:
        if isinstance(layer, InvertibleResidualBlock):
            jac = torch.func.vmap(torch.func.jacrev(lambda v, g=layer.g: g(v[None])[0]))(h.detach())  # (N, 2, 2)
            assert torch.linalg.matrix_norm(jac, ord=2).max().item() <= reported * (1 + 1e-5)
        with torch.no_grad():
            h, _ = layer(h)


def test_stage_is_deterministic(tmp_path: Path, toy_raw: dict[str, Any]) -> None:
    toy_raw["toy"].update({"datasets": ["8gaussians"], "steps": 3})
    params = parse_params(toy_raw)
    first, second = Paths.at(tmp_path / "a"), Paths.at(tmp_path / "b")
    toy_density.run(params, first)
    toy_density.run(params, second)
    assert (first.curves / "toy.csv").read_bytes() == (second.curves / "toy.csv").read_bytes()
    a, b = read_json(first.metrics / "toy.json"), read_json(second.metrics / "toy.json")
    for key in ("iresnet_nll", "glow_nll", "iresnet_grid_mass", "iresnet_lipschitz_max"):
        assert a["datasets"]["8gaussians"][key] == b["datasets"]["8gaussians"][key]


def test_a_seed_trains_the_same_bytes_whatever_shares_its_stack(tmp_path: Path, toy_raw: dict[str, Any]) -> None:
    # Seed 1 of moons trained in a stack of 2 datasets x 2 seeds and alone: the same model, to the last bit.
    params = parse_params(toy_raw)
    toy_raw["toy"].update({"datasets": ["moons"], "seeds": [1]})
    alone = parse_params(toy_raw)
    together, single = Paths.at(tmp_path / "a"), Paths.at(tmp_path / "b")
    toy_density.run(params, together)
    toy_density.run(alone, single)
    for kind in toy_density.MODELS:
        name = f"moons-{kind}-seed1.pt"
        a = load_model_file(together.models / "toy" / name, toy_density.MODEL_KIND)["state_dict"]
        b = load_model_file(single.models / "toy" / name, toy_density.MODEL_KIND)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("intervals", "verdict"),
    [
        ([(-0.3, -0.01), (-0.2, -0.001)], "iresnet"),  # every seed's interval below 0
        ([(-0.3, -0.01), (-0.2, 0.001)], "neither"),  # one seed's interval reaches 0
        ([(0.01, 0.3), (0.001, 0.2)], "glow"),
        ([(0.01, 0.3), (-0.001, 0.2)], "neither"),
        ([(-0.3, -0.01), (0.01, 0.3)], "neither"),  # the seeds disagree
    ],
)
def test_a_toy_win_must_hold_for_every_seed(intervals: list[tuple[float, float]], verdict: str) -> None:
    assert toy_density.lower_nll([{"low": lo, "high": hi} for lo, hi in intervals]) == verdict


def test_training_lowers_the_loss(tmp_path: Path, toy_raw: dict[str, Any]) -> None:
    # 60 Adam steps at lr 1e-2 on 8 Gaussians: the mean loss of the last 10 steps is well below the first 10.
    toy_raw["toy"].update(
        {"datasets": ["8gaussians"], "seeds": [0], "steps": 60, "lr": 1.0e-2, "glow_lr": 1.0e-2, "grid_size": 4}
    )
    paths = Paths.at(tmp_path)
    toy_density.run(parse_params(toy_raw), paths)
    with open(paths.curves / "toy.csv") as f:
        rows = list(csv.DictReader(f))
    for kind in toy_density.MODELS:
        losses = [float(r["loss"]) for r in rows if r["model"] == kind]
        assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1


def _set_actnorms(flow: Flow2d, generator: torch.Generator) -> None:
    """Give every ActNorm a non-trivial bias and a positive log-scale, marked initialised."""
    with torch.no_grad():
        for layer in flow.modules():
            if isinstance(layer, ActNorm):
                layer.bias.copy_(0.3 * torch.randn(2, generator=generator, dtype=torch.float64))
                layer.log_scale.copy_(0.1 + 0.2 * torch.rand(2, generator=generator, dtype=torch.float64))
                layer.initialized.fill_(True)


def _midpoint_mass(log_prob: Any, half_width: float, n: int) -> float:
    """Midpoint rule for the integral of ``exp(log_prob)`` over ``[-a, a]²`` with ``n x n`` cells."""
    h = 2 * half_width / n
    axis = -half_width + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    with torch.no_grad():
        return float(log_prob(torch.stack([xx.flatten(), yy.flatten()], dim=1)).exp().sum()) * h * h


def test_iresnet_toy_density_integrates_to_one() -> None:
    """``∫ p = 1`` on a grid, for a random i-ResNet toy flow with non-trivial blocks and ActNorms (float64).

    Tolerance: (1) the mass outside ``[-a, a]²`` is at most ``exp(-ρ²/2)``: x outside has ``‖x‖ >= a``, so
    ``‖z‖ = ‖F(x) - F(x*)‖ >= (a - ‖x*‖) / Lip(F⁻¹) = ρ`` with ``x* = F⁻¹(0)``, ``Lip(F⁻¹) <= Π 1/(1 - Lip(g_t)) ·
    Π max exp(-log_scale)`` (Lemma 2, certified ``Lip(g_t)``), and ``P(‖z‖ >= ρ) = exp(-ρ²/2)`` in 2-D;
    (2) the midpoint rule is second order, so its error at step h is about ``(I_2h - I_h) / 3``: we allow the full
    ``|I_2h - I_h|``.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    flow = toy_iresnet(n_blocks=2, hidden=16, n_hidden_layers=1, coeff=0.7).double()
    _set_actnorms(flow, generator)
    for layer in flow.modules():
        if isinstance(layer, LipschitzLinear):
            layer.power_iterate(200)  # converged σ̃: each layer's norm <= c, so Lip(g_t) <= c² (a tight tail bound)
    flow.eval()
    lips = [block.lipschitz_bound() for block in residual_blocks(flow)]
    assert max(lips) < 0.7**2 * (1 + 1e-6) and min(lips) > 0.3  # invertible blocks that do bend space
    scales = [float(layer.log_scale.detach().min()) for layer in flow.modules() if isinstance(layer, ActNorm)]
    inverse_lip = math.prod(1 / (1 - lip) for lip in lips) * math.prod(math.exp(-s) for s in scales)
    x_star = flow.transform.inverse(torch.zeros(1, 2, dtype=torch.float64))
    half_width = 16.0
    rho = (half_width - x_star.norm().item() - 1e-3) / inverse_lip  # 1e-3: slack for the inverse's tolerance
    tail = math.exp(-(rho**2) / 2)
    assert tail < 1e-7
    coarse, fine = (_midpoint_mass(flow.log_prob, half_width, n) for n in (320, 640))
    tolerance = tail + abs(fine - coarse)
    assert abs(fine - 1) <= tolerance and tolerance < 1e-5

    def without_block_logdets(x: torch.Tensor) -> torch.Tensor:
        # Negative control: the same flow with the residual blocks' log-dets dropped is far from normalised.
        total = x.new_zeros(x.shape[0])
        for layer in flow.transform.layers:
            x, logdet = layer(x)
            if not isinstance(layer, InvertibleResidualBlock):
                total = total + logdet
        return standard_normal_logprob(x) + total

    assert abs(_midpoint_mass(without_block_logdets, half_width, 320) - 1) > 1000 * tolerance


def test_certificate_is_exact_when_the_power_iteration_lags() -> None:
    """A stale power-iteration estimate lets a weight through Eq. 2 unscaled: the certificate reports the exact bound
    of the model as it is (here > 1, so invertibility is not certified) and leaves the model unchanged."""
    torch.manual_seed(0)
    flow = toy_iresnet(n_blocks=2, hidden=16, n_hidden_layers=2, coeff=0.8)
    first = next(m for m in flow.modules() if isinstance(m, LipschitzLinear))  # 2 -> 16
    with torch.no_grad():
        v_perp = torch.stack([-first.v[1], first.v[0]])  # orthogonal to the stored v
        first.weight.copy_(5.0 * torch.outer(first.u, v_perp))  # σ̃ = <u, W v> = 0, so W is used as is: ‖W‖₂ = 5
    flow.eval()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    lip = max(lipschitz_bounds(flow))
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())
    assert lip > 1
    _check_certificate(flow, lip, sample("8gaussians", 256, 0, "lag-test").float())


def test_nan_stops_with_a_diagnosis(tmp_path: Path, toy_params: Params, monkeypatch: pytest.MonkeyPatch) -> None:
    real = toy_density.sample

    def poisoned(name: str, n: int, seed: int, purpose: str = "train", step: int = 0) -> torch.Tensor:
        x = real(name, n, seed, purpose, step)
        return x * math.nan if purpose == "train" and step == 2 else x

    monkeypatch.setattr(toy_density, "sample", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at moons, seed 0 / i-ResNet, step 2.*toy\.lr"):
        toy_density.run(toy_params, Paths.at(tmp_path))
    assert not (tmp_path / "reports" / "metrics" / "toy.json").exists()


def test_nan_in_one_dataset_names_that_dataset(
    tmp_path: Path, toy_params: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The datasets and seeds train together (one stacked model per flow kind); a diverging one is still named."""
    real = toy_density.sample

    def poisoned(name: str, n: int, seed: int, purpose: str = "train", step: int = 0) -> torch.Tensor:
        x = real(name, n, seed, purpose, step)
        return x * math.nan if (name, seed, purpose, step) == ("checkerboard", 1, "train", 1) else x

    monkeypatch.setattr(toy_density, "sample", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at checkerboard, seed 1 / i-ResNet, step 1.*toy\.lr"):
        toy_density.run(toy_params, Paths.at(tmp_path))


@pytest.mark.parametrize("nonlin", ["elu", "sorting"])  # stacked training, and each model alone
def test_both_flows_follow_the_learning_rate_schedule(tmp_path: Path, toy_raw: dict[str, Any], nonlin: str) -> None:
    """Every optimiser step uses :func:`pipeline.training.scheduled_lr` of its flow's rate: warm-up, then cosine."""
    toy_raw["toy"].update(
        {
            "datasets": ["moons"],
            "seeds": [0],
            "steps": 6,
            "warmup_steps": 2,
            "lr_schedule": "cosine",
            "lr": 4e-3,
            "nonlin": nonlin,
        }
    )
    applied: list[float] = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"]))
    try:
        toy_density.run(parse_params(toy_raw), Paths.at(tmp_path))
    finally:
        hook.remove()
    expected = [[scheduled_lr(step, lr, 2, 6, "cosine") for step in range(6)] for lr in (4e-3, 1e-3)]  # i-ResNet, Glow
    assert applied == pytest.approx(expected[0] + expected[1], rel=1e-15)
    assert applied[:4] == pytest.approx([2e-3, 4e-3, 4e-3, 4e-3 * (1 + math.cos(math.pi / 4)) / 2], rel=1e-15)


def test_a_nonlinearity_without_closed_form_trains_each_model_alone(tmp_path: Path, toy_raw: dict[str, Any]) -> None:
    """ "sorting" has no elementwise slope: the i-ResNets fall back to per-model training with the autograd log-det."""
    toy_raw["toy"].update({"datasets": ["moons"], "steps": 2, "nonlin": "sorting"})
    flat = toy_density.run(parse_params(toy_raw), Paths.at(tmp_path))
    assert math.isfinite(flat["moons.iresnet_nll"]) and math.isfinite(flat["moons.glow_nll"])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hidden", [64, 32], "toy.hidden"),
        ("n_power_iter", 0, "toy.n_power_iter"),
        ("datasets", ["moons", "spiral"], r"toy.datasets\[1\]"),
        ("datasets", ["moons", "moons"], "without repeated"),
        ("seeds", [0, 0], "without repeated"),
        ("seeds", [], "toy.seeds"),
        ("seeds", [-1], r"toy.seeds\[0\]"),
        ("grid_size", 1, "toy.grid_size"),
        ("warmup_steps", -1, "toy.warmup_steps"),
        ("lr_schedule", "step", "toy.lr_schedule"),
    ],
)
def test_bad_params(toy_raw: dict[str, Any], key: str, value: Any, message: str) -> None:
    toy_raw["toy"][key] = value
    with pytest.raises(ParamsError, match=message):
        parse_params(toy_raw)


def test_bad_model_kind(toy_params: Params) -> None:
    with pytest.raises(ValueError, match="unknown toy model 'realnvp'"):
        toy_density.build_flow({"kind": "realnvp"})
    with pytest.raises(ValueError, match="iresnet, glow"):
        toy_density.model_config("realnvp", toy_params.toy)


def test_cli_runs_the_stage(tmp_path: Path, toy_raw: dict[str, Any]) -> None:
    import yaml

    from pipeline.cli import app

    toy_raw["toy"].update({"datasets": ["moons"], "steps": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(toy_raw, sort_keys=False))
    result = CliRunner().invoke(app, ["--root", str(tmp_path), "toy-density", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert "toy_density: results" in result.output and "moons.iresnet_nll" in result.output
    with open(tmp_path / "reports" / "curves" / "toy.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(TINY_TOY["seeds"]) * 3  # --steps overrides toy.steps


def test_dvc_stage_tracks_exactly_the_params_it_reads() -> None:
    from dataclasses import fields

    import yaml

    from pipeline.params import ToyParams

    repo = Path(__file__).resolve().parents[3]
    stage = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["toy_density"]
    assert set(stage["params"]) == {"seed"} | {f"toy.{f.name}" for f in fields(ToyParams)}
    assert {"pipeline/stages/toy_density.py", "pipeline/data/toy2d.py", "iresnet"} <= set(stage["deps"])
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]}
    # the stage's metrics file is a plain uncached out: `dvc metrics` compares only the report's summary
    expected = {
        "reports/curves/toy.csv",
        "reports/figures/fig2_toy_densities.png",
        "models/toy",
        "reports/metrics/toy.json",
    }
    assert outs == expected
