"""Small, explicit validators that turn a parsed YAML mapping into frozen dataclasses.

A section is a frozen dataclass whose fields are declared with :func:`param`, each holding a *spec*: a function
``spec(value, key) -> value`` that checks the type and range and raises :class:`ParamsError` naming the key path
(``classifier.coeffs[2]``), the value and what is allowed. :func:`build` checks unknown and missing keys, applies
each field's spec, then the section's own ``check(key)`` for rules that involve several fields.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pipeline.errors import ParamsError

Spec = Callable[[Any, str], Any]
T = TypeVar("T")


def param(spec: Spec, doc: str = "") -> Any:
    """Declare a section field validated by ``spec``; ``doc`` says what it controls (shown in errors and docs)."""
    return dataclasses.field(metadata={"spec": spec, "doc": doc})


def _is_number(value: object) -> bool:
    # bool is a subclass of int in Python; `true` is never a valid number here.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts)


def integer(lo: int | None = None, hi: int | None = None) -> Spec:
    """An int (not a bool, not a float) in ``[lo, hi]``."""
    allowed = "an integer" + (f" {_range_text(lo, hi, False, False)}" if lo is not None or hi is not None else "")

    def spec(value: Any, key: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ParamsError(key, value, allowed)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ParamsError(key, value, allowed)
        return value

    return spec


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Spec:
    """A finite number (int or float, returned as float) in the given open/closed range."""
    rng = _range_text(lo, hi, lo_open, hi_open)
    allowed = "a finite number" + (f" {rng}" if rng else "")

    def spec(value: Any, key: str) -> float:
        if not _is_number(value) or not math.isfinite(value):
            raise ParamsError(key, value, allowed)
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and (value >= hi if hi_open else value > hi)
        if low_bad or high_bad:
            raise ParamsError(key, value, allowed)
        return float(value)

    return spec


def boolean() -> Spec:
    """``true`` or ``false`` (not 0/1, not strings)."""

    def spec(value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise ParamsError(key, value, "true or false")
        return value

    return spec


def string() -> Spec:
    """A non-empty string."""

    def spec(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise ParamsError(key, value, "a non-empty string")
        return value

    return spec


def choice(*names: object) -> Spec:
    """One of ``names`` (compared with ``==`` and type, so ``1`` does not match ``true``)."""
    allowed = "one of " + ", ".join(repr(n) for n in names)

    def spec(value: Any, key: str) -> Any:
        if not any(value == n and type(value) is type(n) for n in names):
            raise ParamsError(key, value, allowed)
        return value

    return spec


def optional(inner: Spec) -> Spec:
    """``null`` or a value accepted by ``inner``."""

    def spec(value: Any, key: str) -> Any:
        if value is None:
            return None
        try:
            return inner(value, key)
        except ParamsError as err:
            raise ParamsError(key, value, f"null or {err.allowed}") from None

    return spec


def one_of(*specs: Spec) -> Spec:
    """A value accepted by at least one of ``specs`` (tried in order)."""

    def spec(value: Any, key: str) -> Any:
        allowed = []
        for inner in specs:
            try:
                return inner(value, key)
            except ParamsError as err:
                allowed.append(err.allowed)
        raise ParamsError(key, value, " or ".join(allowed))

    return spec


def list_of(inner: Spec, min_len: int = 1, increasing: bool = False, unique: bool = False) -> Spec:
    """A YAML list (returned as a tuple) whose items pass ``inner``; optionally strictly increasing or unique."""

    def spec(value: Any, key: str) -> tuple[Any, ...]:
        if not isinstance(value, list) or len(value) < min_len:
            raise ParamsError(key, value, f"a list of at least {min_len} item(s)")
        items = tuple(inner(item, f"{key}[{i}]") for i, item in enumerate(value))
        if increasing and any(b <= a for a, b in zip(items, items[1:])):
            raise ParamsError(key, value, "a strictly increasing list")
        if unique and len(set(items)) != len(items):
            raise ParamsError(key, value, "a list without repeated items")
        return items

    return spec


def section(cls: type[T]) -> Spec:
    """A nested mapping validated as the dataclass ``cls``."""

    def spec(value: Any, key: str) -> T:
        return build(cls, value, key)

    return spec


def build(cls: type[T], raw: Any, key: str) -> T:
    """Validate the mapping ``raw`` against the section ``cls`` (every field required, no unknown key)."""
    if not isinstance(raw, Mapping):
        raise ParamsError(key or "<top level>", raw, "a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    prefix = f"{key}." if key else ""
    for name in raw:
        if name not in fields:
            raise ParamsError(f"{prefix}{name}", raw[name], f"no such key; known keys here: {', '.join(fields)}")
    values = {}
    for name, field in fields.items():
        if name not in raw:
            doc = field.metadata.get("doc", "")
            raise ParamsError(f"{prefix}{name}", "<missing>", f"a value ({doc})" if doc else "a value")
        values[name] = field.metadata["spec"](raw[name], f"{prefix}{name}")
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        check(key)
    return obj


def to_dict(obj: Any) -> Any:
    """A section (or any nesting of sections and tuples) as plain YAML/JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj
