"""Paper-scale profiles: ``configs/<profile>/params.yaml`` with the paper's settings, and the ``dvc.yaml`` that
:mod:`pipeline.tools.profiles` derives from the root one (DVC-cached data and models, reports in git)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.params import load_params
from pipeline.tools.profiles import main, profiles, render

REPO = Path(__file__).resolve().parents[3]
ROOT = yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_the_paper_profiles_exist_and_none_has_a_committed_dvc_yaml() -> None:
    assert profiles() == ["cifar10", "cifar100", "mnist"]
    assert not list((REPO / "configs").glob("*/dvc.yaml"))  # `dvc status` of a fresh clone sees the default only


@pytest.mark.parametrize(("name", "channels", "terms"), [("mnist", 32, 10), ("cifar10", 512, 5)])
def test_table4_settings(name: str, channels: int, terms: int) -> None:
    """App. C.3: 3 scales of 32 blocks, 32 (MNIST) or 512 (CIFAR10) filters, Adamax lr 0.003, 200 epochs, 10 / 5
    series terms, ELU, multiscale with factor-out."""
    f = load_params(REPO / "configs" / name / "params.yaml").flow
    assert f.n_blocks == (32, 32, 32) and f.channels == (channels,) * 3 and f.n_terms == terms
    assert (f.optimizer, f.lr, f.epochs, f.nonlin, f.factor_out, f.estimator) == (
        "adamax",
        0.003,
        200,
        "elu",
        True,
        "truncated",
    )


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_fig2_settings(name: str) -> None:
    """App. C.3: 100 residual blocks of an MLP 2-64-64-64-2 with ELU (Glow: 100 coupling layers)."""
    t = load_params(REPO / "configs" / name / "params.yaml").toy
    assert (t.n_blocks, t.hidden, t.nonlin) == (100, (64, 64, 64), "elu")


def test_a_profile_dvc_yaml_runs_every_stage_under_its_folder_with_cached_data_and_models() -> None:
    profile = yaml.safe_load(render("cifar10"))
    assert profile["stages"].keys() == ROOT["stages"].keys()
    for name, stage in profile["stages"].items():
        root = ROOT["stages"][name]
        assert stage["wdir"] == "../.."
        assert stage["cmd"].startswith(
            "exec python -m pipeline.cli --root configs/cifar10 --params configs/cifar10/params.yaml "
        )
        assert [d for d in stage["deps"] if d.startswith(("pipeline", "iresnet"))] == [
            d for d in root["deps"] if d.startswith(("pipeline", "iresnet"))
        ]
        if "params" in root:
            assert stage["params"] == [{"configs/cifar10/params.yaml": root["params"]}]
        for entry in stage.get("outs", []) + stage.get("plots", []):
            ((path, options),) = entry.items()
            assert path.startswith("configs/cifar10/")
            cached = path.startswith(("configs/cifar10/data/prepared", "configs/cifar10/models/"))
            assert options["cache"] is cached, path
    assert profile["stages"]["train_classifier"]["cmd"] == (
        "exec python -m pipeline.cli --root configs/cifar10 --params configs/cifar10/params.yaml train-classifiers"
    )


def test_unknown_profile_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cifar11"]) == 2
    assert "profiles: cifar10, cifar100, mnist" in capsys.readouterr().err
