"""The ``iresnet`` command line: one command per DVC stage, plus ``ui`` for the MLflow UI.

Each stage command loads ``params.yaml`` (or ``--params FILE``), applies ``--set KEY=VALUE`` and its own explicit
options, runs the stage module's ``run(params, paths, tracker)`` inside an MLflow run, and prints the returned
metrics as a table. A user error (bad param, missing data, missing stage input) prints one paragraph and exits 1.

The process plumbing behind each command (threads, device, torchrun, signals, outputs, MLflow run) is
:mod:`pipeline.runner`; this module holds the commands only.

Adding a stage::

    @app.command()
    def train_flow(ctx: typer.Context, epochs: Optional[int] = typer.Option(None, help="override flow.epochs")) -> None:
        \"\"\"Train the multiscale flow.\"\"\"
        from pipeline.stages import train_flow as stage
        run_stage(ctx, "flow", "train_flow", stage.run, ("seed", "data", "flow"), {"flow.epochs": epochs})
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

try:
    import typer
    import typer.core

    from pipeline.console import console
    from pipeline.errors import TrackingError, UserError
    from pipeline.params import Params
    from pipeline.paths import Paths
    from pipeline.runner import Settings, declared, dry_run, fail, load, on_signals, run_each, run_stage
except ImportError as _missing:  # a Python without the project installed, e.g. `dvc repro` outside `.venv`
    raise SystemExit(
        f"error: {_missing} in {sys.executable}. Activate the project's environment (`. .venv/bin/activate`), or "
        "create it with step 1 of README.md, then run the command again."
    ) from None


class GlobalOptionsAnywhere(typer.core.TyperGroup):
    """The global options (``--params``, ``--set``, ``--root``, ``--threads``, ``--device``, ``--nproc``) are
    accepted after the command too:
    ``iresnet train-classifier --coeff 0.9 -S classifier.epochs=1`` is read as
    ``iresnet -S classifier.epochs=1 train-classifier --coeff 0.9``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args, self.params, set(self.commands)))


def hoist_global_options(args: list[str], options: Sequence[Any], commands: set[str]) -> list[str]:
    """``args`` with every global option (and its value) found after the command name moved before it; ``--help``,
    ``--version``, the command's own options and anything after ``--`` stay where they are."""
    takes_value, flags = set(), set()
    for option in options:
        if option.param_type_name == "option" and option.name not in ("help", "version"):
            (flags if option.is_flag else takes_value).update(option.opts + option.secondary_opts)
    i = 0
    while i < len(args) and args[i] not in commands:  # up to the command name
        i += 2 if args[i] in takes_value else 1
    if i >= len(args):
        return list(args)
    command, rest, moved, after = args[i], args[i + 1 :], [], []
    j = 0
    while j < len(rest):
        arg = rest[j]
        if arg == "--":
            after += rest[j:]
            break
        name = arg.split("=", 1)[0]
        if arg in takes_value and j + 1 < len(rest):
            moved += rest[j : j + 2]
            j += 2
            continue
        if (name in takes_value and "=" in arg) or arg in flags:
            moved.append(arg)
        else:
            after.append(arg)
        j += 1
    return [*args[:i], *moved, command, *after]


