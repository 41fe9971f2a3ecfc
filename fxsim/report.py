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
