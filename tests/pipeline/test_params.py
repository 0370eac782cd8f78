"""Params validation: the committed file loads, and every rule rejects a bad value with the key path named."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ParamsError
from pipeline.params import (
    Params,
    apply_overrides,
    check_spatial,
    load_params,
    params_hash,
    parse_override,
    parse_params,
    squeeze_factor,
)

REPO = Path(__file__).resolve().parents[2]


def _set(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``raw`` with ``dotted`` set (``a.b[2]`` indexes a list); ``...`` deletes the key."""
    out = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    if leaf.endswith("]"):
        name, index = leaf[:-1].split("[")
        node[name][int(index)] = value
    elif value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return out


def test_committed_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.dataset == "mnist-5k"
    assert params.data.download is False
    assert "vanilla" in params.classifier.coeffs
    assert all(0 < c < 1 for c in params.classifier.coeffs if not isinstance(c, str))
    assert params.evaluate_flow.max_bias_bits == 1e-4
    assert params.logdet_bias.max_terms == 20
    assert params.to_dict()["classifier"]["coeffs"] == list(params.classifier.coeffs)


# (key path changed, bad value, key path the error must name, a word of the allowed description)
BAD = [
    ("seed", -1, "seed", ">= 0"),
    ("seed", True, "seed", "integer"),
    ("seed", 1.5, "seed", "integer"),
    ("data.dataset", "imagenet", "data.dataset", "idx:"),
    ("data.dataset", "idx:", "data.dataset", "idx:"),
    ("data.root", "", "data.root", "non-empty"),
    ("data.download", "yes", "data.download", "true or false"),
    ("data.download", 1, "data.download", "true or false"),
    ("data.test_fraction", 1.0, "data.test_fraction", "< 1"),
    ("data.test_fraction", 0, "data.test_fraction", "> 0"),
    ("data.val_fraction", 0, "data.val_fraction", "> 0"),
    ("data.val_fraction", -0.1, "data.val_fraction", "> 0"),
    ("data.val_fraction", 0.6, "data.val_fraction", "<= 0.5"),
    ("data.val_fraction", "10%", "data.val_fraction", "a finite number"),
    ("data.val_fraction", ..., "data.val_fraction", "validation split"),  # required: the doc names it
    ("data.max_train", 0, "data.max_train", "null or"),
    ("data.zca.epsilon", 0.0, "data.zca.epsilon", "> 0"),
    ("data.zca.epsilon", float("nan"), "data.zca.epsilon", "finite"),
    ("data.zca", [1], "data.zca", "mapping"),
    ("data.zca.enabled", ..., "data.zca.enabled", "a value"),
    ("data.colour", True, "data.colour", "no such key"),
    ("classifier.coeffs[2]", 1.0, "classifier.coeffs[2]", "< 1"),
    ("classifier.coeffs[1]", 0.0, "classifier.coeffs[1]", "> 0"),
    ("classifier.coeffs[0]", "plain", "classifier.coeffs[0]", "'vanilla'"),
    ("classifier.coeffs", ["vanilla", 0.9, 0.9], "classifier.coeffs", "repeated"),
    ("classifier.coeffs", [], "classifier.coeffs", "at least 1"),
    ("classifier.coeffs", 0.9, "classifier.coeffs", "list"),
    ("classifier.n_blocks", [2, 2], "classifier.strides", "equal length"),
    ("classifier.channels", [16, 32, 64, 128], "classifier.strides", "equal length"),
    ("classifier.strides[1]", 3, "classifier.strides[1]", "one of 1, 2"),
    ("classifier.strides", [2, 2, 2], "classifier.strides", "divide the 28x28"),
    ("classifier.init_ds", 4, "classifier.init_ds", "one of 1, 2"),
    ("classifier.nonlin", "tanh", "classifier.nonlin", "'elu'"),
    ("classifier.optimizer", "rmsprop", "classifier.optimizer", "'sgd'"),
    ("classifier.lr", 0, "classifier.lr", "> 0"),
    ("classifier.lr", 1e308, "classifier.lr", "<= 1e+09"),  # accepted once, then a traceback in training
    ("toy.glow_lr", 2e9, "toy.glow_lr", "<= 1e+09"),
    ("seed", 2**32, "seed", "<= 4294967295"),  # numpy's seed range
    ("classifier.seeds[1]", 2**32, "classifier.seeds[1]", "<= 4294967295"),
    ("classifier.momentum", 1.0, "classifier.momentum", "< 1"),
    ("classifier.weight_decay", -1e-4, "classifier.weight_decay", ">= 0"),
    ("classifier.milestones", [3, 2], "classifier.milestones", "increasing"),
    ("classifier.gamma", 0.0, "classifier.gamma", "> 0"),
    ("classifier.n_blocks[0]", 0, "classifier.n_blocks[0]", ">= 1"),
    ("classifier.epochs", "3", "classifier.epochs", "integer"),
    ("reconstruction.iterations", [1, 5, 5], "reconstruction.iterations", "increasing"),
    ("reconstruction.tolerances[0]", -1e-3, "reconstruction.tolerances[0]", "> 0"),
    ("flow.coeff", 1.0, "flow.coeff", "< 1"),
    ("flow.estimator", "exact", "flow.estimator", "'truncated'"),
    ("flow.prior", "uniform", "flow.prior", "'learned'"),
    ("flow.strides", [2, 2, 1], "flow.strides", "divide the 28x28"),  # with init_ds 2: /8
    ("flow.use_zca", True, "flow.use_zca", "data.zca.enabled"),
    ("flow.warmup_epochs", -1, "flow.warmup_epochs", ">= 0"),
    ("flow.lr_schedule", "step", "flow.lr_schedule", "'constant'"),
    ("flow.logit_alpha", 0.5, "flow.logit_alpha", "< 0.5"),
    ("flow.actnorm_init_images", 0, "flow.actnorm_init_images", "null or"),
    ("flow.factor_out", "no", "flow.factor_out", "true or false"),
    ("evaluate_flow.max_bias_bits", 0, "evaluate_flow.max_bias_bits", "> 0"),
    ("evaluate_flow.n_examples", 0, "evaluate_flow.n_examples", "null or"),
    ("logdet_bias.max_terms", 0, "logdet_bias.max_terms", ">= 1"),
    ("toy.datasets[1]", "mnist", "toy.datasets[1]", "'moons'"),
    ("toy.grid_size", 1, "toy.grid_size", ">= 2"),
    ("tracking.enabled", "off", "tracking.enabled", "true or false"),
    ("singular_values", None, "singular_values", "mapping"),
]


