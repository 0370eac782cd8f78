"""Stage ``train_classifier``: outputs and their consistency, kill-and-resume equality, divergence and bad input,
augmentation, the resumable epoch loop, and the CLI / DVC wiring."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from iresnet.layers import ActNorm
from iresnet.models import IResNetClassifier, ResNetConfig
from pipeline.cli import app
from pipeline.data.batches import augment, batch_indices, n_batches, random_hflip, random_shift
from pipeline.data.store import load_prepared
from pipeline.errors import DataError, ParamsError
from pipeline.files import read_json
from pipeline.models.classifiers import load_classifier
from pipeline.models.specs import ClassifierSpec, coeff_label, resolve_spec
from pipeline.outputs import TRAIN_CLASSIFIER
from pipeline.params import ClassifierParams, load_params, parse_params
from pipeline.paths import Paths
from pipeline.stages import train_classifier
from pipeline.stats import outcomes
from pipeline.tracking import NullTracker
from pipeline.training import EpochLoop, ResumeFile, TrainingDiverged
from tests.pipeline.classifier_helpers import REPO, classifier_project

METRIC_KEYS = {
    "model",
    "coeff",
    "kind",
    "dataset",
    "n_train",
    "n_val",
    "n_test",
    "epochs",
    "val_error",
    "val_loss",
    "test_error",
    "test_error_stderr",
    "test_loss",
    "train_loss",
    "train_accuracy",
    "n_params",
    "throughput_img_s",
    "wall_time_s",
    "made_with",
    "seed",
    "test_correct",
}
DETERMINISTIC = (
    "val_error",
    "val_loss",
    "test_error",
    "test_loss",
    "train_loss",
    "train_accuracy",
    "epochs",
    "n_params",
)


class RecordingTracker(NullTracker):
    """A tracker that remembers what the stage logged."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.tags: dict[str, Any] = {}
        self.artifacts: list[str] = []

    def log_params(self, params: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_results(self, results: Any) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path).name)


@pytest.mark.parametrize(("label", "kind"), [("0.9", "iresnet"), ("vanilla", "vanilla"), ("batchnorm", "batchnorm")])
def test_trains_and_writes_consistent_outputs(tmp_path: Path, label: str, kind: str) -> None:
    params, paths = classifier_project(tmp_path, coeffs=["vanilla", "batchnorm", 0.9])
    tracker = RecordingTracker()
    metrics = train_classifier.run(params, paths, tracker, coeff=label)
    assert set(metrics) == METRIC_KEYS
    assert metrics["model"] == label and metrics["kind"] == kind and metrics["epochs"] == 2
    assert metrics["coeff"] == (0.9 if label == "0.9" else None)
    assert json.loads(TRAIN_CLASSIFIER.metrics_path(paths, label, 0).read_text()) == metrics

    # The model file rebuilds the trained network: its test error is the reported one.
    loaded = load_classifier(paths, ClassifierSpec.of(label), 0)
    assert loaded.model.config.coeff == metrics["coeff"] and loaded.model.config.batchnorm == (kind == "batchnorm")
    loss, error, correct = train_classifier.evaluate(loaded.model, load_prepared(paths, "test"), loaded.stats, 4)
    assert error == metrics["test_error"] and loss == pytest.approx(metrics["test_loss"], rel=1e-6)
    # The per-image outcomes, in test-split order, are the reported error's: image by image, and counted.
    assert metrics["seed"] == 0 and outcomes(metrics["test_correct"]).tolist() == correct.double().tolist()
    wrong = metrics["test_correct"].count("0")
    assert len(metrics["test_correct"]) == metrics["n_test"] and wrong / metrics["n_test"] == metrics["test_error"]
    assert metrics["test_error_stderr"] == train_classifier.binomial_stderr(error, metrics["n_test"])
    assert metrics["n_params"] == sum(p.numel() for p in loaded.model.parameters())

    # The final validation error is the last epoch's, and the saved model's.
    val_loss, val_error, _ = train_classifier.evaluate(loaded.model, load_prepared(paths, "val"), loaded.stats, 4)
    assert val_error == metrics["val_error"] and val_loss == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert metrics["n_val"] == 6

    curve = pd.read_csv(TRAIN_CLASSIFIER.curve_path(paths, "epochs", label, 0))
    assert list(curve.columns) == list(TRAIN_CLASSIFIER.curves["epochs"].columns) and curve["epoch"].tolist() == [1, 2]
    assert curve["lr"].tolist() == pytest.approx([0.05, 0.05 * 0.2], rel=1e-12)  # milestone after epoch 1
    assert curve["val_error"].iloc[-1] == metrics["val_error"]
    assert not [c for c in curve.columns if "test" in c]  # the test split is not read while training
    assert curve["train_loss"].iloc[-1] == pytest.approx(metrics["train_loss"], rel=1e-12)

    steps = [step for step, _ in tracker.metrics]
    assert steps == [1, 2]
    logged = tracker.metrics[-1][1]
    assert {"val_error", "val_loss"} <= set(logged) and not [k for k in logged if "test" in k]
    sigmas = {k: v for k, v in logged.items() if k.startswith("sigma.")}
    assert len(sigmas) == 6 and logged["sigma_max"] == max(sigmas.values())  # 2 blocks x 3 convs
    assert {"seed0.json", "seed0.csv"} <= set(tracker.artifacts)
    assert not list((paths.workspace / ".resume").glob("*.pt"))  # removed once the outputs exist


