"""Stage ``train_glow_classifier`` (Table 3): matched parameter counts of the default profile, params validation,
outputs on tiny data, divergence recorded as a result (and resumed as one), and the DVC / CLI wiring."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from iresnet.glow import GlowClassifier, GlowConfig
from iresnet.models import IResNetClassifier, ResNetConfig
from pipeline.cli import app
from pipeline.data.store import load_channel_stats, load_prepared
from pipeline.errors import ParamsError
from pipeline.files import read_json
from pipeline.models.glow import build_model
from pipeline.models.glow_specs import GlowRun
from pipeline.outputs import TRAIN_GLOW_CLASSIFIER
from pipeline.params import Params, load_params, parse_params
from pipeline.paths import Paths
from pipeline.stages import train_classifier, train_glow_classifier
from pipeline.stats import outcomes
from pipeline.training import TrainingDiverged, config_from_dict
from tests.pipeline.classifier_helpers import REPO, classifier_project

# The default profile's parameter counts (MNIST 1x28x28, 10 classes), as params.yaml states them.
DEFAULT_COUNTS = {"affine": 28_654, "additive": 28_216, "iresnet": 28_630}
TINY_GLOW = {"n_steps": [1, 1], "channels": {"affine": [4, 4], "additive": [4, 6], "iresnet": [4, 4]}}
METRIC_KEYS = {
    "model",
    "kind",
    "optimizer",
    "optimizer_lr",
    "optimizer_momentum",
    "optimizer_weight_decay",
    "papers_optimizer",
    "seed",
    "dataset",
    "n_train",
    "n_val",
    "n_test",
    "epochs",
    "diverged",
    "diverged_at",
    "val_error",
    "val_loss",
    "test_error",
    "test_error_stderr",
    "test_loss",
    "train_loss",
    "train_accuracy",
    "test_correct",
    "n_params",
    "throughput_img_s",
    "wall_time_s",
    "made_with",
}
DETERMINISTIC = (
    "val_error",
    "val_loss",
    "test_error",
    "test_loss",
    "train_loss",
    "epochs",
    "diverged",
    "diverged_at",
    "test_correct",
)


def glow_project(root: Path, **glow: Any) -> tuple[Params, Paths]:
    """The tiny classification project (8x8 images, 2 epochs of 4 batches) with a tiny ``glow_classifier``."""
    _, paths = classifier_project(root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["glow_classifier"].update({**copy.deepcopy(TINY_GLOW), **glow})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse_params(raw), paths


def test_default_profile_counts_match_within_10_percent() -> None:
    """The Glow-style i-ResNet has Glow's steps per scale and tensor shapes, and parameters within 10% of each Glow."""
    params = load_params(REPO / "params.yaml")
    built = {m: build_model(params, GlowRun.of(f"{m}-sgd"), (1, 28, 28), 10) for m in DEFAULT_COUNTS}
    counts = {m: sum(p.numel() for p in model.parameters()) for m, (_, model) in built.items()}
    assert counts == DEFAULT_COUNTS
    for glow in ("affine", "additive"):
        assert abs(counts["iresnet"] / counts[glow] - 1) <= 0.10
    iresnet_config, iresnet = built["iresnet"]
    assert isinstance(iresnet, IResNetClassifier) and iresnet_config.n_blocks == params.glow_classifier.n_steps
    assert iresnet_config.coeff == params.glow_classifier.coeff
    for glow in ("affine", "additive"):
        config, model = built[glow]
        assert isinstance(model, GlowClassifier) and model.feature_shape == iresnet.feature_shape
        assert (config.n_steps, config.strides, config.init_ds) == (
            iresnet_config.n_blocks,
            iresnet_config.strides,
            iresnet_config.init_ds,
        )


