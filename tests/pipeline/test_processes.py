"""``pipeline.processes``: jobs side by side (never more than asked, a failure stops the pool and names the job),
signals passed on, no process outliving its parent, and a classifier's bytes independent of the number of workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipeline.processes import Job, JobFailed, run_jobs
from tests.pipeline.classifier_helpers import REPO, TINY_CLASSIFIER

# A job that records when it starts and ends (to measure overlap), then sleeps.
_SPAN = (
    "import sys, time; out = open(sys.argv[1], 'a'); out.write(str(time.monotonic()) + ' '); out.flush(); "
    "time.sleep({sleep}); out.write(str(time.monotonic()))"
)


def _span_job(folder: Path, name: str, sleep: float = 0.6) -> Job:
    return Job(name, [sys.executable, "-c", _SPAN.format(sleep=sleep), str(folder / name)])


def _most_at_once(folder: Path) -> int:
    spans = [tuple(map(float, p.read_text().split())) for p in folder.iterdir()]
    return max(sum(start <= t < end for start, end in spans) for t, _ in spans)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_runs_every_job_and_never_more_than_the_workers_at_once(tmp_path: Path, workers: int) -> None:
    jobs = [_span_job(tmp_path, f"job{i}") for i in range(4)]
    run_jobs(jobs, workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"job{i}" for i in range(4)]
    assert _most_at_once(tmp_path) == workers  # the pool fills every worker, and no more


def test_a_failed_job_stops_the_pool_and_names_itself(tmp_path: Path) -> None:
    failing = Job("broken-run", [sys.executable, "-c", "print('the reason'); raise SystemExit(3)"])
    with pytest.raises(JobFailed, match=r"broken-run failed \(exit status 3\)[\s\S]*the reason") as err:
        run_jobs([failing, _span_job(tmp_path, "after")], workers=1)
    assert err.value.code == 3 and not (tmp_path / "after").exists()  # nothing starts after a failure


def test_a_running_job_finishes_when_another_fails(tmp_path: Path) -> None:
    failing = Job("broken-run", [sys.executable, "-c", "raise SystemExit(1)"])
    with pytest.raises(JobFailed):
        run_jobs([_span_job(tmp_path, "beside", sleep=1.0), failing], workers=2)
    assert len((tmp_path / "beside").read_text().split()) == 2  # it ran to its end


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        run_jobs([], 0)


# A pool of one job that writes its pid and sleeps; the job asks to die with its parent (as every stage does).
_POOL = """
import sys
from pipeline.processes import Job, run_jobs
child = "from pipeline.processes import die_with_parent; import os, sys, time; die_with_parent(); " \\
    "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
run_jobs([Job("sleeper", [sys.executable, "-c", child, sys.argv[1]])], 1)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) counts as gone
        return stat.read().split(") ")[-1][0] != "Z"


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_pool_leaves_no_job_running(tmp_path: Path, signum: int) -> None:
    """SIGTERM is passed on by the pool; SIGKILL (no handler runs) reaches the job through its parent-death signal."""
    pid_file = tmp_path / "pid"
    env = {**os.environ, "IRESNET_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    pool = subprocess.Popen([sys.executable, "-c", _POOL, str(pid_file)], env=env, cwd=REPO)
    try:
        assert _wait_for(lambda: pid_file.exists() and pid_file.read_text() != ""), "the job never started"
        job = int(pid_file.read_text())
        pool.send_signal(signum)
        pool.wait(timeout=60)
        assert _wait_for(lambda: not _alive(job), timeout=30), "the job outlived its pool"
        assert pool.returncode != 0
    finally:
        pool.kill()


def test_a_classifiers_bytes_do_not_depend_on_the_number_of_workers(
    tmp_path: Path, tiny_params: dict, make_idx_folder: Callable
) -> None:
    """`train-classifiers` at 2 workers writes, for each model, the bytes of `train-classifier --threads 1` alone."""
    params = {**tiny_params, "classifier": {**tiny_params["classifier"], **TINY_CLASSIFIER, "coeffs": [0.9, 0.5]}}
    params["classifier"].update(epochs=1, max_train_batches=2)
    params["tracking"] = {**params["tracking"], "enabled": False}
    roots = {}
    for name in ("pool", "alone"):
        root = roots[name] = tmp_path / name
        make_idx_folder(root / "tiny")
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "IRESNET_PROGRESS": "0"}
    env.pop("IRESNET_THREADS", None)

    def cli(root: Path, *args: str) -> None:
        command = [sys.executable, "-m", "pipeline.cli", "--root", str(root), *args]
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

    for root in roots.values():
        cli(root, "prepare")
    cli(roots["pool"], "--threads", "2", "train-classifiers")
    cli(roots["alone"], "--threads", "1", "train-classifier", "--coeff", "0.5", "--seed", "0")
    model = Path("models/classifier/0.5/seed0/model.pt")
    assert (roots["pool"] / model).read_bytes() == (roots["alone"] / model).read_bytes()
    assert (roots["pool"] / "models/classifier/0.9/seed0/model.pt").is_file()


