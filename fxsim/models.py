"""Sequential models and the paper's two networks, LeNet5 and CifarNet.

Attacks work in pixel space: images in [0, 1] go in, and the input mapping (LeNet5's 2x - 1,
CifarNet's per-image standardisation) is a layer of the model, so gradients reach the pixels.
"""

from __future__ import annotations

import numpy as np

from fxsim import autograd
from fxsim.errors import FxsimError, ShapeError
from fxsim.layers import (
    Affine,
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Standardize,
)

# The most bytes of im2col columns one forward pass of :meth:`Model.run` or :meth:`Model.predict`
# may build in a layer; larger batches go in chunks. Past glibc's kept-heap threshold (256 MB,
# fxsim/_runtime.py) every chunk's columns are page-faulted in afresh, and past the caches they
# are slow to write and read anyway. CifarNet's conv1 builds 2 MB of columns an image: on 2
# cores, 1,000 images took 9.75 s to predict at batch 1,000 and 2.84 s at 64; a 16-bit CifarNet
# ran 500 images in 3.38 s at batch 500, 1.42 s at 64. LeNet5's largest are 128 KB an image, so
# its batches of 1,000 stay whole (10,000 images: 0.67 s at 1,000, 0.99 s at 64).
CHUNK_BYTES = 128 << 20


