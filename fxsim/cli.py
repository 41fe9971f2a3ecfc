"""The ``fxsim`` command line. Thin: it parses, calls the library and prints.

A problem the user can fix (:class:`fxsim.FxsimError`) ends with one line on stderr and exit
code 2; anything else is a bug and exits 1 (set FXSIM_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import numpy as np

from fxsim import __version__
from fxsim.errors import FxsimError
from fxsim.fixedpoint import Overflow, QFormat, Rounding, dequantize, quantize_with_count

ROUNDING_NAMES = [r.value for r in Rounding]
OVERFLOW_NAMES = [o.value for o in Overflow]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fxsim")
def cli():
    """Bit-accurate fixed-point simulation of neural-network accelerators.

    fxsim simulates exactly what a fixed-point datapath computes (rounding, saturation,
    accumulator width, overflow counts) and asks whether adversarial examples transfer between
    a full-precision network and its pruned or quantised versions.
    """
    from fxsim.kernels import announce_compiling

    announce_compiling(_echo_err)  # a first run's minute of compiling is not a hang


@cli.command("format")
@click.argument("bits", type=int)
@click.argument("int_bits", type=int)
@click.argument("values", nargs=-1, type=float)
@click.option("--unsigned", is_flag=True, help="Unsigned word (default: two's complement).")
@click.option("--rounding", type=click.Choice(ROUNDING_NAMES), default="rnd_conv",
              show_default=True, help="Rounding mode (ap_fixed names).")
@click.option("--overflow", type=click.Choice(OVERFLOW_NAMES), default="sat",
              show_default=True, help="Overflow mode (ap_fixed names).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def format_command(bits, int_bits, values, unsigned, rounding, overflow, as_json):
    """Describe the format fix<BITS,INT_BITS> and quantise VALUES into it.

    INT_BITS counts integer bits including the sign bit (the ap_fixed convention), so
    `fxsim format 8 2 0.3 -5` shows fix<8,2>: step 1/64 over [-2, 1.984375], and the code,
    the value it stands for and whether it overflowed for 0.3 and -5. Negative values need
    `--` before them so they are not read as options: `fxsim format 8 2 -- -5`.
    """
    fmt = QFormat(bits, int_bits, signed=not unsigned)
    rows = []
    for value in values:
        codes, overflowed = quantize_with_count(np.array([value]), fmt, rounding, overflow)
        code = int(codes[0])
        rows.append({"input": value, "code": code, "value": float(dequantize(codes, fmt)[0]),
                     "overflow": bool(overflowed)})
    info = {"format": str(fmt), "bits": fmt.bits, "int_bits": fmt.int_bits,
            "frac_bits": fmt.frac_bits, "signed": fmt.signed, "min_code": fmt.min_code,
            "max_code": fmt.max_code, "step": fmt.step, "min_value": fmt.min_value,
            "max_value": fmt.max_value, "rounding": rounding, "overflow": overflow,
            "values": rows}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    # every number as the shortest text that reads back as the same double (fix<8,2>'s top
    # is 1.984375, which %g showed as 1.98438)
    sign = "sign included" if fmt.signed else "no sign"
    click.echo(f"{fmt}: {fmt.bits} bits, {fmt.int_bits} integer ({sign}), "
               f"{fmt.frac_bits} fraction; step {float(fmt.step)!r}; "
               f"range [{float(fmt.min_value)!r}, {float(fmt.max_value)!r}] "
               f"(codes {fmt.min_code}..{fmt.max_code})")
    for row in rows:
        note = f"  overflow ({overflow})" if row["overflow"] else ""
        click.echo(f"{float(row['input'])!r:>14} -> code {row['code']:>8d} = "
                   f"{float(row['value'])!r}{note}")


@cli.group()
def bench():
    """Measure fxsim's kernels on the paper's layer shapes (no accuracy, only time)."""


def _floats(text: str, option: str = "--densities") -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise FxsimError(f"{option} must be comma-separated numbers, got {text!r}") from exc


@bench.command("kernels")
@click.option("--layers", default=None,
              help="Comma-separated layer names (default: all LeNet5 and CifarNet shapes).")
@click.option("--densities", default="1,0.5,0.2,0.1,0.05,0.02", show_default=True,
              help="Weight densities in (0, 1].")
@click.option("--bits", type=int, default=8, show_default=True,
              help="Width of the paper's fixed-point format for weights and activations.")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True,
              help="Timed calls per measurement (the median is reported).")
@click.option("--per-mac-acc-bits", "per_mac_bits", type=int, default=None,
              help="Time a per_mac saturating accumulator of this many bits instead of the "
                   "exact (final) one.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write the rows to this JSON file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG of time vs density (log scale) here.")
def bench_kernels(layers, densities, bits, repeats, per_mac_bits, seed, json_path, plot_path):
    """Sparse (zero-skipping) vs dense integer kernels vs float32 BLAS.

    For every layer and weight density the three are timed in one run on the same random
    codes, after checking that sparse and dense agree bit for bit. Prints a Markdown table.
    """
    from fxsim import bench as bench_lib
    from fxsim import report, store

    names = [n.strip() for n in layers.split(",")] if layers else None
    for path in (json_path, plot_path):  # before minutes of timing, not after
        if path:
            store.check_writable(path)
    rows = bench_lib.sparse_vs_dense(
        names, bench_lib.check_densities(_floats(densities)), bits, repeats, seed,
        progress=lambda msg: click.echo(f"  {msg}", err=True), per_mac_bits=per_mac_bits,
    )
    click.echo(bench_lib.markdown_table(rows))
    if json_path:
        store.write_json(json_path, {"bits": bits, "repeats": repeats,
                                     "per_mac_acc_bits": per_mac_bits, "rows": rows})
    if plot_path:
        report.plot_sparse_benchmark(rows, plot_path)
        click.echo(f"plot: {plot_path}", err=True)


# ------------------------------------------------------------------------------ data


data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False), default=None,
    help="Where data sets live (default: $FXSIM_DATA, else the user cache folder).")


@cli.group()
def data():
    """List and download data sets (MNIST, Fashion-MNIST, CIFAR-10, the embedded sample)."""


@data.command("list")
@data_dir_option
def data_list(data_dir):
    """Show which data sets are available and where."""
    from fxsim import data as data_lib

    for row in data_lib.available(data_dir):
        click.echo(f"{row['name']:<14} {row['where']}")


@data.command("fetch")
@click.argument("name")
@data_dir_option
def data_fetch(name, data_dir):
    """Download data set NAME from its canonical source, checking published checksums."""
    from fxsim import data as data_lib

    click.echo(str(data_lib.fetch(name, data_dir, progress=_DownloadBar)))


class _DownloadBar:
    """One file's download as a click progress bar on stderr, in the protocol pooch asks of a
    progress bar: pooch sets ``total`` (bytes; 0 when the server does not say), calls
    ``update(n)`` per chunk, then ``reset()``, ``update(total)`` and ``close()``."""

    def __init__(self, file_name: str):
        self.label, self.total, self.bar = file_name, 0, None

    def _bar(self):
        if self.bar is None:
            self.bar = click.progressbar(length=max(self.total, 1), label=self.label,
                                         file=sys.stderr)
            self.bar.__enter__()
        return self.bar

    def update(self, n: int) -> None:
        bar = self._bar()
        bar.update(max(0, min(n, bar.length - bar.pos)))  # pooch counts whole chunks

    def reset(self) -> None:
        self._bar().pos = 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


# ------------------------------------------------------------------------------ models


class _EpochBars:
    """A click progress bar per epoch on stderr, fed by the trainer's progress callback."""

    def __init__(self):
        self.bar = None

    def __call__(self, event: dict):
        if "batch" in event:
            if self.bar is None:
                self.bar = click.progressbar(
                    length=event["batches"], file=sys.stderr, label=f"epoch {event['epoch'] + 1}",
                    item_show_func=lambda loss: None if loss is None else f"loss {loss:.3f}")
                self.bar.__enter__()
            self.bar.update(1, current_item=event["loss"])
            return
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
        test = f" test acc {event['test_acc']:.4f}" if "test_acc" in event else ""
        done = ", from the checkpoint" if event.get("resumed") else ""
        click.echo(f"epoch {event['epoch']}: loss {event['loss']:.4f} train acc "
                   f"{event['train_acc']:.4f}{test} lr {event['lr']:g} "
                   f"({event['seconds']:.1f} s{done})", err=True)


