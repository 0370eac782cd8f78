"""Data-parallel training on the CPU: 2 gloo processes (torch.multiprocessing) against one process.

Both training stages run under world size 2 on tiny projects: the classifier ends with the weights of the same
steps on one process (the same global batches), a run killed under world size 2 resumes (on 2 processes, and on 1),
every rank ends with the same weights and spectral-norm vectors, and only rank 0 writes. Three launches of 2
processes: about 30 s on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.data.store import stats_file
from pipeline.files import read_json, write_json
from pipeline.outputs import TRAIN_CLASSIFIER, TRAIN_FLOW
from pipeline.params import parse_params
from pipeline.paths import Paths
from tests.pipeline.classifier_helpers import tiny_raw, write_prepared
from tests.pipeline.flow_helpers import tiny_flow_params

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, job: dict[str, Any]) -> None:
    """One rank: the torchrun environment, the gloo group, the stage; saves its final model state for the test."""
    import torch.distributed as dist

    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    from pipeline import distributed
    from pipeline.stages import train_classifier, train_flow

    distributed.init_process_group(torch.device("cpu"))
    stage = train_classifier if job["stage"] == "classifier" else train_flow
    built: list[torch.nn.Module] = []
    cls_name = "IResNetClassifier" if job["stage"] == "classifier" else "MultiscaleFlow"
    cls = getattr(stage, cls_name)
    setattr(stage, cls_name, lambda *a, **k: built.append(cls(*a, **k)) or built[-1])
    if job.get("kill_at_step"):
        real, calls = stage.check_finite, {"n": 0}

        def killed(*args: Any) -> None:
            calls["n"] += 1
            if calls["n"] == job["kill_at_step"]:
                raise KeyboardInterrupt  # on both ranks at the same step, as a signal to the launcher would
            real(*args)

        stage.check_finite = killed
    params, paths = parse_params(job["raw"]), Paths.at(job["roots"][rank])
    kwargs = {"coeff": job["coeff"]} if job["stage"] == "classifier" else {}
    try:
        stage.run(params, paths, **kwargs)
    except KeyboardInterrupt:
        pass
    else:
        torch.save(built[0].state_dict(), Path(job["out"]) / f"rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _spawn(job: dict[str, Any]) -> None:
    mp.spawn(_worker, args=(_free_port(), job), nprocs=WORLD, join=True)


def _project(root: Path) -> Paths:
    """Tiny prepared 8x8 data (as the classifier tests use; the flow reads it too)."""
    root.mkdir(parents=True)
    write_prepared(root)
    paths = Paths.at(root)
    stats = read_json(stats_file(paths))
    write_json(stats_file(paths), {**stats, "zca": {"enabled": False}})
    return paths


def _classifier_raw(**classifier: Any) -> dict[str, Any]:
    return tiny_raw(**{"epochs": 2, "milestones": [1], **classifier})


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=1e-4, atol=atol), key


def test_two_ranks_train_as_one_process_resume_after_a_kill_and_only_rank_0_writes(tmp_path: Path) -> None:
    """2 epochs of 4 global batches of 8 (8 SGD steps): killed in epoch 2 under world size 2 (after the epoch-1
    checkpoint), resumed on 2 processes and, from the same checkpoint, on 1; both end with the weights of an unbroken
    single-process run on the same global batches (float tolerance), the 2 ranks with identical weights and buffers
    (spectral-norm vectors, ActNorm, BatchNorm statistics), and rank 1 writes nothing."""
    raw = _classifier_raw()
    from pipeline.stages import train_classifier

    single = _project(tmp_path / "single")
    train_classifier.run(parse_params(raw), single, coeff=0.9)
    reference = _state(TRAIN_CLASSIFIER.model_path(single, "0.9", 0))

    roots = [_project(tmp_path / "rank0").root, _project(tmp_path / "rank1").root]  # who writes what, told apart
    job = {"stage": "classifier", "raw": raw, "coeff": "0.9", "roots": [str(r) for r in roots], "out": str(tmp_path)}
    _spawn({**job, "kill_at_step": 6})
    (checkpoint,) = (roots[0] / ".resume").glob("classifier-0.9-*.pt")
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    assert not TRAIN_CLASSIFIER.model_path(Paths(roots[0]), "0.9", 0).exists()
    assert not (roots[1] / ".resume").exists()
    one = _project(tmp_path / "one")
    for root in (roots[1], one.root):  # on one node the ranks share a root (here: each gets the file)
        shutil.copytree(roots[0] / ".resume", root / ".resume")

    _spawn(job)  # resumed on 2 processes
    _close(_state(TRAIN_CLASSIFIER.model_path(Paths(roots[0]), "0.9", 0)), reference)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    written = {p.relative_to(roots[1]).as_posix() for p in roots[1].rglob("*") if p.is_file()}
    assert all(name.startswith(("data/prepared/", ".resume/")) for name in written), written
    assert (roots[0] / "reports/metrics/classifier/0.9/seed0.json").is_file()
    assert not list((roots[0] / ".resume").glob("*"))  # removed once the outputs were written

    train_classifier.run(parse_params(raw), one, coeff=0.9)  # the same checkpoint resumed on 1 process
    _close(_state(TRAIN_CLASSIFIER.model_path(one, "0.9", 0)), reference)


def test_flow_trains_on_two_ranks_with_identical_weights_on_each(tmp_path: Path) -> None:
    """The flow's DDP path (log_prob through DDP, ActNorm initialised before wrapping): finite, rank-identical."""
    raw = tiny_flow_params(_classifier_raw(), epochs=1)
    root = _project(tmp_path / "flow")
    _spawn({"stage": "flow", "raw": raw, "roots": [str(root.root)] * 2, "out": str(tmp_path)})
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert all(torch.isfinite(v.double()).all() for v in ranks[0].values() if v.is_floating_point())
    assert TRAIN_FLOW.model_path(root).is_file()


@pytest.mark.parametrize(("batch", "ok"), [(8, True), (7, False)])
def test_world_size_must_divide_the_batch(batch: int, ok: bool) -> None:
    from pipeline.distributed import check_divides
    from pipeline.errors import ParamsError

    if ok:
        check_divides(batch, "classifier.batch_size", 2)
    else:
        with pytest.raises(ParamsError, match="classifier.batch_size"):
            check_divides(batch, "classifier.batch_size", 2)
