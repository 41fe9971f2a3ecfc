"""Compression: magnitude pruning, and fixed-point quantisation onto the integer datapath.

A quantised model is the float model with every conv/linear layer replaced by its quantised
twin (:mod:`fxsim.qlayers`) and the input quantised right after the input mapping; BatchNorm is
folded into the preceding convolution first, as accelerators do. The paper's presets give
weights and activations the same ``paper_format(bits)``.
"""

from __future__ import annotations

import numpy as np

from fxsim.datapath import Datapath
from fxsim.errors import FxsimError
from fxsim.fixedpoint import QFormat, paper_format
from fxsim.layers import Affine, AvgPool2d, BatchNorm2d, Conv2d, Linear, Standardize
from fxsim.models import Model
from fxsim.qlayers import QuantConv2d, QuantizeInput, QuantLinear

PRUNABLE = (Conv2d, Linear)


# ------------------------------------------------------------------------------ pruning


def prunable_layers(model: Model) -> list[str]:
    return [layer.name for layer in model.layers if isinstance(layer, PRUNABLE)]


def magnitude_masks(model: Model, density: float, layers=None,
                    scope: str = "layer") -> dict[str, np.ndarray]:
    """Magnitude pruning (Han et al.): keep the largest |w|. ``scope="layer"`` keeps
    ``round(density * size)`` weights in every layer; ``scope="global"`` ranks all prunable
    weights together, so the overall density is exact and big layers give up the most. Ties
    are broken by position, so counts are exact."""
    if not 0.0 < density <= 1.0:
        raise FxsimError(f"density must be in (0, 1], got {density}")
    if scope not in ("layer", "global"):
        raise FxsimError(f"scope must be 'layer' or 'global', got {scope!r}")
    names = prunable_layers(model) if layers is None else list(layers)
    if not names:
        raise FxsimError(f"{model.arch} has no prunable (conv or linear) layers")
    weights = [model.layer(name).params["weight"] for name in names]
    if scope == "global":
        flat = np.concatenate([np.abs(w).ravel() for w in weights])
        keep = _top(flat, round(density * flat.size))
        bounds = np.cumsum([0] + [w.size for w in weights])
        return {name: keep[bounds[i] : bounds[i + 1]].reshape(w.shape)
                for i, (name, w) in enumerate(zip(names, weights, strict=True))}
    return {name: _top(np.abs(w).ravel(), round(density * w.size)).reshape(w.shape)
            for name, w in zip(names, weights, strict=True)}


