"""Quantised layers: the forward pass is the accelerator's integer datapath, the backward pass
is the float gradient passed straight through the quantisers (clipped STE).

A :class:`QuantConv2d` / :class:`QuantLinear` keeps float "shadow" weights (what training
updates) and, per forward call, quantises them into the Datapath's weight format, runs the
integer kernel on the input codes, and hands back the dequantised outputs: values exactly on
the output grid, the numbers the hardware produces. Backward evaluates the float layer's
gradient at the quantised weights, zeroes it where an output saturated and where a weight was
clipped by its format, and passes it on. Counters of every call are in the ctx.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fxsim.datapath import Datapath, PreparedWeights
from fxsim.fixedpoint import (
    QFormat,
    code_dtype,
    codes_on_grid,
    dequantize,
    quantize,
    quantize_with_count,
    values,
)
from fxsim.kernels.dense import unsaturated_gradient
from fxsim.layers import Layer, conv2d_gradients, conv_columns, linear_gradients


def _value_dtype(fmt: QFormat):
    """float32 holds every value of a format of at most 24 bits exactly; wider ones need 64."""
    return np.float32 if fmt.bits <= 24 else np.float64


class QuantizeInput(Layer):
    """Quantise activations into a format (the model input); the STE passes gradients through,
    zeroed where a value saturated."""

    kind = "quantize"

    def __init__(self, fmt: QFormat, rounding="rnd_conv", overflow="sat", name=None):
        super().__init__(name)
        self.fmt, self.rounding, self.overflow = fmt, rounding, overflow

    def forward(self, x, train=False, rng=None):
        codes, overflowed = quantize_with_count(x, self.fmt, self.rounding, self.overflow)
        clipped = (x > self.fmt.max_value) | (x < self.fmt.min_value)  # no gradient there
        y = values(codes, self.fmt, _value_dtype(self.fmt))
        return y, {"clipped": clipped, "saturations": overflowed}

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        return np.where(ctx["clipped"], 0, dy).astype(dy.dtype, copy=False), {}


class _QuantMixin:
    """Shared by QuantConv2d and QuantLinear: weights -> codes, the kernel, the STE masks."""

    datapath: Datapath
    mask: np.ndarray | None

    def _prepare(self, train: bool = False) -> tuple[PreparedWeights, np.ndarray]:
        """Weight and bias codes, prepared for the kernel. Reused while the float weights are
        unchanged (checked exactly: comparing is much cheaper than quantising again).

        In training, ``kernel="auto"`` means the dense kernel: every step changes the weights,
        so prepared weights serve one forward pass, and the zero-skipping schedule cost more
        than it saves (a 4-bit LeNet5 step, 90 % of its weights 0: 11 ms of 29 building it).
        Both kernels give the same bits; only the counters' kernel path differs."""
        dp = self.datapath
        if train and dp.kernel == "auto":
            dp = replace(dp, kernel="dense")
        cached = getattr(self, "_cache", None)
        if cached is not None and cached[3] == dp.kernel and all(
            np.array_equal(cached[0][k], v) for k, v in self.params.items()
        ):
            return cached[1], cached[2]
        w = self.params["weight"]
        if self.mask is not None:
            w = np.where(self.mask, w, 0)
        w_codes = quantize(w, dp.weight_fmt, dp.rounding)
        bias_codes = None
        if "bias" in self.params:
            bias_codes = quantize(self.params["bias"], dp.bias_format, dp.rounding)
        clipped = (w > dp.weight_fmt.max_value) | (w < dp.weight_fmt.min_value)
        prepared = PreparedWeights(w_codes, bias_codes, dp, self.mask)
        self._cache = ({k: v.copy() for k, v in self.params.items()}, prepared, clipped,
                       dp.kernel)
        return prepared, clipped

    def weight_values(self) -> np.ndarray:
        """The weights the datapath multiplies by: the values of the weight codes (pruned
        weights 0), float64 (exact for codes of up to 53 bits)."""
        prepared, _ = self._prepare()
        return dequantize(prepared.weights, self.datapath.weight_fmt)

    def _input_codes(self, x):
        # Inputs come from a quantised layer or QuantizeInput, so they are normally on the grid
        # and need no rounding; anything else (an average pool) takes the general path.
        # (in the narrowest dtype that holds the format, as the accelerator stores them: the
        # kernels read int8 codes as they are, an eighth of the bytes of int64 ones)
        fmt = self.datapath.act_fmt
        codes = codes_on_grid(x, fmt, code_dtype(fmt))
        return quantize(x, fmt) if codes is None else codes

    def _output(self, y_codes):
        fmt = self.datapath.output_fmt
        return values(y_codes, fmt, _value_dtype(fmt))

    def _forward(self, x, run, train=False):
        """Quantise weights (cached) and input, ``run(prepared, codes, out_dtype)`` the integer
        kernel, dequantise; the ctx keeps what the STE backward and the counters need."""
        prepared, clipped = self._prepare(train)
        out_dtype = code_dtype(self.datapath.output_fmt)
        y_codes, counters = run(prepared, self._input_codes(x), out_dtype)
        y = self._output(y_codes)
        return y, {"x": x, "y": y, "prepared": prepared, "clipped": clipped,
                   "counters": counters}

    def _ste_inputs(self, dy, ctx):
        """The clipped STE: no gradient through a saturated output; the float gradient is
        taken at the quantised weights. Returns (dy, weights used, input) in dy's dtype."""
        fmt = self.datapath.output_fmt
        dy = unsaturated_gradient(dy, ctx["y"], fmt.min_value, fmt.max_value)
        return (dy, *self._ste_constants(ctx, dy.dtype))

    def _ste_constants(self, ctx, dtype):
        """What the STE backward takes from the forward pass, in ``dtype``: (the quantised
        weights' values, the input). Computed at the first backward pass and kept in ``ctx``
        (next to what the forward pass left there, which stays as it was) for the next replay
        of the same tape: DeepFool replays it once per candidate class
        (:meth:`fxsim.models.Model.logit_gradients`)."""
        key = ("ste", np.dtype(dtype))
        if key not in ctx:
            ctx[key] = (dequantize(ctx["prepared"].weights, self.datapath.weight_fmt).astype(dtype),
                        ctx["x"].astype(dtype, copy=False))
        return ctx[key]

    def _ste_grads(self, grads, ctx):
        """No weight gradient where the format clipped the weight or the mask pruned it."""
        if "weight" not in grads:
            return grads
        keep = ~ctx["clipped"] if self.mask is None else (~ctx["clipped"] & self.mask)
        grads["weight"] = np.where(keep, grads["weight"], 0)
        return grads


