"""The exact mode: a fixed thread count (:data:`pipeline.env.EXACT_THREADS`) under which training is bitwise
repeatable while it uses more than one core, and the record of what made each result."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from pipeline.env import EXACT_THREADS, cpu_model, made_with

REPO = Path(__file__).resolve().parents[2]

# Trains a small i-ResNet classifier (ops large enough for torch to split them across threads: 16x16 images, batch 32)
# for a few SGD steps in a fresh process at the given thread count, and prints a digest of every weight's bytes.
TRAIN = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from iresnet.models import IResNetClassifier, ResNetConfig
from pipeline.training import seed_everything
seed_everything(0)
config = ResNetConfig(in_shape=(1, 16, 16), n_blocks=(2, 2), strides=(1, 2), channels=(16, 32), inj_pad=3)
model = IResNetClassifier(config, n_classes=4)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for step in range(4):
    x, y = torch.rand(32, 1, 16, 16), torch.randint(0, 4, (32,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
print(torch.get_num_threads(), digest.hexdigest())
"""


def _train(threads: int) -> tuple[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", TRAIN, str(threads)], cwd=REPO, capture_output=True, text=True, check=True
    )
    used, digest = done.stdout.split()
    return used, digest


def test_training_in_the_exact_mode_is_bitwise_repeatable() -> None:
    first, second = _train(EXACT_THREADS), _train(EXACT_THREADS)
    assert first[0] == str(EXACT_THREADS)  # it really ran on that many threads
    assert first == second


def test_made_with_names_cpu_torch_build_and_threads() -> None:
    import torch

    record = made_with()
    assert record["torch"] == torch.__version__ and record["threads"] == torch.get_num_threads()
    assert record["cpu"] == cpu_model() and record["cpu"] and record["device"] == "cpu"
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert hashlib.sha256(str(record).encode())  # plain JSON types only
    assert all(isinstance(v, (str, int)) for v in record.values())
