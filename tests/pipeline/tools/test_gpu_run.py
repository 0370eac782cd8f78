"""``scripts/gpu_run.sh --tiny`` on the CPU: every part of the GPU node's session runs and writes its JSON, and the
report's GPU section renders them.

The wheel install is the node's path when ``GPU_WHEELS`` names a folder of wheels this Python can install
(``scripts/fetch_gpu_wheels.sh /tmp/w311 3.11``); without it (offline) the script uses what is installed. The
documented command, with the real install path::

    scripts/fetch_gpu_wheels.sh /tmp/w311 "$(python -c 'import sys; print(*sys.version_info[:2], sep=".")')"
    GPU_WHEELS=/tmp/w311 scripts/gpu_run.sh --tiny /tmp/gpu_out

A few minutes on 2 busy cores: marked ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.report.gpu import NOT_RUN, gpu_section

REPO = Path(__file__).resolve().parents[3]
PARTS = ("env", "gpu_check", "bench", "flow", "toy", "ddp")


@pytest.mark.slow
def test_gpu_run_tiny_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "GPU_WHEELS": os.environ.get("GPU_WHEELS", str(tmp_path / "no-wheels"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the script calls `python`
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_run.sh"), "--tiny", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert run["tiny"] is True
    assert {p["part"]: p["rc"] for p in run["parts"] if p["part"] in PARTS} == dict.fromkeys(PARTS, 0), run
    for part in PARTS:
        assert json.loads((out / f"{part}.json").read_text())
    assert json.loads((out / "gpu_check.json").read_text())["pass"] is True
    assert json.loads((out / "ddp.json").read_text())["backend"] == "gloo"
    text = gpu_section(out)
    assert NOT_RUN not in text and "tiny CPU smoke-test profile" in text and "spectral norm" in text