def checkpoint_path(output) -> Path:
    """Where training for ``output`` keeps its checkpoint until ``output`` is written."""
    return Path(f"{output}.checkpoint")


@cli.command("train")
@click.argument("arch", type=click.Choice(["lenet5", "cifarnet"]))
@click.option("--dataset", default=None,
              help="Data set name (default: fashion-mnist if present, else the embedded sample).")
@data_dir_option
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True,
              help="Initial learning rate; it drops 10x after 50%, 75% and 90% of the epochs.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Use only the first N training images.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="Model file to write (HDF5).")
def train_command(arch, dataset, data_dir, epochs, batch_size, lr, momentum, weight_decay, seed,
                  limit, output):
    """Train ARCH (lenet5 or cifarnet) and save it as an HDF5 model file."""
    from fxsim import data as data_lib
    from fxsim import store
    from fxsim.models import ARCHITECTURES
    from fxsim.train import TrainConfig, train

    dataset = dataset or data_lib.default_dataset(data_dir)
    model = ARCHITECTURES[arch](seed=seed)
    if data_lib.input_shape(dataset) != model.input_shape:
        raise FxsimError(f"{arch} needs images of shape {model.input_shape}, {dataset} has "
                         f"{data_lib.input_shape(dataset)}")
    store.check_writable(output)
    x_train, y_train = data_lib.load(dataset, "train", data_dir, limit)
    test = data_lib.load(dataset, "test", data_dir)
    config = TrainConfig(epochs, batch_size, lr, momentum, weight_decay, seed=seed)
    click.echo(f"training {arch} on {len(x_train)} {dataset} images", err=True)
    checkpoint = checkpoint_path(output)
    history = train(model, x_train, y_train, config, test=test, progress=_EpochBars(),
                    checkpoint=checkpoint)
    metrics = {"test_acc": history[-1]["test_acc"], "train_acc": history[-1]["train_acc"],
               "history": history}
    provenance = {"command": "fxsim " + " ".join(sys.argv[1:]), "parent": None, "seed": seed,
                  "train_config": config.to_dict()}
    store.save_model(model, output, dataset, provenance, metrics)
    checkpoint.unlink(missing_ok=True)
    click.echo(f"{output}: test accuracy {history[-1]['test_acc']:.4f}")


