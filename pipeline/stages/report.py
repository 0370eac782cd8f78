"""Stage ``report``: the paper-style tables, one aggregate summary and the results page, from the metrics files.

Reads (never MLflow) the metrics files, curves and figures of every other stage (:mod:`pipeline.report.inputs`).
Writes:

- ``reports/tables/{table2,table3,table4,toy,runcost}.{md,tex,csv}`` (:mod:`pipeline.report.tables`, Table 3 in
  :mod:`pipeline.report.glow`) and ``reports/tables/verdicts.{md,tex,csv}``: one row per claim of the paper with its
  verdict (:mod:`pipeline.report.verdicts`);
- ``reports/metrics/summary.json``: the few headline numbers ``dvc exp show`` / ``dvc metrics diff`` compare;
- ``reports/README.md``: the verdict table, then every table and figure with what the paper and this run found
  (:mod:`pipeline.report.page`).
"""

from __future__ import annotations

import statistics
from typing import Any

from pipeline.files import finite_or_none, write_bytes_atomic, write_json
from pipeline.outputs import PAGE, REPORT, SUMMARY, StageRun
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.report.classifiers import seed_summaries
from pipeline.report.glow import table3
from pipeline.report.gpu import gpu_section
from pipeline.report.inputs import ReportInputs, load_inputs
from pipeline.report.page import all_certified, render_page
from pipeline.report.tables import build_tables, made_with_all, percent
from pipeline.report.verdicts import verdict_table
from pipeline.tracking import Tracker


def summary(inputs: ReportInputs, total_wall_time_s: float) -> dict[str, Any]:
    """Headline numbers: per classifier the test error (%, mean over seeds) with its spread over seeds (std, n − 1;
    null for one seed), its binomial standard error (the runs', averaged) and the certificate; bits/dim, toy NLLs,
    total compute time. ``iresnet check-repro`` judges each mean by the seed spread (by the standard error when there
    is one seed).

    Kept small and nested (``dvc exp show`` flattens it into columns such as ``classifier.0.9.test_error_pct``).
    """
    certs = inputs.singular_values["models"]
    ev = inputs.evaluate_flow
    seeds = seed_summaries(inputs.classifier_runs)
    out: dict[str, Any] = {
        "classifier": {
            label: {
                "test_error_pct": percent(s.mean),
                "test_error_seed_std_pct": None if s.std is None else percent(s.std),
                "test_error_stderr_pct": percent(
                    statistics.fmean(float(m["test_error_stderr"]) for m in inputs.classifier_runs[label].values())
                ),
                "n_seeds": len(s.errors),
                "guaranteed_inverse": bool(certs[label]["guaranteed_inverse"]),
            }
            for label, s in seeds.items()
        },
        "flow": {
            "bpd": float(ev["bpd"]),
            "stderr": float(ev["stderr"]),
            "bias_bound_bits": finite_or_none(ev["bias_bound_bits"]),
        },
        "toy": {
            name: {"iresnet_nll": finite_or_none(e["iresnet_nll"]), "glow_nll": finite_or_none(e["glow_nll"])}
            for name, e in inputs.toy["datasets"].items()
        },
        "glow_classifier": {  # Table 3: each run's test error over its seeds, and on how many seeds it diverged
            run: {
                "test_error_pct": percent(s.mean),
                "test_error_seed_std_pct": None if s.std is None else percent(s.std),
                "n_seeds": len(s.errors),
                "diverged_seeds": sum(bool(m["diverged"]) for m in inputs.glow_runs[run].values()),
            }
            for run, s in seed_summaries(inputs.glow_runs).items()
        },
        "total_wall_time_s": total_wall_time_s,
    }
    out["made_with"] = made_with_all(inputs)
    certified = all_certified(inputs)
    if certified is not None:
        out["all_iresnets_certified"] = certified
    return out


def run(params: Params, paths: Paths, tracker: Tracker | None = None) -> dict[str, Any]:
    """Build every table, the summary and the page; returns headline metrics (flat) for the CLI and MLflow."""
    out = StageRun(REPORT, paths, tracker)
    g = params.glow_classifier
    inputs = load_inputs(paths, params.classifier.coeffs, params.classifier.seeds, g.runs, g.seeds)
    tables = {t.name: t for t in [*build_tables(inputs), table3(inputs), verdict_table(inputs)]}
    for table in tables.values():
        table.write(paths)
    total = float(tables["runcost"].data.loc["total", "wall_time_s"])
    head = summary(inputs, total)
    write_json(paths.metrics / SUMMARY, head)
    page = render_page(inputs, tables, gpu=gpu_section(paths.reports / "gpu"))  # reports/gpu/: scripts/gpu_run.sh
    write_bytes_atomic(paths.reports / PAGE, page.encode())
    for path in (paths.tables, paths.metrics / SUMMARY, paths.reports / PAGE):
        out.artifact(path, "report")

    metrics: dict[str, Any] = {
        f"test_error_pct.{label}": v["test_error_pct"] for label, v in head["classifier"].items()
    }
    if "all_iresnets_certified" in head:
        metrics["all_iresnets_certified"] = head["all_iresnets_certified"]
    metrics.update({"bpd": head["flow"]["bpd"], "bpd_stderr": head["flow"]["stderr"]})
    metrics["pipeline_wall_time_s"] = total
    return out.finish(metrics)
