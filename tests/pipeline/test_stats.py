"""Standard errors of per-example means and of paired differences, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.stats import Z95, mean_and_stderr, paired_difference


def test_mean_and_stderr_closed_form() -> None:
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean = 3.5
    variance = ((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2 + (7 - mean) ** 2) / 3  # n - 1 dof
    stats = mean_and_stderr(values)
    assert stats["mean"] == mean
    assert stats["stderr"] == pytest.approx(math.sqrt(variance / 4), rel=1e-15)


def test_one_value_has_no_standard_error() -> None:
    assert math.isnan(mean_and_stderr(torch.tensor([2.0]))["stderr"])


def test_paired_difference_is_the_mean_of_the_differences_with_its_interval() -> None:
    a = torch.tensor([3.0, 5.0, 4.0, 8.0], dtype=torch.float64)
    b = torch.tensor([2.5, 5.0, 3.0, 7.0], dtype=torch.float64)
    d = [0.5, 0.0, 1.0, 1.0]
    mean = sum(d) / 4
    stderr = math.sqrt(sum((x - mean) ** 2 for x in d) / 3 / 4)
    out = paired_difference(a, b)
    assert out["mean"] == pytest.approx(mean, rel=1e-15) and out["stderr"] == pytest.approx(stderr, rel=1e-15)
    assert out["low"] == pytest.approx(mean - Z95 * stderr) and out["high"] == pytest.approx(mean + Z95 * stderr)


def test_pairing_removes_the_shared_spread() -> None:
    """Two models that differ by a constant on widely spread examples: the paired interval is exact (zero width),
    where independent standard errors would not separate them."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, generator=g, dtype=torch.float64) * 3
    out = paired_difference(a + 0.01, a)
    assert out["mean"] == pytest.approx(0.01, rel=1e-9) and out["stderr"] < 1e-12 and out["low"] > 0
    independent = math.hypot(mean_and_stderr(a + 0.01)["stderr"], mean_and_stderr(a)["stderr"])
    assert 0.01 - Z95 * independent < 0


def test_paired_difference_needs_the_same_examples() -> None:
    with pytest.raises(ValueError, match="same examples"):
        paired_difference(torch.zeros(3), torch.zeros(4))