@cli.command("info")
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info_command(model_file, as_json):
    """Describe a model file: architecture, parameters, per-layer density and formats, metrics,
    provenance."""
    from fxsim import store

    model, info = store.load_model(model_file)
    layers = []
    for layer in model.layers:
        if "weight" not in layer.params:
            continue
        weight = layer.params["weight"]
        mask = info["masks"].get(layer.name)
        kept = int(mask.sum()) if mask is not None else int(np.count_nonzero(weight))
        layers.append({"name": layer.name, "shape": list(weight.shape),
                       "parameters": int(sum(p.size for p in layer.params.values())),
                       "density": kept / weight.size, "quant": info["quant"].get(layer.name)})
    summary = {"file": model_file, "arch": model.arch, "dataset": info["dataset"],
               "parameters": model.num_parameters(), "layers": layers,
               "metrics": {k: v for k, v in info["metrics"].items() if k != "history"},
               "provenance": info["provenance"], "fxsim_version": info["fxsim_version"]}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{model_file}: {model.arch} on {info['dataset']}, "
               f"{summary['parameters']:,} parameters (fxsim {info['fxsim_version']})")
    for row in layers:
        quant = row["quant"]
        fmt = "float32" if not quant else (
            f"w {quant['weight_fmt']['bits']}b/{quant['weight_fmt']['int_bits']}i, "
            f"a {quant['act_fmt']['bits']}b/{quant['act_fmt']['int_bits']}i")
        click.echo(f"  {row['name']:<8} {tuple(row['shape'])!s:<18} "
                   f"{row['parameters']:>9,} params  density {row['density']:.3f}  {fmt}")
    for key, value in summary["metrics"].items():
        click.echo(f"  {key}: {value}")
    click.echo(f"  provenance: {json.dumps(info['provenance'])}")


# ------------------------------------------------------------------------------ compression


def _load(model_file):
    from fxsim import store

    return store.load_model(model_file)


def _finetuning_setup(dataset, data_dir, epochs, lr, seed, limit, what):
    """((training images, labels), fine-tuning TrainConfig) for fine-tuning or DNS; (None,
    None) for 0 epochs."""
    from fxsim import data as data_lib
    from fxsim.train import finetune_config

    config = finetune_config(epochs, lr, seed)
    if config is None:
        return None, None
    x_train, y_train = data_lib.load(dataset, "train", data_dir, limit)
    click.echo(f"{what} on {len(x_train)} {dataset} images", err=True)
    return (x_train, y_train), config


def _test_accuracy(model, dataset, data_dir, n=None):
    from fxsim import data as data_lib
    from fxsim.train import evaluate

    return evaluate(model, *data_lib.load(dataset, "test", data_dir, n))


finetune_options = [
    click.option("--finetune-epochs", type=click.IntRange(0), default=0, show_default=True,
                 help="Epochs of fine-tuning after compressing."),
    click.option("--lr", type=float, default=0.001, show_default=True,
                 help="Fine-tuning learning rate (constant)."),
    click.option("--dataset", default=None, help="Data set (default: the model's own)."),
    data_dir_option,
    click.option("--limit", type=click.IntRange(1), default=None,
                 help="Fine-tune on the first N training images only."),
    click.option("--seed", type=click.IntRange(0), default=0, show_default=True),
    click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
                 help="Model file to write (HDF5)."),
]


def _with_options(options):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


@cli.command("prune")
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--density", type=float, required=True, help="Fraction of weights kept, (0, 1].")
@click.option("--method", type=click.Choice(["magnitude", "dns"]), default="magnitude",
              show_default=True,
              help="magnitude: prune once, then fine-tune with the masks fixed (Han et al.); "
                   "dns: dynamic network surgery during the fine-tuning epochs (Guo et al.).")
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer",
              show_default=True,
              help="The density per layer, or overall with one threshold for all layers.")
@_with_options(finetune_options)
def prune_command(model_file, density, method, scope, finetune_epochs, lr, dataset, data_dir,
                  limit, seed, output):
    """Prune MODEL_FILE to a weight density, fine-tune with the masks fixed, save."""
    from fxsim import compress, store

    model, info = _load(model_file)
    if info["quant"]:
        raise FxsimError(f"{model_file} is quantised: prune the float model, then quantize it")
    store.check_writable(output, [model_file])
    dataset = dataset or info["dataset"]
    if method == "dns" and finetune_epochs < 1:
        raise FxsimError("dns prunes while training: give --finetune-epochs >= 1")
    train_data, config = _finetuning_setup(dataset, data_dir, finetune_epochs, lr, seed, limit,
                                           "dynamic network surgery" if method == "dns"
                                           else "fine-tuning")
    masks, history = compress.prune_model(model, density, method, scope, train_data, config,
                                          progress=_EpochBars(),
                                          checkpoint=checkpoint_path(output))
    acc = _test_accuracy(model, dataset, data_dir)
    report = compress.density_report(model, masks)
    store.save_model(model, output, info["dataset"],
                     {"command": "fxsim " + " ".join(sys.argv[1:]), "parent": str(model_file),
                      "seed": seed, "method": method, "scope": scope, "density": density},
                     {"test_acc": acc, "density": report, "history": history}, masks=masks)
    checkpoint_path(output).unlink(missing_ok=True)
    click.echo(f"{output}: density {report['overall']:.4f}, test accuracy {acc:.4f}")


