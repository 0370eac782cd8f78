"""Speed and memory benchmark of the library at fixed, paper-sized configurations (``iresnet bench``).

Imports only torch, rich, the standard library and ``iresnet``, so it survives reorganisations of ``pipeline``.
The configurations below are fixed for good: later changes are judged by running the same command again.

What is measured, per configuration ("case"):

* ``step_s``: a training step = forward + loss + backward (cross-entropy for CLF, negative log-likelihood for
  DENS / TOY), no optimiser (gradients are dropped with ``zero_grad(set_to_none=True)`` between steps). Median,
  min, max and quartiles of ``repeats`` steps after ``warmup`` steps, model in training mode.
* ``forward_s``: the invertible body's forward without log-det (``x + g(x)`` per block), eval mode, no grad.
* ``inverse_fixed_s``: the inverse of the body at exactly ``INVERSE_FIXED_ITERS`` fixed-point steps per block
  (eval mode), and ``inverse_step_over_forward``: its cost per step over ``forward_s``.
* ``inverse_tol``: the inverse to ``INVERSE_ATOL`` (at most ``INVERSE_MAX_ITER`` steps per block): time and the
  iterations used over all blocks (none for the vanilla classifier, which has no inverse to converge to).
* ``peak_mem_mb``: peak resident memory (RSS) growth during one training step, on CPU: the kernel's high-water
  mark ``VmHWM`` is reset (``/proc/self/clear_refs``) just before the step and read after it, minus ``VmRSS`` just
  before (``peak_rss_total_mb``: the high-water mark itself, with Python, torch and the model). Each case runs in
  a fresh Python process (unless ``isolate=False``, as in quick mode), so memory freed by earlier cases and kept by
  the allocator cannot hide the growth. Model, data and warm-up state are in the baseline; memory the allocator
  reuses from the model's construction is not counted (it is small). The first step is measured: later steps
  reuse memory the allocator kept.
* ``gflops``: FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
  products only) over the median step time, beside ``sgemm_gflops``: a float32 1024^3 matmul timed in the same
  process, as the machine's reference speed.

Timings on a shared machine are noisy: compare ratios within one run (``results["ratios"]``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from iresnet import FlowConfig, InverseSettings, IResNetClassifier, LogDetSettings, MultiscaleFlow, ResNetConfig
from iresnet.blocks import residual_blocks, set_inverse_settings
from iresnet.toy import toy_iresnet

# --- fixed configurations (never change them: results must stay comparable) ------------------------------------

#: The paper's CIFAR10 classifier (seed command: --nBlocks 7 7 7 --nStrides 1 2 2 --nChannels 32 64 128
#: --coeff 0.9 --init_ds 1 --inj_pad 13 --powerIterSpectralNorm 1 --nonlin elu).
CLF_CONFIG = ResNetConfig(
    in_shape=(3, 32, 32),
    n_blocks=(7, 7, 7),
    strides=(1, 2, 2),
    channels=(32, 64, 128),
    coeff=0.9,
    n_power_iter=1,
    nonlin="elu",
    init_ds=1,
    inj_pad=13,
)
CLF_BATCH = 64
#: CLF cases: the config above, the vanilla baseline (no Lipschitz constraint) and ReLU instead of ELU.
CLF_CASES: dict[str, dict[str, Any]] = {"clf_elu": {}, "clf_vanilla": {"coeff": None}, "clf_relu": {"nonlin": "relu"}}

#: A small multiscale flow: blocks 4-4-4, 32 hidden channels, initial squeeze; 5 series terms, 1 probe.
DENS_CONFIG = FlowConfig(
    in_shape=(3, 32, 32),
    n_blocks=(4, 4, 4),
    strides=(1, 2, 2),
    channels=(32, 32, 32),
    coeff=0.9,
    n_power_iter=1,
    nonlin="elu",
    init_ds=2,
)
DENS_BATCH = 64
DENS_LOGDET = LogDetSettings(n_terms=5, n_samples=1)
#: DENS cases: each log-det estimator, and "none" (the same network without log-det: a classifier-like step).
DENS_CASES: dict[str, str] = {
    "dens_series": "series",
    "dens_neumann": "neumann",
    "dens_unbiased": "unbiased",
    "dens_none": "none",
}

#: The 2-D toy i-ResNet flow (MLP 2-64-64-64-2, ELU, exact log-det) at 16 and 100 blocks.
TOY_BATCH = 256
TOY_CASES: dict[str, int] = {"toy_16": 16, "toy_100": 100}

INVERSE_FIXED_ITERS = 20
INVERSE_ATOL = 1e-5
INVERSE_MAX_ITER = 100
WARMUP, REPEATS, FORWARD_REPEATS, INVERSE_REPEATS = 1, 5, 3, 1
SGEMM_N = 1024
SEED = 0

#: The paper's runtime claims (Sec. 5.1 / App. C): a forward+backward of 128 CIFAR10 images through the classifier
#: above costs 0.5 s with spectral normalisation (1 power iteration) against 0.2 s without (4 GTX 1080); and a
#: 5-term log-det about 4x a classification step (the DENS ratio ``dens_series_step_over_none_step``). Not in the
#: default run (``--only PAPER``, on a GPU: ``iresnet --device cuda bench --only PAPER,DENS``).
PAPER_BATCH = 128
PAPER_CASES: dict[str, dict[str, Any]] = {"paper_sn_128": {}, "paper_plain_128": {"coeff": None}}

FAMILIES: dict[str, tuple[str, ...]] = {
    "CLF": tuple(CLF_CASES),
    "DENS": tuple(DENS_CASES),
    "TOY": tuple(TOY_CASES),
    "PAPER": tuple(PAPER_CASES),
}
DEFAULT_FAMILIES = ("CLF", "DENS", "TOY")
#: One case per family whose training step is also timed on one thread, in the same run, for the speed-up of the
#: run's thread count over one thread (``<case>_step_speedup_over_1_thread``): what the exact mode's fixed thread
#: count (``IRESNET_THREADS=2``) gains over the single-threaded mode it replaced.
THREAD_SPEEDUP_CASES = ("clf_elu", "dens_series", "toy_100")
#: Cases also timed as the classifier stages run them: as many one-thread processes side by side as the run has
#: threads (``<case>_side_by_side_speedup``: their combined throughput over one process on all the threads).
SIDE_BY_SIDE_CASES = ("clf_elu",)
_device = torch.device("cpu")  # where measure_case runs (set by it): _timed waits for CUDA before reading clocks

# Quick mode (a smoke test of a few seconds): tiny shapes, 1 block per stage, few repeats.
_QUICK_CLF = replace(CLF_CONFIG, in_shape=(3, 8, 8), n_blocks=(1, 1, 1), channels=(4, 8, 8), inj_pad=1)
_QUICK_DENS = replace(DENS_CONFIG, in_shape=(3, 8, 8), n_blocks=(1, 1, 1), channels=(8, 8, 8))
_QUICK_TOY = {"toy_16": 2, "toy_100": 4}
_QUICK_BATCH = 4
_QUICK_COUNTS = {
    "warmup": 1,
    "repeats": 2,
    "forward_repeats": 1,
    "inverse_repeats": 1,
    "fixed_iters": 3,
    "sgemm_n": 128,
}


# --- one case ---------------------------------------------------------------------------------------------------


NO_LOGDET = LogDetSettings(estimator="none")  # the body alone: its forward time, what the inverse undoes


class _Case:
    """A model, a batch, its training loss, its body's forward (no log-det) and inverse."""

    def __init__(self, name: str, quick: bool) -> None:
        torch.manual_seed(SEED)
        self.name = name
        self.family = next(f for f, names in FAMILIES.items() if name in names)
        if self.family in ("CLF", "PAPER"):
            cases = CLF_CASES if self.family == "CLF" else PAPER_CASES
            config = replace(_QUICK_CLF if quick else CLF_CONFIG, **cases[name])
            batch = _QUICK_BATCH if quick else (CLF_BATCH if self.family == "CLF" else PAPER_BATCH)
            self.model: nn.Module = IResNetClassifier(config)
            self.x = torch.randn(batch, *config.in_shape)
            self.labels = torch.randint(0, 10, (batch,))
            self.description = f"classifier {config.n_blocks} {config.channels} c={config.coeff} {config.nonlin}"
        elif self.family == "DENS":
            base = _QUICK_DENS if quick else DENS_CONFIG
            config = replace(base, logdet=replace(DENS_LOGDET, estimator=DENS_CASES[name]))
            batch = _QUICK_BATCH if quick else DENS_BATCH
            self.model = MultiscaleFlow(config)
            self.x = torch.rand(batch, *config.in_shape) - 0.5
            self.description = f"flow {config.n_blocks} {config.channels} {config.logdet.estimator} n=5"
        else:
            n_blocks = (_QUICK_TOY if quick else TOY_CASES)[name]
            batch = _QUICK_BATCH * 4 if quick else TOY_BATCH
            self.model = toy_iresnet(n_blocks=n_blocks)
            self.x = torch.randn(batch, 2)
            self.description = f"toy flow {n_blocks} blocks, exact log-det"
        self.batch = self.x.shape[0]

    def to(self, device: torch.device) -> None:
        """Model and batch on ``device`` (built on the CPU: the same weights and inputs everywhere)."""
        self.model.to(device)
        self.x = self.x.to(device)
        if hasattr(self, "labels"):
            self.labels = self.labels.to(device)

    def loss(self) -> Tensor:
        if self.family in ("CLF", "PAPER"):
            return F.cross_entropy(self.model(self.x), self.labels)
        return -self.model(self.x).mean()

    def step(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.loss().backward()

    def encode(self) -> Any:
        """The body's output (no log-det): what ``decode`` inverts."""
        if self.family in ("CLF", "PAPER"):
            return self.model.body(self.x, NO_LOGDET)[0]
        if self.family == "DENS":
            return self.model.encode(self.x, NO_LOGDET)[0]
        return self.model.transform(self.x, NO_LOGDET)[0]

    def decode(self, z: Any) -> Tensor:
        if self.family in ("CLF", "PAPER"):
            return self.model.body.inverse(z)
        if self.family == "DENS":
            return self.model.decode(z)
        return self.model.transform.inverse(z)


def _stats(times: Sequence[float]) -> dict[str, float]:
    ordered = sorted(times)
    q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q[0],
        "q3": q[2],
        "n": len(ordered),
    }


