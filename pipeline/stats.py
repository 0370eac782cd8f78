"""Sampling error of per-example means, shared by the stages that compare models on the same test examples.

A mean over N test examples carries the standard error ``s / sqrt(N)`` (``s`` the sample standard deviation): what
another test set of the same size would change. Two models scored on the *same* examples are compared by the mean of
their per-example differences; its standard error is smaller than either model's, because the examples are shared.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Z95 = 1.96  # a normal ~95% interval is the estimate ± 1.96 standard errors


def mean_and_stderr(values: Tensor) -> dict[str, float]:
    """``{"mean", "stderr"}`` of per-example ``values`` ``(N,)``: the mean and its standard error over examples
    (NaN for ``N < 2``)."""
    v = values.double()
    stderr = float(v.std(correction=1) / math.sqrt(len(v))) if len(v) >= 2 else math.nan
    return {"mean": float(v.mean()), "stderr": stderr}


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