def _version(value: bool) -> None:
    """``--version``: the installed versions of the library and the pipeline, then exit."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        texts = []
        for name in ("iresnet", "iresnet-pipeline"):  # the library and this pipeline (pipeline/pyproject.toml)
            try:
                texts.append(f"{name} {version(name)}")
            except PackageNotFoundError:
                texts.append(f"{name} unknown (not installed: `pip install -e . -e ./pipeline`)")
        console.print(", ".join(texts), highlight=False)
        raise typer.Exit()


app = typer.Typer(
    cls=GlobalOptionsAnywhere,
    name="iresnet",
    help="Invertible Residual Networks (Behrmann et al., 2019): the experiment pipeline's stages.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    params: Optional[Path] = typer.Option(None, "--params", "-p", help="Params file (default: ROOT/params.yaml)."),
    root: Path = typer.Option(Path("."), "--root", help="Project root holding data/, models/, reports/."),
    set_: list[str] = typer.Option(
        [], "--set", "-S", help="Override a param, KEY=VALUE (YAML value), e.g. -S data.dataset=cifar10. Repeatable."
    ),
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        envvar="IRESNET_THREADS",
        min=1,
        help="torch CPU threads (env IRESNET_THREADS; default: torch's, one per core). 2, the exact mode, reproduces "
        "the committed outputs byte for byte on the CPU model and torch build that made them (reports/README.md).",
    ),
    device: Optional[str] = typer.Option(
        None,
        "--device",
        envvar="IRESNET_DEVICE",
        help="Where stages compute: auto (CUDA when present, the default), cpu, cuda or cuda:N (env IRESNET_DEVICE). "
        "An execution setting: it does not change dvc.lock.",
    ),
    nproc: Optional[int] = typer.Option(
        None,
        "--nproc",
        envvar="IRESNET_NPROC",
        min=1,
        help="Data-parallel processes for train-classifier and train-flow (env IRESNET_NPROC), launched through "
        "torchrun, one per GPU on CUDA; the params' batch size is the global one, split across them.",
    ),
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_version, help="Print the package version and exit."
    ),
) -> None:
    """Invertible Residual Networks: run one pipeline stage (normally through `dvc repro`).

    The options below may also come after the command: `iresnet train-classifier --coeff 0.9 -S classifier.epochs=1`.
    """
    ctx.obj = Settings(root=root, params_file=params, sets=tuple(set_), threads=threads, device=device, nproc=nproc)


DRY_RUN_HELP = "Print parameters, activation memory per example and the time per epoch from 10 measured steps."


@app.command()
def raw_data(ctx: typer.Context) -> None:
    """Hash the raw dataset files `prepare` reads into data/raw.json (a dep of prepare: DVC re-runs it on a change)."""
    from pipeline.output_set import replaced_together
    from pipeline.stages import raw_data as stage

    try:
        params, paths = load(ctx)
        with replaced_together(paths.root, "raw_data", declared("raw_data")):
            record = stage.run(params, paths)
    except UserError as err:
        fail(err)
    missing = sorted(name for name, digest in record["files"].items() if digest is None)
    note = f"; missing: {', '.join(missing)}" if missing else ""
    console.print(f"raw data of {record['dataset']}: {len(record['files'])} files hashed{note}", highlight=False)


@app.command()
def prepare(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, help="Override data.dataset (mnist-5k, mnist, ..., idx:<folder>)."),
    download: Optional[bool] = typer.Option(None, "--download/--no-download", help="Override data.download."),
) -> None:
    """Split the dataset into train / validation / test, fit normalisation and ZCA on train only, write
    data/prepared/ and a preview grid."""
    from pipeline.stages import prepare as stage

    run_stage(ctx, "data", "prepare", stage.run, ("data",), {"data.dataset": dataset, "data.download": download})


@app.command()
def train_classifier(
    ctx: typer.Context,
    coeff: str = typer.Option(..., help="Which entry of classifier.coeffs: vanilla, batchnorm, or c (e.g. 0.9)."),
    seed: int = typer.Option(..., help="Which entry of classifier.seeds: the run's training seed (e.g. 0)."),
    epochs: Optional[int] = typer.Option(None, help="Override classifier.epochs."),
    dry: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
) -> None:
    """Train one classifier of Table 2 from one seed: validation error per epoch, the test error once at the end
    (resumes from its last epoch checkpoint if an earlier run was killed)."""
    from pipeline.models.specs import coeff_label, run_name
    from pipeline.outputs import TRAIN_CLASSIFIER
    from pipeline.stages import train_classifier as stage

    coeff = coeff_label(coeff)  # "０.９" or "0.90" names the run (and finds the entry) as "0.9" does

    def batch_key(params: Params) -> tuple[str, int]:
        return "classifier.batch_size", params.classifier.batch_size

    if dry:
        from pipeline.tools import dry_run as measure

        def runner_dry(params: Params, paths: Paths, nproc: int) -> dict[str, Any]:
            return measure.classifier(params, paths, coeff, nproc)

        return dry_run(ctx, runner_dry, {"classifier.epochs": epochs}, batch_key)

    def runner(params: Params, paths: Paths, tracker: Any) -> dict[str, Any]:
        metrics = stage.run(params, paths, tracker, coeff=coeff, seed=seed)
        # The per-image outcomes stay in the metrics file (an MLflow artifact): too long for a tag or the table.
        return {k: v for k, v in metrics.items() if k != "test_correct"}

    run_stage(
        ctx,
        "classifier",
        run_name(coeff, seed),
        runner,
        ("data", "classifier"),  # not the global `seed`: the run's seed is its entry of classifier.seeds
        {"classifier.epochs": epochs},
        {"coeff": coeff, "seed": seed},
        batch_key=batch_key,
        outputs=TRAIN_CLASSIFIER.run_files(coeff, seed),
    )


@app.command()
def train_glow_classifier(
    ctx: typer.Context,
    run: str = typer.Option(..., "--run", help="Which entry of glow_classifier.runs, e.g. affine-adamax."),
    seed: int = typer.Option(..., help="Which entry of glow_classifier.seeds: the run's training seed (e.g. 0)."),
    epochs: Optional[int] = typer.Option(None, help="Override classifier.epochs."),
) -> None:
    """Train one classifier of Table 3 (Glow or the Glow-style i-ResNet) from one seed; a run that diverges is
    recorded as such (resumes from its last epoch checkpoint if an earlier run was killed)."""
    from pipeline.models.glow_specs import run_name
    from pipeline.outputs import TRAIN_GLOW_CLASSIFIER
    from pipeline.stages import train_glow_classifier as stage

    def runner(params: Params, paths: Paths, tracker: Any) -> dict[str, Any]:
        metrics = stage.run(params, paths, tracker, run_label=run, seed=seed)
        return {k: v for k, v in metrics.items() if k != "test_correct"}  # per-image outcomes: in the metrics file

    run_stage(
        ctx,
        "classifier",
        run_name(run, seed),
        runner,
        ("data", "classifier", "glow_classifier"),
        {"classifier.epochs": epochs},
        {"run": run, "seed": seed},
        outputs=TRAIN_GLOW_CLASSIFIER.run_files(run, seed),
    )


@app.command()
def train_classifiers(ctx: typer.Context) -> None:
    """Train every classifier of Table 2, one per (entry of classifier.coeffs, entry of classifier.seeds), each as
    `train-classifier --coeff C --seed S` in a process of its own, side by side on the CPU (the DVC stage)."""
    from pipeline.models.specs import classifier_specs, run_name

    def runs(params: Params) -> list[tuple[str, list[str]]]:
        return [
            (run_name(spec.label, seed), ["train-classifier", "--coeff", spec.label, "--seed", str(seed)])
            for spec in classifier_specs(params.classifier)
            for seed in params.classifier.seeds
        ]

    run_each(ctx, "train_classifier", runs)


@app.command()
def train_glow_classifiers(ctx: typer.Context) -> None:
    """Train every classifier of Table 3, one per (entry of glow_classifier.runs, entry of glow_classifier.seeds),
    each as `train-glow-classifier --run R --seed S` in a process of its own, side by side on the CPU (the DVC
    stage)."""
    from pipeline.models.glow_specs import STAGE, run_name

    def runs(params: Params) -> list[tuple[str, list[str]]]:
        return [
            (run_name(label, seed), ["train-glow-classifier", "--run", label, "--seed", str(seed)])
            for label in params.glow_classifier.runs
            for seed in params.glow_classifier.seeds
        ]

    run_each(ctx, STAGE, runs)


@app.command()
def singular_values(ctx: typer.Context) -> None:
    """Exact/certified largest singular value of every conv of every classifier, certificates, Fig. 6."""
    from pipeline.stages import singular_values as stage

    run_stage(ctx, "analysis", "singular_values", stage.run, ("classifier", "singular_values"))


@app.command()
def reconstruction(ctx: typer.Context) -> None:
    """Invert every classifier's features back to its input: error vs fixed-point iterations, timing, Fig. 3/8."""
    from pipeline.stages import reconstruction as stage

    run_stage(ctx, "analysis", "reconstruction", stage.run, ("classifier", "reconstruction"))


