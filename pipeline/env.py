"""Execution switches read from the environment (they change how a stage runs, never what it computes)."""

from __future__ import annotations

import os

_OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool = True) -> bool:
    """``name`` as an on/off switch: ``0``, ``false``, ``no`` or ``off`` (any case) mean off, anything else on;
    unset (or empty) gives ``default``."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in _OFF
