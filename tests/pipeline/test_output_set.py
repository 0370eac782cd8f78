"""``pipeline.output_set``: a stage's outputs replaced all together or not at all, whatever stops the stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import OutputError
from pipeline.output_set import BACKUP, replaced_together
from pipeline.processes import owner_tags

OUTPUTS = ["models/clf", "reports/metrics/clf.json"]


def _previous(root: Path) -> dict[str, bytes]:
    """A previous run's outputs: a folder of two files and one file."""
    files = {
        "models/clf/a/model.pt": b"old model",
        "models/clf/stale.pt": b"old extra",
        "reports/metrics/clf.json": b"1",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "reports/metrics/other.json").write_bytes(b"another stage's")
    return files


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_new(root: Path) -> None:
    (root / "models/clf/a").mkdir(parents=True, exist_ok=True)
    (root / "models/clf/a/model.pt").write_bytes(b"new model")


def test_a_finished_run_replaces_every_output_and_leaves_nothing_stale(tmp_path: Path) -> None:
    _previous(tmp_path)
    with replaced_together(tmp_path, "clf", OUTPUTS):
        assert not (tmp_path / "models/clf").exists()  # the block starts without them, as after DVC's removal
        _write_new(tmp_path)
        (tmp_path / "reports/metrics/clf.json").write_bytes(b"2")
    assert _tree(tmp_path) == {
        "models/clf/a/model.pt": b"new model",
        "reports/metrics/clf.json": b"2",
        "reports/metrics/other.json": b"another stage's",
    }
    assert list((tmp_path / BACKUP).iterdir()) == []


@pytest.mark.parametrize("stop", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_or_stopped_run_leaves_the_previous_outputs(tmp_path: Path, stop: BaseException) -> None:
    _previous(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(type(stop)), replaced_together(tmp_path, "clf", OUTPUTS):
        _write_new(tmp_path)  # half of the new set written: the model, not the metrics
        raise stop
    assert _tree(tmp_path) == before
    assert list((tmp_path / BACKUP).iterdir()) == []


def test_a_first_run_that_fails_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), replaced_together(tmp_path, "clf", OUTPUTS):
        _write_new(tmp_path)
        raise RuntimeError
    assert _tree(tmp_path) == {}


def test_an_output_folder_that_takes_no_file_is_refused_before_the_block(tmp_path: Path) -> None:
    """Refused before any compute, and nothing moved: here an output's folder is a file (what a read-only folder
    does for a user who is not root), so nothing can go into it."""
    _previous(tmp_path)
    before = _tree(tmp_path)
    ran = []
    with (
        pytest.raises(OutputError, match=r"cannot write into .*models/clf/a/model.pt.*writable folder"),
        replaced_together(tmp_path, "clf", ["models/clf/a/model.pt/x.json", *OUTPUTS]),
    ):
        ran.append(True)
    assert not ran and _tree(tmp_path) == before


def _abandon(root: Path, name: str, outputs: list[str], owner: dict[str, str]) -> None:
    """What a run killed outright leaves: its outputs half-written, the previous ones in its backup."""
    backup = root / BACKUP / name
    existing = [output for output in outputs if (root / output).exists()]
    for output in existing:
        (backup / output).parent.mkdir(parents=True, exist_ok=True)
        (root / output).replace(backup / output)
    manifest = {"owner": owner, "outputs": outputs, "existing": existing}
    (backup / "manifest.json").write_text(json.dumps(manifest))
    _write_new(root)


def _dead_owner() -> dict[str, str]:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from pipeline.processes import owner_tags; print(json.dumps(owner_tags()))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)  # that process has exited


@pytest.mark.parametrize("name", ["clf", "clf@a"])  # the same run, or another run writing inside the same folder
def test_a_set_left_by_a_killed_run_is_restored_before_the_next_run(tmp_path: Path, name: str) -> None:
    previous = _previous(tmp_path)
    _abandon(tmp_path, "clf", OUTPUTS, _dead_owner())
    with pytest.raises(RuntimeError), replaced_together(tmp_path, name, ["models/clf/a/model.pt"]):
        raise RuntimeError
    assert {k: v for k, v in _tree(tmp_path).items() if k in previous} == previous  # the killed run is undone
    assert list((tmp_path / BACKUP).iterdir()) == []


