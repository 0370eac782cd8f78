"""The 2-D samplers of Fig. 2: shapes, stream determinism, closed-form moments, supports, reference densities."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.data.toy2d import (
    GAUSS8_RADIUS,
    MEANS,
    SAMPLERS,
    SECOND_MOMENTS,
    reference_log_prob,
    sample,
    stream_seed,
)
from pipeline.params import TOY_DATASETS

N_MOMENTS = 200_000


def test_registry_matches_params() -> None:
    # params.yaml validates dataset names against TOY_DATASETS; every such name must have a sampler.
    assert set(SAMPLERS) == set(TOY_DATASETS) == set(SECOND_MOMENTS) == set(MEANS)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_shape_dtype_and_determinism(name: str) -> None:
    x = sample(name, 37, seed=3, purpose="train", step=5)
    assert x.shape == (37, 2) and x.dtype == torch.float64 and torch.isfinite(x).all()
    assert torch.equal(x, sample(name, 37, seed=3, purpose="train", step=5))  # a function of its arguments only
    for other in (sample(name, 37, 4, "train", 5), sample(name, 37, 3, "train", 6), sample(name, 37, 3, "test", 5)):
        assert not torch.equal(x, other)  # seed, step and purpose each select another stream


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_moments_match_closed_form(name: str) -> None:
    """Mean and E‖x‖² within 5 standard errors (estimated from the same sample) of their closed forms."""
    x = sample(name, N_MOMENTS, seed=11, purpose="moments")
    se_mean = x.std(dim=0) / math.sqrt(N_MOMENTS)
    assert ((x.mean(dim=0) - torch.tensor(MEANS[name], dtype=x.dtype)).abs() <= 5 * se_mean).all()
    sq = (x**2).sum(dim=1)
    assert abs(sq.mean().item() - SECOND_MOMENTS[name]) <= 5 * sq.std().item() / math.sqrt(N_MOMENTS)


def test_moment_check_has_power() -> None:
    # The same check rejects the moments of another density (the test can fail).
    x = sample("rings", N_MOMENTS, seed=11, purpose="moments")
    sq = (x**2).sum(dim=1)
    assert abs(sq.mean().item() - SECOND_MOMENTS["circles"]) > 5 * sq.std().item() / math.sqrt(N_MOMENTS)


def test_checkerboard_support_and_reference_density() -> None:
    x = sample("checkerboard", 10_000, seed=0, purpose="test")
    assert ((x >= -2) & (x < 2)).all()
    assert (torch.remainder(torch.floor(x).sum(dim=1), 2) == 0).all()  # only the squares with i + j even
    # All 8 black squares are used about equally (each 1/8; 5 binomial standard errors).
    squares = (torch.floor(x[:, 0]) + 2) * 4 + torch.floor(x[:, 1]) + 2
    counts = torch.bincount(squares.long(), minlength=16).double()
    assert (counts > 0).sum() == 8
    expected, se = 10_000 / 8, math.sqrt(10_000 * (1 / 8) * (7 / 8))
    assert ((counts[counts > 0] - expected).abs() <= 5 * se).all()
    log_p = reference_log_prob("checkerboard", x)
    assert torch.equal(log_p, torch.full_like(log_p, -math.log(8)))
    outside = torch.tensor([[0.5, 1.5], [2.5, 0.5], [-1.5, -0.5]], dtype=torch.float64)  # odd square, outside, odd
    assert torch.isneginf(reference_log_prob("checkerboard", outside)).all()


def test_eight_gaussians_reference_density_integrates_to_one() -> None:
    # Midpoint rule on [-5, 5]^2 with h = 0.01: the centres are 2.5 from the origin and std 0.3, so the mass outside
    # is below 8 Gaussian tails of (5 - 2.5) / 0.3 > 8 standard deviations (< 1e-14); the midpoint rule's error
    # for a Gaussian of std 0.3 with h = 0.01 is about h² / 24 · (1 / 0.3²) · 2 < 1e-4.
    h = 0.01
    axis = -5 + h * (torch.arange(1000, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    p = reference_log_prob("8gaussians", torch.stack([xx.flatten(), yy.flatten()], dim=1)).exp()
    assert abs(p.sum().item() * h * h - 1) < 1e-4
    # At a centre: its own component 1 / (8 · 2π · 0.3²) plus the others' at chord distances 2 R sin(πk / 8).
    centre = torch.tensor([[GAUSS8_RADIUS, 0.0]], dtype=torch.float64)
    chords = [2 * GAUSS8_RADIUS * math.sin(math.pi * k / 8) for k in range(8)]
    expected = sum(math.exp(-(d**2) / (2 * 0.3**2)) for d in chords) / (8 * 2 * math.pi * 0.3**2)
    assert reference_log_prob("8gaussians", centre).exp().item() == pytest.approx(expected, rel=1e-12)
    assert reference_log_prob("moons", centre) is None


def test_stream_seed_is_stable() -> None:
    # A hash of the arguments, not Python's per-process salted hash(): the same on every run and platform.
    assert (
        stream_seed(0, "moons", "train", 0)
        == int.from_bytes(__import__("hashlib").sha256(b"0/moons/train/0").digest()[:8], "big") >> 1
    )
    assert 0 <= stream_seed(2**40, "x", "y", 10**9) < 2**63


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "spiral", "n": 5}, "unknown toy dataset 'spiral'"),
        ({"name": "moons", "n": 0}, "positive int"),
        ({"name": "moons", "n": 2.5}, "positive int"),
        ({"name": "moons", "n": 5, "step": -1}, "step must be"),
    ],
)
def test_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample(seed=0, **kwargs)
    if "spiral" in message:
        with pytest.raises(ValueError, match="moons"):  # the error lists the known names
            reference_log_prob("spiral", torch.zeros(1, 2))
