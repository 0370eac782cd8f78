"""Terminal output shared by every stage: progress bars (stderr) and result tables (stdout), with rich."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from pipeline.env import env_flag

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)


def progress_enabled() -> bool:
    """Progress bars are on unless ``IRESNET_PROGRESS=0`` (e.g. for quiet logs)."""
    return env_flag("IRESNET_PROGRESS")


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A progress bar; yields ``advance(n=1, info=None)`` where ``info`` is a short status text (e.g. the loss)."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err_console,
        disable=not progress_enabled(),
    )
    with bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            if info is None:
                bar.advance(task, n)
            else:
                bar.update(task, advance=n, info=info)

        yield advance


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar (``total`` defaults to ``len(items)`` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(description, total) as advance:
        for item in items:
            yield item
            advance()


def format_value(value: Any) -> str:
    """Numbers with 6 significant digits; everything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def metrics_table(title: str, metrics: Mapping[str, Any]) -> Table:
    """A two-column table of a stage's result dict."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(Text(str(key)), Text(format_value(value)))  # Text: no rich markup in keys/values
    return table


def print_error(message: str) -> None:
    """One paragraph on stderr, without markup interpretation (``[2]`` in a key path is not a style)."""
    err_console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)  # one unbroken line