def _int_or_none(text, option: str):
    if text is None:
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise FxsimError(f"{option} must be an integer or 'auto', got {text!r}") from exc


@cli.command("quantize")
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--bits", type=int, required=True,
              help="Word width of weights and activations (the paper: 4, 8, 10 ... 32).")
@click.option("--int-bits", default=None,
              help="Integer bits incl. sign (default: the paper's preset for the width), or "
                   "'auto': per layer, the fewest whose overflow rate on calibration images "
                   "stays under --max-overflow (dynamic fixed point).")
@click.option("--max-overflow", type=click.FloatRange(0, 1), default=1e-3, show_default=True,
              help="With --int-bits auto: the overflow rate allowed on calibration data.")
@click.option("--calibration", type=click.IntRange(1), default=1000, show_default=True,
              help="With --int-bits auto: training images used for calibration.")
@click.option("--weight-bits", type=int, default=None,
              help="Weights in another width than the activations (default: --bits).")
@click.option("--weight-int-bits", type=int, default=None,
              help="Integer bits of the weights (default: the preset for their width).")
@click.option("--acc-bits", type=int, default=None, help="Accumulator width (default: exact).")
@click.option("--acc-mode", type=click.Choice(["final", "per_mac"]), default="final",
              show_default=True)
@click.option("--acc-overflow", type=click.Choice(["sat", "wrap"]), default="sat",
              show_default=True)
@click.option("--rounding", type=click.Choice(ROUNDING_NAMES), default="rnd_conv",
              show_default=True)
@_with_options(finetune_options)
def quantize_command(model_file, bits, int_bits, max_overflow, calibration, weight_bits,
                     weight_int_bits, acc_bits, acc_mode, acc_overflow, rounding,
                     finetune_epochs, lr, dataset, data_dir, limit, seed, output):
    """Quantise MODEL_FILE to fixed point, fine-tune through the integer datapath (clipped STE),
    save. A pruned model keeps its masks."""
    from fxsim import compress, store
    from fxsim import data as data_lib
    from fxsim.train import train

    model, info = _load(model_file)
    store.check_writable(output, [model_file])
    dataset = dataset or info["dataset"]
    if int_bits == "auto" and (weight_bits is not None or weight_int_bits is not None):
        raise FxsimError("--int-bits auto picks weight formats too: drop --weight-bits")
    int_bits = int_bits if int_bits == "auto" else _int_or_none(int_bits, "--int-bits")
    calibration_images = None
    if int_bits == "auto":
        calibration_images, _ = data_lib.load(dataset, "train", data_dir, calibration)
    datapath_options = {"acc_bits": acc_bits, "acc_mode": acc_mode, "acc_overflow": acc_overflow,
                        "rounding": rounding}
    if int_bits != "auto":
        datapath_options.update(weight_bits=weight_bits, weight_int_bits=weight_int_bits)
    qmodel, config, _ = compress.quantize_finetune(model, bits, int_bits, info["masks"],
                                                   calibration=calibration_images,
                                                   max_overflow=max_overflow, **datapath_options)
    before = _test_accuracy(qmodel, dataset, data_dir)
    click.echo(f"bit-accurate test accuracy before fine-tuning: {before:.4f}", err=True)
    history = []
    train_data, train_config = _finetuning_setup(dataset, data_dir, finetune_epochs, lr, seed,
                                                 limit, "fine-tuning")
    if train_config:
        history = train(qmodel, *train_data, train_config, progress=_EpochBars(),
                        masks=info["masks"], checkpoint=checkpoint_path(output))
    acc = _test_accuracy(qmodel, dataset, data_dir) if history else before
    store.save_model(compress.export_float(qmodel, model), output, info["dataset"],
                     {"command": "fxsim " + " ".join(sys.argv[1:]), "parent": str(model_file),
                      "seed": seed, "bits": bits, "int_bits": int_bits},
                     {"test_acc": acc, "test_acc_before_finetune": before, "history": history},
                     masks=info["masks"], quant=config)
    checkpoint_path(output).unlink(missing_ok=True)
    click.echo(f"{output}: {bits}-bit, bit-accurate test accuracy {acc:.4f}")


