"""The params schema on pydantic v2: typed, frozen sections and one-line errors naming the key path.

A section is a frozen pydantic dataclass (``@section``), every field required (``param(doc)``), unknown keys
rejected. Field types come from the helpers below (:func:`integer`, :func:`real`, :func:`choice`, :func:`list_of`,
...): each is an ``Annotated`` pydantic type that also carries :class:`Allowed`, the words of the error message.
:func:`build` validates with pydantic and turns its first error into :class:`ParamsError` naming the key path
(``classifier.coeffs[2]``), the value and what is allowed, as in ``invalid parameter `flow.coeff` = 1.0: expected a
finite number > 0 and < 1.``. Rules over several fields are a section's ``check()``, run after its fields validate
(a pydantic ``model_validator``), raising :class:`ParamsError` with a key relative to the section.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from pipeline.errors import ParamsError

T = TypeVar("T")


@dataclass(frozen=True)
class Allowed:
    """What a type accepts, in the words of the error message (``an integer >= 1``)."""

    text: str


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    def text(bound: float) -> str:  # integers in full (a seed's 4294967295, not 4.29497e+09)
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {text(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {text(hi)}")
    return " and ".join(parts)


def integer(lo: int | None = None, hi: int | None = None) -> Any:
    """An int (not a bool, not a float) in ``[lo, hi]``."""
    text = "an integer" + (f" {_range_text(lo, hi, False, False)}" if lo is not None or hi is not None else "")
    return Annotated[int, Strict(), Field(ge=lo, le=hi), Allowed(text)]


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Any:
    """A finite number (int or float, stored as float) in the given open/closed range."""
    rng = _range_text(lo, hi, lo_open, hi_open)
    bounds = {"gt" if lo_open else "ge": lo, "lt" if hi_open else "le": hi}
    field = Field(allow_inf_nan=False, **{k: v for k, v in bounds.items() if v is not None})
    return Annotated[float, Strict(), field, Allowed("a finite number" + (f" {rng}" if rng else ""))]


def boolean() -> Any:
    """``true`` or ``false`` (not 0/1, not strings)."""
    return Annotated[bool, Strict(), Allowed("true or false")]


def string() -> Any:
    """A non-empty string."""
    return Annotated[str, Strict(), Field(min_length=1), Allowed("a non-empty string")]


def choice(*names: object) -> Any:
    """One of ``names`` (strictly: ``1`` does not match ``true``)."""
    allowed = "one of " + ", ".join(repr(n) for n in names)

    def exact(value: Any) -> Any:  # pydantic's lax Literal takes true for 1 and 1.0 for 1; Strict() does not apply
        if not any(value == n and type(value) is type(n) for n in names):
            raise ValueError(allowed)
        return value

    return Annotated[Literal[names], BeforeValidator(exact), Allowed(allowed)]  # type: ignore[valid-type]


def checked(base: Any, check: Callable[[Any], str | None], allowed: str) -> Any:
    """``base`` with an extra rule: ``check(value)`` returns None when the value is fine, else what is allowed."""

    def validate(value: Any) -> Any:
        problem = check(value)
        if problem:
            raise ValueError(problem)
        return value

    return Annotated[base, AfterValidator(validate), Allowed(allowed)]


def optional(inner: Any) -> Any:
    """``null`` or a value ``inner`` accepts."""
    return Annotated[inner | None, Allowed(f"null or {_allowed(inner)}")]


def one_of(*types: Any) -> Any:
    """A value one of ``types`` accepts (tried in order)."""
    union = typing.Union[tuple(types)]  # built from a runtime tuple
    return Annotated[union, Field(union_mode="left_to_right"), Allowed(" or ".join(_allowed(t) for t in types))]


def list_of(inner: Any, min_len: int = 1, increasing: bool = False, unique: bool = False) -> Any:
    """A YAML list (stored as a tuple) whose items ``inner`` accepts; optionally strictly increasing or unique."""

    def order(items: tuple[Any, ...]) -> tuple[Any, ...]:
        if increasing and any(b <= a for a, b in zip(items, items[1:])):
            raise ValueError("a strictly increasing list")
        if unique and len(set(items)) != len(items):
            raise ValueError("a list without repeated items")
        return items

    text = f"a list of at least {min_len} item(s)"
    return Annotated[tuple[inner, ...], Field(min_length=min_len), AfterValidator(order), Allowed(text)]


def param(doc: str = "") -> Any:
    """A required section field; ``doc`` says what it controls (shown when it is missing)."""
    return Field(description=doc)


def section(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen pydantic dataclass with no unknown keys; its ``check()`` runs once its fields are valid."""
    if hasattr(cls, "check"):

        def run_check(self: Any) -> Any:
            self.check()
            return self

        cls._run_check = model_validator(mode="after")(run_check)  # type: ignore[attr-defined]
    return pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)