@app.command()
def train_flow(
    ctx: typer.Context,
    epochs: Optional[int] = typer.Option(None, help="Override flow.epochs."),
    dry: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
) -> None:
    """Train the multiscale flow (Table 4) with validation bits/dim per epoch (test: evaluate-flow), samples grid
    (Fig. 5); resumes from its last epoch checkpoint."""
    from pipeline.stages import train_flow as stage

    def batch_key(params: Params) -> tuple[str, int]:
        return "flow.batch_size", params.flow.batch_size

    if dry:
        from pipeline.tools import dry_run as measure

        return dry_run(ctx, measure.flow, {"flow.epochs": epochs}, batch_key)

    run_stage(
        ctx,
        "flow",
        "train_flow",
        stage.run,
        ("seed", "flow"),
        {"flow.epochs": epochs},
        batch_key=batch_key,
    )


@app.command()
def evaluate_flow(ctx: typer.Context) -> None:
    """Test bits/dim by the App. C.3 protocol: series terms from the Theorem 3 bound, probes to a standard error."""
    from pipeline.stages import evaluate_flow as stage

    run_stage(ctx, "flow", "evaluate_flow", stage.run, ("seed", "evaluate_flow"))


@app.command()
def logdet_bias(ctx: typer.Context) -> None:
    """Bias and std of the truncated log-det estimator vs series terms, against exact per-block log-dets (Fig. 4)."""
    from pipeline.stages import logdet_bias as stage

    run_stage(ctx, "analysis", "logdet_bias", stage.run, ("seed", "logdet_bias"))


