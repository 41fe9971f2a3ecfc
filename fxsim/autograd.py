"""The thin reverse-mode layer: a forward pass records a tape, the backward pass replays it.

No graph, no operator overloading: a model is a sequence of layers, each of which knows its
own backward (:mod:`fxsim.layers`). The tape is the list of (layer, ctx) pairs the forward pass
produced; the backward pass walks it in reverse, handing each layer the gradient of its output
and collecting parameter gradients as ``"layer.param"``.
"""

from __future__ import annotations

import numpy as np


def forward(layers, x, train=False, rng=None):
    """Run ``layers`` on ``x``; return (output, tape)."""
    tape = []
    for layer in layers:
        x, ctx = layer.forward(x, train=train, rng=rng)
        tape.append((layer, ctx))
    return x, tape


def backward(tape, dy, input_grad=True, param_grads=True):
    """Replay ``tape`` backwards from ``dy`` = dLoss/dOutput; return (dLoss/dInput, grads).

    With ``input_grad=False`` (training) a layer is not asked for the gradient of its input
    when no earlier layer has parameters (it would only reach the images), and the first
    return value is None. With ``param_grads=False`` (attacks) no parameter gradient is
    computed and the dict is empty.
    """
    grads = {}
    # needed[i]: does anything before layer i want a gradient?
    needed, wanted = [], input_grad
    for layer, _ in tape:
        needed.append(wanted)
        wanted = wanted or (param_grads and bool(layer.params))
    for (layer, ctx), need_dx in zip(reversed(tape), reversed(needed), strict=True):
        dy, layer_grads = layer.backward(dy, ctx, need_dx, param_grads)
        for name, g in layer_grads.items():
            grads[f"{layer.name}.{name}"] = g
        if not need_dx:
            return None, grads
    return dy, grads


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray):
    """Per-sample cross-entropy (N,) and its gradient dLoss_i/dlogits_i (N, classes)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    n = logits.shape[0]
    loss = -log_p[np.arange(n), labels]
    grad = np.exp(log_p)
    grad[np.arange(n), labels] -= 1.0
    return loss, grad
