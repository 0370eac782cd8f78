"""Errors a user can fix: the CLI prints them as one paragraph and exits 1, without a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def brief(err: BaseException, limit: int = 240) -> str:
    """The first line of ``err`` (torch's unpickling errors run to a dozen lines), cut at ``limit`` characters: the
    cause inside a one-line message."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UserError(Exception):
    """Base class of every error caused by input the user controls (params, data, missing stage outputs)."""


class ParamsError(UserError, ValueError):
    """A parameter value is invalid; the message names the key path, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid parameter `{key}` = {value!r}: expected {allowed}.")


class DataError(UserError):
    """A dataset is missing or corrupt, or a stage's input has not been produced yet."""


class OutputError(UserError):
    """A stage cannot write one of its outputs (a read-only folder, a full disk); the earlier file is untouched."""


class TrackingError(UserError):
    """The MLflow store cannot be opened (locked, unreadable, unreachable server)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a stage: a KeyboardInterrupt (so every cleanup runs) that knows its signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


_held: list[int] | None = None  # signals that arrived inside signals_held(), in order; None outside it


def interrupt(signum: int, frame: object) -> None:
    """The handler the CLI installs for SIGINT and SIGTERM: raise :class:`Interrupted`, or, inside
    :func:`signals_held`, keep the signal for the end of that block."""
    if _held is not None:
        _held.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (as :func:`interrupt` handles them) until the block ends, then raise the first as
    :class:`Interrupted`. For MLflow store writes: a write cut in the middle by the KeyboardInterrupt leaves its SQLite
    transaction open, and the cleanup's own writes (the run marked KILLED) then fail with "database is locked"."""
    global _held
    if _held is not None:  # nested: the outermost block raises
        yield
        return
    _held = []
    try:
        yield
    finally:
        held, _held = _held, None
    if held:
        raise Interrupted(held[0])