def _stage_processes(root: Path) -> list[int]:
    """Pids of the ``python -m pipeline.cli`` processes working in ``root`` (not a shell whose ``-c`` names one)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"pipeline.cli" in (entry / "cmdline").read_bytes().split(b"\0"):
                if Path(os.readlink(entry / "cwd")) == root and _alive(int(entry.name)):
                    found.append(int(entry.name))
        except OSError:
            continue  # exited meanwhile, or not ours to read
    return found


def _describe(pid: int) -> str:
    """A process as a failure message shows it: its command line, state and parent, and where each of its threads
    waits in the kernel (what a process that outlives its parent is stuck on)."""
    proc = Path(f"/proc/{pid}")
    try:
        argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        state, ppid = (proc / "stat").read_text().split(") ")[-1].split()[:2]
        waits = sorted({(task / "wchan").read_text() for task in (proc / "task").iterdir()})
    except OSError:
        return f"{pid}: gone"
    return f"{pid} (state {state}, parent {ppid}, threads wait in {', '.join(waits)}): {argv}"


def _stop_and_expect_none_left(
    parent: subprocess.Popen, root: Path, running: int, signum: int, log: Path | None = None
) -> None:
    """Once ``running`` ``pipeline.cli`` processes work in ``root``, send ``signum`` to ``parent``; within a minute
    none may be left (any that are, are killed after the check). ``log``, the parent's output, explains a failure."""
    try:
        started = _wait_for(lambda: len(_stage_processes(root)) == running, timeout=120)
        assert started, f"they never all started: {len(_stage_processes(root))} of {running} running; " + (
            log.read_text()[-3000:] if log is not None else ""
        )
        parent.send_signal(signum)
        parent.wait(timeout=120)
        assert _wait_for(lambda: not _stage_processes(root), timeout=60), (
            "a process outlived what started it:\n"
            + "\n".join(_describe(pid) for pid in _stage_processes(root))
            + ("\n" + log.read_text()[-3000:] if log is not None else "")
        )
    finally:
        parent.kill()
        for pid in _stage_processes(root):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_dvc_repro_leaves_no_stage_running(tmp_path: Path, classifier_repo: Callable, signum: int) -> None:
    """``dvc repro`` stopped mid-stage (SIGTERM, or SIGKILL where DVC can pass nothing on): the pool and its training
    processes stop too, instead of training on and writing outputs that dvc.lock does not record, and the outputs of
    the last good run are back in place."""
    from tests.pipeline.repo_copy import outputs_of

    repo, params, good = classifier_repo(milestones=[1], max_train_batches=1)
    params["classifier"]["epochs"] = 10_000  # trains far longer than the test
    (repo.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = tmp_path / "dvc.log"
    with log.open("w") as out:  # two workers whatever the machine's core count, so the pool runs both at once
        dvc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro", "train_classifier"],
            cwd=repo.root,
            # dash (Debian's /bin/sh, DVC's shell where SHELL is unset) does not exec a `-c` command: only the
            # stage's own `exec` (dvc.yaml) keeps a shell from standing between DVC and the stage
            env={**repo.env, "IRESNET_THREADS": "2", "SHELL": "/bin/sh"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _stop_and_expect_none_left(dvc, repo.root.resolve(), 3, signum, log)  # the pool and its 2 runs
    assert outputs_of(repo.root) == good
    assert "changed outs" not in repo.dvc("status", "train_classifier")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_a_killed_data_parallel_launcher_leaves_no_worker_running(tiny_project: Path, tiny_params: dict) -> None:
    """``kill -9`` of the ``--nproc 2`` launcher: torchrun and both of its training processes stop too."""
    params = {**tiny_params, "classifier": {**tiny_params["classifier"], **TINY_CLASSIFIER, "coeffs": [0.9]}}
    params["classifier"].update(epochs=10_000, milestones=[1], max_train_batches=1)
    params["tracking"] = {**params["tracking"], "enabled": False}
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "IRESNET_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    env.pop("IRESNET_THREADS", None)
    root = tiny_project.resolve()
    command = [sys.executable, "-m", "pipeline.cli", "--root", str(root)]
    subprocess.run([*command, "prepare"], env=env, cwd=root, capture_output=True, timeout=300, check=True)
    args = ["--device", "cpu", "--nproc", "2", "train-classifier", "--coeff", "0.9", "--seed", "0"]
    launcher = subprocess.Popen(
        [*command, *args], env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _stop_and_expect_none_left(launcher, root, 4, signal.SIGKILL)  # launcher, torchrun, 2 workers


def test_a_job_that_cannot_start_stops_the_running_ones(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    sleeper = Job(
        "sleeper",
        [
            sys.executable,
            "-c",
            f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)",
        ],
    )
    missing = Job("missing", [str(tmp_path / "no-such-program")])
    with pytest.raises(FileNotFoundError):
        run_jobs([sleeper, _span_job(tmp_path, "wait"), missing], workers=2)  # starts after "wait" ends
    assert not _alive(int(pid_file.read_text()))
