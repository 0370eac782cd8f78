"""``iresnet ui`` for real: the MLflow server on a free port against a tmp store with one run, found through the REST
API, then stopped with every process it started (bounded waits throughout)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.paths import Paths
from pipeline.tracking import FAMILIES, experiment_name, stage_run

START_TIMEOUT_S = 90.0  # the server is up in ~6 s on an idle machine; 2 busy cores can take several times that
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc: the server and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def api(port: int, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_healthy(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`iresnet ui` exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the MLflow UI did not answer /health within {START_TIMEOUT_S:.0f} s")


def test_ui_serves_the_project_store_and_stops_cleanly(
    tmp_path: Path, fresh_store: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IRESNET_TRACKING", "1")
    fresh_store(tmp_path)
    paths = Paths.at(tmp_path)
    with stage_run("data", "prepare", {"data": {"dataset": "idx:tiny"}}, paths) as tracker:
        tracker.log_metrics({"n_train": 30.0})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--root", str(tmp_path), "ui", "--port", str(port)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    started: set[int] = set()
    try:
        wait_healthy(port, proc)
        started = descendants(proc.pid)
        assert started, "the UI command should run the server as a child process"

        experiments = api(port, "experiments/search", {"max_results": 100})["experiments"]
        ids = {e["name"]: e["experiment_id"] for e in experiments}
        assert {experiment_name(f) for f in FAMILIES} <= set(ids)
        runs = api(port, "runs/search", {"experiment_ids": [ids["iresnet-data"]], "max_results": 10})["runs"]
        assert len(runs) == 1
        run = runs[0]
        assert run["info"]["run_name"] == "prepare" and run["info"]["status"] == "FINISHED"
        assert {"key": "data.dataset", "value": "idx:tiny"} in run["data"]["params"]
        assert any(m["key"] == "n_train" and m["value"] == 30.0 for m in run["data"]["metrics"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the command's own group; it stops the server's group in turn
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [pid for pid in started if alive(pid)]
        for pid in survivors:  # never leak a server into the next test, even when this one fails
            os.kill(pid, signal.SIGKILL)
    out = proc.stdout.read() if proc.stdout else ""
    assert not survivors, f"processes left running after stopping `iresnet ui`: {survivors}"
    assert f"http://127.0.0.1:{port}/#/experiments/{ids['iresnet-data']}/runs" in out