@pytest.mark.parametrize(("wrong", "n"), [(46, 1000), (0, 20), (3, 7)])
def test_binomial_stderr_is_the_std_error_of_the_mean_of_the_0_1_outcomes(wrong: int, n: int) -> None:
    """sqrt(p (1 - p) / n) is the standard error of the mean of n Bernoulli outcomes (population variance)."""
    outcomes = torch.zeros(n, dtype=torch.float64)
    outcomes[:wrong] = 1.0
    direct = float(outcomes.std(correction=0) / n**0.5)
    assert train_classifier.binomial_stderr(wrong / n, n) == pytest.approx(direct, rel=1e-12, abs=1e-300)


def test_killed_run_resumes_to_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed mid-way through epoch 3 (of 4) continues from its epoch-2 checkpoint and ends bit-identical."""
    overrides = {"epochs": 4, "milestones": [2, 3]}
    params_a, paths_a = classifier_project(tmp_path / "a", **overrides)
    params_b, paths_b = classifier_project(tmp_path / "b", **overrides)
    straight = train_classifier.run(params_a, paths_a, coeff=0.9)

    batches = n_batches(32, 8)  # 4 per epoch
    real_check = train_classifier.check_finite
    calls = {"n": 0}

    def killed_in_epoch_3(*args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2 * batches + 2:
            raise KeyboardInterrupt  # what SIGINT raises; SIGKILL would leave the same files
        real_check(*args)

    monkeypatch.setattr(train_classifier, "check_finite", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_classifier.run(params_b, paths_b, coeff=0.9)
    (checkpoint,) = (paths_b.workspace / ".resume").glob("classifier-0.9-*.pt")
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2
    assert not TRAIN_CLASSIFIER.model_path(paths_b, "0.9", 0).exists()

    monkeypatch.setattr(train_classifier, "check_finite", real_check)
    tracker = RecordingTracker()
    resumed = train_classifier.run(params_b, paths_b, tracker, coeff=0.9)
    assert tracker.tags["resumed_from_epoch"] == 2
    assert [step for step, _ in tracker.metrics] == [3, 4]  # epochs 1-2 are in the killed stage's MLflow run
    for key in DETERMINISTIC:
        assert resumed[key] == straight[key], key
    assert (
        TRAIN_CLASSIFIER.curve_path(paths_b, "epochs", "0.9", 0).read_bytes()
        == TRAIN_CLASSIFIER.curve_path(paths_a, "epochs", "0.9", 0).read_bytes()
    )
    state_a = torch.load(TRAIN_CLASSIFIER.model_path(paths_a, "0.9", 0), weights_only=True)["state_dict"]
    state_b = torch.load(TRAIN_CLASSIFIER.model_path(paths_b, "0.9", 0), weights_only=True)["state_dict"]
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not checkpoint.exists()


def test_nan_loss_stops_and_says_where(tmp_path: Path) -> None:
    params, paths = classifier_project(tmp_path)
    stats = read_json(paths.prepared / "stats.json")
    stats["mean"] = [float("nan")]  # every normalised pixel becomes NaN
    (paths.prepared / "stats.json").write_text(json.dumps(stats))  # NaN as Python writes it (write_json: null)
    with pytest.raises(TrainingDiverged, match=r"training loss became nan at model vanilla, epoch 1, batch 1\. Lower"):
        train_classifier.run(params, paths, coeff="vanilla")
    assert not TRAIN_CLASSIFIER.metrics_path(paths, "vanilla", 0).exists()


def test_bad_input_is_explained(tmp_path: Path) -> None:
    params, paths = classifier_project(tmp_path)
    with pytest.raises(ParamsError, match=r"--coeff.*0\.7.*classifier\.coeffs \(vanilla, 0\.9, 0\.5\)"):
        train_classifier.run(params, paths, coeff="0.7")
    with pytest.raises(ParamsError, match="one of the entries of classifier.coeffs"):
        train_classifier.run(params, paths, coeff=None)
    with pytest.raises(ParamsError, match="'plain'"):
        resolve_spec(params.classifier, "plain")
    assert resolve_spec(params.classifier, "0.90").label == "0.9"
    assert coeff_label("０.９") == coeff_label("0.90") == "0.9" and coeff_label("vanilla") == "vanilla"
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        ClassifierSpec.of(1.5)
    with pytest.raises(ValueError, match="unknown model 'plain'; expected vanilla, batchnorm or a coefficient"):
        ClassifierSpec.of("plain")
    assert ClassifierSpec.of("0.9") == ClassifierSpec.of(0.9) == ClassifierSpec("0.9", 0.9, "iresnet")
    assert ClassifierSpec.of("batchnorm") == ClassifierSpec("batchnorm", None, "batchnorm")
    for name in ("train.pt", "test.pt", "stats.json"):
        (paths.prepared / name).unlink()
    with pytest.raises(DataError, match="run `dvc repro prepare`"):
        train_classifier.run(params, paths, coeff="vanilla")


def test_init_actnorm_keeps_constant_channels_at_scale_one() -> None:
    torch.manual_seed(0)
    model = IResNetClassifier(ResNetConfig((1, 8, 8), (1,), (1,), (4,), coeff=0.9, inj_pad=2), n_classes=3)
    x = torch.randn(16, 1, 8, 8, dtype=torch.float32) * 3.0 + 1.0
    train_classifier.init_actnorm(model, x)  # the injective padding adds two constant (zero) channels
    first = next(m for m in model.modules() if isinstance(m, ActNorm))
    assert first.log_scale[1:].tolist() == [0.0, 0.0] and bool(first.initialized)
    with torch.no_grad():
        y = first(torch.cat([x, x.new_zeros(16, 2, 8, 8)], 1))[0]
    assert float(y[:, 0].mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(y[:, 0].std(correction=0)) == pytest.approx(1.0, rel=1e-4)
    assert float(y[:, 1:].abs().max()) == 0.0


def test_random_shift_is_a_bounded_translation_with_zero_fill() -> None:
    torch.manual_seed(0)
    x = torch.rand(40, 2, 5, 6) + 0.1  # strictly positive, so zero fill is visible
    out = random_shift(x, 2)
    for img, src in zip(out, x):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                expected = torch.zeros_like(src)
                rows, cols = slice(max(0, -dy), min(5, 5 - dy)), slice(max(0, -dx), min(6, 6 - dx))
                expected[:, rows, cols] = src[:, max(0, dy) : min(5, 5 + dy), max(0, dx) : min(6, 6 + dx)]
                matches.append(torch.equal(img, expected))
        assert sum(matches) == 1
    assert torch.equal(random_shift(x, 0), x)
    flipped = random_hflip(x)
    same = [torch.equal(a, b) for a, b in zip(flipped, x)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 40
    assert torch.equal(augment(x, 0, False), x)
    with pytest.raises(ValueError, match="shift_px must be >= 0"):
        random_shift(x, -1)


def test_batch_indices_cover_every_example_once() -> None:
    torch.manual_seed(0)
    batches = list(batch_indices(10, 4, shuffle=True))
    assert [len(b) for b in batches] == [4, 4, 2] and n_batches(10, 4) == 3
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [b.tolist() for b in batch_indices(5, 2, shuffle=False, max_batches=2)] == [[0, 1], [2, 3]]
    assert n_batches(5, 2, 2) == 2
    with pytest.raises(ValueError, match="batch_size >= 1"):
        list(batch_indices(5, 0, shuffle=False))


def test_epoch_loop_contract(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    resume = ResumeFile(tmp_path / "r.pt")
    loop = EpochLoop(resume, 3, {"model": model})
    with pytest.raises(RuntimeError, match="without loop.save"):
        for _ in loop:
            pass
    with pytest.raises(ValueError, match="out of order"):
        EpochLoop(resume, 3, {"model": model}).save(2, {})
    EpochLoop(resume, 3, {"model": model}).save(1, {"x": 1.0})
    with pytest.raises(DataError, match="does not fit this run"):
        list(EpochLoop(resume, 3, {"other": model}))
    with pytest.raises(DataError, match="does not fit this run"):
        list(EpochLoop(resume, 3, {"model": torch.nn.Linear(3, 2)}))
    loop = EpochLoop(resume, 3, {"model": model})
    assert next(iter(loop)) == 2 and loop.resumed_from == 1 and loop.history == [{"x": 1.0}]
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        EpochLoop(resume, 0, {})


def test_cli_trains_tracks_and_reports_errors(
    tmp_path: Path, fresh_store: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    classifier_project(tmp_path)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["tracking"]["enabled"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("IRESNET_TRACKING", "1")
    fresh_store(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(app, ["--root", str(tmp_path), "train-classifier", "--coeff", "0.5", "--seed", "0"])
    assert ok.exit_code == 0, ok.output
    assert "train_classifier@0.5-0: results" in ok.output and "test_error" in ok.output
    assert "test_correct" not in ok.output  # the per-image outcomes stay in the metrics file
    assert TRAIN_CLASSIFIER.model_path(Paths.at(tmp_path), "0.5", 0).is_file()
    bad = runner.invoke(app, ["--root", str(tmp_path), "train-classifier", "--coeff", "0.6", "--seed", "0"])
    assert bad.exit_code == 1 and "classifier.coeffs" in bad.output and "Traceback" not in bad.output
    unknown = runner.invoke(app, ["--root", str(tmp_path), "train-classifier", "--coeff", "0.5", "--seed", "7"])
    assert unknown.exit_code == 1 and "classifier.seeds" in unknown.output and "Traceback" not in unknown.output

    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("iresnet-classifier").experiment_id
    run, failed, _ = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    assert run.info.status == "FINISHED" and run.info.run_name == "train_classifier@0.5-0"
    assert failed.info.status == "FAILED" and "classifier.coeffs" in failed.data.tags["error"]
    history = client.get_metric_history(run.info.run_id, "val_error")
    curve = pd.read_csv(TRAIN_CLASSIFIER.curve_path(Paths.at(tmp_path), "epochs", "0.5", 0))
    per_epoch = sorted((m.step, m.value) for m in history)
    assert per_epoch == list(zip(curve["epoch"], curve["val_error"]))  # the final val_error is the curve's last point
    (final,) = client.get_metric_history(run.info.run_id, "test_error")  # once, after training: no curve
    assert (
        final.step == 0
        and final.value == read_json(TRAIN_CLASSIFIER.metrics_path(Paths.at(tmp_path), "0.5", 0))["test_error"]
    )
    assert {f"sigma.0{b}.{i}" for b in range(2) for i in range(3)} <= set(run.data.metrics)
    assert run.data.params["classifier.lr"] == "0.05" and run.data.metrics["coeff"] == 0.5
    assert run.data.params["seed"] == "0" and "result.test_correct" not in run.data.tags
    assert run.data.tags["result.kind"] == "iresnet" and run.data.tags["result.model"] == "0.5"


def test_dvc_yaml_runs_every_coefficient_and_seed_and_tracks_what_it_reads() -> None:
    from dataclasses import fields

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train_classifier"]
    assert "matrix" not in stage and stage["cmd"] == "exec python -m pipeline.cli train-classifiers"
    # Every classifier key, both lists included (one stage trains them all), not the global seed (each run's seed is
    # its entry of classifier.seeds).
    assert set(stage["params"]) == {f"classifier.{f.name}" for f in fields(ClassifierParams)}
    assert {"models/classifier": {"cache": False, "persist": True}} in stage["outs"]
    assert {
        "pipeline/stages/train_classifier.py",
        "pipeline/models/classifiers.py",
        "pipeline/data/batches.py",
        "pipeline/training.py",
        "iresnet",
        "data/prepared/train.pt",
        "data/prepared/test.pt",
        "data/prepared/stats.json",
    } <= set(stage["deps"])


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_paper_configs_hold_the_paper_settings(name: str) -> None:
    params = load_params(REPO / "configs" / name / "params.yaml")  # validates every key of every section
    c = params.classifier
    assert params.data.dataset == name
    assert c.coeffs == ("vanilla", "batchnorm", 0.9, 0.8, 0.7, 0.6, 0.5, 0.3)  # Table 2 and Fig. 6
    assert sum(c.n_blocks) == (21 if name == "mnist" else 39)  # Sec. 5.1 (MNIST), App. C.2 (CIFAR)
    assert (c.strides, c.channels, c.init_ds, c.inj_pad, c.nonlin, c.n_power_iter) == (
        (1, 2, 2),
        (32, 64, 128),
        1,
        13,
        "elu",
        1,
    )
    assert (c.optimizer, c.epochs, c.lr, c.momentum, c.weight_decay) == ("sgd", 200, 0.1, 0.9, 5e-4)
    assert (c.milestones, c.gamma, c.max_train_batches) == ((60, 120, 160), 0.2, None)
    assert c.hflip == (name != "mnist") and c.shift_px >= 2
    assert params.reconstruction.iterations[-1] == 100 and params.reconstruction.timing_iterations == (5, 20, 100)


def _weights(paths: Paths, label: str, seed: int) -> dict[str, torch.Tensor]:
    return torch.load(TRAIN_CLASSIFIER.model_path(paths, label, seed), weights_only=True)["state_dict"]


def test_the_seed_axis_trains_independent_runs_and_the_first_seed_is_the_default(tmp_path: Path) -> None:
    """Each seed is its own run (its own weights and files); the run's seed is its matrix item, not the global
    ``seed``; ``seed=None`` trains the first entry of ``classifier.seeds``, the model the other stages read."""
    params, paths = classifier_project(tmp_path / "a", coeffs=[0.9], seeds=[0, 1])
    first = train_classifier.run(params, paths, coeff=0.9, seed=0)
    second = train_classifier.run(params, paths, coeff=0.9, seed=1)
    a, b = _weights(paths, "0.9", 0), _weights(paths, "0.9", 1)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # another initialisation and data order
    assert (first["seed"], second["seed"]) == (0, 1)
    assert TRAIN_CLASSIFIER.metrics_path(paths, "0.9", 1).is_file()

    # The global seed plays no part; the default is the first seed; both give seed 0's bytes.
    _, other_paths = classifier_project(tmp_path / "b", coeffs=[0.9], seeds=[0, 1])
    raw = yaml.safe_load((tmp_path / "b" / "params.yaml").read_text())
    train_classifier.run(parse_params({**raw, "seed": 5}), other_paths, coeff=0.9)
    assert (
        TRAIN_CLASSIFIER.model_path(other_paths, "0.9", 0).read_bytes()
        == TRAIN_CLASSIFIER.model_path(paths, "0.9", 0).read_bytes()
    )
    with pytest.raises(ParamsError, match="classifier.seeds"):
        train_classifier.run(params, paths, coeff=0.9, seed=3)
