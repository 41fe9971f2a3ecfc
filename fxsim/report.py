"""Tables and plots. matplotlib is imported only when a plot is asked for."""

from __future__ import annotations

import json

from fxsim.errors import FxsimError
from fxsim.store import atomic_path

KERNEL_STYLE = {
    "dense_int": ("dense int", "tab:blue", "o"),
    "sparse_int": ("sparse int (zero-skipping)", "tab:orange", "s"),
    "f32_blas": ("float32 BLAS", "tab:gray", "^"),
}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise FxsimError("plots need matplotlib: pip install matplotlib") from exc
    return plt


def _save(plt, fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_sparse_benchmark(rows: list[dict], path) -> None:
    """Time vs weight density (log-log), one panel per layer, a line per kernel; PNG."""
    plt = _pyplot()
    from matplotlib import ticker

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cols = min(4, len(layers))
    n_rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.6 * cols, 3.0 * n_rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        mine = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["density"])
        density = [r["density"] for r in mine]
        for key, (label, color, marker) in KERNEL_STYLE.items():
            ax.plot(density, [r["seconds"][key] * 1e3 for r in mine], marker=marker,
                    color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(layer, fontsize=10)
        ax.set_xlabel("weight density")
        ax.set_ylabel("time per batch (ms)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Zero-skipping sparse kernel vs dense (bit-identical results)", fontsize=11)
    _save(plt, fig, path)


def plot_adversarial_grid(original, adversarial, labels, before, after, path, count=8,
                          class_names=None) -> None:
    """Originals, adversarial images and their perturbations (amplified to the full grey range)
    for the first ``count`` images, with true / predicted classes; PNG."""
    import numpy as np

    plt = _pyplot()
    count = min(count, len(original))
    fig, axes = plt.subplots(3, count, figsize=(1.5 * count, 4.8), squeeze=False)
    name = (lambda c: class_names[c]) if class_names else str
    for i in range(count):
        delta = adversarial[i] - original[i]
        scale = np.abs(delta).max() or 1.0
        for row, (image, title) in enumerate((
            (original[i], f"{name(labels[i])}\n-> {name(before[i])}"),
            (adversarial[i], f"-> {name(after[i])}"),
            (0.5 + 0.5 * delta / scale, f"|d|max {scale:.3f}"),
        )):
            ax = axes[row, i]
            picture = image.transpose(1, 2, 0)
            ax.imshow(picture[..., 0] if picture.shape[2] == 1 else np.clip(picture, 0, 1),
                      cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    for row, label in enumerate(("original", "adversarial", "perturbation")):
        axes[row, 0].text(-0.3, 0.5, label, transform=axes[row, 0].transAxes, rotation=90,
                          va="center", ha="right", fontsize=8)
    _save(plt, fig, path)


# ------------------------------------------------------------------------------ scenario results

# The paper's colours: BASE ACC blue, scenario 1 green, 2 red, 3 cyan.
SCENARIO_STYLE = {
    "BASE ACC": ("clean accuracy (BASE ACC)", "tab:blue", "o"),
    "COMP->COMP": ("S1 COMP->COMP", "tab:green", "s"),
    "FULL->COMP": ("S2 FULL->COMP", "tab:red", "^"),
    "COMP->FULL": ("S3 COMP->FULL", "tab:cyan", "v"),
}


def _fmt(value, digits=4) -> str:
    return "" if value is None or value != value else f"{value:.{digits}f}"


def scenario_table(rows: list[dict], models: list[dict]) -> list[dict]:
    """One line per (attack, model): the model's kind, density, bits, clean accuracy and its
    accuracy under COMP->COMP, FULL->COMP and COMP->FULL (FULL->FULL for the baseline), with
    the mean perturbation per pixel of the examples made on it."""
    lines = []
    for attack in dict.fromkeys(r["attack"] for r in rows):
        scores, made = {}, {}  # model -> {scenario: accuracy}; source -> its row
        for r in (r for r in rows if r["attack"] == attack):
            made[r["source"]] = r
            if r["scenario"] != "CROSS":
                owner = r["target"] if r["scenario"] == "FULL->COMP" else r["source"]
                scores.setdefault(owner, {})[r["scenario"]] = r["accuracy"]
        for model in models:
            name = model["name"]
            line = {"attack": attack, "model": name, "kind": model["kind"],
                    "density": model["density"], "bits": model["bits"],
                    "clean_accuracy": model["clean_accuracy"], **scores.get(name, {})}
            if "FULL->FULL" in line:  # the baseline: its one number in every column
                line.update(dict.fromkeys(("COMP->COMP", "FULL->COMP", "COMP->FULL"),
                                          line.pop("FULL->FULL")))
            if name in made:
                line["mean_abs"] = made[name]["mean_abs"]
                line["gradient_masked"] = made[name]["gradient_masked"]
            lines.append(line)
    return lines


TABLE_COLUMNS = ("attack", "model", "kind", "density", "bits", "clean_accuracy", "COMP->COMP",
                 "FULL->COMP", "COMP->FULL", "mean_abs", "gradient_masked")


def markdown_scenarios(lines: list[dict]) -> str:
    """The scenario table as Markdown, one block per attack."""
    out = []
    for attack in dict.fromkeys(line["attack"] for line in lines):
        out += [f"### {attack}", "",
                "| model | kind | density | bits | clean acc | S1 COMP->COMP | S2 FULL->COMP | "
                "S3 COMP->FULL | mean abs perturbation / pixel | gradient masked |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for line in (x for x in lines if x["attack"] == attack):
            out.append(
                f"| {line['model']} | {line['kind']} | {line['density']:.3f} | "
                f"{int(line['bits']) or 'float32'} | {_fmt(line['clean_accuracy'])} | "
                f"{_fmt(line.get('COMP->COMP'))} | {_fmt(line.get('FULL->COMP'))} | "
                f"{_fmt(line.get('COMP->FULL'))} | {_fmt(line.get('mean_abs'), 5)} | "
                f"{int(line.get('gradient_masked', 0))} |")
        out.append("")
    return "\n".join(out)


def write_csv(path, rows: list[dict], columns) -> None:
    """Rows as CSV (atomic)."""
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})


def _scenario_lines(lines, attack, kind, x_key):
    """x values and each scenario's accuracies for the models of one kind, sorted by x."""
    mine = sorted((x for x in lines if x["attack"] == attack and x["kind"] == kind),
                  key=lambda x: x[x_key])
    xs = [x[x_key] for x in mine]
    ys = {"BASE ACC": [x["clean_accuracy"] for x in mine]}
    for scenario in ("COMP->COMP", "FULL->COMP", "COMP->FULL"):
        ys[scenario] = [x.get(scenario, float("nan")) for x in mine]
    return xs, ys


def plot_scenarios(lines: list[dict], kind: str, path) -> bool:
    """Accuracy vs density (kind "pruned") or vs bitwidth ("quantized"), one panel per
    attack, a line per scenario and the clean accuracy, the baseline as dashed lines (the
    paper's Figures 2 and 4). False when there is nothing of that kind to plot."""
    x_key = "density" if kind == "pruned" else "bits"
    attacks = list(dict.fromkeys(x["attack"] for x in lines))
    if not any(x["kind"] == kind for x in lines):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.6), squeeze=False)
    for ax, attack in zip(axes.flat, attacks, strict=True):
        xs, ys = _scenario_lines(lines, attack, kind, x_key)
        base = next(x for x in lines if x["attack"] == attack and x["model"] == "baseline")
        for scenario, values in ys.items():
            label, color, marker = SCENARIO_STYLE[scenario]
            ax.plot(xs, values, marker=marker, color=color, label=label)
        ax.axhline(base["clean_accuracy"], color="tab:blue", ls="--", lw=0.8,
                   label="baseline clean")
        ax.axhline(base.get("COMP->COMP", float("nan")), color="gray", ls=":", lw=0.8,
                   label="baseline FULL->FULL")
        if kind == "pruned":
            ax.set_xscale("log")
            ax.set_xlabel("weight density")
        else:
            ax.set_xlabel("bitwidth (weights and activations)")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=8)
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(attack)
        ax.grid(True, alpha=0.3)
    axes.flat[0].set_ylabel("test accuracy")
    what = "pruning" if kind == "pruned" else "fixed-point quantisation"
    fig.suptitle(f"Transferability under {what}", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=6,
               fontsize=8, frameon=False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def plot_perturbation(lines: list[dict], path) -> bool:
    """Mean |perturbation| per pixel of the examples each quantised model makes, vs bitwidth,
    a line per attack, the baseline's dashed (the paper's Figure 6)."""
    if not any(x["kind"] == "quantized" for x in lines):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for i, attack in enumerate(dict.fromkeys(x["attack"] for x in lines)):
        mine = sorted((x for x in lines if x["attack"] == attack and x["kind"] == "quantized"),
                      key=lambda x: x["bits"])
        color = f"C{i}"
        ax.plot([x["bits"] for x in mine], [x.get("mean_abs", float("nan")) for x in mine],
                marker="o", color=color, label=attack)
        base = next(x for x in lines if x["attack"] == attack and x["model"] == "baseline")
        ax.axhline(base.get("mean_abs", float("nan")), color=color, ls="--", lw=0.8)
    ax.set_xlabel("bitwidth (dashed: float32 baseline)")
    ax.set_ylabel("mean |perturbation| per pixel")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Perturbation of adversarial examples made on quantised models", fontsize=10)
    _save(plt, fig, path)
    return True


def markdown_distributions(summary: dict) -> str:
    """Two Markdown tables (weights, activations), a row per model, from the summary the
    ``distributions`` command builds (label -> {"weights": stats, "activations": stats}, stats
    from :func:`fxsim.distributions.summarize`)."""
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    out = []
    for which in ("weights", "activations"):
        out += [f"### {which}", "",
                "| model | values | zero | at a format limit | min | max | mean abs |",
                "|---|---|---|---|---|---|---|"]
        for label, entry in summary.items():
            s = entry[which]
            out.append(f"| {label} | {s['count']:,} | {number(s['zero'], '.4g')} | "
                       f"{number(s['at_limit'], '.4g')} | {number(s['min'], '.5g')} | "
                       f"{number(s['max'], '.5g')} | {number(s['mean_abs'], '.4g')} |")
        out.append("")
    return "\n".join(out).rstrip("\n")


def plot_value_cdfs(models: dict, path, images: int | None = None) -> None:
    """The empirical CDF of every model's weights and of its activations, one panel each, a
    line per model (the paper's Figure 5). ``models``: label -> (weights, activations), 1-D
    arrays (:mod:`fxsim.distributions`); ``images``: how many the activations come from, for
    the title. Each panel spans the central 99.8 % of every model's values (float outliers
    would otherwise squeeze the quantised models' steps into a corner)."""
    import numpy as np

    from fxsim.distributions import ecdf

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for ax, which, title in ((axes[0], 0, "weights"), (axes[1], 1, "activations")):
        arrays = [values[which] for values in models.values() if len(values[which])]
        if not arrays:
            continue
        lo = min(float(np.quantile(a, 0.001)) for a in arrays)
        hi = max(float(np.quantile(a, 0.999)) for a in arrays)
        pad = 0.05 * (hi - lo) or 1.0
        grid = np.union1d(np.linspace(lo - pad, hi + pad, 2001), [0.0])
        for i, (label, values) in enumerate(models.items()):
            if len(values[which]):
                ax.plot(grid, ecdf(values[which], grid), drawstyle="steps-post",
                        color=f"C{i % 10}", label=label, lw=1.2)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("value")
        ax.set_title(title if which == 0 or images is None
                     else f"{title} (conv/linear outputs, {images} images)", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("cumulative fraction")
    fig.suptitle("Value distributions (CDF)", fontsize=11)
    rows = -(-len(models) // 4)
    fig.tight_layout(rect=(0, 0.05 + 0.05 * rows, 1, 1))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(4, len(models)),
               fontsize=8, frameon=False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown_strength(curves: list, source: str = "source") -> str:
    """A Markdown table per attack and evaluated model: accuracy by step size (rows) and number
    of steps (columns), from :func:`fxsim.attacks.strength_curves` results."""
    out = []
    for c in curves:
        for name, acc in c.accuracy.items():
            label = f"{source} (white-box)" if name == "source" else f"{name} (transfer)"
            out += [f"### {c.method} on {label}", "",
                    "| eps | " + " | ".join(f"{k} steps" for k in range(c.steps + 1)) + " |",
                    "|---" * (c.steps + 2) + "|"]
            out += [f"| {eps:g} | " + " | ".join(f"{a:.3f}" for a in row) + " |"
                    for eps, row in zip(c.eps, acc, strict=True)]
            out.append("")
    return "\n".join(out).rstrip("\n")


def plot_strength_curves(curves: list, path, source: str = "source") -> None:
    """Accuracy vs number of steps, a line per step size, a panel per attack (rows) and
    evaluated model (columns): the paper's Figure 3."""
    plt = _pyplot()
    names = list(curves[0].accuracy) if curves else []
    fig, axes = plt.subplots(len(curves), len(names), figsize=(4.0 * len(names),
                             3.2 * len(curves)), squeeze=False)
    for row, c in enumerate(curves):
        for col, name in enumerate(names):
            ax = axes[row, col]
            for i, (eps, acc) in enumerate(zip(c.eps, c.accuracy[name], strict=True)):
                ax.plot(range(c.steps + 1), acc, marker="o", ms=3, color=f"C{i % 10}",
                        label=f"eps {eps:g}")
            what = "white-box" if name == "source" else f"on {name}"
            ax.set_title(f"{c.method}, {what}", fontsize=9)
            ax.set_xlabel("steps")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(True, alpha=0.3)
        axes[row, 0].set_ylabel("test accuracy")
    if curves:
        axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Attack strength: examples made on {source}", fontsize=10)
    _save(plt, fig, path)


def transfer_matrix(rows: list[dict], models: list[dict], attack: str):
    """(names, matrix) with matrix[i, j] the accuracy of model j on the examples made on
    model i; NaN where that pair was not evaluated."""
    import numpy as np

    names = [m["name"] for m in models]
    index = {n: i for i, n in enumerate(names)}
    matrix = np.full((len(names), len(names)), np.nan)
    for r in rows:
        if r["attack"] == attack:
            matrix[index[r["source"]], index[r["target"]]] = r["accuracy"]
    return names, matrix


def plot_transfer_matrix(rows: list[dict], models: list[dict], path) -> None:
    """Heatmaps of accuracy on target (columns) under examples made on source (rows), one
    panel per attack; cells not evaluated are blank (run the sweep with matrix = true)."""
    import numpy as np

    plt = _pyplot()
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    size = max(3.5, 0.42 * len(models) + 1.5)
    fig, axes = plt.subplots(1, len(attacks), figsize=(size * len(attacks), size),
                             squeeze=False)
    image = None
    for ax, attack in zip(axes.flat, attacks, strict=True):
        names, matrix = transfer_matrix(rows, models, attack)
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xlabel("evaluated on")
        ax.set_title(attack)
        if len(names) <= 12:
            for (i, j), value in np.ndenumerate(matrix):
                if value == value:
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if value < 0.5 else "black")
    axes.flat[0].set_ylabel("adversarial examples made on")
    fig.suptitle("Transfer matrix (accuracy of the target)", fontsize=11)
    fig.tight_layout()
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="accuracy")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], models: list[dict], config: dict, out_dir,
                 source: str = "", distributions: tuple | None = None) -> list:
    """Tables (Markdown, CSV) and plots of a results file into ``out_dir``; returns the
    files written. ``distributions``: (summary, values, note) of the models' weights and
    activations (:func:`fxsim.distributions.of_results`; the note says what is missing), for
    a section of its own with a CDF plot of the baseline and the quantised models (the
    paper's Figure 5; every model where none is quantised)."""
    from pathlib import Path

    from fxsim.scenarios import MODEL_COLUMNS, ROW_COLUMNS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = scenario_table(rows, models)
    written = []
    for name, data, columns in (("rows.csv", rows, ROW_COLUMNS),
                                ("models.csv", models, MODEL_COLUMNS),
                                ("scenarios.csv", lines, TABLE_COLUMNS)):
        write_csv(out / name, data, columns)
        written.append(out / name)
    plots = []
    for kind, name in (("pruned", "pruning.png"), ("quantized", "quantization.png")):
        if plot_scenarios(lines, kind, out / name):
            plots.append(name)
    if plot_perturbation(lines, out / "perturbation.png"):
        plots.append("perturbation.png")
    plot_transfer_matrix(rows, models, out / "transfer-matrix.png")
    plots.append("transfer-matrix.png")
    written += [out / p for p in plots]
    section = []
    if distributions is not None:
        summary, values, note = distributions
        quantised = [m["name"] for m in models if "quantized" in m["kind"]]
        shown = [m["name"] for m in models
                 if m["name"] in values and (not quantised or m["kind"] == "baseline"
                                             or m["name"] in quantised)]
        if shown:
            images = next(iter(summary.values()))["images"]
            plot_value_cdfs({name: values[name] for name in shown},
                            out / "value-distributions.png", images=images)
            written.append(out / "value-distributions.png")
            section = ["## Value distributions", "",
                       f"Weights as the datapath uses them; activations: every conv/linear "
                       f"layer's output on {images} test images, before the activation "
                       f"function (`fxsim distributions`).", "",
                       "![value-distributions.png](value-distributions.png)", "",
                       markdown_distributions(summary)]
        if note:
            section += ["", note]
    text = [f"# fxsim scenario report{f': {source}' if source else ''}", "",
            f"Data set {config.get('dataset', '?')}, architecture {config.get('arch', '?')}, "
            f"{int(rows[0]['images']) if rows else 0} test images, seed "
            f"{config.get('seed', '?')}. Accuracy is against the true labels; S1 COMP->COMP: "
            "examples made on the compressed model, evaluated on it; S2 FULL->COMP: made on "
            "the baseline, evaluated on the compressed model; S3 COMP->FULL: made on the "
            "compressed model, evaluated on the baseline. The baseline's line shows "
            "FULL->FULL in all three columns.", ""]
    text += [f"![{p}]({p})" for p in plots] + [""]
    text += ["## Attacks", "", "```", json.dumps(config.get("attacks", {}), indent=2), "```",
             "", "## Accuracy per scenario", "", markdown_scenarios(lines)]
    if section:
        text += ["", *section]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(text) + "\n")
    return [path, *written]
