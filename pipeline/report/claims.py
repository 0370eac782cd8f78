"""The paper's claims as data: ``claims.yaml`` beside this module (read by the page and by the verdict table), with
the words of every finding as a jinja template that :func:`finding` fills with the numbers a report module computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import yaml

from pipeline.report.tables import column_name, num, signed

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
PAGE_TEMPLATE = Path(__file__).with_name("page.md.j2")


@cache
def load_claims() -> dict[str, Any]:
    """``{"sections": [{key, title, paper, finding}], "claims": [{id, section, where, claim, paper, reads, rule}]}``."""
    return yaml.safe_load(CLAIMS_FILE.read_text(encoding="utf-8"))


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``3 epochs``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def listed(parts: Iterable[Any]) -> str:
    """``a, b, c``; ``none`` for no parts."""
    parts = [str(p) for p in parts]
    return ", ".join(parts) if parts else "none"


@cache
def environment() -> jinja2.Environment:
    """Markdown, not HTML (no escaping); an unknown name is an error, not an empty string. Filters: ``f`` (Python's
    ``format``, ``x | f(".2f")``), ``num`` (``n/a`` for no value), ``signed`` (``+0.40``, ``−2.20``), ``yes_no``,
    ``plural``, ``listed`` and ``name`` (``c = 0.9`` for a coefficient label)."""
    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)
    filters = dict(f=format, num=num, signed=signed, yes_no=yes_no, plural=plural, listed=listed, name=column_name)
    env.filters.update({name: _defined_only(fn) for name, fn in filters.items()})
    return env


def _defined_only(fn: Callable[..., str]) -> Callable[..., str]:
    """``fn`` as a filter that fails, naming the missing fact, where a template names one its function did not pass
    (Python's ``format`` would fail on the undefined value with a message naming neither)."""

    def strict(value: Any, *args: Any) -> str:
        if isinstance(value, jinja2.Undefined):
            str(value)  # a StrictUndefined raises UndefinedError ("'total' is undefined")
        return fn(value, *args)

    return strict


@cache
def _templates() -> dict[str, jinja2.Template]:
    return {s["key"]: environment().from_string(s["finding"]) for s in load_claims()["sections"]}


def finding(key: str, **facts: Any) -> str:
    """This run's finding for the section ``key`` of ``claims.yaml``: its ``finding`` template filled with ``facts``."""
    return _templates()[key].render(**facts)
