"""How a stage command runs: the process plumbing behind the thin ``iresnet`` command line (:mod:`pipeline.cli`).

:func:`run_stage` is the frame of every stage command: threads and device, params, data-parallel relaunch through
torchrun (:func:`launch`), the outputs replaced all together or not at all, the MLflow run, signals turned into a
clean stop with the command that resumes (:func:`interrupted_message`), and user errors as one line (:func:`fail`).
:func:`run_each` runs a stage made of independent runs (the classifiers) as processes side by side.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import typer

from pipeline.console import console, metrics_table, print_error, progress_enabled
from pipeline.errors import Interrupted, UserError, interrupt
from pipeline.params import Params, load_params, parse_override
from pipeline.paths import Paths

StageRunner = Callable[..., dict[str, Any]]  # a stage module's run(params, paths, tracker)


@dataclass(frozen=True)
class Settings:
    """Global options, shared by every command through ``ctx.obj``."""

    root: Path
    params_file: Path | None
    sets: tuple[str, ...]
    threads: int | None
    device: str | None = None
    nproc: int | None = None


def fail(err: BaseException) -> NoReturn:
    """Print a user error as one paragraph and exit with status 1 (no traceback)."""
    print_error(str(err))
    raise typer.Exit(1)


def load(ctx: typer.Context, overrides: Mapping[str, Any] | None = None) -> tuple[Params, Paths]:
    """Params (with ``--set`` and explicit ``overrides`` applied, explicit options winning) and paths."""
    settings: Settings = ctx.obj
    paths = Paths.at(settings.root)
    merged = dict(parse_override(text) for text in settings.sets)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    params = load_params(settings.params_file or paths.params_file, merged)
    return params, paths


def declared(stage: str) -> list[str]:
    """What DVC stage ``stage`` writes, as ``dvc.yaml`` declares it (paths from the root)."""
    from pipeline.outputs import STAGES

    return STAGES[stage].declared()


BatchKey = Callable[[Params], tuple[str, int]]  # a data-parallel stage's global batch size: (param key, value)


def select_device(settings: Settings) -> Any:
    """Resolve ``--device`` / ``--nproc`` for this process and make the device current
    (:func:`pipeline.env.set_device`); a device or process count this machine cannot honour is a one-line error,
    before any compute."""
    import torch

    from pipeline.env import DeviceError, parse_device, set_device, world

    here = world()
    try:
        device = parse_device(settings.device, here.local_rank if here.distributed else None)
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if device.type == "cuda" and (settings.nproc or 1) > gpus:
            raise DeviceError(
                f"--nproc {settings.nproc} but this machine has {gpus} GPU(s): use --nproc {gpus} or fewer here, "
                "or torchrun's multi-node rendezvous (README, 'Many GPUs') for more."
            )
    except DeviceError as err:
        fail(err)
    set_device(device)
    return device


def without_nproc(args: list[str]) -> list[str]:
    """``args`` less ``--nproc N`` / ``--nproc=N`` (torchrun's own parser would read ``--nproc`` as an ambiguous
    abbreviation of its options; its processes know their number from ``WORLD_SIZE``)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int) -> NoReturn:
    """Run this very command line again as ``nproc`` processes of one data-parallel run, through PyTorch's launcher
    (``torchrun --standalone --nproc-per-node nproc -m pipeline.cli ...``), and exit with its status. The processes
    see ``WORLD_SIZE`` and so never launch again."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "pipeline.cli", *without_nproc(sys.argv[1:])]
    from pipeline.processes import die_with_parent

    proc = subprocess.Popen(command, preexec_fn=die_with_parent)  # torchrun (and so its workers) dies with this one
    try:
        code = proc.wait()
    except KeyboardInterrupt as err:  # SIGINT or SIGTERM (DVC stopping the stage): torchrun stops its processes
        proc.send_signal(_signum(err))
        proc.wait()
        code = 128 + _signum(err)
    raise typer.Exit(code)


def _signum(err: KeyboardInterrupt) -> int:
    """The signal that stopped the process: SIGINT or SIGTERM (:class:`Interrupted`), SIGINT for a plain Ctrl-C."""
    return err.signum if isinstance(err, Interrupted) else signal.SIGINT


def _stopped(err: KeyboardInterrupt, checkpoint_epoch: int | None) -> NoReturn:
    """End a stopped command: the command that goes on (:func:`interrupted_message`), and the shell's exit status
    for the signal (128 + its number)."""
    print_error(interrupted_message(checkpoint_epoch))
    raise typer.Exit(128 + _signum(err)) from None


def _compute_here(settings: Settings) -> Any:
    """Set this process's torch threads (``--threads``) and device (:func:`select_device`); returns the device.

    torch's default uses every core. Results can differ in the last bits between thread counts (reductions split
    differently), so the committed outputs are made with a fixed count, pipeline.env.EXACT_THREADS (2: measured
    bit-identical run to run, and 1.3-1.4x faster than 1 thread on 2 cores): `IRESNET_THREADS=2 dvc repro --force`
    regenerates them byte for byte on the same CPU model and torch build. Set here, not at start-up, so `--help`
    and `iresnet ui` do not import torch.
    """
    import torch

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    return select_device(settings)


def run_stage(
    ctx: typer.Context,
    family: str,
    stage: str,
    runner: StageRunner,
    sections: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    extra_params: Mapping[str, Any] | None = None,
    batch_key: BatchKey | None = None,
    outputs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Load params, run ``runner(params, paths, tracker)`` in an MLflow run of ``family``, print its metrics.

    ``outputs``: what the run writes (paths from the root; default: what ``dvc.yaml`` declares for DVC stage
    ``stage``); they are replaced all together or not at all (:func:`pipeline.output_set.replaced_together`): a
    failed or stopped run leaves the previous ones.

    ``sections``: the top-level params sections the stage reads; they are logged to MLflow and hashed into the
    run's ``params_hash`` tag. ``extra_params``: the command's own choices (the run's model and seed, e.g. ``coeff``),
    logged as params too. ``batch_key``: set for the stages that train data-parallel (``--nproc``); it names their
    global batch size, which must divide by the number of processes. Other stages run as one process whatever
    ``--nproc`` says. Under torchrun, only rank 0 tracks and prints.
    """
    from pipeline.env import device_info, world
    from pipeline.output_set import replaced_together
    from pipeline.processes import die_with_parent
    from pipeline.tracking import stage_run

    die_with_parent()  # a stopped `dvc repro` (or pool, or torchrun) must not leave this stage training on unseen
    device = _compute_here(ctx.obj)
    here = world()
    nproc = (ctx.obj.nproc or 1) if batch_key is not None else 1
    tracker = None
    try:
        with on_signals(signal.SIGINT, signal.SIGTERM):
            progress_enabled()  # a malformed IRESNET_PROGRESS is refused now, not when the first bar appears
            params, paths = load(ctx, overrides)
            if batch_key is not None and (here.distributed or nproc > 1):
                from pipeline.distributed import check_divides, init_process_group

                key, batch = batch_key(params)
                check_divides(batch, key, here.size if here.distributed else nproc)
                if not here.distributed:
                    launch(nproc)
                init_process_group(device)
            logged = {**params.section_dict(*sections), **(extra_params or {})}
            enabled = params.tracking.enabled and here.is_main
            tags = {**device_info(device), "world_size": here.size}
            outputs = declared(stage) if outputs is None else outputs
            written = replaced_together(paths.root, stage, outputs) if here.is_main else nullcontext()
            with written, stage_run(family, stage, logged, paths, enabled, tags) as tracker:
                metrics = runner(params, paths, tracker)
                tracker.log_results(metrics)
            if here.distributed:
                from pipeline.distributed import close_process_group

                close_process_group(here)
    except UserError as err:
        fail(err)
    except KeyboardInterrupt as err:
        _stopped(err, tracker.checkpoint_epoch if tracker is not None else None)
    if here.is_main:
        console.print(metrics_table(f"{stage}: results", metrics))
    return metrics


