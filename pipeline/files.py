"""Atomic, deterministic file writing shared by every stage.

A stage killed mid-write must never leave a truncated file that a later run trusts, and re-running a stage with
the same inputs must give byte-identical outputs (DVC then sees no change). Each writer renders the whole content
in memory, writes it to a temporary file in the same folder and renames it over the target (atomic on POSIX).
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import OutputError, brief

if TYPE_CHECKING:
    import pandas as pd


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating parent folders.

    A folder that refuses the write (read-only, full disk) raises :class:`OutputError` naming it, and leaves the
    earlier ``path`` as it was: nothing replaces it before the new content is complete on disk.
    """
    # A unique name opened with "x" (not mkstemp, whose files are private 0600): the result gets the umask's mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OutputError(
                f"cannot write {path} ({err.strerror or brief(err)}): make {path.parent} writable (or free space "
                f"on its disk) and run the stage again; the earlier {path.name}, if any, is untouched."
            ) from None
        raise


def probe_writable(folder: Path) -> None:
    """Create ``folder`` if needed and a file in it, then delete that file: an ``OSError`` says ``folder`` cannot take
    the files a stage is about to write (read-only, not a folder, disk full), before any compute is spent."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex}"
    probe.touch(exist_ok=False)
    probe.unlink()


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` atomically and deterministically.

    ``torch.save`` names the records inside its zip archive after the target file, so saving straight to a
    temporary name would change the bytes; saving to memory first gives the same bytes for the same object.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def write_json(path: Path, data: Any) -> None:
    """Pretty, key-sorted, strict JSON with a trailing newline, written atomically: a NaN or infinite float is written
    as null (Python's ``NaN``/``Infinity`` tokens are not JSON, and DVC, jq or a browser would refuse the file)."""
    text = json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False)
    write_bytes_atomic(path, (text + "\n").encode())


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return finite_or_none(data)
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def finite_or_none(value: Any) -> float | None:
    """JSON has no NaN/inf: a non-finite number (or None) is written as null."""
    return None if value is None or not math.isfinite(float(value)) else float(value)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """A table as CSV without the index, ``\n`` line ends on every platform, written atomically."""
    write_bytes_atomic(path, frame.to_csv(index=False, lineterminator="\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