@cli.command("simulate")
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--dataset", default=None, help="Data set (default: the model's own).")
@data_dir_option
@click.option("--n", "count", type=click.IntRange(1), default=None,
              help="Use the first N test images (default: all).")
@click.option("--bits", type=int, default=None,
              help="Quantise a float model on the fly to this width (paper preset).")
@click.option("--acc-bits", type=int, default=None, help="What-if: accumulator width.")
@click.option("--acc-mode", type=click.Choice(["final", "per_mac"]), default=None)
@click.option("--acc-overflow", type=click.Choice(["sat", "wrap"]), default=None)
@click.option("--rounding", type=click.Choice(ROUNDING_NAMES), default=None)
@click.option("--kernel", type=click.Choice(["auto", "dense", "sparse"]), default=None)
@click.option("--batch-size", type=click.IntRange(1), default=500, show_default=True,
              help="Images per forward pass (fewer where a layer would build more than 128 MB "
                   "of im2col columns; the integer datapath gives the same bits either way).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def simulate_command(model_file, dataset, data_dir, count, bits, acc_bits, acc_mode,
                     acc_overflow, rounding, kernel, batch_size, as_json):
    """Run MODEL_FILE bit-accurately on the integer datapath: accuracy and, per layer, MACs
    (dense / executed / skipped), accumulator overflows, output saturations, max |acc| and
    weight storage per encoding."""
    from fxsim import compress
    from fxsim import data as data_lib

    model, info = _load(model_file)
    config = info["quant"] or None
    if bits is not None:
        config = compress.quant_config(model, bits)
    if not config:
        raise FxsimError(f"{model_file} is a float model: give --bits to quantise it on the fly")
    config = compress.with_overrides(config, acc_bits=acc_bits, acc_mode=acc_mode,
                                     acc_overflow=acc_overflow, rounding=rounding,
                                     kernel=kernel)
    qmodel = compress.quantize_model(model, config, info["masks"])
    dataset = dataset or info["dataset"]
    images, labels = data_lib.load(dataset, "test", data_dir, count)
    result = compress.simulate(qmodel, images, labels, batch_size)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{model_file} on {result['images']} {dataset} test images: bit-accurate "
               f"accuracy {result['accuracy']:.4f}; input saturations "
               f"{result['input_saturations']}")
    # counters exactly, as the datapath counted them
    click.echo(f"{'layer':<8} {'MACs dense':>13} {'executed':>13} {'skipped':>13}  acc overflows"
               "  out saturations     max |acc|  kernel              weight bytes "
               "dense/bitmask/csr/eie")
    for name, row in result["layers"].items():
        wb = row["weight_bytes"]
        click.echo(f"{name:<8} {row['macs']:>13,} {row['executed_macs']:>13,} "
                   f"{row['skipped_macs']:>13,} {row['acc_overflows']:>14,} "
                   f"{row['out_saturations']:>16,} {row['max_abs_acc']:>13,}  "
                   f"{','.join(row['paths']):<19} {wb['dense']}/{wb['bitmask']}/{wb['csr']}/"
                   f"{wb['eie']}")


@cli.command("distributions")
@click.argument("model_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--images", "count", type=click.IntRange(1), default=10, show_default=True,
              help="Test images the activations come from (the paper: 10).")
@click.option("--dataset", default=None, help="Data set (default: each model's own).")
@data_dir_option
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of the CDFs here (weights, activations; a line per model).")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (per model and per layer) instead of text.")
def distributions_command(model_files, count, dataset, data_dir, plot_path, as_json):
    """Value distributions of the weights and activations of MODEL_FILES (the paper's Figure
    5): how many are zero, how many sit at a limit of their format (clipped), the range.

    Weights: every conv/linear weight as the datapath uses it (a quantised model's code
    values, pruned weights as 0). Activations: every conv/linear layer's output on the first
    --images test images, before the activation function, with batch normalisation folded
    into its convolution."""
    from fxsim import distributions, report, store

    if plot_path:
        store.check_writable(plot_path, model_files)
    stems = [Path(f).stem for f in model_files]
    labels = stems if len(set(stems)) == len(stems) else list(model_files)
    summary, values = distributions.of_files(dict(zip(labels, model_files, strict=True)), count,
                                             dataset, data_dir)
    if plot_path:
        report.plot_value_cdfs(values, plot_path, images=count)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(report.markdown_distributions(summary))
    if plot_path:
        click.echo(f"plot: {plot_path}", err=True)


# ------------------------------------------------------------------------------ attacks


# The attacked images and the models their adversarial examples are evaluated on, as `attack`
# and `strength` take them.
attack_data_options = [
    click.option("--dataset", default=None, help="Data set (default: the model's own)."),
    data_dir_option,
    click.option("--n", "count", type=click.IntRange(1), default=1000, show_default=True,
                 help="Attack the first N test images."),
    click.option("--eval-on", "eval_on", multiple=True, type=click.Path(dir_okay=False),
                 help="Also evaluate the adversarial images on this model (repeatable)."),
]


def _evaluated_models(eval_on, model, model_file) -> dict:
    """The --eval-on files, ready to run (name -> model); each must take ``model``'s images."""
    from fxsim import compress

    targets = {}
    for other in eval_on:
        other_model, other_info = _load(other)
        if other_model.input_shape != model.input_shape:
            raise FxsimError(f"{other} takes {other_model.input_shape} images, {model_file} "
                             f"takes {model.input_shape}")
        targets[other] = compress.runnable(other_model, other_info)
    return targets


@cli.command("attack")
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--method", type=click.Choice(["fgsm", "fgm", "ifgsm", "ifgm", "deepfool"]),
              default="ifgsm", show_default=True)
@click.option("--eps", type=float, default=0.02, show_default=True, help="Step size.")
@click.option("--steps", type=int, default=12, show_default=True,
              help="Iterations of ifgsm / ifgm.")