def test_a_set_held_by_a_live_run_is_left_alone(tmp_path: Path) -> None:
    """The pool's set while its runs (which write inside the same folders) go on, or another stage's."""
    _previous(tmp_path)
    _abandon(tmp_path, "clf", OUTPUTS, owner_tags())  # this process: alive
    with replaced_together(tmp_path, "clf@a", ["models/clf/a/model.pt"]):
        _write_new(tmp_path)
    assert (tmp_path / BACKUP / "clf" / "models/clf/stale.pt").read_bytes() == b"old extra"
    assert (tmp_path / "models/clf/a/model.pt").read_bytes() == b"new model"


def test_a_half_discarded_set_is_never_restored(tmp_path: Path) -> None:
    """A kill while the finished run deletes its backup: what is left of it is deleted, not put back."""
    doomed = tmp_path / BACKUP / "clf.discard"
    (doomed / "models/clf").mkdir(parents=True)
    (doomed / "models/clf/old.pt").write_bytes(b"old")
    _write_new(tmp_path)
    with replaced_together(tmp_path, "clf", OUTPUTS):
        _write_new(tmp_path)
    assert _tree(tmp_path) == {"models/clf/a/model.pt": b"new model"}
    assert list((tmp_path / BACKUP).iterdir()) == []


def test_two_live_runs_of_one_name_are_refused(tmp_path: Path) -> None:
    with replaced_together(tmp_path, "clf", OUTPUTS), pytest.raises(OutputError, match="still going"):
        with replaced_together(tmp_path, "clf", OUTPUTS):
            pass


def test_kill_9_mid_run_then_the_next_run_restores(tmp_path: Path) -> None:
    """A real ``kill -9``: the process cannot clean up; the next run that meets its set restores it first."""
    previous = _previous(tmp_path)
    script = (
        "import os, signal, sys; from pathlib import Path; from pipeline.output_set import replaced_together\n"
        "root = Path(sys.argv[1])\n"
        f"with replaced_together(root, 'clf', {OUTPUTS!r}):\n"
        "    (root / 'models/clf/a').mkdir(parents=True); (root / 'models/clf/a/model.pt').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False, env=os.environ.copy())
    assert killed.returncode == -9
    assert (tmp_path / "models/clf/a/model.pt").read_bytes() == b"half"
    with pytest.raises(RuntimeError), replaced_together(tmp_path, "clf", OUTPUTS):
        raise RuntimeError
    assert _tree(tmp_path) == {**previous, "reports/metrics/other.json": b"another stage's"}


def test_a_move_aside_that_fails_half_way_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second output cannot be moved aside (a disk error, say): the first comes back and nothing is lost."""
    previous = _previous(tmp_path)
    real_replace = Path.replace

    def failing(self: Path, target: Path) -> Path:
        if self.name == "clf.json" and BACKUP in str(target):
            raise OSError(5, "Input/output error")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", failing)
    with pytest.raises(OSError), replaced_together(tmp_path, "clf", OUTPUTS):
        raise AssertionError("the block must not run")
    monkeypatch.undo()
    assert {k: v for k, v in _tree(tmp_path).items() if k in previous} == previous


def test_a_kill_while_moving_aside_loses_nothing(tmp_path: Path) -> None:
    """Killed after moving the first output aside but before the second: the second is still the previous one, and
    the next run must leave it, not delete it as something the run wrote."""
    previous = _previous(tmp_path)
    backup = tmp_path / BACKUP / "clf"
    (backup / "models").mkdir(parents=True)
    (tmp_path / "models/clf").replace(backup / "models/clf")  # only the first of the two was moved
    manifest = {"owner": _dead_owner(), "outputs": OUTPUTS, "existing": OUTPUTS}
    (backup / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError), replaced_together(tmp_path, "clf", OUTPUTS):
        raise RuntimeError
    assert {k: v for k, v in _tree(tmp_path).items() if k in previous} == previous
