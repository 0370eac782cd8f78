"""MLflow as its users expect it: a trained classifier is an MLflow model (signature, input example) that loads back
by its ``models:/`` URI and computes what the model file computes; the prepared data are the run's dataset inputs
with their digest; MLflow's context tags and the matrix item (``coeff``) are on the run."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.store import load_channel_stats, load_prepared, split_file
from pipeline.models.classifiers import load_classifier
from pipeline.models.specs import resolve_spec
from tests.pipeline.classifier_helpers import classifier_project


def test_a_trained_classifier_is_an_mlflow_model_with_its_inputs(
    tmp_path: Path, fresh_store: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pytorch
    from mlflow import MlflowClient

    params, paths = classifier_project(tmp_path, epochs=1)
    fresh_store(tmp_path)
    monkeypatch.setenv("IRESNET_TRACKING", "1")
    result = CliRunner().invoke(
        app,
        [
            "--root",
            str(tmp_path),
            "-S",
            "tracking.enabled=true",
            "train-classifier",
            "--coeff",
            "０.９０",
            "--seed",
            "0",
        ],
    )  # full-width digits and a trailing zero: the run is named (and the model found) as for 0.9
    assert result.exit_code == 0, result.output

    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("iresnet-classifier").experiment_id])
    assert run.data.params["coeff"] == "0.9"
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == "iresnet train_classifier@0.9-0"

    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}  # the test split: read by the final evaluation
    for split, dataset in inputs.items():
        assert dataset.digest == hashlib.md5(split_file(paths, split).read_bytes()).hexdigest()

    (logged,) = client.search_logged_models([run.info.experiment_id])  # the runs page's Models column
    assert logged.source_run_id == run.info.run_id and logged.status == "READY"
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    assert logged.artifact_location.startswith((tmp_path.resolve() / "mlartifacts" / "classifier").as_uri())
    assert not (Path.cwd() / "mlruns").exists()
    model = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    original = load_classifier(paths, resolve_spec(params.classifier, 0.9), 0).model
    x = load_channel_stats(paths).normalize(load_prepared(paths, "test")[0][:5])  # not the example's batch size
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


@pytest.mark.parametrize("estimator", ["truncated", "unbiased"])
def test_the_trained_flow_is_an_mlflow_model(
    tmp_path: Path,
    tiny_params: dict,
    make_idx_folder: Callable,
    fresh_store: Callable,
    monkeypatch: pytest.MonkeyPatch,
    estimator: str,
) -> None:
    from mlflow import MlflowClient

    from tests.pipeline.flow_helpers import prepared_project, tiny_flow_params

    make_idx_folder(tmp_path / "tiny")
    prepared_project(
        tmp_path,
        tiny_flow_params(tiny_params, epochs=1, estimator=estimator, memory_efficient=estimator == "truncated"),
    )
    fresh_store(tmp_path)
    monkeypatch.setenv("IRESNET_TRACKING", "1")
    result = CliRunner().invoke(app, ["--root", str(tmp_path), "-S", "tracking.enabled=true", "train-flow"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("iresnet-flow").experiment_id])
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert logged.source_run_id == run.info.run_id and logged.status == "READY"
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"train", "val"}  # evaluate_flow reads test


def test_toy_fits_are_nested_runs(tmp_path: Path, tiny_params: dict, fresh_store: Callable, monkeypatch) -> None:
    """One child run per dataset, seed and model under the stage's run, each with its training-loss curve."""
    import copy

    import yaml
    from mlflow import MlflowClient

    from tests.pipeline.stages.test_toy_density import TINY_TOY

    raw = copy.deepcopy(tiny_params)
    raw["toy"] = copy.deepcopy(TINY_TOY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    fresh_store(tmp_path)
    monkeypatch.setenv("IRESNET_TRACKING", "1")
    result = CliRunner().invoke(app, ["--root", str(tmp_path), "toy-density"])
    assert result.exit_code == 0, result.output

    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("iresnet-toy").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == 2 * len(TINY_TOY["datasets"]) * len(TINY_TOY["seeds"])
    assert {(r.data.params["dataset"], r.data.params["seed"], r.data.params["kind"]) for r in children} == {
        (d, str(s), k) for d in TINY_TOY["datasets"] for s in TINY_TOY["seeds"] for k in ("iresnet", "glow")
    }
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")]
        assert steps == list(range(TINY_TOY["steps"]))
