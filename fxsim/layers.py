"""Float layers with hand-written backward passes, for the thin autograd in :mod:`fxsim.autograd`.

Every layer implements ``forward(x, train, rng) -> (y, ctx)`` and
``backward(dy, ctx) -> (dx, {param name: gradient})``. ``ctx`` is whatever the backward pass
needs; layers keep no per-call state, so one model can run many batches at once. Parameters
live in ``layer.params`` (name -> array) and are updated in place by the trainer. Arrays are
NCHW; the dtype follows the input (float32 by default, float64 for gradient checks).
"""

from __future__ import annotations

import numpy as np

from fxsim.errors import ShapeError
from fxsim.kernels import batchnorm
from fxsim.kernels.dense import (
    channels_first,
    col2im,
    col2im_batch_last,
    conv_output_size,
    im2col,
    im2col_batch_last,
    maxpool_backward,
    maxpool_forward,
    relu,
    relu_backward,
    transpose2d,
)


class Layer:
    """Base class: a named layer with parameters (possibly none)."""

    kind = "layer"

    def __init__(self, name: str | None = None):
        self.name = name or self.kind
        self.params: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}  # state that is not trained (BN statistics)

    def forward(self, x, train=False, rng=None):
        raise NotImplementedError

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        raise NotImplementedError

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.params.items())
        return f"{type(self).__name__}({self.name}{', ' + shapes if shapes else ''})"