class QuantConv2d(_QuantMixin, Layer):
    kind = "qconv"

    def __init__(self, conv, datapath: Datapath, mask=None, name=None):
        super().__init__(name or conv.name)
        self.params = {k: v.copy() for k, v in conv.params.items()}
        self.stride, self.padding, self.kernel = conv.stride, conv.padding, conv.kernel
        self.datapath, self.mask = datapath, mask

    def forward(self, x, train=False, rng=None):
        return self._forward(x, lambda p, codes, out_dtype: p.conv2d(codes, self.stride,
                                                                     self.padding, out_dtype),
                             train)

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        dy, w, x = self._ste_inputs(dy, ctx)
        cols = None  # the im2col matrix is only needed for the weight gradient
        if need_params:
            cols = conv_columns(x, w.shape[2], w.shape[3], self.stride, self.padding)
        dx, grads = conv2d_gradients(dy, cols, x.shape, w, self.stride, self.padding,
                                     "bias" in self.params, need_dx, need_params)
        return dx, self._ste_grads(grads, ctx)


class QuantLinear(_QuantMixin, Layer):
    kind = "qlinear"

    def __init__(self, linear, datapath: Datapath, mask=None, name=None):
        super().__init__(name or linear.name)
        self.params = {k: v.copy() for k, v in linear.params.items()}
        self.datapath, self.mask = datapath, mask

    def forward(self, x, train=False, rng=None):
        return self._forward(x, lambda p, codes, out_dtype: p.linear(codes, out_dtype), train)

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        dy, w, x = self._ste_inputs(dy, ctx)
        dx, grads = linear_gradients(dy, x, w, "bias" in self.params, need_dx, need_params)
        return dx, self._ste_grads(grads, ctx)