@app.command()
def toy_density(ctx: typer.Context, steps: Optional[int] = typer.Option(None, help="Override toy.steps.")) -> None:
    """Fit 2-D densities with an i-ResNet flow (exact log-det) and a Glow-style flow: Fig. 2, test NLL per dataset."""
    from pipeline.stages import toy_density as stage

    run_stage(ctx, "toy", "toy_density", stage.run, ("seed", "toy"), {"toy.steps": steps})


@app.command()
def report(ctx: typer.Context) -> None:
    """Write reports/tables/*, reports/metrics/summary.json and reports/README.md from every stage's metrics files."""
    from pipeline.stages import report as stage

    run_stage(ctx, "analysis", "report", stage.run, ("classifier", "glow_classifier"))


@app.command()
def bench(
    ctx: typer.Context,
    quick: bool = typer.Option(False, "--quick", help="Tiny shapes and repeats: a smoke test of a few seconds."),
    only: Optional[str] = typer.Option(
        None, help="Comma-separated families: CLF,DENS,TOY (the default) and PAPER (the paper's runtime claims)."
    ),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this file."),
) -> None:
    """Speed and memory of the library at fixed configurations (train step, inverse, peak memory, ratios)."""
    import json

    import torch

    from pipeline.env import DeviceError, parse_device
    from pipeline.tools import bench as stage

    if ctx.obj.threads is not None:
        torch.set_num_threads(ctx.obj.threads)  # each case's subprocess uses the same count (default: torch's)
    try:
        device = str(parse_device(ctx.obj.device))  # --device auto: CUDA when present
    except DeviceError as err:
        fail(err)
    families = [f.strip() for f in only.split(",") if f.strip()] if only else None
    try:
        results = stage.run_benchmarks(quick=quick, only=families, progress=True, device=device)
    except ValueError as err:
        fail(err)
    for table in stage.render(results):
        console.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=1) + "\n")
        console.print(f"wrote {json_path}")


@app.command("check-repro")
def check_repro(
    ctx: typer.Context,
    against: str = typer.Option("HEAD", "--against", help="The git revision holding the results to compare with."),
) -> None:
    """Compare the workspace's headline metrics with those committed at REV: same bytes, consistent within the seed
    spread or standard errors, or inconsistent (exit 1)."""
    from pipeline import check_repro as check

    try:
        rows = check.compare(Paths.at(ctx.obj.root).root, against)
    except UserError as err:
        fail(err)
    console.print(check.render(rows, against))
    for line in check.verdict_lines(rows):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(0 if rows and all(row.agrees for row in rows) else 1)


def ui_command(uri: str, port: int) -> list[str]:
    """The ``mlflow server`` command line for the project's store, bound to 127.0.0.1 with one worker."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


@app.command()
def ui(ctx: typer.Context, port: int = typer.Option(5000, help="Port on 127.0.0.1.")) -> None:
    """Start the MLflow UI on http://127.0.0.1:PORT against this project's tracking store (Ctrl-C stops it)."""
    from pipeline.tracking import FAMILIES, init_store, tracking_uri

    paths = Paths.at(ctx.obj.root)
    uri = tracking_uri(paths)
    try:
        ids = init_store(paths, uri)
    except Exception as err:  # e.g. a locked or unreadable database
        fail(
            TrackingError(
                f"cannot open the MLflow store {uri}: {err}. If another process holds the database (a stage still "
                "running), wait for it or stop it; otherwise move the damaged file away or point MLFLOW_TRACKING_URI "
                "at another store."
            )
        )
    console.print(f"MLflow UI for {uri}; runs tables:")
    for family in FAMILIES:
        console.print(f"  {family:<10} http://127.0.0.1:{port}/#/experiments/{ids[family]}/runs", highlight=False)
    # Job execution would start extra worker processes the UI does not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(ui_command(uri, port), env=env, start_new_session=True)  # own process group
    try:
        with on_signals(signal.SIGTERM):  # `kill` of this command also stops the server
            code = proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's workers are in the same group
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    raise typer.Exit(code if code and code > 0 else 0)


if __name__ == "__main__":
    app()