def _he_normal(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


class Conv2d(Layer):
    """2-D cross-correlation, im2col + BLAS. weight (J, C, KH, KW), optional bias (J,)."""

    kind = "conv"

    def __init__(self, in_channels, out_channels, kernel, stride=1, padding=0, bias=True,
                 name=None, rng=None):
        super().__init__(name)
        rng = rng or np.random.default_rng(0)
        self.stride, self.padding, self.kernel = stride, padding, kernel
        fan_in = in_channels * kernel * kernel
        self.params["weight"] = _he_normal(rng, (out_channels, in_channels, kernel, kernel),
                                           fan_in)
        if bias:
            self.params["bias"] = np.zeros(out_channels, np.float32)

    def forward(self, x, train=False, rng=None):
        w = self.params["weight"].astype(x.dtype, copy=False)
        j, c, kh, kw = w.shape
        if x.ndim != 4 or x.shape[1] != c:
            raise ShapeError(f"{self.name}: expects (N, {c}, H, W) input, got {x.shape}")
        n, _, h, wd = x.shape
        s, p = (self.stride,) * 2, (self.padding,) * 2
        oh, ow = conv_output_size(h, kh, s[0], p[0]), conv_output_size(wd, kw, s[1], p[1])
        cols = conv_columns(x, kh, kw, self.stride, self.padding)
        bias = self.params.get("bias")
        if per_image_gemm(oh * ow):
            w2 = w.reshape(j, -1)
            if w2.size * oh * ow >= ONE_GEMM_MACS:  # one GEMM over the batch, then NCHW
                y = channels_first((w2 @ cols).reshape(j, n, oh * ow), bias)
            else:  # (N, J, OH*OW): NCHW straight out of a GEMM per image
                y = np.matmul(w2, cols.reshape(cols.shape[0], n, oh * ow).transpose(1, 0, 2))
                if bias is not None:
                    y += bias.astype(x.dtype, copy=False)[None, :, None]
            return y.reshape(n, j, oh, ow), (cols, x.shape)
        y = w.reshape(j, -1) @ cols  # (J, OH*OW*N), the batch fastest
        if bias is not None:
            y += bias.astype(x.dtype, copy=False)[:, None]
        return transpose2d(y.reshape(j * oh * ow, n)).reshape(n, j, oh, ow), (cols, x.shape)

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        cols, x_shape = ctx
        w = self.params["weight"].astype(dy.dtype, copy=False)
        return conv2d_gradients(dy, cols, x_shape, w, self.stride, self.padding,
                                "bias" in self.params, need_dx, need_params)


def per_image_gemm(positions: int) -> bool:
    """Whether a convolution with ``positions`` output pixels per image runs as one GEMM per
    image (output already NCHW, no transposes) rather than one big GEMM over the batch plus
    layout copies. Measured on 2 cores at batch 256: per image is faster for LeNet5's conv1
    (576 positions: forward 2.4 -> 1.6 ms, weight gradient 4.5 -> 1.7 ms) and slower for conv2
    (64 positions: 4.3 -> 11.5 ms)."""
    return positions >= 256


# MACs of one image's GEMM from which a convolution with image-major columns runs one GEMM over
# the batch (then a parallel copy into NCHW, :func:`~fxsim.kernels.dense.channels_first`)
# rather than one per image. Measured on 2 cores at batch 64, forward: CifarNet's conv1 (33M
# MACs an image) 43.9 -> 39.7 ms and conv0 (1.6M) 4.5-4.7 -> 3.4 ms that way; LeNet5's conv1
# (0.29M) 1.01-1.03 -> 1.05-1.13 ms, so it keeps a GEMM per image.
ONE_GEMM_MACS = 1 << 20


def conv_columns(x, kh, kw, stride, padding):
    """The im2col matrix of ``x`` (N, C, H, W) in the column order the convolution uses:
    (image, position) for per-image GEMMs, else (position, image) from
    :func:`~fxsim.kernels.dense.im2col_batch_last` (whose columns and their adjoint are several
    times faster to build when an image has few output positions)."""
    s, p = (stride,) * 2, (padding,) * 2
    oh = conv_output_size(x.shape[2], kh, s[0], p[0])
    ow = conv_output_size(x.shape[3], kw, s[1], p[1])
    if per_image_gemm(oh * ow):
        return im2col(x, kh, kw, s, p)
    return im2col_batch_last(np.ascontiguousarray(x), kh, kw, s, p)


def conv2d_gradients(dy, cols, x_shape, w, stride, padding, has_bias, need_dx,
                     need_params=True):
    """(dx or None, {"weight", "bias"} or {}) of a convolution with weights ``w`` whose forward
    read the :func:`conv_columns` matrix ``cols`` (only needed for the weight gradient) of an
    input of ``x_shape``."""
    j = w.shape[0]
    n, positions = dy.shape[0], dy.shape[2] * dy.shape[3]
    s, p = (stride,) * 2, (padding,) * 2
    w2 = w.reshape(j, -1)
    grads = {}
    if per_image_gemm(positions):
        dy3 = np.ascontiguousarray(dy).reshape(n, j, positions)
        if need_params:
            per_image_cols = cols.reshape(cols.shape[0], n, positions).transpose(1, 2, 0)
            per_image = np.matmul(dy3, per_image_cols)
            grads["weight"] = per_image.sum(axis=0).reshape(w.shape)
            if has_bias:
                grads["bias"] = dy3.sum(axis=(0, 2))
        if not need_dx:
            return None, grads
        # one GEMM over the batch in the columns' (image, position) order (CifarNet's conv1 at
        # batch 64, with col2im: 49.2 -> 42.5 ms, against a GEMM per image)
        dy_rows = np.ascontiguousarray(dy3.transpose(1, 0, 2)).reshape(j, n * positions)
        return col2im(w2.T @ dy_rows, x_shape, w.shape[2], w.shape[3], s, p), grads
    dy2 = transpose2d(dy.reshape(n, j * positions)).reshape(j, positions * n)  # columns' order
    if need_params:
        grads["weight"] = (dy2 @ cols.T).reshape(w.shape)
        if has_bias:
            grads["bias"] = dy2.sum(axis=1)
    if not need_dx:
        return None, grads
    return col2im_batch_last(w2.T @ dy2, x_shape, w.shape[2], w.shape[3], s, p), grads


class Linear(Layer):
    """y = x @ weight.T + bias; weight (out, in) as in the integer datapath."""

    kind = "linear"

    def __init__(self, in_features, out_features, bias=True, name=None, rng=None):
        super().__init__(name)
        rng = rng or np.random.default_rng(0)
        self.params["weight"] = _he_normal(rng, (out_features, in_features), in_features)
        if bias:
            self.params["bias"] = np.zeros(out_features, np.float32)

    def forward(self, x, train=False, rng=None):
        w = self.params["weight"].astype(x.dtype, copy=False)
        if x.ndim != 2 or x.shape[1] != w.shape[1]:
            raise ShapeError(f"{self.name}: expects (N, {w.shape[1]}) input, got {x.shape}")
        y = x @ w.T
        if "bias" in self.params:
            y += self.params["bias"].astype(x.dtype, copy=False)
        return y, x

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        w = self.params["weight"].astype(dy.dtype, copy=False)
        return linear_gradients(dy, ctx, w, "bias" in self.params, need_dx, need_params)


def linear_gradients(dy, x, w, has_bias, need_dx, need_params=True):
    """(dx or None, {"weight", "bias"} or {}) of y = x @ w.T (+ bias)."""
    grads = {}
    if need_params:
        grads["weight"] = dy.T @ x
        if has_bias:
            grads["bias"] = dy.sum(axis=0)
    return (dy @ w if need_dx else None), grads


class ReLU(Layer):
    kind = "relu"

    def forward(self, x, train=False, rng=None):
        y = relu(x)
        return y, y

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        return relu_backward(dy, ctx), {}


def _check_divisible(x, k, name):
    if x.ndim != 4 or x.shape[2] % k or x.shape[3] % k:
        raise ShapeError(f"{name}: a {k}x{k} pool needs (N, C, H, W) with H and W divisible by "
                         f"{k}, got {x.shape}")


def _windows(x, k, name):
    _check_divisible(x, k, name)
    n, c, h, w = x.shape
    return x.reshape(n, c, h // k, k, w // k, k).transpose(0, 1, 2, 4, 3, 5).reshape(
        n, c, h // k, w // k, k * k)


class MaxPool2d(Layer):
    """Non-overlapping k x k max pooling (stride k); the gradient goes to the first maximum."""

    kind = "maxpool"

    def __init__(self, kernel=2, name=None):
        super().__init__(name)
        self.k = kernel

    def forward(self, x, train=False, rng=None):
        _check_divisible(x, self.k, self.name)
        return maxpool_forward(np.ascontiguousarray(x), self.k)  # (y, ctx: the argmax)

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        return maxpool_backward(np.ascontiguousarray(dy), ctx, self.k), {}


class AvgPool2d(Layer):
    """Non-overlapping k x k average pooling (stride k)."""

    kind = "avgpool"

    def __init__(self, kernel=2, name=None):
        super().__init__(name)
        self.k = kernel

    def forward(self, x, train=False, rng=None):
        return _windows(x, self.k, self.name).mean(axis=-1), x.shape

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        k = self.k
        dx = np.repeat(np.repeat(dy, k, axis=2), k, axis=3) / (k * k)
        return dx.astype(dy.dtype, copy=False), {}


class BatchNorm2d(Layer):
    """Per-channel batch normalisation; batch statistics in training, running ones otherwise."""

    kind = "batchnorm"

    def __init__(self, channels, momentum=0.9, eps=1e-3, name=None):
        super().__init__(name)
        self.momentum, self.eps = momentum, eps
        self.params["gamma"] = np.ones(channels, np.float32)
        self.params["beta"] = np.zeros(channels, np.float32)
        self.buffers["mean"] = np.zeros(channels, np.float32)
        self.buffers["var"] = np.ones(channels, np.float32)

    def forward(self, x, train=False, rng=None):
        dt = x.dtype
        if train:
            mean, var = batchnorm.statistics(x)
            m = self.momentum
            self.buffers["mean"] = (m * self.buffers["mean"] + (1 - m) * mean).astype(np.float32)
            self.buffers["var"] = (m * self.buffers["var"] + (1 - m) * var).astype(np.float32)
            mean, var = mean.astype(dt), var.astype(dt)
        else:
            mean, var = self.buffers["mean"].astype(dt), self.buffers["var"].astype(dt)
        inv = 1.0 / np.sqrt(var + self.eps).astype(dt)
        y, xhat = batchnorm.normalise(x, mean, inv, self.params["gamma"], self.params["beta"])
        return y, (xhat, inv, train)

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        xhat, inv, train = ctx
        dt = dy.dtype
        scale = self.params["gamma"].astype(dt) * inv
        grads = {}
        if need_params or train:
            sum_dy, sum_dy_xhat = batchnorm.gradient_sums(dy, xhat)
            if need_params:
                grads = {"gamma": sum_dy_xhat.astype(dt), "beta": sum_dy.astype(dt)}
        if not train:  # running statistics are constants
            return dy * scale[None, :, None, None], grads
        count = dy.size // dy.shape[1]
        return batchnorm.input_gradient(dy, xhat, scale, sum_dy / count,
                                        sum_dy_xhat / count), grads


class Flatten(Layer):
    kind = "flatten"

    def forward(self, x, train=False, rng=None):
        return x.reshape(x.shape[0], int(np.prod(x.shape[1:]))), x.shape

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        return dy.reshape(ctx), {}


class Dropout(Layer):
    """Inverted dropout: zeroes a fraction ``p`` in training and scales the rest by 1/(1-p)."""

    kind = "dropout"

    def __init__(self, p=0.5, name=None):
        super().__init__(name)
        self.p = p

    def forward(self, x, train=False, rng=None):
        if not train or self.p == 0:
            return x, None
        # float32 draws and a multiply instead of a boolean scatter: 1.7 -> 0.5 ms for LeNet5's
        # (256, 800) activations
        scale = (rng.random(x.shape, dtype=np.float32) >= self.p).astype(x.dtype)
        scale *= x.dtype.type(1.0 / (1.0 - self.p))
        return x * scale, scale

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        return (dy if ctx is None else dy * ctx), {}


class Affine(Layer):
    """A fixed y = scale * x + shift (LeNet5 maps pixels in [0, 1] to [-1, 1])."""

    kind = "affine"

    def __init__(self, scale=2.0, shift=-1.0, name=None):
        super().__init__(name)
        self.scale, self.shift = scale, shift

    def forward(self, x, train=False, rng=None):
        return (x * self.scale + self.shift).astype(x.dtype, copy=False), None

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        return (dy * self.scale).astype(dy.dtype, copy=False), {}


class Standardize(Layer):
    """Per-image standardisation (as TensorFlow's): (x - mean) / max(std, 1/sqrt(size))."""

    kind = "standardize"

    def forward(self, x, train=False, rng=None):
        axes = tuple(range(1, x.ndim))
        size = int(np.prod(x.shape[1:]))
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True)
        floor = 1.0 / np.sqrt(size)
        scale = np.maximum(std, floor).astype(x.dtype)
        y = (x - mean) / scale
        return y, (y, scale, std > floor)

    def backward(self, dy, ctx, need_dx=True, need_params=True):
        y, scale, uses_std = ctx
        axes = tuple(range(1, dy.ndim))
        mean_dy = dy.mean(axis=axes, keepdims=True)
        mean_dy_y = np.where(uses_std, (dy * y).mean(axis=axes, keepdims=True), 0)
        return ((dy - mean_dy - y * mean_dy_y) / scale).astype(dy.dtype, copy=False), {}
