"""Faults a researcher meets, through the CLI: each ends in one line that names the file and the way out (exit 1, no
traceback), and an earlier good output is never lost."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.outputs import TRAIN_CLASSIFIER
from pipeline.paths import Paths
from pipeline.stages import train_classifier
from tests.pipeline.classifier_helpers import classifier_project

runner = CliRunner()


def _cli(root: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--root", str(root), *args])
    return result.exit_code, result.output


def _one_error_line(output: str, *parts: str) -> str:
    """The single ``error:`` line of ``output`` (no traceback), holding every one of ``parts``."""
    assert "Traceback" not in output, output
    (line,) = [text for text in output.splitlines() if text.strip()]
    assert line.startswith("error: ") and all(part in line for part in parts), line
    return line


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    """A tiny project with the ``0.9`` classifier trained once (its model is the earlier good output)."""
    params, paths = classifier_project(tmp_path, epochs=1)
    train_classifier.run(params, paths, coeff=0.9)
    return tmp_path


def _model(root: Path) -> Path:
    return TRAIN_CLASSIFIER.model_path(Paths.at(root), "0.9", 0)


def _checkpoint_after_epoch_1(root: Path) -> Path:
    """Train 2 epochs and die while writing the outputs: the epoch-2 checkpoint stays."""

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_classifier, "save_model", killed)
        assert _cli(root, "train-classifier", "--coeff", "0.9", "--seed", "0", "--epochs", "2")[0] == 130
    (checkpoint,) = (root / ".resume").glob("classifier-0.9-*.pt")
    return checkpoint


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_resume_checkpoint(trained: Path, damage: str) -> None:
    checkpoint = _checkpoint_after_epoch_1(trained)
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 20)
    before = _model(trained).read_bytes()
    code, output = _cli(trained, "train-classifier", "--coeff", "0.9", "--seed", "0", "--epochs", "2")
    assert code == 1
    _one_error_line(output, str(checkpoint), "Delete it")
    assert _model(trained).read_bytes() == before


def test_a_resume_checkpoint_of_another_shape(trained: Path) -> None:
    """A checkpoint under this run's name whose model does not fit (written by hand, or by a bug) is refused."""
    import torch

    checkpoint = _checkpoint_after_epoch_1(trained)
    state = torch.load(checkpoint, weights_only=True)
    state["states"]["model"] = torch.nn.Linear(2, 2).state_dict()
    torch.save(state, checkpoint)
    code, output = _cli(trained, "train-classifier", "--coeff", "0.9", "--seed", "0", "--epochs", "2")
    assert code == 1
    _one_error_line(output, str(checkpoint), "does not fit this run", "delete it")


@pytest.mark.parametrize("name", ["train.pt", "stats.json"])
def test_corrupt_prepared_data(trained: Path, name: str) -> None:
    path = trained / "data" / "prepared" / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    before = _model(trained).read_bytes()
    code, output = _cli(trained, "train-classifier", "--coeff", "0.9", "--seed", "0")
    assert code == 1
    _one_error_line(output, str(path), "dvc repro prepare")
    assert _model(trained).read_bytes() == before


def test_a_corrupt_model_file(trained: Path) -> None:
    model = _model(trained)
    model.write_bytes(model.read_bytes()[:100])
    code, output = _cli(trained, "-S", "classifier.coeffs=[0.9]", "singular-values")
    assert code == 1
    _one_error_line(output, str(model), "re-run the stage that writes it")


def test_an_unwritable_output_folder_keeps_the_earlier_outputs(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's folder refuses writes: a one-line error naming it, and the earlier model stays whole. (Root writes
    through permission bits, so as root the refusal is simulated at the rename that publishes a new file, after the
    training: the stage then puts its previous outputs back.)"""
    folder = _model(trained).parent
    before = _model(trained).read_bytes()
    if os.geteuid() == 0:
        real_replace = os.replace

        def refused(src: str | Path, dst: str | Path) -> None:
            if Path(dst).parent == folder and str(src).endswith(".tmp"):
                raise PermissionError(13, "Permission denied", str(dst))
            real_replace(src, dst)

        monkeypatch.setattr("pipeline.files.os.replace", refused)
    else:
        folder.chmod(0o555)
    try:
        code, output = _cli(trained, "train-classifier", "--coeff", "0.9", "--seed", "0")
    finally:
        folder.chmod(0o755)
    assert code == 1
    _one_error_line(output, "cannot write", str(folder), "Permission denied")
    assert _model(trained).read_bytes() == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no half-written file left behind


def test_nan_mid_training_keeps_the_earlier_model(trained: Path) -> None:
    """The existing diagnosis (where, and what to try) as one line; the earlier model is untouched."""
    from pipeline.files import read_json

    stats_path = trained / "data" / "prepared" / "stats.json"
    stats = read_json(stats_path)
    stats["mean"] = [float("nan")]
    stats_path.write_text(json.dumps(stats))  # Python's NaN token: write_json itself writes only strict JSON
    before = _model(trained).read_bytes()
    code, output = _cli(trained, "train-classifier", "--coeff", "0.9", "--seed", "0")
    assert code == 1
    _one_error_line(output, "became nan", "epoch 1", "Lower")
    assert _model(trained).read_bytes() == before


def test_metrics_json_is_strict_json(tmp_path: Path) -> None:
    """NaN and infinities are written as null: Python's NaN/Infinity tokens are not JSON (DVC, jq, browsers refuse)."""
    from pipeline.files import write_json

    path = tmp_path / "m.json"
    write_json(path, {"loss": float("nan"), "curve": [1.5, float("inf"), -float("inf")], "nested": {"ok": 2.0}})

    def refuse(token: str) -> None:
        raise ValueError(f"non-JSON token {token}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "curve": [1.5, None, None],
        "loss": None,
        "nested": {"ok": 2.0},
    }


