"""The one mapping from params into the library's configs: every shared architecture field reaches the config of
every model built from it, under the same name."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from iresnet.models import FlowConfig, ResNetConfig
from pipeline.models.classifiers import resnet_config
from pipeline.models.flows import flow_config
from pipeline.models.glow import glow_style_config
from pipeline.models.specs import classifier_specs
from pipeline.params import NETWORK_FIELDS, parse_params

# A value for each shared field that differs from the repository's params.yaml (init_ds: the other one), and the
# library accepts on 32x32 inputs.
CHANGED: dict[str, Any] = {
    "n_blocks": [1, 1, 1],
    "strides": [2, 1, 1],
    "channels": [4, 4, 4],
    "init_ds": 1,
    "nonlin": "softplus",
    "n_power_iter": 3,
    "actnorm": False,
}


def test_the_shared_fields_are_fields_of_every_config() -> None:
    assert set(CHANGED) == set(NETWORK_FIELDS)
    for config in (ResNetConfig, FlowConfig):
        assert set(NETWORK_FIELDS) <= {f.name for f in dataclasses.fields(config)}, config


@pytest.mark.parametrize("field", NETWORK_FIELDS)
def test_each_shared_field_reaches_the_classifier_and_the_flow(repo_params: dict, field: str) -> None:
    raw = {**repo_params, "data": {**repo_params["data"], "pad_to_32": True}}
    expected = {}
    for section in ("classifier", "flow"):
        value = 3 - raw[section][field] if field == "init_ds" else CHANGED[field]
        assert raw[section][field] != value, f"pick another value of {section}.{field} for this test"
        raw[section] = {**raw[section], field: value}
        expected[section] = tuple(value) if isinstance(value, list) else value
    params = parse_params(raw)
    shape = (1, 32, 32)
    for spec in classifier_specs(params.classifier):
        assert getattr(resnet_config(params.classifier, spec, shape), field) == expected["classifier"]
    assert getattr(flow_config(params.flow, shape), field) == expected["flow"]
    if field in ("nonlin", "n_power_iter", "actnorm"):  # the Glow-style i-ResNet: the classifier's blocks
        assert getattr(glow_style_config(params, shape), field) == expected["classifier"]