def _top(magnitudes: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` largest values (first positions win ties)."""
    mask = np.zeros(magnitudes.size, bool)
    mask[np.argsort(-magnitudes, kind="stable")[:count]] = True
    return mask


def apply_masks(model: Model, masks: dict[str, np.ndarray]) -> None:
    """Zero the pruned weights in place."""
    for name, mask in masks.items():
        w = model.layer(name).params["weight"]
        w *= mask


def density_report(model: Model, masks: dict[str, np.ndarray]) -> dict:
    """Achieved density per layer and overall (over the prunable layers' weights)."""
    rows, kept, total = {}, 0, 0
    for name in prunable_layers(model):
        w = model.layer(name).params["weight"]
        mask = masks.get(name)
        k = int(mask.sum()) if mask is not None else w.size
        rows[name] = k / w.size
        kept, total = kept + k, total + w.size
    return {"layers": rows, "overall": kept / total if total else 1.0}


# ------------------------------------------------------------------------------ quantisation


def quant_config(model: Model, bits: int, int_bits: int | None = None, acc_bits=None,
                 acc_mode="final", acc_overflow="sat", rounding="rnd_conv", overflow="sat",
                 kernel="auto", weight_bits: int | None = None,
                 weight_int_bits: int | None = None) -> dict[str, dict]:
    """Per-layer Datapath dicts: activations in fix<bits, int_bits> (the paper's preset when
    ``int_bits`` is None), weights in the same format unless ``weight_bits`` (and
    ``weight_int_bits``, else the preset) say otherwise. A layer after an average pool of
    k = 2^s values gets s more fraction bits on its input, so the pool's exact sum reaches it
    unrounded."""
    fmt = paper_format(bits) if int_bits is None else QFormat(bits, int_bits)
    if weight_bits is None and weight_int_bits is not None:
        weight_bits = bits
    if weight_bits is None:
        weight_fmt = fmt
    elif weight_int_bits is None:
        weight_fmt = paper_format(weight_bits)
    else:
        weight_fmt = QFormat(weight_bits, weight_int_bits)
    config = {}
    for name, extra in _pool_bits(model.layers).items():
        dp = Datapath(_widened(fmt, extra), weight_fmt, out_fmt=fmt, acc_bits=acc_bits,
                      acc_mode=acc_mode, acc_overflow=acc_overflow, rounding=rounding,
                      overflow=overflow, kernel=kernel)
        config[name] = dp.to_dict()
    return config


def _pool_bits(layers) -> dict[str, int]:
    """Conv/linear layer name -> the fraction bits s an average pool of 2^s values right
    before it adds (0 if none), in layer order."""
    bits, extra = {}, 0
    for layer in layers:
        if isinstance(layer, AvgPool2d):
            extra = (layer.k * layer.k).bit_length() - 1
        elif isinstance(layer, PRUNABLE):
            bits[layer.name], extra = extra, 0
    return bits


def _widened(fmt: QFormat, extra: int) -> QFormat:
    """``fmt`` with ``extra`` more fraction bits, so a pool's exact sum passes unrounded."""
    return fmt if not extra else QFormat(min(64, fmt.bits + extra), fmt.int_bits)


def fold_batchnorm(model: Model) -> Model:
    """A model where each BatchNorm (running statistics) is folded into the conv before it."""
    layers, i = [], 0
    while i < len(model.layers):
        layer = model.layers[i]
        follower = model.layers[i + 1] if i + 1 < len(model.layers) else None
        if isinstance(layer, Conv2d) and isinstance(follower, BatchNorm2d):
            scale = _bn_scale(follower)
            fused = Conv2d(1, 1, 1, layer.stride, layer.padding, name=layer.name)
            fused.kernel = layer.kernel
            fused.params = {
                "weight": (layer.params["weight"] * scale[:, None, None, None]).astype(np.float32),
                "bias": (follower.params["beta"] - follower.buffers["mean"] * scale
                         + scale * layer.params.get("bias", 0.0)).astype(np.float32),
            }
            layers.append(fused)
            i += 2
            continue
        layers.append(layer)
        i += 1
    return Model(layers, model.input_shape, model.num_classes, model.arch)


def _identity_var(bn: BatchNorm2d) -> np.ndarray:
    return np.full_like(bn.buffers["var"], np.float32(1.0 - bn.eps))


def _bn_scale(bn: BatchNorm2d) -> np.ndarray:
    """gamma / sqrt(var + eps); exactly 1 for the identity BatchNorm :func:`export_float` writes,
    so that saving and loading a fine-tuned quantised CifarNet changes no weight bit."""
    gamma, var = bn.params["gamma"], bn.buffers["var"]
    if np.all(gamma == 1) and np.all(bn.buffers["mean"] == 0) and np.array_equal(
            var, _identity_var(bn)):
        return np.ones_like(gamma)
    return gamma / np.sqrt(var + bn.eps)


def quantize_model(model: Model, config: dict[str, dict], masks=None) -> Model:
    """The quantised twin of ``model``: BatchNorm folded, the input quantised into the first
    layer's activation format, every conv/linear layer running on the integer datapath."""
    masks = masks or {}
    folded = fold_batchnorm(model)
    names = {layer.name for layer in folded.layers if isinstance(layer, PRUNABLE)}
    missing = sorted(set(config) - names)
    if missing:
        raise FxsimError(f"quant config names layers the model lacks: {', '.join(missing)}")
    uncovered = sorted(names - set(config))
    if uncovered:
        raise FxsimError(f"quant config has no Datapath for: {', '.join(uncovered)}")
    first = next(layer.name for layer in folded.layers if isinstance(layer, PRUNABLE))
    first_dp = Datapath.from_dict(config[first])
    layers, inserted = [], False
    for layer in folded.layers:
        if not inserted and not isinstance(layer, Affine | Standardize):
            layers.append(QuantizeInput(first_dp.act_fmt, name="quantize_input"))
            inserted = True
        if isinstance(layer, Conv2d):
            layers.append(QuantConv2d(layer, Datapath.from_dict(config[layer.name]),
                                      masks.get(layer.name)))
        elif isinstance(layer, Linear):
            layers.append(QuantLinear(layer, Datapath.from_dict(config[layer.name]),
                                      masks.get(layer.name)))
        else:
            layers.append(layer)
    return Model(layers, model.input_shape, model.num_classes, model.arch)


def export_float(qmodel: Model, template: Model) -> Model:
    """The float model whose quantised twin is ``qmodel``: its (fine-tuned) shadow weights put
    back into ``template``'s architecture. A folded BatchNorm is stored as its conv's weights
    plus an identity BatchNorm carrying the folded bias (gamma 1, mean 0, var 1 - eps, beta)."""
    from copy import deepcopy

    out = deepcopy(template)
    trained = {layer.name: layer for layer in qmodel.layers if layer.params}
    for i, layer in enumerate(out.layers):
        if layer.name not in trained or not isinstance(layer, PRUNABLE):
            continue
        source = trained[layer.name].params
        layer.params["weight"] = source["weight"].astype(np.float32).copy()
        follower = out.layers[i + 1] if i + 1 < len(out.layers) else None
        if isinstance(follower, BatchNorm2d):
            follower.params["gamma"] = np.ones_like(follower.params["gamma"])
            follower.params["beta"] = source["bias"].astype(np.float32).copy()
            follower.buffers["mean"] = np.zeros_like(follower.buffers["mean"])
            follower.buffers["var"] = _identity_var(follower)
        elif "bias" in layer.params:
            layer.params["bias"] = source["bias"].astype(np.float32).copy()
    return out


OVERRIDABLE = ("acc_bits", "acc_mode", "acc_overflow", "rounding", "overflow", "kernel")


def with_overrides(config: dict[str, dict], **overrides) -> dict[str, dict]:
    """A copy of a quant config with some Datapath fields replaced in every layer (what-if runs:
    another accumulator width or mode, rounding, kernel). None leaves a field as it is."""
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise FxsimError(f"cannot override {', '.join(sorted(unknown))}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    out = {name: {**dp, **changes} for name, dp in config.items()}
    for dp in out.values():
        Datapath.from_dict(dp)  # validate now, naming the problem (e.g. acc_bits too small)
    return out


def simulate(model: Model, images, labels, batch_size: int = 500) -> dict:
    """Bit-accurate accuracy of a (quantised) model and what every integer layer counted."""
    logits, counters, input_saturations = model.run(images, batch_size)
    accuracy = float((logits.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")
    layers = {}
    for name, c in counters.items():
        row = c.to_dict()
        row["paths"] = dict(c.paths)
        layers[name] = row
    return {"images": len(images), "accuracy": accuracy,
            "input_saturations": int(input_saturations), "layers": layers}


# ------------------------------------------------------------------------------ dynamic surgery


def dns_update(weights: np.ndarray, previous: np.ndarray | None, alpha: float) -> np.ndarray:
    """Guo et al.'s rule for one layer: with t = mean|W| + alpha * std|W|, keep a weight above
    1.1 t, drop one below 0.9 t, and leave one in between as it was (hysteresis). Without a
    previous mask the threshold is t itself."""
    magnitude = np.abs(weights)
    t = magnitude.mean() + alpha * magnitude.std()
    if previous is None:
        return magnitude > t
    return (previous | (magnitude > 1.1 * t)) & (magnitude > 0.9 * t)


def _search_alpha(weights: list, previous: list, target: int) -> list[np.ndarray]:
    """Bisect one alpha so that the masks ``dns_update`` gives keep ``target`` weights in all
    of ``weights`` together (the kept count falls as alpha grows)."""
    stats = [(np.abs(w).mean(), np.abs(w).std() or 1.0) for w in weights]
    lo = min(-m / s for m, s in stats) - 1.0  # every threshold below 0: all kept
    # every 0.9 t above the largest |w|: nothing kept
    hi = max((np.abs(w).max() / 0.9 - m) / s for w, (m, s) in zip(weights, stats, strict=True))
    hi += 1.0
    best = None
    for _ in range(60):
        mid = (lo + hi) / 2
        masks = [dns_update(w, p, mid) for w, p in zip(weights, previous, strict=True)]
        kept = sum(int(m.sum()) for m in masks)
        if best is None or abs(kept - target) < abs(best[0] - target):
            best = (kept, masks)
        if kept == target:
            break
        lo, hi = (mid, hi) if kept > target else (lo, mid)
    return best[1]


def dns_masks(weights: dict, density: float, scope: str, previous=None) -> dict:
    """Masks from the DNS rule with alpha searched to land on ``density`` (per layer, or one
    alpha over all prunable layers)."""
    names = list(weights)
    prev = [None if previous is None else previous[n] for n in names]
    if scope == "global":
        total = sum(weights[n].size for n in names)
        masks = _search_alpha([weights[n] for n in names], prev, round(density * total))
        return dict(zip(names, masks, strict=True))
    return {n: _search_alpha([weights[n]], [p], round(density * weights[n].size))[0]
            for n, p in zip(names, prev, strict=True)}


def dns_prune(model: Model, images, labels, density: float, config, scope: str = "layer",
              interval: int = 50, progress=None, checkpoint=None) -> tuple[dict, list]:
    """Dynamic network surgery (Guo et al. 2016): train with the forward pass using W * mask
    while every weight keeps learning, so pruned weights can come back; every ``interval``
    batches the masks are updated by the hysteresis rule, alpha searched to hold ``density``.
    The last epoch keeps the masks fixed (plain fine-tuning). The model ends up with the pruned
    weights zeroed. Returns (masks, epoch history). ``checkpoint``: as in
    :func:`fxsim.train.train`, the masks kept with the rest."""
    import time

    from fxsim.train import resume, run_id, save_checkpoint, sgd_step

    if not 0.0 < density <= 1.0:
        raise FxsimError(f"density must be in (0, 1], got {density}")
    names = prunable_layers(model)
    if not names:
        raise FxsimError(f"{model.arch} has no prunable (conv or linear) layers")
    dense = {n: model.layer(n).params["weight"] for n in names}  # updated in place by SGD
    masks = dns_masks(dense, density, scope)
    rng = np.random.default_rng(config.seed)
    params = model.parameters()
    velocity = {name: np.zeros_like(p) for name, p in params.items()}
    n = len(images)
    batches = -(-n // config.batch_size)
    run = None if checkpoint is None else run_id(model, images, labels, config, {}, None,
                                                 ("dns", density, scope, interval))
    history, extra = resume(checkpoint, run, model, velocity, rng, config.epochs, progress)
    masks = extra.get("masks", masks)
    step = len(history) * batches  # mask updates fall every `interval` steps of the whole run
    for epoch in range(len(history), config.epochs):
        lr, order, loss_sum, correct = config.lr_at(epoch), rng.permutation(n), 0.0, 0
        start = time.perf_counter()
        surgery = epoch < config.epochs - 1 or config.epochs == 1
        for b in range(batches):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            for name in names:  # forward and backward see the pruned weights
                model.layer(name).params["weight"] = dense[name] * masks[name]
            loss, grads, logits = model.loss_grads_logits(images[idx], labels[idx], rng)
            correct += int((logits.argmax(axis=1) == labels[idx]).sum())
            for name in names:  # ... but every weight is updated
                model.layer(name).params["weight"] = dense[name]
            sgd_step(params, grads, velocity, lr, config)
            loss_sum += loss * len(idx)
            step += 1
            if surgery and step % interval == 0:
                masks = dns_masks(dense, density, scope, masks)
            if progress:
                progress({"epoch": epoch, "batch": b + 1, "batches": batches, "loss": loss})
        record = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / n, "train_acc": correct / n,
                  "seconds": time.perf_counter() - start}
        history.append(record)
        save_checkpoint(checkpoint, run, model, velocity, rng, history, {"masks": masks})
        if progress:
            progress(record)
    apply_masks(model, masks)
    return masks, history


# ------------------------------------------------------------------------------ dynamic fixed point


def fewest_int_bits(values: np.ndarray, bits: int, max_overflow: float) -> int:
    """The fewest integer bits (sign included) for which at most a fraction ``max_overflow``
    of ``values`` falls outside fix<bits, int_bits>'s range. More integer bits never overflow
    more, so the first one that passes is the answer."""
    flat = np.abs(np.asarray(values, np.float64).ravel())
    if flat.size == 0:
        return 1
    for int_bits in range(-bits + 1, 65):
        fmt = QFormat(bits, int_bits)
        over = np.count_nonzero((flat > fmt.max_value) | (-flat < fmt.min_value))
        if over <= max_overflow * flat.size:
            return int_bits
    raise FxsimError(f"no fix<{bits}, I> format holds these values")


def auto_quant_config(model: Model, bits: int, calibration: np.ndarray,
                      max_overflow: float = 1e-3, **datapath_options) -> dict[str, dict]:
    """Dynamic fixed point: per layer, weights get the fewest integer bits whose overflow rate
    stays under ``max_overflow``, and so does each conv/linear output on the calibration
    images (float model, evaluation mode). A layer's input format is the previous layer's
    output format (the model input's for the first), so activations pass between layers on
    the grid they were produced on."""
    folded = fold_batchnorm(model)
    outputs, weights = {}, {}
    value = np.asarray(calibration, np.float32)
    input_values = None
    for layer in folded.layers:
        if isinstance(layer, PRUNABLE) and input_values is None:
            input_values = value
        value, _ = layer.forward(value)
        if isinstance(layer, PRUNABLE):
            outputs[layer.name] = value
            weights[layer.name] = layer.params["weight"]
    if input_values is None:
        raise FxsimError(f"{model.arch} has no conv or linear layers to quantise")
    act = QFormat(bits, fewest_int_bits(input_values, bits, max_overflow))
    config = {}
    for name, extra in _pool_bits(folded.layers).items():
        weight_fmt = QFormat(bits, fewest_int_bits(weights[name], bits, max_overflow))
        out = QFormat(bits, fewest_int_bits(outputs[name], bits, max_overflow))
        config[name] = Datapath(_widened(act, extra), weight_fmt, out_fmt=out,
                                **datapath_options).to_dict()
        act = out
    return config


def runnable(model: Model, info: dict) -> Model:
    """The model a file describes, ready to run: its quantised twin (integer datapath, masks
    applied) when it has a quant config, the float model otherwise."""
    if info.get("quant"):
        return quantize_model(model, info["quant"], info.get("masks"))
    if info.get("masks"):
        apply_masks(model, info["masks"])
    return model


# ------------------------------------------------------------------------------ pipelines


def prune_model(model: Model, density: float, method: str = "magnitude", scope: str = "layer",
                train_data=None, config=None, progress=None,
                checkpoint=None) -> tuple[dict, list]:
    """Prune ``model`` in place to ``density`` and fine-tune it on ``train_data`` (images,
    labels) with ``config`` (a TrainConfig; None or no data: no fine-tuning). ``method``:
    "magnitude" (prune once, then train with the masks fixed) or "dns" (dynamic network
    surgery while training; needs data). Returns (masks, epoch history). ``checkpoint``: see
    :func:`fxsim.train.train`."""
    from fxsim.train import train

    if method not in ("magnitude", "dns"):
        raise FxsimError(f"pruning method must be 'magnitude' or 'dns', got {method!r}")
    if method == "dns":
        if train_data is None or config is None:
            raise FxsimError("dns prunes while training: give it training data and epochs >= 1")
        return dns_prune(model, *train_data, density, config, scope, progress=progress,
                         checkpoint=checkpoint)
    masks = magnitude_masks(model, density, scope=scope)
    apply_masks(model, masks)
    if train_data is None or config is None:
        return masks, []
    return masks, train(model, *train_data, config, progress=progress, masks=masks,
                        checkpoint=checkpoint)


def quantize_finetune(model: Model, bits: int, int_bits=None, masks=None, train_data=None,
                      config=None, calibration=None, max_overflow: float = 1e-3,
                      progress=None, checkpoint=None,
                      **datapath_options) -> tuple[Model, dict, list]:
    """Quantise ``model`` to ``bits`` (``int_bits``: None = the paper's preset, an integer, or
    "auto" = dynamic fixed point calibrated on ``calibration`` images) and fine-tune the
    quantised twin through the integer datapath (clipped STE) when ``train_data`` and
    ``config`` are given. Returns (quantised model, quant config, epoch history); the
    float model to store is ``export_float(quantised, model)``. ``checkpoint``: see
    :func:`fxsim.train.train`."""
    from fxsim.train import train

    if int_bits == "auto":
        if calibration is None:
            raise FxsimError("int_bits 'auto' needs calibration images")
        quant = auto_quant_config(model, bits, calibration, max_overflow, **datapath_options)
    else:
        quant = quant_config(model, bits, int_bits, **datapath_options)
    qmodel = quantize_model(model, quant, masks)
    if train_data is None or config is None:
        return qmodel, quant, []
    return qmodel, quant, train(qmodel, *train_data, config, progress=progress, masks=masks,
                                checkpoint=checkpoint)
