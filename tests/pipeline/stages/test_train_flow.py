"""The ``train_flow`` stage on an 8x8 dataset: outputs, warm-up schedule, ZCA units, kill-and-resume, NaN diagnosis."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

from iresnet.logdet import LogDetSettings
from iresnet.models import FlowConfig, MultiscaleFlow, bits_per_dim
from iresnet.priors import standard_normal_logprob
from pipeline.data.batches import evenly_spaced
from pipeline.data.preprocess import ZCA
from pipeline.errors import ParamsError
from pipeline.files import read_json
from pipeline.models.flows import (
    FlowSpace,
    fixed_noise_inputs,
    flow_config,
    load_trained_flow,
    logdet_settings,
)
from pipeline.outputs import TRAIN_FLOW
from pipeline.params import EvaluateFlowParams, FlowParams, LogdetBiasParams, parse_params
from pipeline.stages import train_flow
from pipeline.training import TrainingDiverged, config_from_dict, config_to_dict
from tests.pipeline.flow_helpers import prepared_project, tiny_flow_params, trained_project

REPO = Path(__file__).resolve().parents[3]

FLOW_KEYS = {
    "made_with",
    "dataset",
    "zca",
    "n_dims",
    "dims",
    "epochs",
    "train_bpd",
    "val_bpd",
    "val_logpz",
    "val_logdet",
    "recon_error",
    "estimator",
    "n_terms",
    "samples_converged",
    "samples_converged_fraction",
    "samples_max_residual",
    "samples_max_iterations",
    "n_params",
    "throughput_img_s",
    "wall_time_s",
}


def test_stage_outputs_and_applied_learning_rates(
    tiny_project: Path, tiny_params: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied: list[float] = []
    read: list[str] = []
    real_load = train_flow.load_prepared
    monkeypatch.setattr(train_flow, "load_prepared", lambda paths, split: read.append(split) or real_load(paths, split))
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"]))
    try:
        params, paths, metrics = trained_project(tiny_project, tiny_params)
    finally:
        hook.remove()
    assert read == ["train", "val"]  # the test split is evaluate_flow's alone
    # 26 train images (30 less 4 for validation) in batches of 8: 4 steps per epoch; the warm-up spans the first epoch.
    lr = params.flow.lr
    assert applied == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr, lr, lr, lr, lr], rel=1e-15)

    assert set(metrics) == FLOW_KEYS and read_json(TRAIN_FLOW.metrics_path(paths)) == metrics
    assert metrics["n_dims"] == 64 and metrics["dims"] == "64 = 1x8x8" and metrics["zca"] is False
    assert metrics["epochs"] == 2 and metrics["dataset"] == "idx:tiny"
    assert metrics["estimator"] == logdet_settings(params.flow).estimator
    assert math.isfinite(metrics["train_bpd"]) and metrics["recon_error"] < 1e-3
    curve = pd.read_csv(TRAIN_FLOW.curve_path(paths, "epochs"))
    assert tuple(curve.columns) == TRAIN_FLOW.curves["epochs"].columns and curve["epoch"].tolist() == [1, 2]
    assert curve["lr"].tolist() == [lr, lr] and curve["val_bpd"].iloc[-1] == metrics["val_bpd"]
    assert not [c for c in curve.columns if "test" in c]
    assert (TRAIN_FLOW.figure_path(paths, "fig5")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((paths.root / ".resume").glob("*.pt"))  # removed once the outputs are written

    # The saved model is the trained one: re-evaluating it on the validation split reproduces the last epoch's
    # numbers exactly.
    flow = load_trained_flow(paths)
    assert flow.meta["n_dims"] == 64 and flow.dataset == "idx:tiny"
    assert sum(t.numel() for t in flow.model.parameters()) == metrics["n_params"]
    from pipeline.data.store import load_prepared

    val_images, _ = load_prepared(paths, "val")
    x = fixed_noise_inputs(flow.space, val_images, params.seed + 1)
    again = train_flow.evaluate_epoch(flow.model, flow.space, x, 12, params.seed + 1)
    assert again["bpd"] == metrics["val_bpd"] and again["logdet"] == metrics["val_logdet"]
    assert again["logpz"] == metrics["val_logpz"]


def test_kill_and_resume_gives_identical_results(
    tmp_path: Path, tiny_params: dict, make_idx_folder: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = [tmp_path / "straight", tmp_path / "killed"]
    for root in roots:
        make_idx_folder(root / "tiny")
    raw = tiny_flow_params(tiny_params, epochs=3)
    params, straight = prepared_project(roots[0], raw)
    expected = train_flow.run(params, straight)

    params, killed = prepared_project(roots[1], raw)
    real_epoch = train_flow.train_epoch
    calls = {"n": 0}

    def dies_in_epoch_2(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        result = real_epoch(*args, **kwargs)  # epoch 2 changes the model and RNGs, then the process "dies"
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(train_flow, "train_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_flow.run(params, killed)
    assert len(list((killed.root / ".resume").glob("*.pt"))) == 1
    monkeypatch.setattr(train_flow, "train_epoch", real_epoch)
    resumed = train_flow.run(params, killed)

    timing = {"wall_time_s", "throughput_img_s"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in expected.items() if k not in timing
    }
    assert (
        TRAIN_FLOW.curve_path(killed, "epochs").read_bytes() == TRAIN_FLOW.curve_path(straight, "epochs").read_bytes()
    )
    a = torch.load(killed.models / "flow" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(straight.models / "flow" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flow_options_train_and_reload(tiny_project: Path, tiny_params: dict) -> None:
    """Logit layer, conditional prior, ActNorm on 12 images and the cosine schedule together; a single-scale flow."""
    applied: list[float] = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"]))
    try:
        params, paths, metrics = trained_project(
            tiny_project,
            tiny_params,
            prior="conditional",
            logit_alpha=1e-6,
            actnorm_init_images=12,
            lr_schedule="cosine",
        )
    finally:
        hook.remove()
    lr = params.flow.lr
    assert applied == pytest.approx([train_flow.scheduled_lr(s, lr, 4, 8, "cosine") for s in range(8)], rel=1e-15)
    assert math.isfinite(metrics["val_bpd"]) and metrics["recon_error"] < 1e-3
    flow = load_trained_flow(paths)
    assert flow.model.config.prior == "conditional" and flow.model.config.logit_alpha == 1e-6
    samples = flow.model.sample(2, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()

    _, paths, metrics = trained_project(tiny_project, tiny_params, epochs=1, factor_out=False)
    assert len(load_trained_flow(paths).model.priors) == 1 and math.isfinite(metrics["val_bpd"])


def test_actnorm_initialises_on_the_given_images_only(tiny_project: Path, tiny_params: dict) -> None:
    """``initialise_actnorm`` standardises the first ActNorm's output on those images and leaves the rest as it was."""
    params, paths = prepared_project(tiny_project, tiny_flow_params(tiny_params, actnorm_init_images=12))
    model = MultiscaleFlow(flow_config(params.flow, (1, 8, 8)))
    before = {k: v.clone() for k, v in model.state_dict().items() if "actnorm" not in k}
    from pipeline.data.store import load_prepared

    images, _ = load_prepared(paths, "train")
    x = fixed_noise_inputs(FlowSpace((1, 8, 8)), images[evenly_spaced(len(images), 12)], 5)
    rng = torch.get_rng_state()
    train_flow.initialise_actnorm(model, x)
    assert torch.equal(torch.get_rng_state(), rng) and not model.training  # no random draws
    first = model.stages[0][1]  # after the squeeze
    assert bool(first.initialized)
    out, _ = first(model.stages[0][0](x)[0])
    assert (
        out.mean(dim=(0, 2, 3)).abs().max() < 1e-5 and (out.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    )
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert all(k.endswith(("bias", "log_scale", "initialized")) for k in changed) and changed


def test_config_files_before_the_flow_options_still_load(repo_params: dict) -> None:
    plain = config_to_dict(flow_config(parse_params(repo_params).flow, (1, 28, 28)))
    old = {k: v for k, v in plain.items() if k not in ("logit_alpha", "prior", "factor_out")}
    config = config_from_dict(FlowConfig, old)
    off = {"logit_alpha": None, "prior": "diagonal", "factor_out": True}  # what a file without the keys meant
    assert config == dataclasses.replace(flow_config(parse_params(repo_params).flow, (1, 28, 28)), **off)
    assert config.logit_alpha is None and config.prior == "diagonal" and config.factor_out


@pytest.mark.parametrize(("estimator", "library"), [("truncated", "series"), ("unbiased", "unbiased")])
def test_other_estimators_train(tiny_project: Path, tiny_params: dict, estimator: str, library: str) -> None:
    _, _, metrics = trained_project(tiny_project, tiny_params, epochs=1, estimator=estimator, memory_efficient=False)
    assert metrics["estimator"] == library and math.isfinite(metrics["val_bpd"])


def test_nan_stops_with_a_diagnosis(tiny_project: Path, tiny_params: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    params, paths = prepared_project(tiny_project, tiny_flow_params(tiny_params))
    monkeypatch.setattr(MultiscaleFlow, "log_prob", lambda self, x: torch.full((x.shape[0],), float("nan")))
    with pytest.raises(TrainingDiverged, match=r"training loss \(bits/dim\) became nan at epoch 1, batch 1.*Lip\(g\)"):
        train_flow.run(params, paths)


def test_zca_space_reports_original_units() -> None:
    """A standard normal on whitened data is the Gaussian N(mean, W⁻²) on the original pixels: same bits/dim."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(50, 1, 3, 3, generator=gen, dtype=torch.float64)
    zca = ZCA.fit(images, 0.01)
    space = FlowSpace((1, 3, 3), zca)
    x = torch.rand(4, 1, 3, 3, generator=gen, dtype=torch.float64) - 0.5  # dequantised pixels
    z = zca.whiten(x + 0.5)
    gaussian = torch.distributions.MultivariateNormal(zca.mean, precision_matrix=zca.matrix @ zca.matrix)
    expected = bits_per_dim(gaussian.log_prob((x + 0.5).reshape(4, 9)), 9)
    torch.testing.assert_close(space.bpd(standard_normal_logprob(z)), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(space.to_images(z), (x + 0.5).clamp(0, 1), rtol=0, atol=1e-12)
    assert space.n_dims == 9 and space.log_det_correction == zca.logdet


def test_zca_training_is_marked_and_corrected(tiny_project: Path, tiny_params: dict) -> None:
    params, paths, metrics = trained_project(tiny_project, tiny_params, use_zca=True, epochs=1)
    assert metrics["zca"] is True and metrics["n_dims"] == 64
    flow = load_trained_flow(paths)
    assert flow.space.zca is not None and flow.space.log_det_correction == flow.meta["zca_logdet"] != 0


def test_estimator_params_map_to_library_settings(repo_params: dict) -> None:
    flow = parse_params(repo_params).flow
    cases = {
        ("truncated", False): LogDetSettings("series", flow.n_terms, flow.n_samples),
        ("truncated", True): LogDetSettings("neumann", flow.n_terms, flow.n_samples),
        ("unbiased", False): LogDetSettings("unbiased", n_samples=flow.n_samples, n_exact_terms=flow.n_terms),
    }
    for (estimator, efficient), expected in cases.items():
        raw = copy.deepcopy(repo_params)
        raw["flow"].update({"estimator": estimator, "memory_efficient": efficient})
        assert logdet_settings(parse_params(raw).flow) == expected
    raw = copy.deepcopy(repo_params)
    raw["flow"].update({"estimator": "unbiased", "memory_efficient": True})
    with pytest.raises(ParamsError, match="flow.memory_efficient"):
        parse_params(raw)


def test_evenly_spaced_subset_covers_a_class_sorted_split() -> None:
    labels = torch.arange(10).repeat_interleave(10)  # 100 examples, 10 per class, sorted by class
    assert labels[evenly_spaced(100, 10)].tolist() == list(range(10))  # one per class
    assert evenly_spaced(100, 10)[[0, -1]].tolist() == [0, 99]  # first and last included
    assert torch.equal(evenly_spaced(100, None), torch.arange(100)) and torch.equal(
        evenly_spaced(100, 500), torch.arange(100)
    )
    with pytest.raises(ValueError, match="k must be >= 1"):
        evenly_spaced(100, 0)


def test_config_round_trip(repo_params: dict) -> None:
    config = flow_config(parse_params(repo_params).flow, (1, 28, 28))
    plain = config_to_dict(config)
    assert config_from_dict(FlowConfig, plain) == config
    assert isinstance(plain["n_blocks"], list) and isinstance(plain["logdet"], dict)  # what torch.load accepts
    assert config_from_dict(FlowConfig, {**plain, "n_blocks": tuple(plain["n_blocks"])}) == config  # older files
    with pytest.raises(ValueError, match="^unknown: Unexpected keyword argument"):
        config_from_dict(FlowConfig, {**plain, "unknown": 1})
    with pytest.raises(ValueError, match=r"^logdet\.n_term: Unexpected"):  # inside a nested config too
        config_from_dict(FlowConfig, {**plain, "logdet": {**plain["logdet"], "n_term": 3}})
    with pytest.raises(ValueError, match=r"^FlowConfig: Value error, coeff must lie in \(0, 1\)"):  # its own checks
        config_from_dict(FlowConfig, {**plain, "coeff": 1.5})
    assert MultiscaleFlow(config).n_dims == 784


@pytest.mark.parametrize(
    ("stage", "section", "cls"),
    [
        ("train_flow", "flow", FlowParams),
        ("evaluate_flow", "evaluate_flow", EvaluateFlowParams),
        ("logdet_bias", "logdet_bias", LogdetBiasParams),
    ],
)
def test_dvc_yaml_tracks_exactly_the_params_each_flow_stage_reads(stage: str, section: str, cls: type) -> None:
    """Each flow stage reads ``seed`` and every leaf of its own section, and nothing else (evaluate_flow also the
    classifier seeds: it scores samples with the first seed's classifier)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    extra = {"classifier.seeds"} if stage == "evaluate_flow" else set()
    assert set(spec["params"]) == {"seed"} | extra | {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    assert f"pipeline/stages/{stage}.py" in spec["deps"] and "iresnet" in spec["deps"]


BEFORE_FLOW_OPTIONS = "d98fe65"  # the last commit before flow.{prior: conditional, factor_out, logit_alpha, ...}
NEW_FLOW_KEYS = ("factor_out", "logit_alpha", "actnorm_init_images", "lr_schedule")
NEW_TOY_KEYS = ("warmup_steps", "lr_schedule", "glow_scale_cap", "seeds", "n_val")


def _archive_before_flow_options() -> bytes:
    """``iresnet/`` and ``pipeline/`` of :data:`BEFORE_FLOW_OPTIONS` as a tar archive.

    Skips, with the reason in the summary (``-ra``), where the history is not there: no git, a tree that is not a git
    checkout, or a shallow clone (CI services often clone one commit deep; ``git fetch --unshallow`` brings the check
    back). A full clone that lacks the commit fails: there the history was rewritten and the check is lost."""
    if shutil.which("git") is None:
        pytest.skip(f"needs git to read the code of commit {BEFORE_FLOW_OPTIONS}; git is not installed")
    inside = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-inside-work-tree"], capture_output=True)
    if inside.returncode != 0:
        pytest.skip(f"needs the git history (commit {BEFORE_FLOW_OPTIONS}); {REPO} is not a git checkout")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", BEFORE_FLOW_OPTIONS, "iresnet", "pipeline"], capture_output=True
    )
    if archive.returncode != 0:
        shallow = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"], capture_output=True, text=True
        ).stdout.strip()
        what = (
            f"commit {BEFORE_FLOW_OPTIONS} (the code before the flow options, which this bit-identity check trains "
            f"against) is not in {REPO}"
        )
        if shallow == "true":
            pytest.skip(f"SKIPPED A BIT-IDENTITY CHECK: {what}, a shallow clone; run `git fetch --unshallow`")
        pytest.fail(f"{what}. git said: {archive.stderr.decode().strip()}", pytrace=False)
    return archive.stdout


def test_flow_options_off_train_bit_identically_to_the_code_before_them(
    tiny_project: Path, tiny_params: dict, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The tiny flow trained with the new options switched off (as :data:`TINY_FLOW` has them) equals, bit for bit,
    the one trained by the code of the commit before them (run from a ``git archive`` of it, on the same prepared
    data)."""
    old_code = tmp_path_factory.mktemp("old_code")
    subprocess.run(["tar", "-x", "-C", str(old_code)], input=_archive_before_flow_options(), check=True)

    params, paths, _ = trained_project(tiny_project, tiny_params)
    old_root = tmp_path_factory.mktemp("old_project")
    shutil.copytree(paths.root / "data", old_root / "data")
    raw = params.to_dict()
    for key in NEW_FLOW_KEYS:
        del raw["flow"][key]
    for key in ("bf16", "seeds"):  # added later still, and unknown to that code's strict params
        del raw["classifier"][key]
    for key in NEW_TOY_KEYS:  # added after that commit (the toy stage's schedule, Glow cap, seeds, validation size)
        del raw["toy"][key]
    for key in ("sample_classifier", "n_scored_samples"):  # added later still (evaluate_flow's sample scoring)
        del raw["evaluate_flow"][key]
    del raw["data"]["val_fraction"]  # added later still (the validation split; that code evaluates on test)
    del raw["glow_classifier"]  # added later still (Table 3)
    (old_root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    script = (  # one thread, as the tests run (tests/conftest.py): reductions then add up in the same order
        "import torch; torch.set_num_threads(1); "
        "from pipeline.params import load_params; from pipeline.paths import Paths; "
        "from pipeline.stages import train_flow; paths = Paths.at('.'); "
        "train_flow.run(load_params(paths.params_file), paths)"
    )
    env = {**os.environ, "PYTHONPATH": str(old_code), "IRESNET_TRACKING": "0"}
    subprocess.run([sys.executable, "-c", script], cwd=old_root, env=env, check=True, capture_output=True)
    old = torch.load(old_root / "models" / "flow" / "model.pt", weights_only=True)["state_dict"]
    new = torch.load(TRAIN_FLOW.model_path(paths), weights_only=True)["state_dict"]
    assert list(old) == list(new) and all(torch.equal(old[k], new[k]) for k in old)
