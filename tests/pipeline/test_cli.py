"""The typer CLI through ``CliRunner``: help everywhere, user errors as one paragraph with exit 1, a real stage run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app, ui_command
from pipeline.data.store import load_prepared
from pipeline.paths import Paths

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args", [["--help"], ["prepare", "--help"], ["ui", "--help"]])
def test_help(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "--help" in result.output


def test_bad_param_exits_1_naming_the_key(tiny_project: Path, tiny_params: dict) -> None:
    raw = copy.deepcopy(tiny_params)
    raw["classifier"]["coeffs"][2] = 1.5
    (tiny_project / "bad.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["--root", str(tiny_project), "--params", str(tiny_project / "bad.yaml"), "prepare"])
    assert result.exit_code == 1
    assert "classifier.coeffs[2]" in result.output and "1.5" in result.output and "< 1" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tiny_project / "data" / "prepared").exists()  # stopped before any compute


def test_set_override_is_validated(tiny_project: Path) -> None:
    result = runner.invoke(app, ["--root", str(tiny_project), "-S", "flow.coeff=0", "prepare"])
    assert result.exit_code == 1 and "flow.coeff" in result.output and "> 0" in result.output


def test_missing_dataset_is_a_user_error(tiny_project: Path) -> None:
    result = runner.invoke(app, ["--root", str(tiny_project), "prepare", "--dataset", "mnist"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "not found" in result.output and "data.download: true" in result.output


def test_help_and_ui_start_without_torch() -> None:
    """torch is imported by the stage commands (which set its threads), not at start-up: help stays instant."""
    code = (
        "import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
        "codes = [CliRunner().invoke(app, [c, '--help']).exit_code for c in ('train-flow', 'ui')]; "
        "print(codes, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[0,", "0]", "False"], done.stdout + done.stderr


def test_prepare_runs_and_prints_a_table(tiny_project: Path) -> None:
    torch.set_num_threads(1)
    result = runner.invoke(app, ["--root", str(tiny_project), "--threads", "2", "prepare"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite runs single-threaded (conftest.py)
    assert result.exit_code == 0, result.output
    assert threads == 2  # --threads reaches torch when a stage runs
    assert "prepare: results" in result.output and "n_train" in result.output and "zca_logdet" in result.output
    images, _ = load_prepared(Paths.at(tiny_project), "train")
    assert images.shape == (26, 1, 8, 8)  # 30 less 4 for validation


def test_prepare_is_tracked(tiny_project: Path, fresh_store: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("IRESNET_TRACKING", "1")
    fresh_store(tiny_project)
    ok = runner.invoke(app, ["--root", str(tiny_project), "-S", "data.max_train=12", "prepare"])
    bad = runner.invoke(app, ["--root", str(tiny_project), "prepare", "--dataset", "idx:missing"])
    assert ok.exit_code == 0 and bad.exit_code == 1, ok.output + bad.output
    client = MlflowClient(f"sqlite:///{tiny_project.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("iresnet-data")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    assert runs[0].data.params["data.max_train"] == "12"
    assert runs[0].data.metrics["n_train"] == 10 and runs[0].data.metrics["n_val"] == 2  # 12 = 10 + 0.125 x 12
    assert "not found" in runs[1].data.tags["error"]
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"figures", "metrics", "prepared"}


def test_ui_command_targets_the_project_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = ui_command(uri, 5055)
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == uri
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5055"
    assert cmd[cmd.index("--workers") + 1] == "1"


def test_global_options_after_the_command(tiny_project: Path, tiny_params: dict) -> None:
    """``--root``, ``--params``, ``-S`` and ``--threads`` work after the command as before it (a bad ``-S`` value
    placed last is still refused before any compute); the command's own options stay its own."""
    raw = copy.deepcopy(tiny_params)
    raw["data"]["max_train"] = 12
    (tiny_project / "other.yaml").write_text(yaml.safe_dump(raw))
    torch.set_num_threads(1)
    args = [
        "prepare",
        "--root",
        str(tiny_project),
        "--dataset",
        "idx:tiny",
        f"--params={tiny_project / 'other.yaml'}",
        "-S",
        "data.max_test=6",
        "--threads",
        "1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    images, _ = load_prepared(Paths.at(tiny_project), "train")
    tests, _ = load_prepared(Paths.at(tiny_project), "test")
    assert len(images) == 10 and len(tests) == 6  # from other.yaml (12, 2 of them validation) and from -S

    bad = runner.invoke(
        app, ["train-classifier", "--coeff", "0.9", "--seed", "0", "--root", str(tiny_project), "-S", "flow.coeff=0"]
    )
    assert bad.exit_code == 1 and "flow.coeff" in bad.output and "No such option" not in bad.output


def test_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    expected = f"iresnet {version('iresnet')}, iresnet-pipeline {version('iresnet-pipeline')}"
    assert result.exit_code == 0 and result.output.strip() == expected


def test_a_malformed_switch_is_refused_before_the_stage_runs(
    tiny_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IRESNET_PROGRESS", "maybe")
    result = runner.invoke(app, ["--root", str(tiny_project), "prepare"])
    assert result.exit_code == 1 and "`IRESNET_PROGRESS` = 'maybe'" in result.output
    assert not (tiny_project / "data" / "prepared").exists()


def test_set_null_clears_a_key_and_an_empty_value_is_refused(tiny_project: Path) -> None:
    empty = runner.invoke(app, ["--root", str(tiny_project), "-S", "data.max_train=", "prepare"])
    assert empty.exit_code == 1 and "to clear a key write KEY=null" in empty.output
    counts = []
    for value in ("12", "null"):
        done = runner.invoke(app, ["--root", str(tiny_project), "-S", f"data.max_train={value}", "prepare"])
        assert done.exit_code == 0, done.output
        metrics = json.loads((tiny_project / "reports" / "metrics" / "prepare.json").read_text())
        counts.append(metrics["n_train"] + metrics["n_val"])
    assert counts[0] == 12 and counts[1] > 12  # null is "no cap", not "the file's value"