def test_a_failed_dvc_repro_keeps_the_last_good_outputs(classifier_repo: Callable) -> None:
    """A stage that fails half-way (a blow-up found in training) and one that fails at once (a params file refused)
    leave every output as ``dvc.lock`` records it: DVC deletes nothing before a stage (``persist``), and the stage
    puts its previous outputs back (:mod:`pipeline.output_set`)."""
    import subprocess

    from tests.pipeline.repo_copy import outputs_of

    repo, params, good = classifier_repo(max_train_batches=2)
    assert any(name.endswith("model.pt") for name in good) and "data/raw.json" in good

    def repro_fails(change: dict, *expected: str) -> None:
        edited = {**params, "classifier": {**params["classifier"], **change}}
        (repo.root / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "train_classifier"],
            cwd=repo.root,
            env={**repo.env, "IRESNET_THREADS": "2"},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode != 0 and all(text in done.stdout + done.stderr for text in expected), done.stderr
        assert outputs_of(repo.root) == good
        status = repo.dvc("status", "train_classifier")  # it and the stages before it
        assert "changed outs" not in status and "deleted" not in status, status
        assert not any((repo.root / ".outputs-backup").iterdir())

    repro_fails({"lr": 1.0e8}, "became nan")  # fails in the classifier runs, after both started writing
    repro_fails({"epochs": 0}, "classifier.epochs")  # refused by raw_data, the first stage to read params


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{}", "no dataset, shape"),
        ("[1, 2]", "a JSON object was expected, not list"),
        (
            '{"dataset": "x", "shape": [1, 8], "n_classes": 3, "n_train": 1, "n_val": 1, "n_test": 1, "mean": [0], '
            '"std": [1]}',
            "is not [channels, height, width]",
        ),
    ],
)
def test_a_stats_file_of_another_shape(trained: Path, content: str, problem: str) -> None:
    """Valid JSON that is not what `prepare` writes: refused in one line before any compute, not a KeyError."""
    path = trained / "data" / "prepared" / "stats.json"
    path.write_text(content)
    before = _model(trained).read_bytes()
    code, output = _cli(trained, "train-classifier", "--coeff", "0.9", "--seed", "0")
    assert code == 1
    _one_error_line(output, str(path), problem, "dvc repro prepare")
    assert _model(trained).read_bytes() == before


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"n_train": 0}, "the train split of idx:tiny"),
        ({"n_test": 0}, "the test split of idx:tiny"),
        ({"test_size": 10}, "training images of shape (8, 8) but test images of shape (10, 10)"),
    ],
)
def test_idx_files_that_disagree_are_refused_by_prepare(
    tmp_path: Path, tiny_params: dict, make_idx_folder: Callable, change: dict, expected: str
) -> None:
    """An empty split, or training and test images of two sizes: refused by `prepare` (which otherwise wrote data
    that every later stage refused with advice to run `prepare` again)."""
    import numpy as np

    from tests.pipeline.conftest import IDX_NAMES, idx_bytes, tiny_arrays

    folder = tmp_path / "tiny"
    make_idx_folder(folder, n_train=change.get("n_train", 30), n_test=change.get("n_test", 12))
    if "test_size" in change:
        size = change["test_size"]
        images = np.zeros((12, size, size), dtype=np.uint8)
        (folder / IDX_NAMES["test_images"]).write_bytes(idx_bytes(images))
        (folder / IDX_NAMES["test_labels"]).write_bytes(idx_bytes(tiny_arrays(n_test=12)["test_labels"]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    code, output = _cli(tmp_path, "prepare")
    assert code == 1
    _one_error_line(output, expected)
    assert not (tmp_path / "data" / "prepared").exists()


def test_a_batch_larger_than_the_training_set_trains_on_all_of_it(
    tmp_path: Path, tiny_params: dict, make_idx_folder: Callable
) -> None:
    """One batch an epoch holding every training image: the metrics are finite numbers in strict JSON."""
    import math

    from pipeline.files import read_json
    from tests.pipeline.flow_helpers import trained_project

    make_idx_folder(tmp_path / "tiny")
    params, paths, _ = trained_project(tmp_path, tiny_params, batch_size=10_000)
    assert params.flow.batch_size > read_json(paths.prepared / "stats.json")["n_train"]

    def refuse(token: str) -> None:
        raise ValueError(f"non-JSON token {token}")

    metrics = json.loads((paths.metrics / "flow.json").read_text(), parse_constant=refuse)
    for key in ("train_bpd", "val_bpd", "val_logdet", "recon_error"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), (key, metrics[key])
