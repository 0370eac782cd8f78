"""Preprocessing: padding, normalisation, dequantisation and ZCA, against exact closed forms in float64."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.preprocess import ZCA, ChannelStats, dequantize, pad_to, to_unit


def _correlated(n: int = 400, c: int = 2, h: int = 3, w: int = 3, seed: int = 0) -> torch.Tensor:
    """Full-rank data with a non-trivial covariance: Gaussian noise through a random linear map, plus a mean."""
    g = torch.Generator().manual_seed(seed)
    d = c * h * w
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + torch.randn(d, generator=g, dtype=torch.float64)
    return x.reshape(n, c, h, w)


def test_to_unit_and_pad() -> None:
    raw = torch.arange(2 * 1 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(2, 1, 28, 28)
    x = to_unit(raw)
    assert x.dtype == torch.float32 and x.min() == 0 and x.max() == 1
    torch.testing.assert_close(x * 255, raw.float(), rtol=0, atol=1e-4)
    padded = pad_to(x, 32)
    assert padded.shape == (2, 1, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], x)  # centred, 2 pixels each side
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.equal(padded[:, :, border], torch.zeros(2, 1, int(border.sum())))
    with pytest.raises(ValueError, match="uint8"):
        to_unit(x)
    with pytest.raises(ValueError, match="larger"):
        pad_to(torch.zeros(1, 1, 33, 33), 32)


def test_channel_stats_normalise_exactly() -> None:
    x = _correlated(c=3)
    stats = ChannelStats.fit(x)
    z = stats.normalize(x)
    zeros, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), zeros, rtol=0, atol=1e-12)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), correction=0), ones, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.denormalize(z), x, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="constant"):
        ChannelStats.fit(torch.ones(4, 1, 2, 2))


def test_dequantize_stays_in_the_pixel_bin() -> None:
    k = torch.arange(256, dtype=torch.float64).repeat(40).reshape(-1, 1, 16, 16)
    x = k / 255
    y = dequantize(x, torch.Generator().manual_seed(0))
    assert y.min() >= -0.5 and y.max() < 0.5
    # (k + u) / 256 - 0.5 with u in [0, 1): the bin index floor((y + 0.5) * 256) is the pixel value k.
    assert torch.equal(torch.floor((y + 0.5) * 256), k)
    u = (y + 0.5) * 256 - k
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12) ** 0.5 / u.numel() ** 0.5  # 4 standard errors of U[0,1) mean
    assert torch.equal(y, dequantize(x, torch.Generator().manual_seed(0)))  # same generator state, same noise
    assert not torch.equal(y, dequantize(x, torch.Generator().manual_seed(1)))


def test_zca_whitened_covariance_matches_closed_form() -> None:
    x = _correlated()
    eps = 0.3
    zca = ZCA.fit(x, eps)
    z = zca.whiten(x).reshape(len(x), -1)
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / len(z)
    lam, u = zca.eigenvalues, zca.eigenvectors
    expected = (u * (lam / (lam + eps))) @ u.T  # W Σ Wᵀ = U diag(λ / (λ + ε)) Uᵀ
    torch.testing.assert_close(cov, expected, rtol=0, atol=1e-10)
    # The fitted eigen-decomposition is that of the data's population covariance.
    flat = x.reshape(len(x), -1)
    sigma = (flat - flat.mean(0)).T @ (flat - flat.mean(0)) / len(x)
    torch.testing.assert_close((u * lam) @ u.T, sigma, rtol=0, atol=1e-9 * float(sigma.abs().max()))


def test_zca_with_tiny_epsilon_whitens_to_identity() -> None:
    x = _correlated()
    zca = ZCA.fit(x, 1e-12)
    z = zca.whiten(x).reshape(len(x), -1)
    cov = (z - z.mean(0)).T @ (z - z.mean(0)) / len(z)
    # Deviation from I is ε / (λ_min + ε) plus round-off; λ_min of this data is far above 1e-12.
    assert float(zca.eigenvalues.min()) > 1e-3
    torch.testing.assert_close(cov, torch.eye(cov.shape[0], dtype=torch.float64), rtol=0, atol=1e-8)


def test_zca_inverse_and_logdet_are_exact() -> None:
    x = _correlated()
    zca = ZCA.fit(x, 0.05)
    torch.testing.assert_close(zca.unwhiten(zca.whiten(x)), x, rtol=0, atol=1e-10)
    eye = torch.eye(zca.dim, dtype=torch.float64)
    torch.testing.assert_close(zca.matrix @ zca.inverse_matrix, eye, rtol=0, atol=1e-10)
    sign, logabsdet = torch.linalg.slogdet(zca.matrix)
    assert float(sign) == 1.0
    assert abs(zca.logdet - float(logabsdet)) < 1e-10 * abs(float(logabsdet)) + 1e-12
    # float32 data keep their dtype and round-trip to float32 precision.
    x32 = x.float()
    assert zca.whiten(x32).dtype == torch.float32
    torch.testing.assert_close(zca.unwhiten(zca.whiten(x32)), x32, rtol=1e-5, atol=1e-5)


def test_zca_state_dict_round_trip_and_errors() -> None:
    x = _correlated()
    zca = ZCA.fit(x, 0.1)
    state = zca.state_dict()
    assert float(state["logdet"]) == zca.logdet
    again = ZCA.from_state_dict(state)
    assert torch.equal(again.whiten(x), zca.whiten(x)) and again.logdet == zca.logdet
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        ZCA.fit(x, 0.0)
    with pytest.raises(ValueError, match="fitted on 18 dimensions"):
        zca.whiten(torch.zeros(2, 5))
