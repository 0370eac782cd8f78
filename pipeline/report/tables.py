"""The paper-style tables of the report, as pandas frames built only from the stages' metrics files.

Each builder returns a :class:`ReportTable`: ``data`` (raw numbers, written as CSV for machines) and ``shown``
(formatted text, written as Markdown for the report page and as LaTeX for a paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.files import finite_or_none, write_bytes_atomic
from pipeline.models.glow_specs import run_name as glow_run_name
from pipeline.models.specs import run_name
from pipeline.outputs import ZCA_MARK
from pipeline.paths import Paths
from pipeline.report.classifiers import compare_with_vanilla, seed_summaries
from pipeline.report.inputs import ReportInputs

# Table 4's published bits/dim on the test sets (Behrmann et al. 2019, Table 4): (method, source, MNIST, CIFAR10).
PUBLISHED_BPD = (
    ("i-ResNet", "published: Behrmann et al. 2019, Table 4", 1.06, 3.45),
    ("Glow", "published: as cited in Behrmann et al. 2019, Table 4", 1.05, 3.35),
    ("FFJORD", "published: as cited in Behrmann et al. 2019, Table 4", 0.99, 3.40),
    ("Real NVP", "published: as cited in Behrmann et al. 2019, Table 4", 1.06, 3.49),
    ("Residual Flows", "published: Chen et al. 2019", 0.97, 3.28),
)
MNIST_PIXELS = 784  # 1x28x28: what a bits/dim on MNIST means when nothing was added to the images
CIFAR10_DIMS = 3072  # 3x32x32
_FFJORD_MNIST = "1x28x28 images, as tabulated in Grathwohl et al. 2019 (FFJORD), Table 2"
# The dimension count each published MNIST value divides by, and where that count comes from. Only values over the
# same count as ours are comparable: the i-ResNet's code pads MNIST to 32x32 and repeats it to 3 channels.
PUBLISHED_MNIST_DIMS = {
    "i-ResNet": (3072, "authors' code, github.com/jhjacobsen/invertible-resnet: MNIST padded to 32x32, 3 channels"),
    "Glow": (MNIST_PIXELS, _FFJORD_MNIST),
    "FFJORD": (MNIST_PIXELS, _FFJORD_MNIST),
    "Real NVP": (MNIST_PIXELS, _FFJORD_MNIST),
    "Residual Flows": (MNIST_PIXELS, "authors' code, github.com/rtqichen/residual-flows: MNIST at --imagesize 28"),
}
CIFAR10_DIMS_SOURCE = "CIFAR10 images: 3x32x32"
PUBLISHED_DATASETS = {"mnist": "MNIST", "cifar10": "CIFAR10"}  # our dataset name -> the paper's column
# Our dataset name -> the published column it can be compared with. mnist-5k holds real MNIST digits (from MNIST's
# training split); fashion-mnist and idx: folders are other data, whatever their shape.
PAPER_DATASET = {"mnist": "MNIST", "mnist-5k": "MNIST", "cifar10": "CIFAR10"}
COMPARABLE_784 = "bits/dim, MNIST over 784 dims"
BASELINE_NAMES = {"gaussian_logit": "Gaussian on logit pixels", "histogram": "per-pixel histogram"}
MISSING = "–"


@dataclass(frozen=True)
class ReportTable:
    """One table: ``data`` for the CSV, ``shown`` for Markdown/LaTeX, ``index`` whether the row labels are shown."""

    name: str
    data: pd.DataFrame
    shown: pd.DataFrame
    index: bool = True

    def markdown(self) -> str:
        # Cells are already formatted text: tabulate must not re-parse "1.200" into 1.2.
        return self.shown.to_markdown(index=self.index, disable_numparse=True) + "\n"

    def latex(self) -> str:
        styler = self.shown.style.format(escape="latex").format_index(escape="latex", axis=1)
        if self.index:
            styler = styler.format_index(escape="latex", axis=0)
        else:
            styler = styler.hide(axis="index")
        latex = styler.to_latex(hrules=True).replace("±", r"$\pm$").replace(ZCA_MARK, r"$^\dagger$")
        return latex.replace("−", "$-$")  # the minus sign (U+2212) of the cells: pdflatex has no glyph for it

    def write(self, paths: Paths) -> list[str]:
        """``reports/tables/<name>.{md,tex,csv}``; returns the file paths written."""
        out = []
        for ext, text in (("md", self.markdown()), ("tex", self.latex()), ("csv", self.data.to_csv(index=self.index))):
            path = paths.tables / f"{self.name}.{ext}"
            write_bytes_atomic(path, text.encode())
            out.append(str(path))
        return out


def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals, a bool as Yes/No, None/NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def num(value: Any, spec: str, missing: str = "n/a") -> str:
    """``value`` formatted with ``spec``; ``missing`` for None/NaN (a stage's "no value"), ``inf`` stays ``inf``."""
    if value is None or math.isnan(float(value)):
        return missing
    return format(float(value), spec) if math.isfinite(float(value)) else str(float(value))


def percent(fraction: float) -> float:
    """A fraction as a percentage, rounded to 1e-6 points (drops float noise such as 1.8900000000000001)."""
    return round(100.0 * float(fraction), 6)


def column_name(label: str) -> str:
    """``vanilla`` / ``batchnorm`` stay, a coefficient ``0.9`` becomes ``c = 0.9``."""
    return label if label in ("vanilla", "batchnorm") else f"c = {label}"


def table2(inputs: ReportInputs) -> ReportTable:
    """Table 2: test error (%) per classifier over its training seeds, its paired difference to vanilla seed by seed,
    the verdict against vanilla, and whether its inverse is guaranteed by the certificate.

    Rows: the mean test error over seeds, its standard deviation over seeds (n − 1) and the number of seeds; per seed
    the paired difference to vanilla of the same seed on the same test images (points, with its 95% interval) and the
    mean of those differences; the verdict of :func:`pipeline.report.classifiers.compare_with_vanilla`;
    ``guaranteed inverse`` (``singular_values.json``, of the first seed's model, never assumed from the model kind) and
    the largest certified block Lipschitz bound behind it.
    """
    labels = list(inputs.classifiers)
    certs = inputs.singular_values["models"]
    summaries = seed_summaries(inputs.classifier_runs)
    seeds = list(next(iter(inputs.classifier_runs.values())))
    datasets = "/".join(dict.fromkeys(m["dataset"] for m in inputs.classifiers.values()))
    s = [summaries[label] for label in labels]

    def points(d: dict[str, float] | None, key: str) -> float | None:
        return None if d is None else 100.0 * d[key]

    rows: dict[str, list[Any]] = {
        f"test error (%), mean over seeds, {datasets}": [percent(x.mean) for x in s],
        "test error seed std (points)": [None if x.std is None else 100.0 * x.std for x in s],
        "seeds": [len(x.errors) for x in s],
    }
    shown_rows: dict[str, list[str]] = {
        f"test error (%) mean ± seed std (seeds), {datasets}": [
            f"{100 * x.mean:.2f} ± {num(None if x.std is None else 100 * x.std, '.2f')} ({len(x.errors)})" for x in s
        ]
    }
    for seed in seeds:
        diffs = [x.differences.get(seed) for x in s]
        for key in ("mean", "low", "high"):
            rows[f"seed {seed}: − vanilla, {key} (points)"] = [points(d, key) for d in diffs]
        shown_rows[f"seed {seed}: − vanilla, points (95% interval)"] = [
            difference_cell(None if d is None else in_points(d), ".2f") for d in diffs
        ]
    rows["mean − vanilla (points)"] = [None if x.mean_difference is None else 100 * x.mean_difference for x in s]
    shown_rows["mean − vanilla (points)"] = [num(v, "+.2f", MISSING) for v in rows["mean − vanilla (points)"]]
    vanilla = summaries.get("vanilla")
    verdicts = [compare_with_vanilla(x, vanilla) if vanilla and x.differences else None for x in s]
    rows["vs vanilla"] = verdicts
    shown_rows["vs vanilla"] = [v or MISSING for v in verdicts]
    rows["guaranteed inverse"] = [bool(certs[label]["guaranteed_inverse"]) for label in labels]
    rows["max block Lipschitz bound"] = [float(certs[label]["max_block_bound"]) for label in labels]
    data = pd.DataFrame.from_dict(rows, orient="index", columns=labels)
    for key in ("guaranteed inverse", "max block Lipschitz bound"):
        shown_rows[key] = [fmt(v, 2) for v in data.loc[key]]
    shown = pd.DataFrame.from_dict(shown_rows, orient="index", columns=[column_name(label) for label in labels])
    return ReportTable("table2", data, shown)


def comparable_784(r: dict[str, Any]) -> float | None:
    """A row's bits/dim where it is comparable with the published MNIST flows: MNIST digits over exactly their 784
    pixels, not ZCA-whitened; None otherwise."""
    mnist = r["dataset"] in ("MNIST", "mnist-5k")
    return r["bpd"] if mnist and r["n_dims"] == MNIST_PIXELS and not r.get("zca") else None


def comparable_cell(r: dict[str, Any], digits: str) -> str:
    """The ``COMPARABLE_784`` cell: the value, or why an MNIST row has none (another dimension count, ZCA), or a dash
    for other data."""
    if r["bpd_mnist_784"] is not None:
        return format(r["bpd_mnist_784"], digits)
    if r["dataset"] not in ("MNIST", "mnist-5k"):
        return MISSING
    if r.get("zca"):
        return f"not comparable (ZCA {ZCA_MARK})"
    return f"not comparable ({fmt(r['n_dims'])} dims)" if r["n_dims"] else "not comparable (dims unknown)"


def table4(inputs: ReportInputs) -> ReportTable:
    """Table 4: bits/dim of our flow and of the closed-form baselines (same test examples and dequantisation), next
    to the published values, one row per method and dataset, each with its source, dimension count and where that
    count comes from (``dims_source`` in the CSV).

    Bits/dim divide by a dimension count, so two of them are comparable only over the same count: the column
    ``COMPARABLE_784`` holds only bits/dim over MNIST's 784 pixels (ours on MNIST digits, and the published Real NVP,
    Glow, FFJORD and Residual Flows), so a reader can rank the numbers in it. The published i-ResNet MNIST value
    counts 3,072 dims (MNIST padded and repeated) and reads "not comparable (3,072 dims)" there: a bound converted from
    it (1.06 x 3072 / 784 ≤ 4.15) is looser than a per-pixel histogram and ranks nothing. Bits per image (bits/dim x
    dims) are shown for every row whose dims are known. Our flow's value carries two standard errors: ``±`` in its
    cell is the Hutchinson probes' (the examples fixed, what the protocol drives below ``max_stderr_bits``), ``± test
    examples`` the sampling error of the mean over the test examples, which no number of probes reduces and which
    decides a comparison. A ZCA-whitened result is marked with a dagger and is not comparable.
    """
    ev = inputs.evaluate_flow
    dataset, n_dims = PUBLISHED_DATASETS.get(ev["dataset"], ev["dataset"]), int(ev["n_dims"])
    ours_dims = f"this run ({ev.get('dims', f'{n_dims} dims')})"
    records: list[dict[str, Any]] = [
        {
            "method": "i-ResNet (this run)",
            "source": "this run (evaluate_flow)",
            "dataset": dataset,
            "n_dims": n_dims,
            "dims_source": ours_dims,
            "bpd": ev["bpd"],
            "stderr": ev["stderr"],
            "stderr_examples": ev["stderr_examples"],
            "n_terms": ev["n_terms"],
            "n_samples": ev["n_samples"],
            "bias_bound_bits": ev["bias_bound_bits"],
            "zca": bool(ev["zca"]),
        }
    ]
    for key, name in BASELINE_NAMES.items():
        baseline = ev["baselines"].get(key)
        if baseline is not None:
            records.append(
                {
                    "method": f"{name} (this run)",
                    "source": "this run (evaluate_flow, closed form)",
                    "dataset": dataset,
                    "n_dims": n_dims,
                    "dims_source": ours_dims,
                    "bpd": baseline["bpd"],
                    "stderr_examples": baseline["stderr_examples"],
                    "zca": False,
                }
            )
    for method, source, mnist, cifar in PUBLISHED_BPD:
        mnist_dims, mnist_how = PUBLISHED_MNIST_DIMS.get(method, (None, None))
        records.append(
            {
                "method": method,
                "source": source,
                "dataset": "MNIST",
                "n_dims": mnist_dims,
                "dims_source": mnist_how,
                "bpd": mnist,
            }
        )
        records.append(
            {
                "method": method,
                "source": source,
                "dataset": "CIFAR10",
                "n_dims": CIFAR10_DIMS,
                "dims_source": CIFAR10_DIMS_SOURCE,
                "bpd": cifar,
            }
        )
    for r in records:
        r["bits_per_image"] = r["bpd"] * r["n_dims"] if r["n_dims"] else None
        r["bpd_mnist_784"] = comparable_784(r)
    data = pd.DataFrame.from_records(records)

    def shown(r: dict[str, Any]) -> dict[str, str]:
        digits = ".4f" if r["method"].endswith("(this run)") else ".2f"
        value = format(r["bpd"], digits) + (f" ± {r['stderr']:.4f}" if r.get("stderr") is not None else "")
        return {
            "method": r["method"],
            "source": r["source"],
            "data": r["dataset"],
            "dims": fmt(r["n_dims"]),
            "bits/dim": value + (ZCA_MARK if r.get("zca") else ""),
            "± test examples": num(r.get("stderr_examples"), ".4f", MISSING),
            "bits/image": num(r["bits_per_image"], ".0f", MISSING)
            + (f" ± {r['stderr_examples'] * r['n_dims']:.0f}" if r.get("stderr_examples") is not None else ""),
            COMPARABLE_784: comparable_cell(r, digits),
            "series terms": fmt(r.get("n_terms")),
            "bias bound (bits/dim)": num(r.get("bias_bound_bits"), ".1e", "n/a" if "n_terms" in r else MISSING),
        }

    return ReportTable("table4", data, pd.DataFrame([shown(r) for r in records]), index=False)


def signed(x: float, spec: str = ".2f") -> str:
    """``x`` with its sign, a minus sign (−) for negatives: ``+0.40``, ``−2.20``, ``−3.1e-06``."""
    text = format(x, "+" + spec)
    return "−" + text[1:] if text.startswith("-") else text


TOY_VERDICTS = {"iresnet": "i-ResNet", "glow": "Glow", "neither": "neither"}


def lower_nll(entry: dict[str, Any]) -> str:
    """Which flow has the lower test NLL on one toy dataset: "i-ResNet", "Glow", or "neither". The stage's verdict
    where it wrote one (``lower_nll``: every seed's paired 95% interval on the same side of 0); else "neither" when
    the paired interval of the difference (``iresnet_minus_glow``) includes 0. Without a paired difference (a missing
    NLL, or a metrics file from before the stage wrote one) the point values decide, and a missing NLL loses."""
    if entry.get("lower_nll") in TOY_VERDICTS:
        return TOY_VERDICTS[entry["lower_nll"]]
    d = entry.get("iresnet_minus_glow")
    if d is not None and finite_or_none(d.get("high")) is not None and finite_or_none(d.get("low")) is not None:
        return "i-ResNet" if d["high"] < 0 else "Glow" if d["low"] > 0 else "neither"
    a, b = finite_or_none(entry["iresnet_nll"]), finite_or_none(entry["glow_nll"])
    return "i-ResNet" if a is not None and (b is None or a < b) else "Glow"


def with_stderr(value: Any, stderr: Any, spec: str = ".3f") -> str:
    """``value ± stderr`` (the ± left out where the standard error is unknown); n/a for a missing value."""
    if finite_or_none(value) is None:
        return num(value, spec)
    return num(value, spec) + (f" ± {stderr:{spec}}" if finite_or_none(stderr) is not None else "")


def in_points(d: dict[str, float]) -> dict[str, float]:
    """A paired difference of error fractions ``{"mean", "low", "high"}`` in percentage points."""
    return {k: 100 * d[k] for k in ("mean", "low", "high")}


def difference_cell(d: dict[str, float] | None, spec: str = ".3f") -> str:
    """A paired difference ``{"mean", "low", "high"}`` as ``+0.012 (−0.004, +0.028)``; n/a when absent."""
    if d is None or finite_or_none(d.get("mean")) is None:
        return "n/a"
    mean, low, high = (signed(d[k], spec) for k in ("mean", "low", "high"))
    return f"{mean} ({low}, {high})"


def toy_table(inputs: ReportInputs) -> ReportTable:
    """Fig. 2's numbers: test NLL (nats per point, mean over seeds ± its standard error over the test points) of the
    i-ResNet flow and the Glow-style flow per 2-D dataset, the paired difference with its 95% interval and its spread
    over seeds, and the distance of the i-ResNet from the true density where that is closed-form; "lower NLL" is
    decided on every seed's interval (:func:`lower_nll`)."""
    sets = inputs.toy["datasets"]

    def row(e: dict[str, Any]) -> dict[str, Any]:
        difference = e.get("iresnet_minus_glow") or {}
        return {
            "iresnet_nll": e["iresnet_nll"],
            "iresnet_nll_stderr": e.get("iresnet_nll_stderr"),
            "glow_nll": e["glow_nll"],
            "glow_nll_stderr": e.get("glow_nll_stderr"),
            "iresnet_minus_glow": difference.get("mean"),
            "iresnet_minus_glow_low": difference.get("low"),
            "iresnet_minus_glow_high": difference.get("high"),
            "iresnet_minus_glow_seed_std": e.get("iresnet_minus_glow_seed_std"),
            "iresnet_params": e["iresnet_params"],
            "glow_params": e["glow_params"],
        }

    data = pd.DataFrame.from_dict({name: row(e) for name, e in sets.items()}, orient="index")
    data.index.name = "dataset"
    data["lower_nll"] = [lower_nll(e) for e in sets.values()]
    references = [finite_or_none(e.get("reference_nll")) for e in sets.values()]
    columns = {
        "i-ResNet NLL": [with_stderr(e["iresnet_nll"], e.get("iresnet_nll_stderr")) for e in sets.values()],
        "Glow NLL": [with_stderr(e["glow_nll"], e.get("glow_nll_stderr")) for e in sets.values()],
        "i-ResNet − Glow (95% interval)": [difference_cell(e.get("iresnet_minus_glow")) for e in sets.values()],
    }
    if any(e.get("iresnet_minus_glow_seed_std") is not None for e in sets.values()):  # files with several seeds
        columns["seed std of i-ResNet − Glow"] = [
            num(e.get("iresnet_minus_glow_seed_std"), ".3f") for e in sets.values()
        ]
    if any(r is not None for r in references):  # the true density's NLL, where it is closed-form
        data["reference_nll"] = references
        columns["true density NLL"] = [num(r, ".3f") for r in references]
        columns["i-ResNet − true (95% interval)"] = [
            difference_cell(e.get("iresnet_minus_reference")) for e in sets.values()
        ]
    columns.update(
        {
            "i-ResNet params": [fmt(int(v)) for v in data["iresnet_params"]],
            "Glow params": [fmt(int(v)) for v in data["glow_params"]],
            "lower NLL": list(data["lower_nll"]),
        }
    )
    shown = pd.DataFrame(columns, index=data.index)
    return ReportTable("toy", data, shown)


def stage_costs(inputs: ReportInputs) -> list[tuple[str, dict[str, Any]]]:
    """(stage, metrics) for every stage whose metrics file the report read, in pipeline order."""
    out = [("prepare", inputs.prepare)]
    out += [
        (run_name(label, seed), m) for label, by_seed in inputs.classifier_runs.items() for seed, m in by_seed.items()
    ]
    out += [(glow_run_name(run, seed), m) for run, by_seed in inputs.glow_runs.items() for seed, m in by_seed.items()]
    out += [
        ("singular_values", inputs.singular_values),
        ("reconstruction", inputs.reconstruction),
        ("train_flow", inputs.flow),
        ("evaluate_flow", inputs.evaluate_flow),
        ("logdet_bias", inputs.logdet_bias),
        ("toy_density", inputs.toy),
    ]
    return out


def made_with_all(inputs: ReportInputs) -> list[dict[str, Any]]:
    """The distinct environments (CPU, torch build, threads, device) that made the stages' metrics files, in
    pipeline order; files older than the ``made_with`` record are left out."""
    found: list[dict[str, Any]] = []
    for _, metrics in stage_costs(inputs):
        env = metrics.get("made_with")
        if env is not None and env not in found:
            found.append(env)
    return found


def _params_text(n_params: Any) -> str:
    """A parameter count; a stage with several kinds of model (toy: ``{"iresnet": n, "glow": m}``) lists each."""
    if isinstance(n_params, dict):
        return " / ".join(f"{kind} {fmt(int(n))}" for kind, n in n_params.items())
    return fmt(None if n_params is None else int(n_params))


def runcost_table(inputs: ReportInputs) -> ReportTable:
    """Wall time, throughput and parameter count per stage, and per run of the classifier stages (from each metrics
    file), with the sum of the times (more than the wall time of the whole: a classifier stage's runs overlap).

    The CSV keeps numbers only: a per-kind parameter count (the toy stage) is in the Markdown/LaTeX and toy tables.
    """
    costs = stage_costs(inputs)
    records = [
        {
            "stage": stage,
            "wall_time_s": finite_or_none(m.get("wall_time_s")),
            "throughput_img_s": finite_or_none(m.get("throughput_img_s")),
            "n_params": None if isinstance(m.get("n_params"), dict) else m.get("n_params"),
        }
        for stage, m in costs
    ]
    data = pd.DataFrame.from_records(records).set_index("stage")
    data.loc["total"] = [data["wall_time_s"].sum(min_count=1), None, None]
    shown = pd.DataFrame(
        {
            "wall time (s)": [num(v, ".1f", MISSING) for v in data["wall_time_s"]],
            "throughput (img/s)": [num(v, ".1f", MISSING) for v in data["throughput_img_s"]],
            "parameters": [_params_text(m.get("n_params")) for _, m in costs] + [MISSING],
        },
        index=data.index,
    )
    return ReportTable("runcost", data, shown)


def build_tables(inputs: ReportInputs) -> list[ReportTable]:
    return [table2(inputs), table4(inputs), toy_table(inputs), runcost_table(inputs)]
