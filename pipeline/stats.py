"""Sampling error of per-example means, shared by the stages that compare models on the same test examples.

A mean over N test examples carries the standard error ``s / sqrt(N)`` (``s`` the sample standard deviation): what
another test set of the same size would change. Two models scored on the *same* examples are compared by the mean of
their per-example differences; its standard error is smaller than either model's, because the examples are shared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

Z95 = 1.96  # a normal ~95% interval is the estimate ± 1.96 standard errors
# Student's t 97.5% quantiles for 1..30 degrees of freedom: a 95% interval of a mean over a few seeds or models
# (df = n - 1). Beyond 30 the value at 30 is kept (slightly wide, never narrow).
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_and_stderr(values: Tensor) -> dict[str, float]:
    """``{"mean", "stderr"}`` of per-example ``values`` ``(N,)``: the mean and its standard error over examples
    (NaN for ``N < 2``)."""
    v = values.double()
    stderr = float(v.std(correction=1) / math.sqrt(len(v))) if len(v) >= 2 else math.nan
    return {"mean": float(v.mean()), "stderr": stderr}


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df >= 1`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    return _T95[min(df, len(_T95)) - 1]


def seed_std(values: Iterable[float]) -> float | None:
    """The sample standard deviation ``s`` of a few replicates (seeds, models); None for fewer than two."""
    values = list(values)
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def mean_interval(values: list[float]) -> dict[str, float] | None:
    """``{"mean", "stderr", "low", "high", "n"}``: the mean of a few replicates (seeds, models) with its 95% t
    interval ``mean ± t95(n - 1) · s / sqrt(n)``; None for fewer than two values (no spread to judge by)."""
    s = seed_std(values)
    if s is None:
        return None
    n = len(values)
    mean = math.fsum(values) / n
    half = t95(n - 1) * s / math.sqrt(n)
    return {"mean": mean, "stderr": s / math.sqrt(n), "low": mean - half, "high": mean + half, "n": n}


def paired_difference(a: Tensor, b: Tensor) -> dict[str, float]:
    """The paired difference ``a - b`` of two models' per-example values ``(N,)`` on the same examples:
    ``{"mean", "stderr", "low", "high"}`` with the ~95% interval ``mean ± 1.96 stderr``."""
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a paired difference needs two (N,) tensors of the same examples, got {a.shape}, {b.shape}")
    d = mean_and_stderr(a.double() - b.double())
    return {**d, "low": d["mean"] - Z95 * d["stderr"], "high": d["mean"] + Z95 * d["stderr"]}


def outcomes_text(correct: Tensor) -> str:
    """Per-example 0/1 outcomes ``(N,)`` (e.g. "classified correctly") as a string of ``0`` and ``1``, one character
    per example in order: 1,000 test images take 1,000 bytes of JSON, and models scored on the same examples can
    later be compared pairwise (:func:`paired_difference`) without loading them."""
    return "".join("1" if flag else "0" for flag in correct.bool().tolist())


def outcomes(text: str) -> Tensor:
    """The ``(N,)`` float64 0/1 tensor that :func:`outcomes_text` wrote."""
    if not set(text) <= {"0", "1"}:
        raise ValueError(f"per-example outcomes are a string of 0 and 1, got {text[:20]!r}...")
    return torch.tensor([c == "1" for c in text], dtype=torch.float64)