def _set(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return out


BAD = [
    ("glow_classifier.runs", ["affine-rmsprop"], "glow_classifier.runs[0]", "<model>-<optimizer>"),
    ("glow_classifier.runs", ["affine-sgd", "glow-sgd"], "glow_classifier.runs[1]", "'affine'"),
    ("glow_classifier.runs", ["affine-sgd", "affine-sgd"], "glow_classifier.runs", "repeated"),
    ("glow_classifier.seeds", [], "glow_classifier.seeds", "at least 1"),
    ("glow_classifier.n_steps", [2, 2, 2], "glow_classifier.strides", "equal length"),
    ("glow_classifier.channels.iresnet", [8], "glow_classifier.strides", "channels.iresnet 1"),
    ("glow_classifier.channels.additive", ..., "glow_classifier.channels.additive", "a value"),
    ("glow_classifier.strides", [2, 2], "glow_classifier.strides", "divide the 28x28"),  # with init_ds 2: /8
    ("glow_classifier.coeff", 1.0, "glow_classifier.coeff", "< 1"),
    ("glow_classifier.lr", 0, "glow_classifier.lr", "> 0"),
    ("glow_classifier.inj_pad", -1, "glow_classifier.inj_pad", ">= 0"),
    ("glow_classifier.colour", 1, "glow_classifier.colour", "no such key"),
]


@pytest.mark.parametrize(("dotted", "value", "key", "allowed"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_params_name_their_key(repo_params: dict, dotted: str, value: Any, key: str, allowed: str) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(_set(repo_params, dotted, value))
    assert info.value.key == key
    assert f"`{key}`" in str(info.value) and allowed in str(info.value), str(info.value)


def test_a_layout_no_coupling_can_split_is_a_params_error(repo_params: dict) -> None:
    params = parse_params(_set(_set(repo_params, "glow_classifier.init_ds", 1), "glow_classifier.strides", [1, 2]))
    with pytest.raises(ParamsError, match=r"glow_classifier.inj_pad.*needs at least 2"):
        build_model(params, GlowRun.of("affine-adamax"), (1, 28, 28), 10)
    assert GlowRun.of("iresnet-sgd").papers_optimizer and GlowRun.of("affine-adam").papers_optimizer
    assert not GlowRun.of("additive-sgd").papers_optimizer and not GlowRun.of("iresnet-adamax").papers_optimizer


@pytest.mark.parametrize("run", ["affine-adamax", "additive-sgd", "iresnet-sgd"])
def test_trains_and_writes_consistent_outputs(tmp_path: Path, run: str) -> None:
    params, paths = glow_project(tmp_path)
    metrics = train_glow_classifier.run(params, paths, run_label=run, seed=0)
    assert set(metrics) == METRIC_KEYS
    assert json.loads(TRAIN_GLOW_CLASSIFIER.metrics_path(paths, run, 0).read_text()) == metrics
    assert metrics["model"] == run and metrics["epochs"] == 2 and metrics["diverged"] is False
    assert metrics["diverged_at"] is None
    expected_lr = params.glow_classifier.lr if run.endswith("adamax") else params.classifier.lr
    assert metrics["optimizer_lr"] == expected_lr and metrics["papers_optimizer"] == (run != "additive-sgd")

    # The model file rebuilds the trained network; its outcome on each test image is the reported one.
    state = torch.load(TRAIN_GLOW_CLASSIFIER.model_path(paths, run, 0), weights_only=True)
    model = (
        IResNetClassifier(config_from_dict(ResNetConfig, state["config"]), state["n_classes"])
        if run.startswith("iresnet")
        else GlowClassifier(config_from_dict(GlowConfig, state["config"]), state["n_classes"])
    )
    model.load_state_dict(state["state_dict"])
    _, error, correct = train_classifier.evaluate(model, load_prepared(paths, "test"), load_channel_stats(paths), 4)
    assert error == metrics["test_error"] and outcomes(metrics["test_correct"]).tolist() == correct.double().tolist()
    assert metrics["n_params"] == sum(p.numel() for p in model.parameters())

    curve = pd.read_csv(TRAIN_GLOW_CLASSIFIER.curve_path(paths, "epochs", run, 0))
    assert list(curve.columns) == list(TRAIN_GLOW_CLASSIFIER.curves["epochs"].columns) and curve["epoch"].tolist() == [
        1,
        2,
    ]
    assert curve["diverged_batch"].tolist() == [0, 0] and curve["val_error"].iloc[-1] == metrics["val_error"]
    assert "test_error" not in curve.columns  # the test split is read once, after training
    assert not list((paths.workspace / ".resume").glob("*.pt"))


def diverging_at(call: int, real: Callable[..., None]) -> Callable[..., None]:
    """A ``check_finite`` whose ``call``-th call finds a NaN loss (what a blown-up optimiser step leads to)."""
    calls = {"n": 0}

    def check(*args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == call:
            raise TrainingDiverged("the training loss became nan at the simulated step. Lower the learning rate.")
        real(*args)

    return check


def test_divergence_is_recorded_as_a_result_and_survives_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN at batch 2 of epoch 2 (4 batches per epoch): the stage ends normally with the divergence in its metrics.
    Killed after saving that epoch, a resumed run reports the same divergence and results."""
    real = train_classifier.check_finite
    params, paths = glow_project(tmp_path / "a")
    monkeypatch.setattr(train_classifier, "check_finite", diverging_at(6, real))
    straight = train_glow_classifier.run(params, paths, run_label="affine-sgd", seed=0)
    assert straight["diverged"] is True and straight["epochs"] == 2
    assert straight["diverged_at"] == {
        "epoch": 2,
        "batch": 2,
        "step": 6,
        "message": "diverged at epoch 2, batch 2 (optimiser step 6): the training loss became NaN or infinite",
    }
    assert len(straight["test_correct"]) == straight["n_test"]  # the model as it was when it diverged, scored
    curve = pd.read_csv(TRAIN_GLOW_CLASSIFIER.curve_path(paths, "epochs", "affine-sgd", 0))
    assert curve["diverged_batch"].tolist() == [0, 2] and curve["train_loss"].isna().tolist() == [False, True]

    params_b, paths_b = glow_project(tmp_path / "b")
    monkeypatch.setattr(train_classifier, "check_finite", diverging_at(6, real))

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # after the diverged epoch was saved, before the outputs

    monkeypatch.setattr(train_glow_classifier, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        train_glow_classifier.run(params_b, paths_b, run_label="affine-sgd", seed=0)
    monkeypatch.undo()
    resumed = train_glow_classifier.run(params_b, paths_b, run_label="affine-sgd", seed=0)
    for key in DETERMINISTIC:
        assert resumed[key] == straight[key], key


def test_a_real_blow_up_is_recorded_with_strict_json(tmp_path: Path) -> None:
    """SGD at lr 1e8 really blows Glow up (no simulated NaN): the run ends with the divergence recorded and a
    metrics file without NaN tokens (non-finite losses are written as null)."""
    _, paths = glow_project(tmp_path)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["classifier"]["lr"] = 1e8
    metrics = train_glow_classifier.run(parse_params(raw), paths, run_label="affine-sgd", seed=0)
    assert metrics["diverged"] is True and metrics["diverged_at"]["epoch"] == 1 and metrics["epochs"] == 1
    text = TRAIN_GLOW_CLASSIFIER.metrics_path(paths, "affine-sgd", 0).read_text()

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in the metrics JSON")

    assert json.loads(text, parse_constant=refuse)["train_loss"] is None  # strict JSON: no NaN / Infinity


def test_a_non_finite_loss_before_any_step_stays_an_error(tmp_path: Path) -> None:
    params, paths = glow_project(tmp_path)
    stats = read_json(paths.prepared / "stats.json")
    stats["mean"] = [float("nan")]  # bad data, not divergence
    (paths.prepared / "stats.json").write_text(json.dumps(stats))  # NaN as Python writes it (write_json: null)
    with pytest.raises(TrainingDiverged, match="epoch 1, batch 1"):
        train_glow_classifier.run(params, paths, run_label="affine-adamax", seed=0)
    assert not TRAIN_GLOW_CLASSIFIER.metrics_path(paths, "affine-adamax", 0).exists()


def test_bad_run_or_seed_is_explained(tmp_path: Path) -> None:
    params, paths = glow_project(tmp_path, runs=["affine-adamax", "iresnet-sgd"])
    with pytest.raises(ParamsError, match=r"--run.*glow_classifier.runs \(affine-adamax, iresnet-sgd\)"):
        train_glow_classifier.run(params, paths, run_label="additive-sgd")
    with pytest.raises(ParamsError, match="glow_classifier.seeds"):
        train_glow_classifier.run(params, paths, run_label="affine-adamax", seed=3)


def test_cli_tracks_a_diverged_run_as_finished(
    tmp_path: Path, fresh_store: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the CLI into a real MLflow store: a run that diverges exits 0, its MLflow run is FINISHED with the
    diverged epoch's NaN train loss logged, and its result tags say where it stopped."""
    from mlflow import MlflowClient

    glow_project(tmp_path)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["tracking"]["enabled"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("IRESNET_TRACKING", "1")
    fresh_store(tmp_path)
    monkeypatch.setattr(train_classifier, "check_finite", diverging_at(6, train_classifier.check_finite))
    args = ["--root", str(tmp_path), "train-glow-classifier", "--run", "additive-sgd", "--seed", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "train_glow_classifier@additive-sgd-0: results" in result.output and "test_correct" not in result.output

    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("iresnet-classifier").experiment_id
    (run,) = client.search_runs([experiment])
    assert run.info.status == "FINISHED" and run.info.run_name == "train_glow_classifier@additive-sgd-0"
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert [step for step, _ in losses] == [1, 2] and math.isnan(losses[1][1])
    assert run.data.params["glow_classifier.lr"] == "0.01" and run.data.params["run"] == "additive-sgd"
    assert run.data.metrics["diverged"] == 1.0 and "epoch 2, batch 2" in run.data.tags["result.diverged_at"]


def test_dvc_yaml_runs_every_run_and_seed_and_tracks_what_it_reads() -> None:
    from dataclasses import fields

    from pipeline.params import GlowChannels, GlowClassifierParams

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train_glow_classifier"]
    assert "matrix" not in stage and stage["cmd"] == "exec python -m pipeline.cli train-glow-classifiers"
    glow = {f"glow_classifier.{f.name}" for f in fields(GlowClassifierParams)}
    glow = (glow - {"glow_classifier.channels"}) | {f"glow_classifier.channels.{f.name}" for f in fields(GlowChannels)}
    read = glow | {f"classifier.{key}" for key in train_glow_classifier.CLASSIFIER_KEYS}
    assert set(stage["params"]) == read
    assert {"reports/metrics/glow_classifier": {"cache": False, "persist": True}} in stage["outs"]


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_paper_configs_hold_glows_settings(name: str) -> None:
    """Glow's CIFAR10 model (Kingma & Dhariwal 2018): scales of 32 steps, width 512, Adamax at lr 1e-3; the i-ResNets
    with Table 2's SGD (lr 0.1), Glow also with it (Sec. 5.2)."""
    g = load_params(REPO / "configs" / name / "params.yaml").glow_classifier
    assert set(g.runs) == {"affine-adamax", "additive-adamax", "iresnet-sgd", "affine-sgd", "additive-sgd"}
    assert set(g.n_steps) == {32} and g.lr == 1e-3 and g.coeff == 0.9
    assert {w for m in ("affine", "additive", "iresnet") for w in getattr(g.channels, m)} == {512}
    assert g.init_ds == 2 and len(g.strides) == (2 if name == "mnist" else 3)
