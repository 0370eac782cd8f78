"""Execution switches read from the environment (they change how a stage runs, never what it computes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def env_flag(name: str, default: bool = True) -> bool:
    """``name`` as an on/off switch: ``1``, ``true``, ``yes``, ``on`` or ``0``, ``false``, ``no``, ``off`` (any case);
    unset (or empty) gives ``default``. Anything else is refused (:class:`pipeline.errors.ParamsError`): a typo must
    not silently mean "on"."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in _OFF + _ON:
        from pipeline.errors import ParamsError

        raise ParamsError(name, os.environ[name], f"an on/off switch: one of {', '.join(_ON + _OFF)} (or unset)")
    return value in _ON


# ---------------------------------------------------------------------------------------------------------------------
# The device every stage runs on: an execution setting like the thread count (``iresnet --device``, env
# ``IRESNET_DEVICE``), not a param, so it never changes ``dvc.lock``. The CLI resolves it once, before any compute,
# and stages read it with :func:`device`; code that never went through the CLI (tests, notebooks) gets the CPU.

DEVICE_TEXT = "auto, cpu, cuda or cuda:N"
_current_device: Any = None


class DeviceError(ValueError):
    """A ``--device`` or ``--nproc`` the machine cannot honour; the message names the problem and the fix."""


def parse_device(spec: str | None, local_rank: int | None = None) -> Any:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``.

    Under ``torchrun`` (``local_rank`` set) a bare ``cuda`` or ``auto`` on CUDA means this process's GPU,
    ``cuda:<local_rank>``. Raises :class:`DeviceError` for an unknown name, CUDA on a machine without it, or an index
    past the GPUs present.
    """
    import torch

    text = (spec or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text != "cuda" and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise DeviceError(f"unknown device {spec!r}: use {DEVICE_TEXT} (--device or IRESNET_DEVICE).")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {spec} but this machine has no CUDA GPU that torch can use: run with --device cpu "
            "(or auto), or on a machine with a GPU and a CUDA build of torch."
        )
    count = torch.cuda.device_count()
    index = int(text[5:]) if ":" in text else (local_rank or 0)
    if index >= count:
        raise DeviceError(f"--device {spec}: GPU {index} does not exist ({count} present): use cuda:0..{count - 1}.")
    return torch.device("cuda", index)


def set_device(value: Any) -> None:
    """Make ``value`` (a ``torch.device``) the device of every stage in this process; on CUDA, also that device's
    current one, and TF32 off: certificates, exact log-dets and the fixed-point inverse need full float32 (and
    float64) matmuls and convolutions, and training gets the same arithmetic as the CPU."""
    import torch

    global _current_device
    _current_device = value
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if value.type == "cuda":
        torch.cuda.set_device(value)


def device() -> Any:
    """The device stages run on (:func:`set_device`; the CPU unless the CLI chose another)."""
    import torch

    return _current_device if _current_device is not None else torch.device("cpu")


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the body with the global RNG seeded by ``seed``, restoring it after: the CPU generator, and on CUDA the
    stage device's generator too (``torch.manual_seed`` seeds every CUDA generator; ``fork_rng(devices=[])`` alone
    would leave the device's reseeded, and the probes drawn after it would repeat the same stream at every call).
    On the CPU: exactly ``fork_rng(devices=[])`` + ``manual_seed``."""
    import torch

    here = device()
    with torch.random.fork_rng(devices=[here] if here.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def synchronize() -> None:
    """Wait for the device's queued work (CUDA runs asynchronously): call before reading a wall clock."""
    import torch

    if device().type == "cuda":
        torch.cuda.synchronize(device())


def device_info(value: Any = None) -> dict[str, str]:
    """``{"device": "cuda:0", "gpu": "<name>"}`` (``gpu`` only on CUDA): MLflow tags, and metrics off the CPU."""
    import torch

    value = value if value is not None else device()
    info = {"device": str(value)}
    if value.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(value)
    return info


# ---------------------------------------------------------------------------------------------------------------------
# What made a result. Byte-identity of results holds only on the same CPU model, torch build and thread count (a
# reduction splits differently across threads, and kernels differ between instruction sets), so every metrics file
# records them: a user who regenerates the outputs can tell whether identical bytes are to be expected.


EXACT_THREADS = 2  # the exact mode (`IRESNET_THREADS=2`): the committed outputs are made with this many threads


def cpu_model() -> str:
    """The CPU's model name with its family / model / stepping numbers (a VM may show only a generic name), from
    ``/proc/cpuinfo``; ``platform.processor()`` where that file does not exist."""
    import platform

    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's entry is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.processor() or platform.machine())
    numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def made_with() -> dict[str, Any]:
    """``{"cpu", "cpu_capability", "torch", "threads", "device"}``: what byte-identical reproduction depends on."""
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch dispatches to: AVX512, AVX2
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device()),
    }


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread inside the block, its thread count restored after. For dense float64 LAPACK calls (LU,
    eigenvalues) on batches of Jacobians: on 2 threads this torch build's MKL reported "Parameter 6 was incorrect on
    entry to DLASWP" and the logdet_bias stage ran for over 13 minutes instead of under 2."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# This process's place in a data-parallel run: torchrun (``iresnet --nproc N`` launches through it) sets RANK,
# WORLD_SIZE and LOCAL_RANK; without them a stage is the one and only process and runs exactly today's code.


@dataclass(frozen=True)
class World:
    """``rank`` of ``size`` processes (``local_rank`` on this node); only rank 0 writes outputs, checkpoints, MLflow."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The torchrun environment of this process (one process of one when there is none)."""
    try:
        return World(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )
    except ValueError:
        return World()