@pytest.mark.parametrize(("dotted", "value", "key", "allowed"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_each_rule_rejects_a_bad_value(repo_params: dict, dotted: str, value: Any, key: str, allowed: str) -> None:
    raw = _set(repo_params, dotted, value)
    if dotted == "flow.use_zca":
        raw["data"]["zca"]["enabled"] = False
        raw["flow"]["logit_alpha"] = None  # else the logit's own rule (no logit on whitened data) fires first
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert info.value.key == key
    message = str(info.value)
    assert f"`{key}`" in message and allowed in message, message


def test_a_validation_split_too_small_to_hold_an_image_is_rejected(repo_params: dict) -> None:
    """0.125 of 4 images rounds to 1 (kept); 0.1 of 4 rounds to 0: an empty validation split, refused before any
    compute, naming the key and the smallest fraction that works."""
    raw = _set(_set(repo_params, "data.max_train", 4), "data.val_fraction", 0.125)
    assert parse_params(raw).data.val_fraction == 0.125
    with pytest.raises(ParamsError) as info:
        parse_params(_set(raw, "data.val_fraction", 0.1))
    assert info.value.key == "data.val_fraction" and "max_train 4" in str(info.value) and ">= 0.125" in str(info.value)


def test_padding_to_32_makes_three_squeezes_valid(repo_params: dict) -> None:
    raw = _set(repo_params, "classifier.strides", [2, 2, 2])
    with pytest.raises(ParamsError):
        parse_params(raw)
    raw["data"]["pad_to_32"] = True
    assert parse_params(raw).classifier.strides == (2, 2, 2)


def test_spatial_check_of_a_loaded_idx_dataset(repo_params: dict) -> None:
    params = parse_params(_set(repo_params, "data.dataset", "idx:somewhere"))  # size unknown: accepted for now
    assert squeeze_factor(params.classifier.init_ds, params.classifier.strides) == 4
    check_spatial(params, 12, 12)
    with pytest.raises(ParamsError, match="divide the 10x10 input"):
        check_spatial(params, 10, 10)


def test_valid_alternatives_are_accepted(repo_params: dict) -> None:
    raw = _set(repo_params, "classifier.coeffs", ["vanilla", "batchnorm", 0.5, 1e-3])
    raw = _set(raw, "data.max_train", 100)
    raw = _set(raw, "classifier.milestones", [])
    raw = _set(raw, "evaluate_flow.sample_classifier", "vanilla")  # any entry of classifier.coeffs
    params = parse_params(raw)
    assert params.classifier.coeffs == ("vanilla", "batchnorm", 0.5, 1e-3)
    assert params.evaluate_flow.sample_classifier == "vanilla"
    assert params.data.max_train == 100 and params.classifier.milestones == ()


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    # PyYAML alone reads `1e-4` as a string; DVC's `-S key=1e-4` writes it that way.
    text = (REPO / "params.yaml").read_text().replace("max_bias_bits: 1.0e-4", "max_bias_bits: 1e-4")
    assert "max_bias_bits: 1e-4" in text
    (tmp_path / "p.yaml").write_text(text)
    assert load_params(tmp_path / "p.yaml").evaluate_flow.max_bias_bits == 1e-4


def test_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="existing params file"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_overrides(repo_params: dict) -> None:
    key, value = parse_override("classifier.coeffs=[0.9, vanilla]")
    assert (key, value) == ("classifier.coeffs", [0.9, "vanilla"])
    out = apply_overrides(repo_params, {"classifier.coeffs": value, "data.zca.epsilon": 1e-3, "data.max_train": 5})
    assert out["classifier"]["coeffs"] == [0.9, "vanilla"] and out["data"]["zca"]["epsilon"] == 1e-3
    assert out["data"]["max_train"] == 5
    cleared = apply_overrides(out, dict([parse_override("data.max_train=null")]))
    assert cleared["data"]["max_train"] is None and parse_params(cleared).data.max_train is None  # null is a value
    with pytest.raises(ParamsError, match=r"`seed` = None: expected"):
        parse_params(apply_overrides(repo_params, dict([parse_override("seed=null")])))  # refused where not nullable
    with pytest.raises(ParamsError, match="to clear a key write KEY=null"):
        parse_override("flow.logit_alpha=")
    assert repo_params["classifier"]["coeffs"] != [0.9, "vanilla"]  # the input is not modified
    with pytest.raises(ParamsError, match="existing key"):
        apply_overrides(repo_params, {"data.colour": True})
    with pytest.raises(ParamsError, match="section"):
        apply_overrides(repo_params, {"seed.x": 1})
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        parse_override("novalue")
    with pytest.raises(ParamsError) as info:
        parse_params(apply_overrides(repo_params, {"classifier.coeffs": [0.9, 1.5]}))
    assert info.value.key == "classifier.coeffs[1]"


def test_params_hash_is_stable_and_sensitive() -> None:
    a = {"data": {"dataset": "mnist-5k", "zca": {"epsilon": 0.01}}, "seed": 0}
    b = {"seed": 0, "data": {"zca": {"epsilon": 0.01}, "dataset": "mnist-5k"}}  # same content, other order
    assert params_hash(a) == params_hash(b)
    assert params_hash(a) != params_hash({**a, "seed": 1})
    assert len(params_hash(a)) == 16


def test_params_are_read_as_dvc_reads_them(tmp_path: Path) -> None:
    """YAML 1.2, as DVC (ruamel.yaml): ``yes`` is a string, so it is refused as a boolean instead of silently
    meaning true; ``010`` is ten; ``1e-4`` a float. Overrides follow the same rules."""
    text = (REPO / "params.yaml").read_text()
    (tmp_path / "yes.yaml").write_text(text.replace("download: false", "download: yes"))
    with pytest.raises(ParamsError, match=r"`data.download` = 'yes': expected true or false"):
        load_params(tmp_path / "yes.yaml")
    (tmp_path / "ten.yaml").write_text(text.replace("max_train: null", "max_train: 010"))
    assert load_params(tmp_path / "ten.yaml").data.max_train == 10
    assert parse_override("data.download=on") == ("data.download", "on")
    assert parse_override("flow.lr=1e-4") == ("flow.lr", 1e-4)


def test_flow_option_combinations_are_checked(repo_params: dict) -> None:
    raw = _set(_set(repo_params, "flow.prior", "conditional"), "flow.factor_out", False)
    with pytest.raises(ParamsError, match="factor_out") as info:
        parse_params(raw)
    assert info.value.key == "flow.prior"
    raw = _set(_set(repo_params, "flow.logit_alpha", 1e-6), "flow.use_zca", True)
    with pytest.raises(ParamsError, match="use_zca") as info:
        parse_params(raw)
    assert info.value.key == "flow.logit_alpha"
