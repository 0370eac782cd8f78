"""Paper-scale runs for a fixed wall-time budget, for the GPU node's short slot (issue 22; ``scripts/gpu_run.sh``).

``python -m pipeline.tools.gpu_budget flow --budget 90 --json out.json``: the MNIST flow of
``configs/mnist/params.yaml`` (Table 4's 3 x 32 blocks) trains on the offline mnist-5k digits (the node has no
network) for ``--budget`` seconds of training steps; reports the time per step, the time per epoch and for the
paper's 200 epochs of 60,000 images extrapolated from it, and the validation and test bits/dim (the training
estimator, fixed noise and probes) reached after the budget. ``toy``: the 2-D toy of the same profile (Fig. 2: 100
blocks, batch 500) for ``--steps`` steps on one dataset; its steps per second extrapolated to the profile's steps.

``--tiny`` shrinks both to a CPU smoke test of seconds. Not a stage: it writes only into a temporary project and the
JSON file; MLflow is off.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROFILE = Path(__file__).resolve().parents[2] / "configs" / "mnist" / "params.yaml"
PAPER_TRAIN_IMAGES = 55000  # configs/mnist: MNIST's 60,000 less 5,000 validation images
OFFLINE_DATA: dict[str, Any] = {
    "data.dataset": "mnist-5k",
    "data.download": False,
    "data.val_fraction": 0.125,
    "data.test_fraction": 0.2,
    "tracking.enabled": False,
}
TINY_FLOW: dict[str, Any] = {
    "data.max_train": 512,
    "data.max_test": 64,
    "flow.n_blocks": [1, 1, 1],
    "flow.channels": [8, 8, 8],
    "flow.batch_size": 32,
    "flow.eval_batch_size": 64,
    "flow.n_terms": 2,
}
TINY_TOY: dict[str, Any] = {
    "toy.n_blocks": 4,
    "toy.batch_size": 64,
    "toy.n_test": 256,
    "toy.n_val": 256,
    "toy.grid_size": 20,
}


class _OutOfTime(Exception):
    pass


def _params(overrides: dict[str, Any]) -> Any:
    from pipeline.params import load_params

    return load_params(PROFILE, overrides)


def flow_run(budget_s: float, tiny: bool, root: Path) -> dict[str, Any]:
    """Train the profile's flow for ``budget_s`` seconds of steps in project ``root``; its numbers."""
    import torch

    from iresnet.models import MultiscaleFlow
    from pipeline.data.store import load_prepared, load_zca
    from pipeline.env import device, synchronize
    from pipeline.models.flows import FlowSpace, fixed_noise_inputs, flow_config
    from pipeline.paths import Paths
    from pipeline.stages import prepare, train_flow
    from pipeline.training import build_optimizer, seed_everything

    params = _params({**OFFLINE_DATA, **(TINY_FLOW if tiny else {}), "flow.epochs": 200})
    paths = Paths.at(root)
    prepare.run(params, paths)
    p, dev = params.flow, device()
    seed_everything(params.seed)
    train = load_prepared(paths, "train")[0].to(dev)
    val = load_prepared(paths, "val")[0].to(dev)
    test = load_prepared(paths, "test")[0].to(dev)
    shape = tuple(train.shape[1:])
    space = FlowSpace(shape, load_zca(paths).to(dev) if p.use_zca else None)  # type: ignore[arg-type]
    config = flow_config(p, shape)  # type: ignore[arg-type]
    model = MultiscaleFlow(config).to(dev)
    train_flow.converge_spectral_norms(model)
    optimizer = build_optimizer(p.optimizer, model.parameters(), p.lr, weight_decay=p.weight_decay)
    noise = torch.Generator().manual_seed(params.seed)
    steps, times = 0, []
    synchronize()
    start = last = time.perf_counter()

    def advance(info: str = "", **_: Any) -> None:
        nonlocal steps, last, bpd
        bpd = float(info.split()[0]) if info else math.nan  # train_epoch's "<loss> bits/dim"
        synchronize()
        now = time.perf_counter()
        times.append(now - last)
        last, steps = now, steps + 1
        if now - start >= budget_s:
            raise _OutOfTime

    epochs, bpd = 0, math.nan
    try:
        while True:
            epochs += 1
            train_flow.train_epoch(model, optimizer, train, space, noise, params, epochs, advance)
    except _OutOfTime:
        pass
    trained_s = time.perf_counter() - start
    steady = sorted(times[1:] or times)  # the first step pays for cuDNN autotuning and allocations
    step_s = steady[len(steady) // 2]
    per_epoch = math.ceil(PAPER_TRAIN_IMAGES / p.batch_size)
    seed = params.seed + 1
    t0 = time.perf_counter()
    val_bpd = train_flow.evaluate_epoch(model, space, fixed_noise_inputs(space, val, seed), p.eval_batch_size, seed)
    test_bpd = train_flow.evaluate_epoch(model, space, fixed_noise_inputs(space, test, seed), p.eval_batch_size, seed)
    return {
        "profile": str(PROFILE.relative_to(PROFILE.parents[2])),
        "dataset": params.data.dataset,
        "n_train": len(train),
        "blocks": list(p.n_blocks),
        "channels": list(p.channels),
        "batch_size": p.batch_size,
        "n_terms": p.n_terms,
        "budget_s": budget_s,
        "trained_s": trained_s,
        "steps": steps,
        "step_s_median": step_s,
        "first_step_s": times[0] if times else math.nan,
        "paper_epoch_steps": per_epoch,
        "paper_epoch_s": step_s * per_epoch,
        "paper_200_epochs_h": step_s * per_epoch * 200 / 3600,
        "last_step_train_bpd": bpd,
        "val_bpd": val_bpd["bpd"],
        "test_bpd": test_bpd["bpd"],
        "n_test": len(test),
        "eval_s": time.perf_counter() - t0,
    }


def toy_run(steps: int, tiny: bool, root: Path) -> dict[str, Any]:
    """The profile's toy flows (i-ResNet and Glow) for ``steps`` steps on one dataset; steps/s extrapolated."""
    from pipeline.paths import Paths
    from pipeline.stages import toy_density

    full = _params({"tracking.enabled": False})
    params = _params(
        {
            "tracking.enabled": False,
            "toy.steps": steps,
            "toy.datasets": ["moons"],
            "toy.seeds": [0],
            **(TINY_TOY if tiny else {"toy.n_test": 2000, "toy.n_val": 2000, "toy.grid_size": 50}),
        }
    )
    start = time.perf_counter()
    metrics = toy_density.run(params, Paths.at(root))
    moons = {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("moons.")}  # the run's flat dict
    rates = {k[: -len("_steps_per_s")]: v for k, v in moons.items() if k.endswith("_steps_per_s")}
    return {
        "profile_steps": full.toy.steps,
        "steps": steps,
        "n_blocks": params.toy.n_blocks,
        "batch_size": params.toy.batch_size,
        "seconds": time.perf_counter() - start,
        "steps_per_s": rates,
        "profile_minutes": {k: full.toy.steps / v / 60 for k, v in rates.items()},
        "moons": {k: v for k, v in moons.items() if isinstance(v, (int, float, str, bool))},
    }


def ddp_run(tiny: bool) -> dict[str, Any]:
    """Under ``torchrun --nproc-per-node 1``: the process group (NCCL on CUDA, gloo on the CPU, as
    :func:`pipeline.distributed.init_process_group` makes it), an all-reduce, the RNG broadcast, and a few DDP
    training steps of a small flow (:func:`pipeline.distributed.wrap`)."""
    import torch
    import torch.distributed as dist

    from iresnet.models import MultiscaleFlow
    from pipeline.distributed import Method, barrier, init_process_group, wrap
    from pipeline.env import World, device, synchronize, world
    from pipeline.tools.bench import _QUICK_DENS

    dev = device()
    start = time.perf_counter()
    here = init_process_group(dev, force=True)
    backend = dist.get_backend()
    x = torch.ones(4, device=dev) * (here.rank + 1)
    dist.all_reduce(x)
    states: list[Any] = [torch.get_rng_state()]
    dist.broadcast_object_list(states, src=0)
    torch.manual_seed(0)
    model = MultiscaleFlow(_QUICK_DENS).to(dev)
    net = wrap(Method(model, "log_prob"), dev)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = -net(torch.rand(16, *_QUICK_DENS.in_shape, device=dev)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    synchronize()
    barrier(World(here.rank, 2, here.local_rank))  # a barrier of the real group (World(…, 2, …): not skipped)
    dist.destroy_process_group()
    return {
        "backend": backend,
        "world_size": world().size,
        "all_reduce": x.tolist(),
        "losses": losses,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("flow", "toy", "ddp"))
    parser.add_argument("--budget", type=float, default=90.0, help="flow: seconds of training steps")
    parser.add_argument("--steps", type=int, default=300, help="toy: steps of each flow")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="a CPU smoke test of seconds")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from pipeline.env import device_info, parse_device, set_device

    dev = parse_device(args.device)
    set_device(dev)
    root = Path(tempfile.mkdtemp(prefix=f"iresnet-gpu-{args.part}-"))
    try:
        if args.part == "flow":
            result = flow_run(args.budget, args.tiny, root)
        elif args.part == "toy":
            result = toy_run(args.steps, args.tiny, root)
        else:
            result = ddp_run(args.tiny)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "part": args.part,
        "tiny": args.tiny,
        "torch": torch.__version__,
        **device_info(dev),
        **result,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