def _allowed(annotation: Any) -> str:
    """The :class:`Allowed` text of ``annotation`` (a section: a mapping)."""
    for meta in reversed(getattr(annotation, "__metadata__", ())):
        if isinstance(meta, Allowed):
            return meta.text
    return "a mapping of keys to values"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _step(annotation: Any, part: str | int) -> Any | None:
    """The annotation of ``part`` (a field name, or a list index) inside ``annotation``; None if not a key step."""
    base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    if isinstance(part, str) and dataclasses.is_dataclass(base) and part in _hints(base):
        return _hints(base)[part]
    if isinstance(part, int) and typing.get_origin(base) is tuple:
        return typing.get_args(base)[0]
    return None


def _key(parts: Sequence[str | int]) -> str:
    key = ""
    for part in parts:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else part)
    return key


def _translate(cls: type, error: dict[str, Any]) -> ParamsError:
    """One pydantic error as :class:`ParamsError`: the longest key path of ``error["loc"]`` that names fields and
    list items, the value found there, and the words of its type's :class:`Allowed` (or of a failed rule)."""
    annotation, walked = cls, []
    for part in error["loc"]:
        inner = _step(annotation, part)
        if inner is None:
            break
        annotation, walked = inner, [*walked, part]
    key = _key(walked) or "<top level>"
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ParamsError):  # a section's check(): its key is relative to the section
        return ParamsError(f"{_key(walked)}.{cause.key}" if walked else cause.key, cause.value, cause.allowed)
    if error["type"] == "missing":
        doc = _field_doc(cls, walked)
        return ParamsError(key, "<missing>", f"a value ({doc})" if doc else "a value")
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        name = error["loc"][len(walked)]
        known = ", ".join(_hints(_base(annotation)))
        return ParamsError(_key([*walked, name]), error["input"], f"no such key; known keys here: {known}")
    if error["type"] == "value_error" and isinstance(cause, ValueError):  # a rule of checked() or list_of()
        return ParamsError(key, error["input"], str(cause))
    return ParamsError(key, error["input"], _allowed(annotation))


def _base(annotation: Any) -> Any:
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation


def _field_doc(cls: type, walked: Sequence[str | int]) -> str:
    """The ``param(doc)`` of the field at ``walked``."""
    owner: Any = cls
    for part in walked[:-1]:
        owner = _base(_step(owner, part))
    fields = getattr(_base(owner), "__pydantic_fields__", {})
    info = fields.get(walked[-1]) if walked else None
    return (info.description or "") if info is not None else ""


def build(cls: type[T], raw: Any) -> T:
    """Validate the mapping ``raw`` as the section ``cls``: the first problem raises :class:`ParamsError`."""
    try:
        return TypeAdapter(cls).validate_python(raw)
    except ValidationError as err:
        raise _translate(cls, err.errors()[0]) from None


def to_dict(obj: Any) -> Any:
    """A section (or any nesting of sections and tuples) as plain YAML/JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj
