"""SGD with momentum and weight decay, step learning-rate decay, seeded and deterministic.

The same seed gives the same bits: one generator drives both the shuffling and dropout, and
every operation runs in a fixed order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from numba import njit, prange

from fxsim.errors import FxsimError


@dataclass(frozen=True)
class TrainConfig:
    """epochs; batch_size; lr: initial learning rate; momentum; weight_decay (L2 on weights,
    not on biases or BatchNorm parameters); lr_decays: fractions of the run after which the
    learning rate drops by 10x (the paper: three decays from 0.01); seed."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decays: tuple = (0.5, 0.75, 0.9)
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise FxsimError(f"epochs and batch size must be >= 1, got {self.epochs}, "
                             f"{self.batch_size}")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            raise FxsimError(f"need lr > 0, 0 <= momentum < 1 and weight_decay >= 0, got lr "
                             f"{self.lr}, momentum {self.momentum}, weight_decay "
                             f"{self.weight_decay}")
        _check_seed(self.seed)

    def lr_at(self, epoch: int) -> float:
        """Learning rate during ``epoch`` (0-based)."""
        drops = sum(epoch >= round(f * self.epochs) for f in self.lr_decays if f * self.epochs >= 1)
        return self.lr * 0.1**drops

    def to_dict(self) -> dict:
        return asdict(self)


def finetune_config(epochs: int, lr: float, seed: int) -> TrainConfig | None:
    """How fxsim fine-tunes a compressed model: ``epochs`` at a constant ``lr``, batches of
    64; None for 0 epochs (no fine-tuning)."""
    if not lr > 0:  # checked without fine-tuning too: a bad value is a mistake either way
        raise FxsimError(f"the fine-tuning learning rate must be > 0, got {lr}")
    _check_seed(seed)
    if epochs == 0:
        return None
    return TrainConfig(epochs, 64, lr, seed=seed, lr_decays=())


def _check_seed(seed) -> None:
    """NumPy's generators take seeds >= 0 only."""
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise FxsimError(f"seed must be an integer >= 0, got {seed!r}")


def _decays(name: str) -> bool:
    return name.endswith(".weight")


def sgd_step(params, grads, velocity, lr: float, config: TrainConfig, keep=None) -> None:
    """One SGD-with-momentum update in place; weight decay on weights only; ``keep`` (name ->
    mask) holds pruned weights at zero."""
    for name, p in params.items():
        g, v = grads[name], velocity[name]
        decay = config.weight_decay if _decays(name) else 0.0
        mask = keep.get(name) if keep else None
        if p.dtype == g.dtype == v.dtype and p.dtype.kind == "f" and all(
                a.flags.c_contiguous for a in (p, g, v)):
            t = p.dtype.type
            _sgd_update(p.reshape(-1), g.reshape(-1), v.reshape(-1), t(lr), t(config.momentum),
                        t(decay), np.ones(0, bool) if mask is None else
                        np.ascontiguousarray(mask, bool).reshape(-1))
            continue
        if decay:
            g = g + decay * p
        v *= config.momentum
        v -= lr * g
        if mask is not None:
            v *= mask
        p += v


@njit(cache=True, parallel=True)
def _sgd_update(p, g, v, lr, momentum, decay, mask):
    """:func:`sgd_step` for one parameter in one pass (numpy made six over LeNet5's 431,080
    parameters: 0.25 -> 0.07 ms a step). The same operations in the same order and precision
    as the numpy expressions (no fused multiply-add), so the same bits; ``mask`` (bool) empty
    for none."""
    one, zero = p.dtype.type(1), p.dtype.type(0)
    for i in prange(p.size):
        step = g[i] + decay * p[i] if decay else g[i]
        vi = v[i] * momentum - lr * step
        if mask.size:  # numpy's multiply by the mask as 1.0 / 0.0: -0.0, NaN as it made them
            vi = vi * (one if mask[i] else zero)
        v[i] = vi
        p[i] += vi


def evaluate(model, images, labels, batch_size: int = 1000) -> float:
    """Top-1 accuracy in evaluation mode."""
    if len(images) == 0:
        return float("nan")
    return float((model.predict(images, batch_size) == labels).mean())


def train(model, images, labels, config: TrainConfig, test=None,
          progress: Callable[[dict], None] | None = None, masks=None,
          checkpoint=None) -> list[dict]:
    """Train ``model`` in place; return one record per epoch (loss, accuracies, lr, seconds).

    ``masks`` (layer name -> boolean array of its weight's shape) keeps pruned weights at
    exactly zero: their gradient and momentum are dropped after every step.

    ``test`` is an optional (images, labels) pair evaluated after each epoch. ``progress`` is
    called after every batch with {"epoch", "batch", "batches", "loss"} and after every epoch
    with the epoch's record (which has "test_acc").

    ``checkpoint``: a file path. After every epoch the run's whole state (parameters, buffers,
    momentum, the random generator, the records so far) is written there, atomically. A run
    that finds there a checkpoint of the same run (same settings, layers, starting weights,
    masks and data: :func:`run_id`) continues after its last epoch, with the bits it would
    have had uninterrupted; its finished epochs' records go to ``progress`` again, with
    "resumed": True. Another run's checkpoint is replaced. The caller deletes the file once
    the result is saved.
    """
    import time

    if len(images) != len(labels) or len(images) == 0:
        raise FxsimError(f"need as many labels as images, got {len(images)} and {len(labels)}")
    rng = np.random.default_rng(config.seed)
    params = model.parameters()
    velocity = {name: np.zeros_like(p) for name, p in params.items()}
    keep = {f"{layer}.weight": mask for layer, mask in (masks or {}).items()}
    for name, mask in keep.items():
        params[name] *= mask
    n = len(images)
    batches = -(-n // config.batch_size)
    run = None if checkpoint is None else run_id(model, images, labels, config, keep, test)
    history, _ = resume(checkpoint, run, model, velocity, rng, config.epochs, progress)
    for epoch in range(len(history), config.epochs):
        start = time.perf_counter()
        lr = config.lr_at(epoch)
        order = rng.permutation(n)
        loss_sum = 0.0
        correct = 0
        for b in range(batches):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            x, y = images[idx], labels[idx]
            loss, grads, logits = model.loss_grads_logits(x, y, rng)
            loss_sum += loss * len(idx)
            correct += int((logits.argmax(axis=1) == y).sum())
            sgd_step(params, grads, velocity, lr, config, keep)
            if progress:
                progress({"epoch": epoch, "batch": b + 1, "batches": batches, "loss": loss})
        record = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / n, "train_acc": correct / n,
                  "seconds": time.perf_counter() - start}
        if test is not None:
            record["test_acc"] = evaluate(model, *test)
        history.append(record)
        save_checkpoint(checkpoint, run, model, velocity, rng, history)
        if progress:
            progress(record)
    return history


def resume(checkpoint, run: str | None, model, velocity: dict, rng, epochs: int,
           progress=None) -> tuple[list[dict], dict]:
    """The start of a training loop that keeps ``checkpoint`` (None: none): where the file
    holds run ``run``, its parameters, buffers and momentum are put back, ``rng`` takes its
    state, and its records go to ``progress`` with "resumed": True. Returns (the finished
    epochs' records, the checkpoint's other array groups); ([], {}) to start afresh."""
    from fxsim import store

    state = None if checkpoint is None else store.load_checkpoint(checkpoint, run)
    if state is None:
        return [], {}
    arrays = state["arrays"]
    _restore(model, velocity, arrays)
    rng.bit_generator.state = state["rng_state"]
    history = state["history"][:epochs]
    for record in history if progress else ():
        progress({**record, "resumed": True})
    extra = {k: v for k, v in arrays.items() if k not in ("params", "buffers", "velocity")}
    return history, extra


def save_checkpoint(checkpoint, run: str | None, model, velocity: dict, rng,
                    history: list[dict], extra: dict | None = None) -> None:
    """The end of an epoch of a training loop that keeps ``checkpoint`` (None: nothing to
    do): the model's parameters and buffers, the momentum, ``rng``'s state, the records and
    ``extra`` array groups (name -> (name -> array)), written atomically."""
    from fxsim import store

    if checkpoint is not None:
        store.save_checkpoint(checkpoint, run, {"params": model.parameters(),
                                                "buffers": _buffers(model),
                                                "velocity": velocity, **(extra or {})},
                              rng.bit_generator.state, history)


def _buffers(model) -> dict[str, np.ndarray]:
    """``"layer.buffer"`` -> array: the state a model keeps besides its parameters (BatchNorm's
    running statistics)."""
    return {f"{layer.name}.{k}": v for layer in model.layers for k, v in layer.buffers.items()}


def _restore(model, velocity: dict, arrays: dict) -> None:
    """Put a checkpoint's arrays back: parameters and momentum in place (the training loop
    holds them), buffers by assignment (BatchNorm replaces its own)."""
    params = model.parameters()
    for name, value in arrays["params"].items():
        params[name][...] = value
    for name, value in arrays["velocity"].items():
        velocity[name][...] = value
    for layer in model.layers:
        for k in layer.buffers:
            layer.buffers[k] = arrays["buffers"][f"{layer.name}.{k}"]


def run_id(model, images, labels, config: TrainConfig, keep: dict, test=None,
           method=("train",)) -> str:
    """A digest of everything a training run's bits depend on: the settings, every layer's
    type and settings (a quantised layer's datapath too), the starting parameters and
    buffers, the masks, the training images and labels, the test set its records score, and
    ``method``, what the loop does besides (DNS: its density, scope and interval). Two runs
    with the same digest compute the same thing, so one may continue the other."""
    import hashlib
    import json

    digest = hashlib.blake2b(digest_size=16)

    def add(value) -> None:
        if isinstance(value, np.ndarray):
            digest.update(f"{value.dtype}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).data)
        else:
            digest.update(repr(value).encode())

    add(json.dumps(config.to_dict(), sort_keys=True))
    add(method)
    for layer in model.layers:
        add(type(layer).__name__)
        for key, value in sorted(vars(layer).items()):
            if key.startswith("_"):  # caches
                continue
            for name, item in sorted(value.items()) if isinstance(value, dict) else [(key, value)]:
                add(name)
                add(item)
    for name, mask in sorted(keep.items()):
        add(name)
        add(np.asarray(mask, bool))
    for array in (images, labels, *(test or ())):
        add(np.asarray(array))
    return digest.hexdigest()
