"""Terminal helpers: progress wrappers pass every item through; tables show every metric, markup-free."""

from __future__ import annotations

import pytest
from rich.console import Console

from pipeline.console import format_value, metrics_table, progress, track


@pytest.mark.parametrize("enabled", ["0", "1"])
def test_track_and_progress(monkeypatch: pytest.MonkeyPatch, enabled: str) -> None:
    monkeypatch.setenv("IRESNET_PROGRESS", enabled)
    assert list(track(range(5), "items")) == [0, 1, 2, 3, 4]
    assert list(track((i for i in range(3)), "generator")) == [0, 1, 2]  # no len(): indeterminate bar
    calls = []
    with progress("steps", total=2) as advance:
        for step in range(2):
            advance(info=f"loss {step}")
            calls.append(step)
    assert calls == [0, 1]


def test_metrics_table_renders_values_without_markup() -> None:
    table = metrics_table("t", {"coeffs[2]": 0.123456789, "n": 12345, "ok": True, "name": "[bold]x"})
    console = Console(width=100, record=True)
    console.print(table)
    text = console.export_text()
    assert "coeffs[2]" in text and "0.123457" in text and "12,345" in text and "True" in text and "[bold]x" in text
    assert format_value(float("nan")) == "nan" and format_value(1e-7) == "1e-07"