@click.option("--radius", type=float, default=None,
              help="ifgsm / ifgm: project onto this L-inf ball around the image (BIM).")
@click.option("--norm", type=click.Choice(["none", "l2"]), default="none", show_default=True,
              help="fgm / ifgm: the raw gradient (the paper) or its L2-normalised direction.")
@click.option("--max-iter", type=int, default=50, show_default=True, help="DeepFool.")
@click.option("--overshoot", type=float, default=0.02, show_default=True, help="DeepFool.")
@_with_options(attack_data_options)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Save originals, adversarial images and labels here (HDF5).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Save a PNG grid of originals / adversarials / perturbations.")
@click.option("--batch-size", type=click.IntRange(1), default=500, show_default=True,
              help="Images attacked at once (bounds memory).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def attack_command(model_file, method, eps, steps, radius, norm, max_iter, overshoot, dataset,
                   data_dir, count, eval_on, output, plot_path, batch_size, as_json):
    """Attack MODEL_FILE (float, pruned or quantised: the gradient comes from the model itself,
    through the integer datapath and the STE for a quantised one) and report accuracy before
    and after on it and on every --eval-on model, with perturbation statistics."""
    from fxsim import attacks, compress, report, store
    from fxsim import data as data_lib

    given = {"eps": eps, "steps": steps, "radius": radius, "norm": norm, "max_iter": max_iter,
             "overshoot": overshoot}
    settings = attacks.settings_for(
        method, {k: v for k, v in given.items() if k in attacks.DEFAULTS[method]})
    for path in (output, plot_path):
        if path:
            store.check_writable(path, [model_file, *eval_on])
    model, info = _load(model_file)
    source = compress.runnable(model, info)
    targets = {model_file: source, **_evaluated_models(eval_on, model, model_file)}
    dataset = dataset or info["dataset"]
    images, labels = data_lib.load(dataset, "test", data_dir, count)
    with click.progressbar(length=len(images), file=sys.stderr,
                           label=f"{method} on {len(images)} {dataset} images") as bar:
        result = attacks.run(method, source, images, labels, settings, batch_size, bar.update)
    rows = {}
    for name, target in targets.items():
        before = target.predict(images)
        after = target.predict(result.adversarial)
        rows[name] = {"accuracy_before": float((before == labels).mean()),
                      "accuracy_after": float((after == labels).mean())}
    summary = {
        "method": method, "source": model_file, "dataset": dataset, "images": len(images),
        "settings": settings,
        "success_rate": float(result.success.mean()),
        "gradient_masked": int(result.gradient_masked.sum()),
        "mean_abs_per_pixel": float(result.mean_abs.mean()), "mean_l2": float(result.l2.mean()),
        "mean_linf": float(result.linf.mean()), "models": rows,
    }
    if output:
        store.save_adversarial(output, images, result.adversarial, labels, summary)
    if plot_path:
        report.plot_adversarial_grid(images, result.adversarial, labels,
                                     source.predict(images), source.predict(result.adversarial),
                                     plot_path)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"success {summary['success_rate']:.4f}; mean |perturbation| per pixel "
               f"{summary['mean_abs_per_pixel']:.4f}, mean L2 {summary['mean_l2']:.3f}, "
               f"mean Linf {summary['mean_linf']:.3f}; gradient masked on "
               f"{summary['gradient_masked']} images")
    for name, row in rows.items():
        click.echo(f"  {name}: accuracy {row['accuracy_before']:.4f} -> "
                   f"{row['accuracy_after']:.4f}")


@cli.command("strength")
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--method", "methods", default="ifgsm,ifgm", show_default=True,
              help="Iterative attacks, comma-separated (ifgsm, ifgm).")
@click.option("--eps", "eps_text", default="0.005,0.01,0.02,0.05", show_default=True,
              help="Step sizes, comma-separated.")
@click.option("--steps", type=click.IntRange(1), default=12, show_default=True,
              help="The most steps; the accuracy after every step is reported.")
@click.option("--norm", type=click.Choice(["none", "l2"]), default="none", show_default=True,
              help="ifgm: the raw gradient (the paper) or its L2-normalised direction.")
