"""The processes a stage starts: independent runs side by side, and no process that outlives what started it.

:func:`run_jobs` runs independent command lines (for example every ``train-classifier --coeff C --seed S`` of
Table 2) at most ``workers`` at a time. Used with one torch thread per process it is both faster and exact: a
classifier of the default profile is too small to keep two cores busy (two one-thread processes training two
classifiers side by side took 10.6 s for both, one at two threads 9.0 s for one, 2 epochs each on a 2-core AMD
EPYC), and each run's bytes depend only on its own one-thread computation, never on how many run beside it.

:func:`die_with_parent` asks Linux to send SIGTERM to the calling process when its parent exits, so a stage whose
``dvc repro`` (or pool) was stopped, even by ``kill -9``, stops too instead of training on unseen.

:func:`owner_tags` names a process so that a later one can tell whether it still runs (:func:`owner_alive`): an
MLflow run or a set of outputs moved aside by a process that ``kill -9`` ended is recognised as abandoned.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from pipeline.console import progress
from pipeline.errors import UserError, interrupt

_PR_SET_PDEATHSIG = 1  # prctl(2)
_POLL_S = 0.2  # how often the pool looks for finished jobs
_STOP_GRACE_S = 120.0  # a stopped job's time to write its checkpoint note and close its MLflow run
_LOG_TAIL = 40  # lines of a failed job's output shown


class JobFailed(UserError):
    """A job of :func:`run_jobs` exited with a non-zero status (its output's tail is in the message)."""

    def __init__(self, name: str, code: int, tail: str) -> None:
        super().__init__(f"{name} failed (exit status {code}); its last lines:\n{tail}")
        self.code = code


@dataclass(frozen=True)
class Job:
    """One independent run: a name for messages and the command line that runs it."""

    name: str
    argv: Sequence[str]


#: Who owns something a process holds open (an MLflow run, a set of outputs moved aside): host, pid, and the pid's
#: start time, which tells a reused pid apart.
OWNER_TAGS = ("iresnet.host", "iresnet.pid", "iresnet.pid_started")


def owner_tags() -> dict[str, str]:
    """Tags naming this process, so a later one can tell a live owner from one that ``kill -9`` ended."""
    import psutil

    me = psutil.Process()
    return dict(zip(OWNER_TAGS, (socket.gethostname(), str(me.pid), f"{me.create_time():.3f}"), strict=True))


def owner_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process the owner tags name still runs (one on another host counts as alive: unknowable)."""
    import psutil

    if any(name not in tags for name in OWNER_TAGS):
        return False  # written before these tags existed: nobody can still hold it
    if tags["iresnet.host"] != socket.gethostname():
        return True
    try:
        return f"{psutil.Process(int(tags['iresnet.pid'])).create_time():.3f}" == tags["iresnet.pid_started"]
    except (psutil.Error, ValueError):
        return False


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have the kernel send ``signum`` to this process when its parent exits (Linux ``PR_SET_PDEATHSIG``; a no-op
    elsewhere). If the parent exits while this is being set, the signal is sent now."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return  # not permitted here: keep the old behaviour rather than fail the stage
    if os.getppid() != parent:  # the parent exited between the two calls: the kernel will not signal any more
        os.kill(os.getpid(), signum)


def run_jobs(jobs: Sequence[Job], workers: int, env: Mapping[str, str] | None = None, what: str = "jobs") -> None:
    """Run ``jobs`` (each a process of its own, output kept in a temporary file) at most ``workers`` at a time, in
    order, with a progress bar over jobs.

    A job that fails stops the pool: no new job starts, the running ones finish, then :class:`JobFailed` carries
    the first failure's exit status and output. SIGINT or SIGTERM to the pool is passed on as SIGTERM to every
    running job (each is in a session of its own, so a terminal's Ctrl-C reaches it only this way, once), the pool
    waits for them to stop and re-raises as :class:`pipeline.errors.Interrupted`."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    pending = list(jobs)
    running: dict[subprocess.Popen[bytes], tuple[Job, IO[bytes]]] = {}
    failure: JobFailed | None = None
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with progress(what, len(pending)) as advance:
            while pending or running:
                while pending and len(running) < workers and failure is None:
                    job = pending.pop(0)
                    log = tempfile.TemporaryFile()
                    proc = subprocess.Popen(
                        list(job.argv), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
                    running[proc] = (job, log)
                if failure is not None and not running:
                    break
                time.sleep(_POLL_S)
                for proc in [p for p in running if p.poll() is not None]:
                    job, log = running.pop(proc)
                    if proc.returncode != 0 and failure is None:
                        failure = JobFailed(job.name, proc.returncode, _tail(log))
                    log.close()
                    advance(info=job.name)
    except BaseException:  # a signal (Interrupted), or a job that could not start: stop the ones running
        for signum in previous:  # stopping is under way: a second signal must not cut it short
            signal.signal(signum, signal.SIG_IGN)
        _stop(running)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failure is not None:
        raise failure


def _stop(running: dict[subprocess.Popen[bytes], tuple[Job, IO[bytes]]]) -> None:
    """SIGTERM to every running job, then wait for each (SIGKILL after :data:`_STOP_GRACE_S`)."""
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for proc, (_, log) in running.items():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    lines = log.read().decode(errors="replace").splitlines()
    return "\n".join(lines[-_LOG_TAIL:])