def _sync() -> None:
    if _device.type == "cuda":
        torch.cuda.synchronize(_device)


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, float], Any]:
    times, out = [], None
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return _stats(times), out


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peak_growth_mb(fn: Callable[[], Any]) -> tuple[float, float]:
    """``(peak RSS growth, peak RSS)`` in MB while ``fn`` runs: reset the high-water mark, run, read it (Linux).
    On CUDA: the growth of the GPU's allocated memory over what was allocated before, and the peak allocated."""
    if _device.type == "cuda":
        torch.cuda.synchronize(_device)
        torch.cuda.reset_peak_memory_stats(_device)
        before_cuda = torch.cuda.memory_allocated(_device)
        fn()
        torch.cuda.synchronize(_device)
        peak_cuda = torch.cuda.max_memory_allocated(_device)
        return (peak_cuda - before_cuda) / 2**20, peak_cuda / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return (peak - before) / 1024, peak / 1024


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks break ``torch.autograd.grad`` (used
    by every log-det estimator): all FLOPs are attributed to "Global"."""

    parents = ("Global",)

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (convolutions and matrix products) of ``fn()``, by ``torch.utils.flop_counter.FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    with counter:
        fn()
    return counter.get_total_flops()


def sgemm_gflops(n: int = SGEMM_N, repeats: int = 5) -> float:
    """GFLOP/s of a plain float32 ``n x n`` matmul (best of ``repeats``): the machine's reference speed."""
    a, b = torch.randn(n, n, device=_device), torch.randn(n, n, device=_device)
    a @ b
    best = min(_timed(lambda: a @ b, 1)[0]["min"] for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def measure_case(name: str, quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Every measurement of one case (see the module docstring) on ``device``; JSON-serialisable."""
    global _device
    _device = torch.device(device)
    if _device.type == "cuda":  # full float32, as the pipeline computes (pipeline.env.set_device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.cuda.set_device(_device)
    counts = (
        _QUICK_COUNTS
        if quick
        else {
            "warmup": WARMUP,
            "repeats": REPEATS,
            "forward_repeats": FORWARD_REPEATS,
            "inverse_repeats": INVERSE_REPEATS,
            "fixed_iters": INVERSE_FIXED_ITERS,
            "sgemm_n": SGEMM_N,
        }
    )
    case = _Case(name, quick)
    case.to(_device)
    model = case.model
    sgemm = sgemm_gflops(counts["sgemm_n"])
    model.train()
    peak, peak_total = _peak_growth_mb(case.step)  # the first step (includes ActNorm's data-dependent initialisation)
    for _ in range(counts["warmup"]):
        case.step()
    step, _ = _timed(case.step, counts["repeats"])
    flops = count_flops(case.step)
    result: dict[str, Any] = {
        "family": case.family,
        "description": case.description,
        "batch": case.batch,
        "threads": torch.get_num_threads(),
        "device": str(_device),
        "step_s": step,
        "peak_mem_mb": peak,
        "peak_rss_total_mb": peak_total,
        "flops_per_step": flops,
        "gflops": flops / step["median"] / 1e9,
        "sgemm_gflops": sgemm,
    }

    model.eval()
    with torch.no_grad():
        case.encode()
        result["forward_s"], z = _timed(case.encode, counts["forward_repeats"])
        iters = counts["fixed_iters"]
        set_inverse_settings(model, InverseSettings(max_iter=iters, atol=0.0))
        fixed, _ = _timed(lambda: case.decode(z), counts["inverse_repeats"])
        result["inverse_fixed_s"] = {**fixed, "iterations_per_block": iters}
        result["inverse_step_over_forward"] = fixed["median"] / iters / result["forward_s"]["median"]
        result["inverse_tol"] = {}
        cases = {**CLF_CASES, **PAPER_CASES}
        if case.family not in ("CLF", "PAPER") or cases[name].get("coeff", 0.9) is not None:  # vanilla: no inverse
            for method in ("fixed_point",):  # Anderson acceleration was tried and not faster here
                set_inverse_settings(model, InverseSettings(max_iter=INVERSE_MAX_ITER, atol=INVERSE_ATOL))
                timing, x_rec = _timed(lambda: case.decode(z), counts["inverse_repeats"])
                infos = [block.last_inverse_info for block in residual_blocks(model)]
                result["inverse_tol"][method] = {
                    "time_s": timing,
                    "atol": INVERSE_ATOL,
                    "iterations_total": sum(info.iterations for info in infos),
                    "iterations_max": max(info.iterations for info in infos),
                    "all_converged": all(info.converged for info in infos),
                    "reconstruction_max_error": float((x_rec - case.x).abs().max()),
                }
    return result


def measure_step(name: str, quick: bool = False, device: str = "cpu") -> dict[str, float]:
    """Only the training step of case ``name`` (warm-up, then the median and quartiles of the repeats): the part of
    :func:`measure_case` that the thread speed-up compares."""
    global _device
    _device = torch.device(device)
    warmup, repeats = (_QUICK_COUNTS["warmup"], _QUICK_COUNTS["repeats"]) if quick else (WARMUP, REPEATS)
    case = _Case(name, quick)
    case.to(_device)
    case.model.train()
    for _ in range(1 + warmup):  # the first step initialises ActNorm, as in measure_case
        case.step()
    return _timed(case.step, repeats)[0]


# --- all cases --------------------------------------------------------------------------------------------------


def _selected(only: Sequence[str] | None) -> list[str]:
    if not only:
        return [name for family in DEFAULT_FAMILIES for name in FAMILIES[family]]
    unknown = [f for f in only if f.upper() not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown benchmark families {unknown}; choose from {', '.join(FAMILIES)}")
    wanted = {f.upper() for f in only}
    return [name for family, names in FAMILIES.items() if family in wanted for name in names]


def _in_subprocess(
    name: str, quick: bool, threads: int, device: str = "cpu", measure: str = "measure_case", copies: int = 1
) -> dict[str, Any]:
    """``measure`` (:func:`measure_case` or :func:`measure_step`) in a fresh interpreter (fresh allocator, honest
    peak memory); with ``copies`` > 1, that many interpreters at once, side by side, and the first one's result."""
    root = str(Path(__file__).resolve().parents[2])  # the repository
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = (
        f"import json, sys, torch; from pipeline.tools.bench import {measure}; "
        f"torch.set_num_threads({threads}); print(json.dumps({measure}({name!r}, {quick!r}, {device!r})))"
    )
    args = [sys.executable, "-c", code]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)]
    procs += [subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, cwd=root) for _ in range(copies - 1)]
    out, err = procs[0].communicate()
    if any(proc.wait() != 0 for proc in procs):
        raise RuntimeError(f"benchmark case {name} failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratios(
    cases: dict[str, dict[str, Any]],
    one_thread: dict[str, dict[str, float]],
    side_by_side: dict[str, dict[str, float]] | None = None,
    threads: int = 1,
) -> dict[str, float]:
    def step(name: str) -> float | None:
        return cases[name]["step_s"]["median"] if name in cases else None

    ratios: dict[str, float | None] = {
        # the paper: 0.5 s / 0.2 s = 2.5 (128 CIFAR10 images, 1 power iteration, 4 GTX 1080)
        "paper_spectral_norm_overhead_128": _ratio(step("paper_sn_128"), step("paper_plain_128")),
        "clf_elu_step_over_relu_step": _ratio(step("clf_elu"), step("clf_relu")),
        "clf_vanilla_step_over_c09_step": _ratio(step("clf_vanilla"), step("clf_elu")),
        "toy_100_step_over_16_step": _ratio(step("toy_100"), step("toy_16")),
    }
    for name in DENS_CASES:
        if name != "dens_none":
            ratios[f"{name}_step_over_none_step"] = _ratio(step(name), step("dens_none"))
    for name, case in cases.items():
        ratios[f"{name}_inverse_step_over_forward"] = case["inverse_step_over_forward"]
    for name, step_1 in one_thread.items():  # > 1: the run's thread count is faster than one thread
        ratios[f"{name}_step_speedup_over_1_thread"] = _ratio(step_1["median"], step(name))
    for name, beside in (side_by_side or {}).items():  # > 1: one-thread processes side by side beat all the threads
        ratios[f"{name}_side_by_side_speedup"] = _ratio(threads * (step(name) or 0.0), beside["median"])
    return {k: v for k, v in ratios.items() if v is not None}