def dry_run(
    ctx: typer.Context,
    measure: Callable[[Params, Paths, int], dict[str, Any]],
    overrides: Mapping[str, Any],
    batch_key: BatchKey,
) -> None:
    """``--dry-run`` of a training stage: parameters, activation memory per example and the time per epoch from 10
    measured steps on the current device (:mod:`pipeline.tools.dry_run`), for each of ``--nproc`` processes; no
    outputs."""
    _compute_here(ctx.obj)
    nproc = ctx.obj.nproc or 1
    try:
        params, paths = load(ctx, overrides)
        from pipeline.distributed import check_divides

        key, batch = batch_key(params)
        check_divides(batch, key, nproc)
        result = measure(params, paths, nproc)
    except UserError as err:
        fail(err)
    console.print(metrics_table("dry run (nothing written)", result))


def run_each(ctx: typer.Context, what: str, runs: Callable[[Params], Sequence[tuple[str, list[str]]]]) -> None:
    """Run each ``(name, command)`` that ``runs(params)`` lists (a stage command and its options, e.g.
    ``["train-classifier", "--coeff", "0.9", "--seed", "1"]``) as an ``iresnet`` process of its own with this
    command's global options (:func:`pipeline.processes.run_jobs`). On the CPU they run side by side, one torch
    thread each, as many at once as ``--threads`` says (default: one per core), so each run's bytes are those of
    ``iresnet --threads 1 <command>`` whatever the count; on a GPU, or with ``--nproc``, one at a time with the
    global options as given."""
    import torch

    from pipeline.env import DeviceError, parse_device
    from pipeline.output_set import replaced_together
    from pipeline.processes import Job, die_with_parent, run_jobs

    die_with_parent()
    settings: Settings = ctx.obj
    try:
        params, paths = load(ctx)
        on_gpu = parse_device(settings.device, None).type == "cuda"
    except (UserError, DeviceError) as err:
        fail(err)
    base = [sys.executable, "-m", "pipeline.cli", "--root", str(settings.root)]
    base += ["--params", str(settings.params_file)] if settings.params_file is not None else []
    for text in settings.sets:
        base += ["--set", text]
    base += ["--device", settings.device] if settings.device is not None else []
    if on_gpu or (settings.nproc or 1) > 1:
        workers = 1
        base += ["--threads", str(settings.threads)] if settings.threads is not None else []
        base += ["--nproc", str(settings.nproc)] if settings.nproc is not None else []
    else:
        workers = settings.threads or torch.get_num_threads()
        base += ["--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("IRESNET_THREADS", "IRESNET_NPROC")}
    env["IRESNET_PROGRESS"] = "0"  # their bars would only fill the logs; this process shows one over the runs
    jobs = [Job(name, base + command) for name, command in runs(params)]
    try:
        with replaced_together(paths.root, what, declared(what)):  # all runs' outputs, or none
            run_jobs(jobs, min(workers, len(jobs)) or 1, env, what)
    except UserError as err:
        fail(err)
    except KeyboardInterrupt as err:
        _stopped(err, None)
    console.print(f"{what}: {len(jobs)} runs done", highlight=False)


@contextmanager
def on_signals(*signums: signal.Signals) -> Iterator[None]:
    """Turn ``signums`` into :class:`Interrupted` inside the block (SIGTERM's default would end the process without
    any cleanup: no checkpoint note, the MLflow run left RUNNING), held while an MLflow write runs
    (:func:`pipeline.errors.signals_held`); the previous handlers come back afterwards."""
    previous = {signum: signal.signal(signum, interrupt) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupted_message(checkpoint_epoch: int | None) -> str:
    """What a stage stopped by a signal tells its user: the exact command that goes on, and from where."""
    again = f"run `{rerun_command()}` again"
    if checkpoint_epoch:
        return (
            f"interrupted: {again} to resume from epoch {checkpoint_epoch + 1} "
            f"(the checkpoint of epoch {checkpoint_epoch} is kept)."
        )
    return f"interrupted: {again} to run it."


def rerun_command() -> str:
    """The command that runs this stage again: ``dvc repro <stage>`` under DVC (which sets ``DVC_STAGE``), else this
    very command line, ``-S`` values included (``dvc repro`` would run the params file's values, not these, and
    leave the checkpoint of this run unused)."""
    if os.environ.get("DVC_STAGE"):
        return f"dvc repro {os.environ['DVC_STAGE']}"
    program = "iresnet" if Path(sys.argv[0]).name == "iresnet" else "python -m pipeline.cli"
    return " ".join([program, shlex.join(sys.argv[1:])])
