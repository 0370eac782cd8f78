"""Every stage at tiny size on the CPU and on CUDA, and their metrics side by side:
``python -m pipeline.tools.gpu_check``.

Runs ``raw_data`` .. ``report`` in two temporary projects (the committed ``params.yaml`` with :data:`TINY` on top,
the offline mnist-5k data), one per device, in this process, then compares every number of every metrics file.
Deterministic stages (the classifiers, their singular values and reconstructions) must agree to ``--rtol``; the
stages that draw probes on the device (the flows, the toy fits) draw other random numbers there than on the CPU, so
they must agree to ``--stochastic-rtol``; integers (iteration counts) to 1, error rates of the small test set to
:data:`COUNT_ATOL`. Timings are listed, never compared. Prints one line per number and ends
with ``GPU CHECK: PASS`` or ``FAIL`` (exit status 0 or 1); about a minute on a GPU machine.

Not a stage and not imported by one: it changes no output and no ``dvc.lock``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TINY: dict[str, Any] = {
    # 896 train + 128 validation images: more train examples than the 784 pixels (the Gaussian baseline needs a
    # full-rank covariance)
    "data.max_train": 1024,
    "data.val_fraction": 0.125,
    "data.max_test": 128,
    "classifier.coeffs": ["vanilla", 0.9],
    "classifier.n_blocks": [1, 1, 1],  # singular_values' exact spectra of 6 blocks: 3 min on 2 busy cores
    "classifier.seeds": [0],  # one seed per model and toy flow: a seed is the same code path, three took 3x the time
    "toy.seeds": [0],
    "classifier.epochs": 1,
    "classifier.max_train_batches": 8,
    "classifier.eval_batch_size": 128,
    "reconstruction.n_images": 4,
    "reconstruction.iterations": [1, 5, 20],
    "reconstruction.tolerances": [1.0e-3],
    "reconstruction.timing_iterations": [5],
    "flow.epochs": 1,
    "flow.max_train_batches": 8,
    "flow.lr": 1.0e-3,  # 8 steps at the default 0.01 left a block at certified Lip 1.13: no log-det to compare
    "flow.n_generated": 4,
    "evaluate_flow.n_examples": 32,
    "evaluate_flow.max_samples": 4,
    "evaluate_flow.max_terms": 20,
    "logdet_bias.n_examples": 4,
    "logdet_bias.max_terms": 8,
    "logdet_bias.n_samples": 2,
    "toy.datasets": ["moons"],
    "toy.steps": 50,
    "toy.n_test": 256,
    "toy.grid_size": 20,
    "tracking.enabled": False,
}
# --smoke (scripts/gpu_run.sh --tiny, CPU against CPU): smaller still, a check of the script, not of CUDA.
SMOKE: dict[str, Any] = {
    "classifier.channels": [4, 4, 4],  # singular_values' dense spectra at 28x28 x 8 channels: minutes on busy cores
    "singular_values.lower_iters": 5,
    "flow.n_blocks": [1, 1, 1],
    "flow.channels": [8, 8, 8],
    "flow.max_train_batches": 2,
    "reconstruction.iterations": [1, 5],
    "evaluate_flow.n_examples": 8,
    "logdet_bias.n_examples": 2,
    "toy.steps": 10,
    "toy.n_blocks": 2,
    "toy.n_test": 128,
    "toy.n_val": 128,
}
DETERMINISTIC = ("prepare", "classifier", "singular_values", "reconstruction")
# Fractions of a small test or validation set (one flipped prediction of 128 moves them by 0.008): compared to
# COUNT_ATOL.
COUNTED = ("test_error", "val_error", "accuracy")
COUNT_ATOL = 0.02
# Beyond this, a metric has diverged (both devices must then have diverged; their digits are not compared).
DIVERGED = 1.0e6
TIMING = ("time", "seconds", "throughput", "steps_per_s", "per_100", "device", "gpu")


def run_pipeline(root: Path, params: Any) -> float:
    """Every stage of the pipeline on ``root`` (already holding the prepared data when ``prepare`` ran before)."""
    from pipeline.paths import Paths
    from pipeline.stages import (
        evaluate_flow,
        logdet_bias,
        prepare,
        reconstruction,
        report,
        singular_values,
        toy_density,
        train_classifier,
        train_flow,
        train_glow_classifier,
    )

    paths = Paths.at(root)
    start = time.perf_counter()
    prepare.run(params, paths)
    for coeff in params.classifier.coeffs:
        for seed in params.classifier.seeds:
            train_classifier.run(params, paths, coeff=coeff, seed=seed)
    for run in params.glow_classifier.runs:
        for seed in params.glow_classifier.seeds:
            train_glow_classifier.run(params, paths, run_label=run, seed=seed)
    for stage in (singular_values, reconstruction, train_flow, evaluate_flow, logdet_bias, toy_density, report):
        stage.run(params, paths)
    return time.perf_counter() - start


def numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """Every number (bools as 0/1) of a JSON document, keyed by its path."""
    from pipeline.tracking import flatten

    flat = flatten(data, prefix, lists=True)
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not math.isnan(v)}


def diverged(value: float) -> bool:
    """A number no converged computation gives: non-finite, or beyond :data:`DIVERGED` (the vanilla net's
    reconstruction error, ~1e73 on the CPU, whose digits float rounding decides)."""
    return not math.isfinite(value) or abs(value) > DIVERGED


def agree(key: str, a: float, b: float, tol: float) -> bool:
    """Whether the CPU's ``a`` and the device's ``b`` of metric ``key`` agree: to ``tol`` relative, integers
    (iteration counts) to 1, counted fractions (:data:`COUNTED`) to :data:`COUNT_ATOL`, diverged values when both
    diverged."""
    if diverged(a) or diverged(b):
        return diverged(a) and diverged(b)
    return (
        abs(a - b) / max(abs(a), 1e-3) <= tol
        or (a.is_integer() and b.is_integer() and abs(a - b) <= 1)  # e.g. iterations
        or (any(word in key for word in COUNTED) and abs(a - b) <= COUNT_ATOL)
    )


def compare(cpu_root: Path, gpu_root: Path, rtol: float, stochastic_rtol: float) -> list[str]:
    """Print every metric of both runs; returns the failures."""
    from pipeline.files import read_json

    failures = []
    for path in sorted((cpu_root / "reports" / "metrics").rglob("*.json")):
        name = path.relative_to(cpu_root / "reports" / "metrics").as_posix()
        other = gpu_root / "reports" / "metrics" / name
        if not other.is_file():
            failures.append(f"{name}: missing on CUDA")
            continue
        a, b = numbers(read_json(path)), numbers(read_json(other))
        tol = rtol if name.startswith(DETERMINISTIC) else stochastic_rtol
        for key in sorted(a):
            if any(word in key for word in TIMING):
                print(f"  {name:<28} {key:<44} cpu {a[key]:>12.6g}  cuda {b.get(key, math.nan):>12.6g}  (timing)")
                continue
            if key not in b:
                failures.append(f"{name} {key}: missing on CUDA")
                continue
            diff = abs(a[key] - b[key]) / max(abs(a[key]), 1e-3) if math.isfinite(a[key] - b[key]) else math.inf
            close = agree(key, a[key], b[key], tol)
            verdict = ("ok (diverged on both)" if diverged(a[key]) else "ok") if close else "DIFFERS"
            print(f"  {name:<28} {key:<44} cpu {a[key]:>12.6g}  cuda {b[key]:>12.6g}  rel {diff:.1e} {verdict}")
            if not close:
                failures.append(f"{name} {key}: cpu {a[key]:.6g}, cuda {b[key]:.6g} (rel {diff:.1e} > {tol:g})")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device to compare with the CPU (default: cuda)")
    parser.add_argument("--rtol", type=float, default=1e-3, help="deterministic stages (default 1e-3)")
    parser.add_argument("--stochastic-rtol", type=float, default=0.1, help="stages with device-drawn probes (0.1)")
    parser.add_argument("--keep", type=Path, default=None, help="keep both projects under this folder")
    parser.add_argument(
        "--smoke", action="store_true", help="smaller still (SMOKE), and with --device cpu one run: checks the script"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the verdict and timings to this file")
    args = parser.parse_args(argv)

    import torch

    from pipeline.env import device_info, parse_device, set_device
    from pipeline.params import load_params
    from pipeline.paths import Paths

    threads = os.environ.get("IRESNET_THREADS")
    torch.set_num_threads(int(threads) if threads else min(8, torch.get_num_threads()))
    target = parse_device(args.device)
    params = load_params(
        Paths.at(Path(__file__).resolve().parents[2]).params_file, {**TINY, **(SMOKE if args.smoke else {})}
    )
    base = Path(tempfile.mkdtemp(prefix="iresnet-gpu-check-")) if args.keep is None else args.keep
    roots = {"cpu": base / "cpu", "cuda": base / "cuda"}
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {device_info(target)}")
    seconds = {}
    for name, dev in (("cpu", torch.device("cpu")), ("cuda", target)):
        if args.smoke and name == "cuda" and dev.type == "cpu":  # CPU against CPU: the one run against itself
            roots[name], seconds[name] = roots["cpu"], 0.0
            continue
        roots[name].mkdir(parents=True, exist_ok=True)
        set_device(dev)
        seconds[name] = run_pipeline(roots[name], params)
        print(f"{name}: every stage in {seconds[name]:.1f} s")
    set_device(torch.device("cpu"))
    failures = compare(roots["cpu"], roots["cuda"], args.rtol, args.stochastic_rtol)
    for failure in failures:
        print(f"FAIL {failure}")
    print(f"GPU CHECK: {'FAIL' if failures else 'PASS'} (cpu {seconds['cpu']:.1f} s, {target} {seconds['cuda']:.1f} s)")
    if args.json is not None:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        verdict = {
            "part": "gpu_check",
            "pass": not failures,
            "failures": failures,
            "seconds": {"cpu": seconds["cpu"], str(target): seconds["cuda"]},
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            **device_info(target),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        args.json.write_text(json.dumps(verdict, indent=1) + "\n")
    if args.keep is None:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
