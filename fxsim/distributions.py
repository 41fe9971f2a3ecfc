"""Value distributions of a model's weights and activations: the paper's Figure 5.

Zhao et al. explain the transfer results of low-bitwidth models by their values: at 4 bits a
model has many more zeros (quantisation acts like pruning) and its weights and activations
are clipped at the format's limits. This module measures exactly that, on the values the
datapath uses:

* **weights**: every convolution and linear weight. For a quantised model, its weight codes'
  values (pruned weights included, as 0); for a float model, the float weights (pruned ones
  as 0).
* **activations**: every convolution and linear layer's output on some images, before the
  activation function (what an accelerator writes back). For a quantised model the values of
  its output codes, for a float model the float outputs.

Batch normalisation is folded into the convolution before it (weights and outputs) for float
models too, as a quantised model runs it, so that the two compare value for value.

"At a limit" counts values equal to their layer's format's smallest or largest value
(quantised models only: a float model has no limits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fxsim.compress import fold_batchnorm, runnable
from fxsim.errors import FxsimError
from fxsim.layers import Conv2d, Linear
from fxsim.models import Model
from fxsim.qlayers import QuantConv2d, QuantLinear


@dataclass(frozen=True)
class LayerValues:
    """One conv/linear layer's weights and outputs, flattened (float64), and, for a quantised
    layer, the (smallest, largest) value of its weight and output formats (else None)."""

    layer: str
    weights: np.ndarray
    activations: np.ndarray
    weight_limits: tuple[float, float] | None
    output_limits: tuple[float, float] | None


def _weight_values(layer) -> np.ndarray:
    """A float layer's weights (:func:`fxsim.compress.runnable` has zeroed the pruned ones);
    a quantised layer's weight codes' values."""
    if isinstance(layer, QuantConv2d | QuantLinear):
        return layer.weight_values()
    return layer.params["weight"]


def layer_values(model: Model, images: np.ndarray, batch_size: int = 100) -> list[LayerValues]:
    """Per conv/linear layer of ``model`` (float or quantised, as :func:`fxsim.compress.runnable`
    gives it), in order: its weights as the datapath uses them and its outputs on ``images``
    (N, C, H, W) in [0, 1], run ``batch_size`` images at a time in evaluation mode."""
    model = fold_batchnorm(model)
    weighted = [layer for layer in model.layers
                if isinstance(layer, Conv2d | Linear | QuantConv2d | QuantLinear)]
    outputs = {layer.name: [] for layer in weighted}
    for start in range(0, len(images), batch_size):
        batch = model.layer_outputs(images[start : start + batch_size], outputs)
        for name, y in batch.items():
            outputs[name].append(np.asarray(y, np.float64).reshape(-1))
    result = []
    for layer in weighted:
        limits = out_limits = None
        if isinstance(layer, QuantConv2d | QuantLinear):
            dp = layer.datapath
            limits = (dp.weight_fmt.min_value, dp.weight_fmt.max_value)
            out_limits = (dp.output_fmt.min_value, dp.output_fmt.max_value)
        acts = outputs[layer.name]
        result.append(LayerValues(
            layer.name, np.asarray(_weight_values(layer), np.float64).reshape(-1),
            np.concatenate(acts) if acts else np.zeros(0), limits, out_limits))
    return result


def pooled(layers: list[LayerValues], which: str) -> np.ndarray:
    """All layers' ``which`` ("weights" or "activations") in one flat array."""
    if which not in ("weights", "activations"):
        raise ValueError(f"which must be 'weights' or 'activations', got {which!r}")
    arrays = [getattr(layer, which) for layer in layers]
    return np.concatenate(arrays) if arrays else np.zeros(0)


def summarize(layers: list[LayerValues], which: str) -> dict:
    """Statistics of all layers' ``which`` ("weights" or "activations") together: count,
    fraction exactly zero, fraction at a limit of the layer's format (None for a float model),
    min, max, mean |value| (None where there are no values)."""
    values = pooled(layers, which)  # checks ``which``
    arrays = [getattr(layer, which) for layer in layers]
    limits = [layer.weight_limits if which == "weights" else layer.output_limits
              for layer in layers]
    at_limit = None
    if values.size and all(lim is not None for lim in limits):
        hits = sum(int(np.count_nonzero((a <= lo) | (a >= hi)))
                   for a, (lo, hi) in zip(arrays, limits, strict=True))
        at_limit = hits / values.size
    empty = values.size == 0
    return {
        "count": int(values.size),
        "zero": float(np.count_nonzero(values == 0) / values.size) if not empty else None,
        "at_limit": at_limit,
        "min": float(values.min()) if not empty else None,
        "max": float(values.max()) if not empty else None,
        "mean_abs": float(np.abs(values).mean()) if not empty else None,
    }


def ecdf(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The empirical CDF of ``values`` at each point of ``grid``: the fraction <= it."""
    ordered = np.sort(np.asarray(values, np.float64).reshape(-1))
    if ordered.size == 0:
        return np.full(np.shape(grid), np.nan)
    return np.searchsorted(ordered, grid, side="right") / ordered.size


def of_files(files: dict, count: int = 10, dataset: str | None = None,
             data_dir=None) -> tuple[dict, dict]:
    """The distributions of model files: ``files`` label -> path; activations on the first
    ``count`` test images of ``dataset`` (default: each model's own). Returns (summary: label
    -> {file, dataset, images, weights, activations (:func:`summarize`), layers: name ->
    {weights, activations}}, values: label -> (all weights, all activations) for
    :func:`fxsim.report.plot_value_cdfs`)."""
    from fxsim import data as data_lib
    from fxsim import store

    images_of, summary, values = {}, {}, {}
    for label, path in files.items():
        model, info = store.load_model(path)
        name = dataset or info["dataset"]
        if data_lib.input_shape(name) != model.input_shape:
            raise FxsimError(f"{path} ({model.arch}) takes {model.input_shape} images, {name} "
                             f"has {data_lib.input_shape(name)}")
        if name not in images_of:
            images_of[name] = data_lib.load(name, "test", data_dir, count)[0]
        layers = layer_values(runnable(model, info), images_of[name])
        summary[label] = {
            "file": str(path), "dataset": name, "images": len(images_of[name]),
            "weights": summarize(layers, "weights"),
            "activations": summarize(layers, "activations"),
            "layers": {x.layer: {"weights": summarize([x], "weights"),
                                 "activations": summarize([x], "activations")}
                       for x in layers},
        }
        values[label] = (pooled(layers, "weights"), pooled(layers, "activations"))
    return summary, values


def of_results(models: list[dict], results_file, count: int = 10,
               data_dir=None) -> tuple[dict, dict, list[str]]:
    """:func:`of_files` for the models of a results file (its models table: name, file),
    each file found as recorded or, for a sweep, in the ``steps`` folder beside the results
    file (the sweep records paths relative to where it ran). Returns (summary, values, the
    names of models whose file is in neither place)."""
    from pathlib import Path

    files, missing = {}, []
    for model in models:
        recorded = Path(model.get("file") or "")
        beside = Path(results_file).parent / "steps" / recorded.name
        found = next((p for p in (recorded, beside) if recorded.name and p.is_file()), None)
        if found is None:
            missing.append(model["name"])
        else:
            files[model["name"]] = found
    summary, values = of_files(files, count, data_dir=data_dir) if files else ({}, {})
    return summary, values, missing
