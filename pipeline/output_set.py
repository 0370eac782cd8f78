"""A stage's outputs replaced all together or not at all.

``dvc.yaml`` declares every output ``persist: true``, so DVC no longer deletes a stage's outputs before running it
(a stage that then failed left none, nor anything ``dvc.lock`` records). :func:`replaced_together` does that removal
itself, reversibly: it moves the previous outputs aside, and moves them back if the stage fails or is stopped. So
after a failed ``dvc repro`` the workspace still matches ``dvc.lock``, and a stage never leaves files of two runs
side by side (a new model beside the previous run's metrics).

The set moved aside lives in ``<root>/.outputs-backup/<name>/`` (same file system, so every move is a rename), with
a manifest naming the outputs and the process that owns it. A process killed outright (SIGKILL, power loss) cannot
move anything back; the next run whose outputs overlap that set finds it, sees its owner dead, and restores it first.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import OutputError, brief, signals_held
from pipeline.files import probe_writable
from pipeline.processes import owner_alive, owner_tags

BACKUP = ".outputs-backup"  # under the project root; git and DVC ignore it
_MANIFEST = "manifest.json"


@contextmanager
def replaced_together(root: Path, name: str, outputs: Sequence[str]) -> Iterator[None]:
    """Run the block that writes ``outputs`` (files or folders, paths from ``root``) so that they are replaced all
    together or not at all.

    Before the block, each output's folder must take a new file (else :class:`OutputError` names it, before any
    compute), a set left by a killed run that overlaps these outputs is restored, and the existing outputs are moved
    aside: the block starts without them, as it did when DVC removed them. When the block ends normally the set moved
    aside is deleted; when it raises (an error, Ctrl-C, SIGTERM) what it wrote is deleted and the set moved back.
    ``name`` (for example ``train_classifier@0.9-1``) names the set; runs at once need distinct names.
    """
    root = root.resolve()
    for output in outputs:
        _check_writable((root / output).parent)
    store = root / BACKUP
    for leftover in sorted(store.iterdir()) if store.is_dir() else ():
        _restore_if_abandoned(root, leftover, name, outputs)
    backup = store / name
    if backup.exists():  # the same name, owned by a live process: two runs of one stage at once
        raise OutputError(f"{backup} belongs to another run of {name} still going; wait for it to end.")
    try:
        _move_aside(root, backup, outputs)  # inside: a move that fails half-way is undone too
        yield
    except BaseException:
        with signals_held():  # a second Ctrl-C must not stop the restore half-way
            _move_back(root, backup)
        raise
    _discard(backup)


def _check_writable(folder: Path) -> None:
    try:
        probe_writable(folder)
    except OSError as err:
        raise OutputError(
            f"cannot write into {folder} ({err.strerror or brief(err)}): make it a writable folder (or free space on "
            "its disk) and run the stage again; nothing was changed."
        ) from None


def _overlaps(a: str, b: str) -> bool:
    """Whether one path is the other or lies inside it."""
    parts_a, parts_b = Path(a).parts, Path(b).parts
    return parts_a[: len(parts_b)] == parts_b or parts_b[: len(parts_a)] == parts_a


def _read_manifest(backup: Path) -> dict | None:
    try:
        return json.loads((backup / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _restore_if_abandoned(root: Path, backup: Path, name: str, outputs: Sequence[str]) -> None:
    """Restore ``backup`` if its owner is dead and it is ``name``'s or holds any of ``outputs``; a set being
    discarded is deleted."""
    if backup.name.endswith(".discard"):
        shutil.rmtree(backup, ignore_errors=True)
        return
    manifest = _read_manifest(backup)
    if manifest is None:  # killed before its manifest was written: nothing was moved yet
        shutil.rmtree(backup, ignore_errors=True)
        return
    if owner_alive(manifest["owner"]):
        return
    if backup.name == name or any(_overlaps(mine, theirs) for mine in outputs for theirs in manifest["outputs"]):
        _move_back(root, backup)


def _move_aside(root: Path, backup: Path, outputs: Sequence[str]) -> None:
    """Record ``outputs``, which of them exist and this process in ``backup``'s manifest, then move each existing
    output into it."""
    backup.mkdir(parents=True)
    existing = [output for output in outputs if (root / output).exists() or (root / output).is_symlink()]
    manifest = {"owner": owner_tags(), "outputs": list(outputs), "existing": existing}
    tmp = backup / f".{_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(backup / _MANIFEST)  # a manifest is whole or absent
    for output in outputs:
        source = root / output
        if source.exists() or source.is_symlink():
            (backup / output).parent.mkdir(parents=True, exist_ok=True)
            source.replace(backup / output)


def _move_back(root: Path, backup: Path) -> None:
    """Put every output of ``backup``'s manifest back as it was before the run, then drop ``backup``: one that was
    moved aside replaces what the run wrote there; one that did not exist is deleted if the run wrote it; one that
    existed but was never moved (a kill while moving) is the previous output itself and stays."""
    manifest = _read_manifest(backup)
    try:
        for output in manifest["outputs"] if manifest is not None else ():
            saved = backup / output
            if saved.exists() or saved.is_symlink():
                _remove(root / output)
                (root / output).parent.mkdir(parents=True, exist_ok=True)
                saved.replace(root / output)
            elif output not in manifest["existing"]:
                _remove(root / output)
    except OSError as err:
        raise OutputError(
            f"cannot move the previous outputs back from {backup} ({err.strerror or brief(err)}): they are kept "
            f"there; move them back into {root} by hand, or run the stage again once the cause is fixed."
        ) from err
    shutil.rmtree(backup, ignore_errors=True)


def _discard(backup: Path) -> None:
    """Delete ``backup``; renamed first, so a kill half-way through never leaves a partial set to restore."""
    doomed = backup.with_name(f"{backup.name}.discard")
    shutil.rmtree(doomed, ignore_errors=True)
    backup.replace(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