class Model:
    """A sequence of layers with a fixed input shape (C, H, W) and a number of classes."""

    def __init__(self, layers, input_shape, num_classes, arch="custom"):
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise FxsimError(f"layer names must be unique, got {names}")
        self.layers = list(layers)
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)
        self.arch = arch
        self._column_bytes = None  # see _chunk

    # ------------------------------------------------------------------ parameters

    def parameters(self) -> dict[str, np.ndarray]:
        """``"layer.param"`` -> array (the arrays themselves: updating them updates the model)."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.params.items()}

    def num_parameters(self) -> int:
        return int(sum(v.size for v in self.parameters().values()))

    def layer(self, name: str):
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise FxsimError(f"model has no layer {name!r}")

    # ------------------------------------------------------------------ running

    def _check_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != self.input_shape:
            raise ShapeError(
                f"{self.arch} expects images of shape (N, {', '.join(map(str, self.input_shape))}),"
                f" got {x.shape}"
            )
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        return x

    def forward(self, x, train=False, rng=None):
        """Logits (N, classes) for images x (N, C, H, W) in [0, 1]."""
        return autograd.forward(self.layers, self._check_input(x), train, rng)[0]

    def layer_outputs(self, x, names) -> dict[str, np.ndarray]:
        """The outputs of the layers called ``names`` for images x (N, C, H, W) in [0, 1], in
        evaluation mode, from one forward pass: layer name -> array (N, ...)."""
        x = self._check_input(x)
        wanted, outputs = set(names), {}
        for layer in self.layers:
            x, _ = layer.forward(x, False)
            if layer.name in wanted:
                outputs[layer.name] = x
        return outputs

    def _chunk(self, batch_size: int) -> int:
        """Images per forward pass of :meth:`run` and :meth:`predict`: ``batch_size``, or
        fewer where the largest im2col matrix of a layer would pass :data:`CHUNK_BYTES`."""
        if self._column_bytes is None:
            self._column_bytes = self._probe_column_bytes()
        return max(1, min(batch_size, CHUNK_BYTES // max(1, self._column_bytes)))

    def _probe_column_bytes(self) -> int:
        """Bytes of the largest im2col matrix (float32) a convolution builds for one image:
        one forward pass of a blank image, layer by layer."""
        x = np.zeros((1, *self.input_shape), np.float32)
        worst = 0
        for layer in self.layers:
            y, _ = layer.forward(x)
            w = layer.params.get("weight")
            if w is not None and w.ndim == 4 and y.ndim == 4:
                worst = max(worst, w[0].size * y.shape[2] * y.shape[3] * 4)
            x = y
        return worst

    def run(self, x, batch_size=1000):
        """Logits of all images, batch by batch, with what the integer layers counted:
        returns (logits, {layer name: Counters}, input saturations)."""
        x = self._check_input(x)
        logits, counters, input_saturations = [], {}, 0
        batch_size = self._chunk(batch_size) if len(x) else batch_size
        for i in range(0, len(x), batch_size):
            out, tape = autograd.forward(self.layers, x[i : i + batch_size], False)
            logits.append(out)
            for layer, ctx in tape:
                if isinstance(ctx, dict) and "counters" in ctx:
                    previous = counters.get(layer.name)
                    counters[layer.name] = ctx["counters"] if previous is None else (
                        previous + ctx["counters"])
                elif isinstance(ctx, dict) and "saturations" in ctx:
                    input_saturations += ctx["saturations"]
        width = logits[0].shape[1] if logits else self.num_classes
        return (np.concatenate(logits) if logits else np.zeros((0, width)), counters,
                input_saturations)

    def predict(self, x, batch_size=1000) -> np.ndarray:
        """Predicted class per image, in batches."""
        x = self._check_input(x)
        batch_size = self._chunk(batch_size) if len(x) else batch_size
        return np.concatenate([self.forward(x[i : i + batch_size]).argmax(axis=1)
                               for i in range(0, len(x), batch_size)] or [np.zeros(0, int)])

    def loss_and_grads(self, x, labels, train=True, rng=None):
        """Mean cross-entropy over the batch and its gradient for every parameter.

        ``train`` runs dropout, drawing its masks from ``rng`` (default: a generator seeded
        with 0, so that the same call gives the same bits)."""
        loss, grads, _ = self.loss_grads_logits(x, labels, rng, train)
        return loss, grads

    def loss_grads_logits(self, x, labels, rng=None, train=True):
        """:meth:`loss_and_grads` plus the logits, for a trainer that reports accuracy."""
        x = self._check_input(x)
        if len(x) == 0:  # a mean loss over no images is undefined; BatchNorm stats would be NaN
            raise FxsimError("a loss needs at least one image (got an empty batch)")
        labels = self._check_labels(labels, len(x))
        if train and rng is None:
            rng = np.random.default_rng(0)
        logits, tape = autograd.forward(self.layers, x, train, rng)
        loss, dlogits = autograd.softmax_cross_entropy(logits, labels)
        _, grads = autograd.backward(tape, dlogits / len(x), input_grad=False)
        return float(loss.mean()), grads, logits

    def input_gradient(self, x, labels=None, logit=None):
        """Gradient w.r.t. the images of each sample's own cross-entropy (``labels``) or of one
        chosen logit per sample (``logit``: (N,) class indices). Evaluation mode, so a sample's
        gradient does not depend on the batch it is in. Returns (gradient, logits)."""
        x = self._check_input(x)
        logits, tape = autograd.forward(self.layers, x, False)
        if (labels is None) == (logit is None):
            raise FxsimError("input_gradient needs exactly one of labels or logit")
        if labels is not None:
            _, dlogits = autograd.softmax_cross_entropy(logits, self._check_labels(labels, len(x)))
        else:
            dlogits = np.zeros_like(logits)
            dlogits[np.arange(len(x)), self._check_labels(logit, len(x))] = 1.0
        dx, _ = autograd.backward(tape, dlogits.astype(logits.dtype), param_grads=False)
        return dx, logits

    def logit_gradients(self, x, classes):
        """Gradients w.r.t. the images of several chosen logits per sample, from one forward
        pass: ``classes`` (N, K) class indices -> (gradients (N, K, *input shape), logits).
        Gradient [:, k] is what :meth:`input_gradient` gives for ``logit=classes[:, k]``, bit
        for bit: the same forward tape, replayed K times (a layer's backward reads its part of
        the tape and at most adds to it what the next replay can reuse). DeepFool needs ten of
        them per step; one forward instead of ten is what it saves, most on the integer
        datapath of a quantised model."""
        x = self._check_input(x)
        classes = np.asarray(classes)
        if classes.ndim != 2 or classes.shape[0] != len(x):
            raise ShapeError(f"classes must be ({len(x)}, K) class indices, got shape "
                             f"{classes.shape}")
        picks = [self._check_labels(classes[:, k], len(x)) for k in range(classes.shape[1])]
        logits, tape = autograd.forward(self.layers, x, False)
        grads = []
        for pick in picks:
            dlogits = np.zeros_like(logits)
            dlogits[np.arange(len(x)), pick] = 1.0
            grads.append(autograd.backward(tape, dlogits, param_grads=False)[0])
        if not grads:
            return np.empty((len(x), 0, *x.shape[1:]), x.dtype), logits
        return np.stack(grads, axis=1), logits

    def _check_labels(self, labels, n) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise ShapeError(f"labels must be {n} integers, got shape {labels.shape} "
                             f"dtype {labels.dtype}")
        if n and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0]
            raise ShapeError(f"label {bad} is outside 0..{self.num_classes - 1}")
        return labels


def lenet5(num_classes=10, seed=0) -> Model:
    """LeNet5 as the paper's tool defined it: 431,080 parameters for 28x28 grey images."""
    rng = np.random.default_rng(seed)
    layers = [
        Affine(2.0, -1.0, name="input"),
        Conv2d(1, 20, 5, name="conv1", rng=rng), ReLU(name="relu1"), MaxPool2d(2, name="pool1"),
        Conv2d(20, 50, 5, name="conv2", rng=rng), ReLU(name="relu2"), MaxPool2d(2, name="pool2"),
        Flatten(name="flatten"), Dropout(0.5, name="dropout"),
        Linear(800, 500, name="fc1", rng=rng), ReLU(name="relu3"),
        Linear(500, num_classes, name="fc2", rng=rng),
    ]  # fmt: skip
    return Model(layers, (1, 28, 28), num_classes, arch="lenet5")


def cifarnet(num_classes=10, seed=0) -> Model:
    """CifarNet: eight 3x3 convolutions with BatchNorm + ReLU, average pool, 1x1 logits."""
    rng = np.random.default_rng(seed)
    plan = [  # (out channels, stride, padding)
        (64, 1, 0), (64, 1, 1), (128, 2, 1), (128, 1, 1), (128, 1, 1), (192, 2, 1), (192, 1, 1),
        (192, 1, 1),
    ]  # fmt: skip
    layers = [Standardize(name="input")]
    channels = 3
    for i, (out, stride, pad) in enumerate(plan):
        layers += [
            Conv2d(channels, out, 3, stride, pad, bias=False, name=f"conv{i}", rng=rng),
            BatchNorm2d(out, name=f"bn{i}"),
            ReLU(name=f"relu{i}"),
        ]
        if i in (3, 6):
            layers.append(Dropout(0.5, name=f"dropout{i}"))
        channels = out
    layers += [AvgPool2d(8, name="pool"), Conv2d(channels, num_classes, 1, name="logits", rng=rng),
               Flatten(name="flatten")]
    return Model(layers, (3, 32, 32), num_classes, arch="cifarnet")


ARCHITECTURES = {"lenet5": lenet5, "cifarnet": cifarnet}