def run_benchmarks(
    quick: bool = False,
    only: Sequence[str] | None = None,
    isolate: bool | None = None,
    progress: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the benchmark cases of the families in ``only`` (``CLF``, ``DENS``, ``TOY``; all by default).

    ``quick``: tiny shapes and repeats (a smoke test; numbers mean nothing). ``isolate``: each case in a fresh
    process (default: unless ``quick``). ``device``: where the cases run (``cuda:0``: peak memory is then the GPU's
    allocated memory). Uses torch's current thread count. Returns a JSON-serialisable dict
    ``{"meta": ..., "cases": {name: ...}, "one_thread_step_s": {name: ...}, "ratios": {...}}``; on the CPU with
    more than one thread, the training steps of :data:`THREAD_SPEEDUP_CASES` are also timed on one thread.
    """
    isolate = not quick if isolate is None else isolate
    threads = torch.get_num_threads()
    cases: dict[str, dict[str, Any]] = {}
    for name in _selected(only):
        if progress:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
        cases[name] = _in_subprocess(name, quick, threads, device) if isolate else measure_case(name, quick, device)
    # The speed-up over one thread, on the CPU only (a GPU step does not run on the CPU's threads).
    one_thread: dict[str, dict[str, float]] = {}
    if threads > 1 and device == "cpu":
        for name in (n for n in THREAD_SPEEDUP_CASES if n in cases):
            if progress:
                print(f"bench: {name} on 1 thread ...", file=sys.stderr, flush=True)
            one_thread[name] = (
                _in_subprocess(name, quick, 1, device, "measure_step") if isolate else _one_thread(name, quick)
            )
    side_by_side: dict[str, dict[str, float]] = {}
    if threads > 1 and device == "cpu" and isolate:
        for name in (n for n in SIDE_BY_SIDE_CASES if n in cases):
            if progress:
                print(f"bench: {name}, {threads} one-thread processes side by side ...", file=sys.stderr, flush=True)
            side_by_side[name] = _in_subprocess(name, quick, 1, device, "measure_step", copies=threads)
    meta = {
        "torch": torch.__version__,
        "threads": threads,
        "quick": quick,
        "isolated": isolate,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": device,
        "gpu": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None,
        "sgemm_gflops": sgemm_gflops(_QUICK_COUNTS["sgemm_n"] if quick else SGEMM_N),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "memory_method": "peak RSS growth during the first training step (VmHWM reset via /proc/self/clear_refs)"
        + ("; each case in a fresh process" if isolate else "; all cases in one process (allocator reuse)"),
        "step": "forward + loss + backward, no optimiser",
    }
    return {
        "meta": meta,
        "cases": cases,
        "one_thread_step_s": one_thread,
        "side_by_side_step_s": side_by_side,
        "ratios": _ratios(cases, one_thread, side_by_side, threads),
    }


def _one_thread(name: str, quick: bool) -> dict[str, float]:
    """:func:`measure_step` of ``name`` on one thread in this process, restoring the thread count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure_step(name, quick)
    finally:
        torch.set_num_threads(threads)


def _ms(stats: dict[str, float]) -> str:
    return f"{stats['median'] * 1e3:.1f} [{stats['min'] * 1e3:.1f}-{stats['max'] * 1e3:.1f}]"


def render(results: dict[str, Any]) -> list[Table]:
    """Two rich tables: one row per case, and the ratios."""
    cases = Table(title=f"iresnet bench (torch {results['meta']['torch']}, {results['meta']['threads']} threads)")
    for column in (
        "case",
        "step ms median [min-max]",
        "peak MB",
        "GFLOP/s (sgemm)",
        "forward ms",
        "inverse step / forward",
        "to 1e-5: iters (ms)",
    ):
        cases.add_column(column, justify="left" if column == "case" else "right")
    for name, case in results["cases"].items():
        tol = ", ".join(
            f"{m}: {t['iterations_total']} ({t['time_s']['median'] * 1e3:.0f})" for m, t in case["inverse_tol"].items()
        )
        cases.add_row(
            name,
            _ms(case["step_s"]),
            f"{case['peak_mem_mb']:.0f}",
            f"{case['gflops']:.1f} ({case['sgemm_gflops']:.0f})",
            _ms(case["forward_s"]),
            f"{case['inverse_step_over_forward']:.2f}",
            tol or "-",
        )
    ratios = Table(title="ratios (same run)")
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    for key, value in results["ratios"].items():
        ratios.add_row(key, f"{value:.3f}" if math.isfinite(value) else str(value))
    return [cases, ratios]


if __name__ == "__main__":  # python -m pipeline.tools.bench [--quick]
    from rich.console import Console

    out = run_benchmarks(quick="--quick" in sys.argv, progress=True)
    for table in render(out):
        Console().print(table)
    print(json.dumps(out, indent=1))
