"""Shared by the tests and the library's doctests (pytest collects ``iresnet/`` with ``--doctest-modules``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _seeded_doctest(request: pytest.FixtureRequest) -> None:
    """Every doctest starts from the same random state, so an example's values do not depend on which ran before."""
    if isinstance(request.node, pytest.DoctestItem):
        import torch

        torch.manual_seed(0)
