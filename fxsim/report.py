"""Tables and plots. matplotlib is imported only when a plot is asked for."""

from __future__ import annotations

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
        raise FxsimError("plots need matplotlib: pip install 'fxsim[plot]'") from exc
    return plt


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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