@_with_options(attack_data_options)
@click.option("--batch-size", type=click.IntRange(1), default=500, show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: accuracy vs steps, a line per step size, a panel per attack "
                   "and evaluated model.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def strength_command(model_file, methods, eps_text, steps, norm, dataset, data_dir, count,
                     eval_on, batch_size, plot_path, as_json):
    """Accuracy under IFGSM / IFGM as the step size and the number of steps grow (the paper's
    Figure 3): one attack run per step size gives the accuracy after every step, on MODEL_FILE
    itself (white-box) and on every --eval-on model (transfer)."""
    from fxsim import attacks, compress, report, store
    from fxsim import data as data_lib

    eps_values = _floats(eps_text, "--eps")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if plot_path:
        store.check_writable(plot_path, [model_file, *eval_on])
    model, info = _load(model_file)
    source = compress.runnable(model, info)
    targets = _evaluated_models(eval_on, model, model_file)
    dataset = dataset or info["dataset"]
    images, labels = data_lib.load(dataset, "test", data_dir, count)
    curves = []
    for method in names:
        settings = {"norm": norm} if method == "ifgm" else {}
        with click.progressbar(length=len(images) * len(eps_values), file=sys.stderr,
                               label=f"{method} on {len(images)} {dataset} images") as bar:
            curves.append(attacks.strength_curves(method, source, images, labels, eps_values,
                                                  steps, targets, settings, batch_size,
                                                  bar.update))
    if plot_path:
        report.plot_strength_curves(curves, plot_path, source=model_file)
    if as_json:
        click.echo(json.dumps({"source": model_file, "dataset": dataset, "images": len(images),
                               "curves": [{"method": c.method, "eps": c.eps, "steps": c.steps,
                                           "accuracy": {k: v.tolist()
                                                        for k, v in c.accuracy.items()}}
                                          for c in curves]}, indent=2))
    else:
        click.echo(report.markdown_strength(curves, source=model_file))
    if plot_path:
        click.echo(f"plot: {plot_path}", err=True)


# ------------------------------------------------------------------------------ scenarios


def _echo_err(message: str) -> None:
    """Log lines to stderr (module level, so sweep worker processes can receive it)."""
    click.echo(message, err=True)


def _write_report(results_file, out_dir, data_dir=None) -> list:
    from fxsim import distributions, report, store

    rows, models, config = store.load_results(results_file)
    try:
        summary, values, missing = distributions.of_results(models, results_file,
                                                            data_dir=data_dir)
        note = (f"Not found, so not in the value distributions: {', '.join(missing)}."
                if missing else "")
        found = (summary, values, note)
    except FxsimError as exc:  # e.g. the data set is not on this machine: report the rest
        click.echo(f"value distributions left out: {exc}", err=True)
        found = ({}, {}, f"Value distributions left out: {exc}")
    return report.write_report(rows, models, config, out_dir, source=str(results_file),
                               distributions=found)


@cli.command("scenarios")
@click.option("--baseline", "baseline_file", type=click.Path(dir_okay=False), required=True,
              help="The full-precision model (HDF5).")
@click.option("--compressed", "compressed", multiple=True, type=click.Path(dir_okay=False),
              required=True, help="Compressed models: --compressed C1.h5 C2.h5 ...")
@click.argument("more_compressed", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--attacks", "attack_names", default="ifgsm,ifgm,deepfool", show_default=True,
              help="Comma-separated attacks (fgsm, fgm, ifgsm, ifgm, deepfool).")
@click.option("--eps", type=float, default=0.02, show_default=True,
              help="Step size of the gradient attacks.")
@click.option("--steps", type=int, default=12, show_default=True, help="ifgsm / ifgm.")
@click.option("--max-iter", type=int, default=50, show_default=True, help="DeepFool.")
@click.option("--overshoot", type=float, default=0.02, show_default=True, help="DeepFool.")
@click.option("--dataset", default=None, help="Data set (default: the baseline's own).")
@data_dir_option
@click.option("--n", "count", type=click.IntRange(1), default=1000, show_default=True,
              help="Attack the first N test images.")
@click.option("--matrix", is_flag=True,
              help="Also evaluate every compressed model's examples on every other one.")
@click.option("--batch-size", type=click.IntRange(1), default=500, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="Results file to write (HDF5).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Also write tables and plots into this folder.")
def scenarios_command(baseline_file, compressed, more_compressed, attack_names, eps, steps,
                      max_iter, overshoot, dataset, data_dir, count, matrix, batch_size, output,
                      report_dir):
    """The paper's three attack scenarios: for every attack, examples made on the baseline
    (once) and on each compressed model, evaluated as COMP->COMP, FULL->COMP and COMP->FULL
    (plus FULL->FULL and clean accuracy); --matrix adds every compressed->compressed pair.

    Finished attacks are kept in OUTPUT.attacks/ until OUTPUT is written: run again after an
    interruption, the command skips them."""
    from fxsim import attacks, compress, scenarios, store
    from fxsim import data as data_lib

    given = {"eps": eps, "steps": steps, "max_iter": max_iter, "overshoot": overshoot}
    settings = {}
    for method in (m.strip() for m in attack_names.split(",") if m.strip()):
        if method not in attacks.DEFAULTS:
            raise FxsimError(f"unknown attack {method!r}; choose from "
                             f"{', '.join(attacks.DEFAULTS)}")
        settings[method] = attacks.settings_for(
            method, {k: v for k, v in given.items() if k in attacks.DEFAULTS[method]})
    if not settings:
        raise FxsimError("--attacks names no attack")
    store.check_writable(output, [baseline_file, *compressed, *more_compressed])
    base_model, base_info = _load(baseline_file)
    if base_info["quant"] or base_info["masks"]:
        raise FxsimError(f"{baseline_file} is compressed: the baseline must be the dense float "
                         "model")
    files = {"baseline": baseline_file}
    given = {Path(baseline_file).resolve(): "the baseline"}
    for path in [*compressed, *more_compressed]:
        if Path(path).resolve() in given:  # the same file under another spelling too
            raise FxsimError(f"{path} is given twice (it is also {given[Path(path).resolve()]})")
        given[Path(path).resolve()] = f"given as {path}"
        name = Path(path).stem
        files[str(path) if name in files else name] = path
    models = {"baseline": compress.runnable(base_model, base_info)}
    table = [scenarios.describe("baseline", base_model, base_info, baseline_file, True)]
    for name, path in list(files.items())[1:]:
        model, info = _load(path)
        scenarios.check_compatible(baseline_file, base_info, path, info)
        table.append(scenarios.describe(name, model, info, path))
        models[name] = compress.runnable(model, info)
    dataset = dataset or base_info["dataset"]
    images, labels = data_lib.load(dataset, "test", data_dir, count)
    # every finished attack is kept beside the output until it is written: a run cut short
    # and started again skips them
    attack_files = scenarios.AttackFiles(f"{output}.attacks",
                                         {name: store.file_digest(path)
                                          for name, path in files.items()}, images, labels)
    rows, clean = scenarios.run(models, "baseline", settings, images, labels, matrix,
                                batch_size, progress=_echo_err, attack_files=attack_files)
    for row in table:
        row["clean_accuracy"] = clean[row["name"]]
    config = {"dataset": dataset, "arch": base_info["arch"], "images": len(images),
              "matrix": matrix, "attacks": settings, "baseline": baseline_file,
              "compressed": files, "command": "fxsim " + " ".join(sys.argv[1:])}
    store.save_results(output, rows, table, config)
    attack_files.remove()
    _print_results(rows, table, output)
    if report_dir:
        written = _write_report(output, report_dir, data_dir)
        click.echo(f"report: {written[0]}")


