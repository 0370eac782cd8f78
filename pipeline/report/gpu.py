"""The report's "GPU" section: the results of ``scripts/gpu_run.sh`` (its JSON files, copied to ``reports/gpu/``)
beside the paper's runtime claims, or one line saying there are none yet.

Not a DVC input of the report stage (the folder exists only after a GPU run): after copying the files, regenerate
the page with ``iresnet report`` (or ``dvc repro --force report``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

NOT_RUN = "Not yet run on a GPU (`scripts/gpu_run.sh` on a GPU node, then its JSON files into `reports/gpu/`)."
#: Sec. 5.1/5.3: forward + backward of a batch of 128 with one power iteration vs none, on 4 GTX 1080.
PAPER_SN_S, PAPER_PLAIN_S = 0.5, 0.2
#: Sec. 5.3: a 5-term log-det step costs about 4x a classification step.
PAPER_LOGDET_RATIO = 4.0
#: Table 4: i-ResNet on MNIST, test bits/dim (3072 padded dims), 200 epochs.
PAPER_MNIST_BPD = 1.06


def load(folder: Path) -> dict[str, dict[str, Any]]:
    """``{stem: contents}`` of every ``*.json`` in ``folder`` (none when it is missing); unreadable files are
    skipped."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out[path.stem] = data
    return out


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def _flat(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        return [item for k, v in data.items() for item in _flat(v, f"{prefix}{k}.")]
    if isinstance(data, list) and all(not isinstance(v, (dict, list)) for v in data):
        return [(prefix.rstrip("."), ", ".join(_num(v) for v in data))]
    if isinstance(data, list):
        return [item for i, v in enumerate(data) for item in _flat(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), data)]


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def claims(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(quantity, paper, this run) rows for the paper's runtime claims and the time-boxed runs."""
    rows: list[tuple[str, str, str]] = []
    bench = results.get("bench", {})
    sn, plain = (_get(bench, "cases", name, "step_s", "median") for name in ("paper_sn_128", "paper_plain_128"))
    if sn is not None and plain is not None:
        rows.append(
            (
                "train step, batch 128, spectral norm (1 power it.) / without",
                f"{PAPER_SN_S} s / {PAPER_PLAIN_S} s = {PAPER_SN_S / PAPER_PLAIN_S:.1f}x (4 GTX 1080)",
                f"{sn:.3f} s / {plain:.3f} s = {sn / plain:.2f}x",
            )
        )
    for name, ratio in sorted((_get(bench, "ratios") or {}).items()):
        if name.startswith("dens_") and name.endswith("_step_over_none_step"):
            rows.append(
                (
                    f"log-det step over plain step ({name[5:-20]}, 5 terms)",
                    f"≈ {PAPER_LOGDET_RATIO:g}x",
                    f"{ratio:.2f}x",
                )
            )
    flow = results.get("flow")
    if flow:
        rows.append(
            (
                "MNIST flow (configs/mnist): time per step, per epoch, 200 epochs",
                "-",
                f"{_num(flow.get('step_s_median'))} s, {_num(flow.get('paper_epoch_s'))} s, "
                f"{_num(flow.get('paper_200_epochs_h'))} h (extrapolated)",
            )
        )
        rows.append(
            (
                f"MNIST flow: test bits/dim after {_num(flow.get('trained_s'), 3)} s ({flow.get('steps')} steps, "
                f"{flow.get('dataset')})",
                f"{PAPER_MNIST_BPD} after 200 epochs (3072 dims)",
                _num(flow.get("test_bpd")),
            )
        )
    toy = results.get("toy")
    if toy and isinstance(toy.get("profile_minutes"), dict):
        rows.append(
            (
                f"2-D toy, {toy.get('n_blocks')} blocks: minutes for {toy.get('profile_steps')} steps",
                "-",
                ", ".join(f"{k} {v:.1f}" for k, v in toy["profile_minutes"].items()),
            )
        )
    check = results.get("gpu_check")
    if check:
        verdict = "PASS" if check.get("pass") else "FAIL"
        rows.append(("every stage, CUDA vs CPU (pipeline.tools.gpu_check)", "-", verdict))
    ddp = results.get("ddp")
    if ddp:
        rows.append(("torchrun, 1 process: process group and DDP steps", "-", f"{ddp.get('backend')} ok"))
    return rows


def gpu_section(folder: Path) -> str:
    """The markdown of the "GPU" section from the JSON files in ``folder``."""
    results = load(folder)
    if not results:
        return "## GPU\n\n" + NOT_RUN + "\n"
    env = results.get("env", {})
    first = next(iter(results.values()))
    gpu = env.get("gpu") or first.get("gpu") or env.get("device") or first.get("device") or "unknown device"
    torch_version = env.get("torch") or first.get("torch") or "?"
    date = env.get("date") or first.get("date") or "?"
    tiny = env.get("tiny") or first.get("tiny")
    lines = [
        "## GPU",
        "",
        f"**Device:** {gpu}; torch {torch_version}"
        + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
        + f"; run {date}"
        + (" — **tiny CPU smoke-test profile: the numbers mean nothing**" if tiny else "")
        + ". From `scripts/gpu_run.sh` (files in `reports/gpu/`).",
        "",
    ]
    rows = claims(results)
    if rows:
        lines += ["| quantity | paper | this run |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        lines.append("")
    run = results.get("run", {})
    failed = [p for p in run.get("parts", []) if p.get("rc")]
    if failed:
        lines.append(
            "Parts that failed or ran out of time: "
            + ", ".join(f"{p['part']} (rc {p['rc']}{', timed out' if p.get('timed_out') else ''})" for p in failed)
            + "."
        )
        lines.append("")
    lines += ["<details><summary>Every number of the GPU run</summary>", ""]
    for stem, data in results.items():
        if stem.endswith(".status"):
            continue
        lines += [f"**{stem}.json**", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {_num(v, 6).replace('|', '/')} |" for k, v in _flat(data) if k != "part"]
        lines.append("")
    lines.append("</details>")
    return "\n".join(lines) + "\n"