def _print_results(rows, models, results_file) -> None:
    from fxsim import report

    click.echo(report.markdown_scenarios(report.scenario_table(rows, models)))
    click.echo(f"results: {results_file}")


def _sweep_progress(event: dict) -> None:
    status = "cached" if event["status"] == "cached" else f"done in {event['seconds']:.1f} s"
    click.echo(f"[{event['index']}/{event['total']}] {event['step']}: {status}", err=True)


def _run_sweep(config_file, output, jobs, data_dir, with_report):
    import time

    from fxsim import store, sweep

    config = sweep.load_config(config_file, output, data_dir)
    start = time.perf_counter()
    click.echo(f"sweep {config_file} -> {config['output']} ({jobs} job{'s' * (jobs > 1)})",
               err=True)
    results = sweep.run_sweep(config, jobs, data_dir, progress=_sweep_progress, log=_echo_err)
    click.echo(f"sweep finished in {time.perf_counter() - start:.1f} s", err=True)
    rows, models, _ = store.load_results(results)
    _print_results(rows, models, results)
    if with_report:
        written = _write_report(results, Path(config["output"]) / "report", data_dir)
        click.echo(f"report: {written[0]}")


@cli.command("sweep")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: the config's `output`, else ./CONFIG-NAME).")
@click.option("--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Independent steps run in this many processes (same results for any).")
@data_dir_option
@click.option("--report/--no-report", "with_report", default=True, show_default=True,
              help="Write tables and plots into OUTPUT/report.")
def sweep_command(config_file, output, jobs, data_dir, with_report):
    """Run the whole experiment in CONFIG_FILE (TOML): train or load the baseline, prune and
    quantise it, fine-tune, attack every model, evaluate the scenarios, write
    OUTPUT/results.h5. Every finished step is a file under OUTPUT/steps named by a hash of
    its settings: a rerun skips what is done, so an interrupted sweep resumes. See
    examples/*.toml."""
    _run_sweep(config_file, output, jobs, data_dir, with_report)


@cli.command("report")
@click.argument("results_file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for report.md, CSV tables and PNG plots.")
@data_dir_option
def report_command(results_file, out_dir, data_dir):
    """Tables (Markdown, CSV) and plots (accuracy vs density and vs bitwidth per attack and
    scenario, perturbation vs bitwidth, transfer matrix, value distributions of the models
    whose files are still there) from a results file."""
    written = _write_report(results_file, out_dir, data_dir)
    for path in written:
        click.echo(str(path))


@cli.command("demo")
@click.option("-o", "--output", type=click.Path(file_okay=False), default="fxsim-demo",
              show_default=True, help="Output folder.")
@click.option("--jobs", type=click.IntRange(1), default=1, show_default=True)
def demo_command(output, jobs):
    """The main job end to end on the embedded Fashion-MNIST sample, in a few minutes: train
    LeNet5, prune it to 3 densities and quantise it to 3 bitwidths (fine-tuning each), run
    IFGSM, IFGM and DeepFool in the three scenarios, write the report. Its config is
    examples/demo.toml; rerunning reuses what is done."""
    from importlib import resources

    config_file = resources.files("fxsim") / "_data" / "demo.toml"
    with resources.as_file(config_file) as path:
        _run_sweep(path, output, jobs, None, True)


def main(argv=None):
    """Entry point of the ``fxsim`` console script."""
    try:
        cli.main(args=argv, prog_name="fxsim", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except FxsimError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # the machine's (permissions, a full disk), not fxsim's
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # a bug: say so in one line, traceback on request
        if os.environ.get("FXSIM_DEBUG"):
            raise
        click.echo(f"internal error: {type(exc).__name__}: {exc} "
                   "(set FXSIM_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
