"""One layer's fixed-point arithmetic (:class:`Datapath`) and its bit-accurate executor.

Semantics of a conv/linear layer, all in integers (see docs/formats.md)::

    acc = bias_code aligned to the accumulator's fraction (frac_x + frac_w)
    for each input channel, kernel row, kernel column (linear: input index):
        acc += x_code * w_code                     # zero weights skipped: adds nothing
        (per_mac: the acc_bits register saturates or wraps after every MAC)
    (final: the exact sum meets the acc_bits register once)
    y = requantize(acc, frac_x + frac_w, out_fmt, rounding, overflow)

Which kernel computes the sums is chosen from a bound, never a guess. With
``P = max|x| * max_j sum_k |w[j, k]|`` every partial sum is below P in magnitude, so int8 dot
products (codes that fit a byte, on CPUs with AVX-512 VNNI: :mod:`fxsim.kernels.int8`) are exact
when P < 2^31, float32 BLAS when P < 2^24, float64 BLAS when P < 2^53, and int64 when
P < 2^63. A per_mac register
that can never leave its range (P + max|bias| <= its max) behaves exactly like the exact sum;
otherwise the per-MAC kernel runs: on int8 dot products where the codes fit a byte and the CPU
has them (:mod:`fxsim.kernels.int8_mac`: groups of products proven unable to reach a rail run
as dot products, the others MAC by MAC), else on float32 / float64 / int32 / int64 lanes.
Codes of up to 16 bits whose base-256 digits fit a byte take exact sums as int8 dot products
of their digits (path ``int8x2``) where float32 cannot hold them.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import asdict, dataclass, field, fields

import numba
import numpy as np

from fxsim.errors import DatapathError, FormatError, ShapeError
from fxsim.fixedpoint import (
    Overflow,
    QFormat,
    Rounding,
    check_codes,
    code_dtype,
    format_args,
    min_max,
    requantize,
    requantize_with_count,
    uniform_draws,
)
from fxsim.kernels import dense, int8, int8_mac, int8_sparse, sparse

ACC_MODES = ("final", "per_mac")
KERNELS = ("auto", "dense", "sparse")

# kernel="auto" runs a layer on the zero-skipping kernel when its weight density is below this.
# Measured with benchmarks/sparse.py on LeNet5 / CifarNet shapes (docs/results/sparse.md): the
# sparse convolution beats the BLAS-backed dense one below about 0.2 to 0.5, a sparse linear
# layer (one output position, so no reuse of the laid-out input) below about 0.2.
# Above this weight density the zero-skipping per-MAC kernel runs every weight, zeros
# included, two or four output channels per pass (sparse.sparse_per_mac with paired rows; the
# dense per-MAC datapath always does), instead of skipping zero weights one channel at a time:
# about 1.5x the MACs per second (measured on im2col tiles), so it wins once fewer than about a
# third of the weights are zero.
_PAIRS_ABOVE = 0.7

# A convolution whose per-MAC register can overflow runs the same kernel either way, every
# weight (dense) or only the nonzero ones (sparse), so skipping wins at any density where
# zeros are skipped at all, below _PAIRS_ABOVE (per-MAC table of docs/results/sparse.md, 20-bit
# register, density 0.5: 1.06-1.56x on lenet5.conv2, cifarnet.conv1, conv6). Linear layers keep
# theirs: the dense one over the outputs skips zero inputs instead, which ReLU makes many.
#
# Where the dense sums run as int8 dot products (fxsim.kernels.int8: 8-bit codes on a CPU with
# AVX-512 VNNI), 3-6x faster than BLAS, the zero-skipping kernel wins only lower: measured
# (docs/results/sparse.md) below ~0.1-0.15 on the convolutions (at 0.1: 1.15-1.38x faster on
# three, 0.95x on cifarnet.conv6) and below ~0.07 on lenet5.fc1 (1.11x at 0.05).
# Where the CPU also has AVX-512 VBMI, the zero-skipping sums run as int8 dot products too
# (fxsim.kernels.int8_sparse, path int8_gather), and win from ~0.5-0.6 down (sparse.md, 2
# cores, 8-bit: at 0.5 1.03-1.55x faster on every layer it takes, four runs; a scan before
# its last 5-15 % gain: at 0.6 0.91-1.11x, lenet5.fc1 1.11x, at 0.75 0.81-1.06x).
# A per-MAC register that runs on int8 dot products (fxsim.kernels.int8_mac) outruns the
# zero-skipping per-MAC kernel above ~0.22-0.4 on the convolutions (lenet5.conv2 excepted:
# skipping was 1.13x faster at 0.5) and ~0.1 on lenet5.fc1 (per-MAC table of
# docs/results/sparse.md, 20-bit register).
SPARSE_DENSITY_THRESHOLD = {"conv": 0.3, "linear": 0.15, "conv_per_mac": _PAIRS_ABOVE,
                            "conv_int8": 0.12, "linear_int8": 0.06,
                            "conv_int8_gather": 0.5, "linear_int8_gather": 0.6,
                            "conv_per_mac_int8": 0.3, "linear_per_mac_int8": 0.12}

# How many im2col elements one chunk of images may produce. Small enough that the im2col and
# GEMM buffers of a chunk stay in cache and are reused from the heap instead of being
# page-faulted in afresh (measured on 2 cores: LeNet5 conv1, batch 256, 21 ms with 8M-element
# chunks, 8 ms with 2M); it also bounds memory for big batches.
_CHUNK_ELEMENTS = 1 << 21


# A convolution with fewer output positions per image than this builds its columns batch-last
# (dense.im2col_batch_last: one contiguous copy per (row, output row)); measured on 2 cores,
# LeNet5 conv2 (64 positions, batch 256): im2col 3.6 -> 1.4 ms.
_BATCH_LAST_BELOW = 256

# The zero-skipping exact sums read int8 input codes as they are below this density (see
# PreparedWeights._run_sparse). Measured, 2 cores, medians of 7 interleaved runs, float32 ->
# int8 inputs: density 0.05: cifarnet.conv2 7.7 -> 6.9 ms, lenet5.conv2 1.39 -> 1.12; 0.1:
# cifarnet.conv1 16.5 -> 15.5, conv6 9.4 -> 8.5; 0.15: conv6 10.4 -> 11.6, lenet5.conv2
# 2.33 -> 2.13; 0.5: conv6 30.7 -> 34.4, cifarnet.conv1 47.9 -> 54.6.
_INT8_INPUTS_BELOW = 0.125

# Numba's parallel loops and OpenBLAS's GEMMs run on two thread pools, and a pool whose workers
# went to sleep while the other one ran takes ~0.15-1 ms to wake. A linear layer whose output
# has fewer elements than this requantises its GEMM's sums on the calling thread alone (the
# kernels' serial builds), which wakes nobody (measured, 2 cores, batch 256: LeNet5 fc2 GEMM +
# requantisation 1.2 ms with both pools, 0.05 ms on one thread; fc1 1.15 -> 0.94 ms).
_ONE_THREAD_BELOW = 1 << 18

# Kernel plans a prepared layer keeps, one per input bound seen (see PreparedWeights.plan).
_PLANS_KEPT = 64


@dataclass(frozen=True)
class Datapath:
    """The arithmetic of one conv/linear layer.

    act_fmt:      format of the layer's input codes.
    weight_fmt:   format of the weight codes.
    out_fmt:      format of the output codes (default: act_fmt).
    bias_fmt:     format of the bias codes (default: the accumulator's fraction, acc_bits wide).
    acc_bits:     accumulator width in bits (sign included); None = unbounded (exact).
    acc_overflow: 'sat' or 'wrap' when the accumulator overflows.
    acc_mode:     'final' (exact sum, overflow applied once: a wide accumulator) or 'per_mac'
                  (overflow after every multiply-accumulate in canonical order).
    rounding, overflow: how the accumulator is requantised into out_fmt.
    seed:         seed of the draws for stochastic rounding.
    kernel:       'dense', 'sparse' (skip zero weights like a pruned accelerator) or 'auto'
                  (sparse when the layer's weight density is below SPARSE_DENSITY_THRESHOLD
                  for its kind, conv or linear).
                  The results are bit-identical; only time and the executed-MAC counters differ.
    """

    act_fmt: QFormat
    weight_fmt: QFormat
    out_fmt: QFormat | None = None
    bias_fmt: QFormat | None = None
    acc_bits: int | None = None
    acc_overflow: Overflow = Overflow.SAT
    acc_mode: str = "final"
    rounding: Rounding = Rounding.RND_CONV
    overflow: Overflow = Overflow.SAT
    seed: int = 0
    kernel: str = "auto"

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("act_fmt", "weight_fmt", "out_fmt", "bias_fmt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, QFormat):
                raise FormatError(f"Datapath {name} must be a QFormat, got {value!r}")
        set_(self, "rounding", Rounding.parse(self.rounding))
        set_(self, "overflow", Overflow.parse(self.overflow))
        set_(self, "acc_overflow", Overflow.parse(self.acc_overflow))
        if self.acc_overflow not in (Overflow.SAT, Overflow.WRAP):
            raise FormatError(
                f"accumulator overflow must be 'sat' or 'wrap', got '{self.acc_overflow}'"
            )
        if self.acc_mode not in ACC_MODES:
            raise FormatError(f"acc_mode must be 'final' or 'per_mac', got {self.acc_mode!r}")
        if self.kernel not in KERNELS:
            raise FormatError(f"kernel must be 'auto', 'dense' or 'sparse', got {self.kernel!r}")
        if self.acc_bits is not None:
            if isinstance(self.acc_bits, bool) or not isinstance(self.acc_bits, int | np.integer):
                raise DatapathError(f"acc_bits must be an integer or None, got {self.acc_bits!r}")
            set_(self, "acc_bits", int(self.acc_bits))
            if not 2 <= self.acc_bits <= 64:
                raise DatapathError(f"acc_bits must be between 2 and 64, got {self.acc_bits}")
            if self.acc_bits < self.product_bits:
                raise DatapathError(
                    f"acc_bits {self.acc_bits} cannot hold one product of {self.act_fmt} x "
                    f"{self.weight_fmt} (needs {self.product_bits} bits)"
                )
        bias = self.bias_format
        if bias.frac_bits > self.acc_frac_bits:
            raise DatapathError(
                f"bias format {bias} has {bias.frac_bits} fraction bits, more than the "
                f"accumulator's {self.acc_frac_bits}"
            )

    @property
    def output_fmt(self) -> QFormat:
        return self.out_fmt if self.out_fmt is not None else self.act_fmt

    @property
    def acc_frac_bits(self) -> int:
        """Fraction bits of a product and of the accumulator: frac_x + frac_w."""
        return self.act_fmt.frac_bits + self.weight_fmt.frac_bits

    @property
    def bias_format(self) -> QFormat:
        if self.bias_fmt is not None:
            return self.bias_fmt
        width = self.acc_bits or 64
        return QFormat(width, width - self.acc_frac_bits)

    @property
    def product_bits(self) -> int:
        """The narrowest signed register that holds every product of an input and a weight code."""
        a, w = self.act_fmt, self.weight_fmt
        ends = [x * y for x in (a.min_code, a.max_code) for y in (w.min_code, w.max_code)]
        return _signed_bits(min(ends), max(ends))

    def to_dict(self) -> dict:
        """A JSON-ready dict (formats as dicts, modes as names)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, QFormat):
                value = value.to_dict()
            elif isinstance(value, Rounding | Overflow):
                value = value.value
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Datapath:
        if not isinstance(data, dict):
            raise FormatError(f"a Datapath must be a JSON object, got {data!r}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise FormatError(f"unknown Datapath keys: {', '.join(sorted(unknown))}")
        for required in ("act_fmt", "weight_fmt"):
            if required not in data:
                raise FormatError(f"a Datapath needs '{required}'")
        kwargs = dict(data)
        for name in ("act_fmt", "weight_fmt", "out_fmt", "bias_fmt"):
            if kwargs.get(name) is not None:
                kwargs[name] = QFormat.from_dict(kwargs[name])
        return cls(**kwargs)


def _signed_bits(lo: int, hi: int) -> int:
    bits = 1
    while not (-(1 << (bits - 1)) <= lo and hi <= (1 << (bits - 1)) - 1):
        bits += 1
    return bits


@dataclass
class Counters:
    """What one layer's execution did; counters of several calls add up with ``+``.

    macs:            dense multiply-accumulates (outputs x fan-in).
    acc_overflows:   accumulator overflow events (final: outputs whose exact sum left the
                     register; per_mac: MAC steps, or bias loads, after which it overflowed).
    out_saturations: outputs that overflowed the output format when requantised.
    max_abs_acc:     largest |accumulator| at the end of a dot product (final: the exact sum;
                     per_mac: the register's last value).
    outputs:         output values produced.
    executed_macs:   MACs the kernel performed (dense: all of them; sparse: stored weights x
                     output positions).
    skipped_macs:    MACs skipped because the weight is zero (macs - executed_macs).
    paths:           which kernel computed the sums (float32, float64, int64, int8 (int8 dot
                     products into int32 lanes, :mod:`fxsim.kernels.int8`), per_mac_float32,
                     per_mac_int32, per_mac_int64, and sparse_* for the zero-skipping kernel),
                     with how many outputs each.
    weight_bytes:    bytes the layer's weights take in the dense, bitmask, csr and eie
                     encodings at the weight format's width (a property of the layer, not
                     summed over calls).
    """

    macs: int = 0
    acc_overflows: int = 0
    out_saturations: int = 0
    max_abs_acc: int = 0
    outputs: int = 0
    executed_macs: int = 0
    skipped_macs: int = 0
    paths: dict = field(default_factory=dict)
    weight_bytes: dict = field(default_factory=dict)

    @property
    def density(self) -> float:
        """Executed over dense MACs: the weight density the sparse kernel saw (1.0 if dense)."""
        return self.executed_macs / self.macs if self.macs else 1.0

    def __add__(self, other: Counters) -> Counters:
        paths = dict(self.paths)
        for name, count in other.paths.items():
            paths[name] = paths.get(name, 0) + count
        return Counters(
            macs=self.macs + other.macs,
            acc_overflows=self.acc_overflows + other.acc_overflows,
            out_saturations=self.out_saturations + other.out_saturations,
            max_abs_acc=max(self.max_abs_acc, other.max_abs_acc),
            outputs=self.outputs + other.outputs,
            executed_macs=self.executed_macs + other.executed_macs,
            skipped_macs=self.skipped_macs + other.skipped_macs,
            paths=paths,
            weight_bytes=self.weight_bytes or other.weight_bytes,
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["density"] = self.density
        return out


# --------------------------------------------------------------------------------------------
# Planning: which kernel, from the bound
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    path: str
    weights: np.ndarray  # (J, K) in the path's dtype
    start: np.ndarray | None  # per_mac: the register's first value per output channel
    start_overflowed: int  # per_mac: output channels whose bias load overflowed
    cols_dtype: type
    acc_bound: int  # no accumulator value (bias included) exceeds this in magnitude
    x_max_abs: int  # no input code exceeds this in magnitude


def _max_abs(codes: np.ndarray) -> int:
    if codes.size == 0:
        return 0
    lo, hi = min_max(codes)
    return max(abs(lo), abs(hi))


def _max_row_abs_sum(w2d: np.ndarray) -> int:
    """max_j sum_k |w[j, k]| exactly, as a Python int."""
    if w2d.size == 0:
        return 0
    if _max_abs(w2d) * w2d.shape[1] < 1 << 63:
        return int(np.abs(w2d).sum(axis=1).max())
    return max(sum(abs(int(v)) for v in row) for row in w2d)


class PreparedWeights:
    """One layer's weight and bias codes under a Datapath, validated once and ready to run.

    Everything that depends only on the weights (range checks, the bias aligned to the
    accumulator, ``max_j sum_k |w[j, k]|`` for the bound, the dtype copies each kernel wants)
    is computed here, so running many batches costs only the work on the activations.
    """

    def __init__(self, w_codes, bias_codes, datapath: Datapath, mask=None):
        if not isinstance(datapath, Datapath):
            raise FormatError(f"expected a Datapath, got {datapath!r}")
        w = np.asarray(w_codes)
        if w.ndim not in (2, 4):
            raise ShapeError(f"weights must be (J, K) or (J, C, KH, KW), got shape {w.shape}")
        check_codes(w, datapath.weight_fmt, "weights")
        if mask is not None:
            sparse.check_mask(w, mask)
        self.datapath = datapath
        self.weights = np.ascontiguousarray(w, dtype=np.int64)
        self.matrix = self.weights.reshape(w.shape[0], -1)
        self.bias = _aligned_bias(bias_codes, w.shape[0], datapath)
        self.row_abs_max = _max_row_abs_sum(self.matrix)
        self.w_max_abs = _max_abs(self.matrix)
        self.bias_max_abs = _max_abs(self.bias)
        self.density = float(np.count_nonzero(self.matrix)) / max(1, self.matrix.size)
        self._compressed: sparse.CompressedWeights | None = None
        self._weight_bytes: dict | None = None
        self._casts: dict = {}
        self._starts: dict = {}
        self._plans: dict = {}

    @property
    def compressed(self) -> sparse.CompressedWeights:
        """The CSR storage of the nonzero weights (built on first use)."""
        if self._compressed is None:
            self._compressed = sparse.CompressedWeights(self.weights)
        return self._compressed

    @functools.cached_property
    def use_sparse(self) -> bool:
        """Whether the layer runs the zero-skipping datapath: ``kernel="sparse"``, or
        ``"auto"`` below the density threshold of its kind (lower where the dense sums run as
        int8 dot products, which outrun the zero-skipping kernel down to a density of ~0.1)."""
        kernel = self.datapath.kernel
        if kernel != "auto":
            return kernel == "sparse"
        kind = "conv" if self.weights.ndim == 4 else "linear"
        fmt = self.datapath.act_fmt
        x_worst = max(-fmt.min_code, fmt.max_code)
        worst = x_worst * self.row_abs_max
        if self._int8_dot(worst) and not self._may_overflow(worst, "per_mac"):
            kind += "_int8_gather" if self._int8_gather(worst) else "_int8"
        elif self._may_overflow(worst, "per_mac") and self._int8_mac(x_worst):
            kind += "_per_mac_int8"
        return self.density < SPARSE_DENSITY_THRESHOLD[kind]

    def weight_bytes(self) -> dict[str, int]:
        """Storage of the weights per encoding (see :func:`sparse.storage_bytes`), counted
        from the weights themselves: the dense datapath never builds the CSR."""
        if self._weight_bytes is None:
            nnz, fillers = sparse.nonzero_counts(self.matrix)
            self._weight_bytes = sparse.storage_bytes(
                self.matrix.shape[0], self.matrix.shape[1], int(nnz), int(fillers),
                self.datapath.weight_fmt.bits)
        return dict(self._weight_bytes)

    def _values_as(self, dtype) -> np.ndarray:
        """The stored (nonzero) weights of :attr:`compressed` in a kernel's lane dtype."""
        key = ("values", dtype)
        if key not in self._casts:
            self._casts[key] = self.compressed.values.astype(dtype)
        return self._casts[key]

    def _quad_rows_as(self, dtype) -> np.ndarray:
        """(J // 4, K, 4): the weights of output channels 4b .. 4b + 3 side by side, in a
        kernel's lane dtype, for the per-MAC kernel's blocks of four."""
        key = ("quad_rows", dtype)
        if key not in self._casts:
            n_out, fan_in = self.matrix.shape
            blocks = n_out // 4
            rows = self.matrix[: 4 * blocks].reshape(blocks, 4, fan_in).transpose(0, 2, 1)
            self._casts[key] = np.ascontiguousarray(rows, dtype=dtype)
        return self._casts[key]

    def _transposed_as(self, dtype) -> np.ndarray:
        """The (K, J) transposed weight matrix in a kernel's lane dtype."""
        key = ("transposed", dtype)
        if key not in self._casts:
            self._casts[key] = np.ascontiguousarray(self.matrix.T, dtype=dtype)
        return self._casts[key]

    def _matrix_as(self, dtype) -> np.ndarray:
        if dtype not in self._casts:
            self._casts[dtype] = np.ascontiguousarray(self.matrix, dtype=dtype)
        return self._casts[dtype]

    def plan(self, x_max_abs: int) -> _Plan:
        """Choose the kernel for inputs bounded by ``x_max_abs``, from the bound alone (kept per
        bound: a layer sees few distinct input maxima, and choosing costs ~10 us of Python,
        which mattered for small layers such as LeNet5's fc2, 40 us in all)."""
        plan = self._plans.get(x_max_abs)
        if plan is None:
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            plan = self._plans[x_max_abs] = self._choose_plan(x_max_abs)
        return plan

    def _choose_plan(self, x_max_abs: int) -> _Plan:
        dp = self.datapath
        bound = x_max_abs * self.row_abs_max  # no partial sum of products exceeds this
        bias_max = self.bias_max_abs
        if self._may_overflow(bound, "per_mac"):
            dtype = _per_mac_lanes(dp.acc_bits, x_max_abs * self.w_max_abs,
                                   dp.acc_overflow is Overflow.WRAP)
            start, overflowed = self._starts_for(dtype)
            return _Plan(f"per_mac_{np.dtype(dtype).name}", self._matrix_as(dtype), start,
                         overflowed, dtype, 1 << (dp.acc_bits - 1), x_max_abs)
        # on the zero-skipping datapath only where most blocks of four output channels would
        # run over their union of columns anyway (filler zeros; see sparse.sparse_sum)
        if self._int8_dot(bound) and (not self.use_sparse or self.compressed.fills_blocks()):
            return _Plan("int8", self._int8_weights(), None, 0, np.int8, bound + bias_max,
                         x_max_abs)
        if self.use_sparse and self._int8_gather(bound):
            return _Plan("int8_gather", self._int8_schedule(), None, 0, np.int8,
                         bound + bias_max, x_max_abs)
        if bound >= 1 << 24 and self._int8_digits(x_max_abs) and not self.use_sparse:
            return _Plan("int8x2", self._int8_digit_weights(), None, 0, np.int16,
                         bound + bias_max, x_max_abs)
        if bound < 1 << 24:
            path, dtype = "float32", np.float32
        elif bound < 1 << 53:
            path, dtype = "float64", np.float64
        else:
            # int64 holds every partial sum only if the bound (refined per chunk) says so
            path, dtype = "int64", np.int64
        return _Plan(path, self._matrix_as(dtype), None, 0, dtype, bound + bias_max, x_max_abs)

    def _may_overflow(self, bound: int, mode: str) -> bool:
        """Whether an accumulator in ``mode`` can overflow with sums bounded by ``bound``."""
        dp = self.datapath
        return (dp.acc_mode == mode and dp.acc_bits is not None
                and bound + self.bias_max_abs > (1 << (dp.acc_bits - 1)) - 1)

    def _int8_dot(self, bound: int) -> bool:
        """Whether exact sums can run as int8 dot products (:mod:`fxsim.kernels.int8`): the
        host has them, the layer is a convolution or a linear one with more outputs than the
        fused few-output kernel takes, both formats' codes fit a byte and no sum leaves
        int32."""
        return (int8.AVAILABLE and self._byte_codes()
                and (self.weights.ndim == 4 or self.weights.shape[0] > dense.FEW_OUTPUTS)
                and bound < 1 << 31)

    def _int8_gather(self, bound: int) -> bool:
        """Whether zero-skipping sums run as int8 dot products (:mod:`fxsim.kernels.int8_sparse`):
        where dense ones can (:meth:`_int8_dot`), the host also has VBMI, and the layer's window
        rows are long enough to gather from (:data:`int8_sparse.MIN_SEGMENT`). (A linear layer
        with few outputs keeps the fused float kernels: on lenet5.fc2 both take ~0.04-0.05 ms,
        per-call costs, at densities 0.02-1.)"""
        return (int8_sparse.AVAILABLE and self._int8_dot(bound)
                and int8_sparse.segment_bytes(self.weights.shape) >= int8_sparse.MIN_SEGMENT)

    def _byte_codes(self) -> bool:
        """Whether the input's and the weights' codes all fit a signed byte."""
        dp = self.datapath
        return all(f.min_code >= -128 and f.max_code <= 127 for f in (dp.act_fmt, dp.weight_fmt))

    def _int8_mac(self, x_max_abs: int) -> bool:
        """Whether a per-MAC register runs on int8 dot products (:mod:`fxsim.kernels.int8_mac`)
        for inputs bounded by ``x_max_abs``: the host has them, the codes fit a byte and every
        biased register value fits int32."""
        dp = self.datapath
        return (int8.AVAILABLE and dp.acc_mode == "per_mac" and dp.acc_bits is not None
                and self._byte_codes()
                and int8_mac.fits(dp.acc_bits, x_max_abs, self.row_abs_max))

    def _runs_int8_mac(self, plan: _Plan) -> bool:
        """Whether this call's per-MAC register runs on int8 dot products: a per-MAC plan that
        :meth:`_int8_mac` allows, on the dense datapath or on the zero-skipping one where it
        runs every weight anyway (density above _PAIRS_ABOVE, filler zeros)."""
        return (plan.path.startswith("per_mac") and self._int8_mac(plan.x_max_abs)
                and (not self.use_sparse or self.density > _PAIRS_ABOVE))

    def _int8_mac_tables(self, x_max_abs: int, nonnegative: bool) -> tuple:
        """(packed weights, start values (J16,) int32, limits, corr) for
        :func:`int8_mac.per_mac_rows`, inputs in [0 or -x_max_abs, x_max_abs] (kept: a layer
        sees few input ranges)."""
        key = ("int8_mac", x_max_abs, nonnegative)
        if key not in self._casts:
            kept = [k for k in self._casts if isinstance(k, tuple) and k[0] == "int8_mac"]
            if len(kept) >= _PLANS_KEPT:  # as many as plans: inputs of many ranges
                for old in kept:
                    del self._casts[old]
            dp = self.datapath
            if "int8_mac" not in self._casts:
                self._casts["int8_mac"] = int8_mac.pack_weights(self.matrix)
            packed = self._casts["int8_mac"]
            lo, hi, _ = _register(dp.acc_bits, int)
            limits, corr = int8_mac.thresholds(self.matrix, 0 if nonnegative else -x_max_abs,
                                               x_max_abs, lo, hi)
            start = np.zeros(packed.shape[1], np.int32)
            start[: self.matrix.shape[0]] = self._starts_for(np.int32)[0]
            self._casts[key] = (packed, start, limits, corr)
        return self._casts[key]

    def _run_int8_mac(self, plan: _Plan, x, out, u, window=None) -> Counters:
        """Per-MAC registers on int8 dot products, chunk by chunk of images; fills ``out``
        (N, J, P). ``x``: (N, K) codes of a linear layer, or with ``window`` = (kh, kw, sh, sw,
        ph, pw) the (N, C, H, W) codes of a convolution, whose windows become rows."""
        dp = self.datapath
        n_img, n_out, per_img = out.shape
        fan_in = self.matrix.shape[1]
        quads = -(-fan_in // int8.QUAD)
        lo, hi, mask = _register(dp.acc_bits, int)
        wrap = dp.acc_overflow is Overflow.WRAP
        ran = dataclasses.replace(plan, path="per_mac_int8")
        per_chunk = _images_per_chunk(fan_in * per_img)
        counters = Counters(weight_bytes=self.weight_bytes())
        zeros = np.zeros(n_out, np.int64)
        for n0 in range(0, n_img, per_chunk):
            n1 = min(n_img, n0 + per_chunk)
            if window is None:
                rows, smallest, _ = int8_mac.bias_rows(x[n0:n1], quads)
                nonnegative = smallest >= 0
            else:
                rows = int8_mac.bias_windows(x[n0:n1], *window, quads)
                nonnegative = int(x[n0:n1].min()) >= 0
            packed, start, limits, corr = self._int8_mac_tables(plan.x_max_abs, nonnegative)
            sums = np.empty((rows.shape[0], n_out), np.int32)
            events = int8_mac.per_mac_rows(rows, packed, limits, corr, start, lo, hi, mask, wrap,
                                           int8_mac.GROUP_QUADS, sums)
            events += plan.start_overflowed * (n1 - n0) * per_img
            chunk_u = _slice(u, n0, n1, n_out * per_img)
            if window is None:
                counters += self._finish_chunk(ran, sums, events, zeros, -1, out[n0:n1], chunk_u,
                                               x_rows=True)
            else:
                sums3 = sums.reshape(n1 - n0, per_img, n_out).transpose(0, 2, 1)
                counters += self._finish_chunk(ran, sums3, events, zeros, -1, out[n0:n1],
                                               chunk_u)
        return counters

    def _int8_digits(self, x_max_abs: int) -> bool:
        """Whether exact sums of codes wider than a byte (up to 16 bits) can run as int8 dot
        products of their base-256 digits (path ``int8x2``, :func:`_digit_sums`): the host has
        them, the layer is a convolution or a linear one with more outputs than the fused
        few-output kernel takes, every weight and input code has digits that fit a byte, and
        the middle digit sums (2 K products of at most 2^14) fit int32."""
        fan_in = self.matrix.shape[1]
        w = self.weights
        return (int8.AVAILABLE and not self._byte_codes()
                # a folded convolution (few channels) fills the int8 kernel's vectors poorly:
                # four dot products of it are slower than float64 BLAS (LeNet5's conv1)
                and (w.shape[0] > dense.FEW_OUTPUTS if w.ndim == 2
                     else not int8.folds(w.shape[1], w.shape[3]))
                and x_max_abs <= int8.DIGITS_MAX
                and int(self.matrix.max(initial=0)) <= int8.DIGITS_MAX
                and int(self.matrix.min(initial=0)) >= -32768
                and 2 * fan_in * (1 << 14) < 1 << 31)

    def _int8_digit_weights(self) -> tuple:
        """The weights' digits packed for the three digit sums of :func:`_digit_sums`: high,
        (low, high) side by side along the fan-in (channels), low."""
        if "int8x2" not in self._casts:
            high, _, low = int8.digits(self.weights)
            # (low, high) along the fan-in (a convolution's channels): against the inputs'
            # (high, low), the middle term
            parts = (high, np.concatenate([low, high], axis=1), low)
            if self.weights.ndim == 2:
                packed = tuple(int8.pack_weights(p) for p in parts)
            else:
                kw = self.weights.shape[3]
                packed = tuple(int8.pack_conv_weights(p, int8.folds(p.shape[1], kw))
                               for p in parts)
            self._casts["int8x2"] = packed
        return self._casts["int8x2"]

    def _int8_weights(self) -> np.ndarray:
        """The weights packed for :func:`int8.dot_rows` or :func:`int8.conv_sums`."""
        if "int8" not in self._casts:
            w = self.weights
            self._casts["int8"] = (int8.pack_weights(w) if w.ndim == 2 else
                                   int8.pack_conv_weights(w, int8.folds(w.shape[1], w.shape[3])))
        return self._casts["int8"]

    def _int8_schedule(self) -> int8_sparse.Schedule:
        """The zero-skipping schedule of :mod:`fxsim.kernels.int8_sparse` (built once)."""
        if "int8_gather" not in self._casts:
            w = self.weights
            self._casts["int8_gather"] = (
                int8_sparse.linear_schedule(w) if w.ndim == 2 else
                int8_sparse.conv_schedule(w, int8.folds(w.shape[1], w.shape[3])))
        return self._casts["int8_gather"]

    def conv2d(self, x_codes, stride=1, padding=0, out_dtype=None):
        """Run as a convolution; see :func:`conv2d`."""
        sh, sw = _pair(stride, "stride")
        ph, pw = _pair(padding, "padding")
        if sh < 1 or sw < 1 or ph < 0 or pw < 0:
            raise ShapeError(f"stride must be >= 1 and padding >= 0, got {stride}, {padding}")
        if self.weights.ndim != 4:
            raise ShapeError(f"conv2d needs (J, C, KH, KW) weights, got {self.weights.shape}")
        dp = self.datapath
        x, x_max_abs = _as_codes(x_codes, dp.act_fmt, "x", 4)
        n, c, h, wd = x.shape
        n_out, c_w, kh, kw = self.weights.shape
        if c_w != c:
            raise ShapeError(f"weights expect {c_w} input channels, x has {c} (shape {x.shape})")
        oh = dense.conv_output_size(h, kh, sh, ph)
        ow = dense.conv_output_size(wd, kw, sw, pw)
        if oh < 1 or ow < 1:
            raise ShapeError(
                f"a {kh}x{kw} kernel does not fit a {h}x{wd} input with padding {(ph, pw)}"
            )
        plan = self.plan(x_max_abs)
        out = np.empty((n, n_out, oh * ow), _output_dtype(out_dtype, dp.output_fmt))
        u = uniform_draws(dp.rounding, out.size, dp.seed)
        if self._runs_int8_mac(plan):
            counters = self._run_int8_mac(plan, x, out, u, (kh, kw, sh, sw, ph, pw))
            return out.reshape(n, n_out, oh, ow), self._as_datapath_ran(plan, counters)
        lanes = _sparse_lanes(plan, dp)
        skip = self.use_sparse or (
            dp.kernel == "auto" and lanes is not None and lanes[1]
            and self.density < SPARSE_DENSITY_THRESHOLD["conv_per_mac"])
        if lanes is not None and (skip or lanes[1]):
            # a per-MAC register of <= 62 bits runs on the zero-skipping kernel's layout even
            # when dense: no im2col, and a tile reads rows of the laid-out input instead of a
            # copy of its im2col columns (2 cores, 8-bit codes, 20-bit register, 2 runs:
            # cifarnet.conv1 27-28 -> 56 GMAC/s, conv2 31 -> 45, conv6 20 -> 23-24, lenet5.conv2
            # 32-33 -> 62-63)
            counters = self._run_sparse(plan, x, (sh, sw), (ph, pw), (oh, ow), out, u,
                                        every_weight=not skip)
            return out.reshape(n, n_out, oh, ow), counters
        if plan.path in ("int8", "int8_gather"):
            counters = self._conv_int8(plan, x, (sh, sw), (ph, pw), out, u)
            return out.reshape(n, n_out, oh, ow), self._as_datapath_ran(plan, counters)
        if plan.path == "int8x2":
            counters = self._conv_int8_digits(plan, x, (sh, sw), (ph, pw), out, u)
            return out.reshape(n, n_out, oh, ow), counters
        per_chunk = _images_per_chunk(c * kh * kw * oh * ow)
        per_image = n_out * oh * ow
        batch_last = oh * ow < _BATCH_LAST_BELOW
        im2col = dense.im2col_batch_last if batch_last else dense.im2col
        counters = Counters(weight_bytes=self.weight_bytes())
        for n0 in range(0, n, per_chunk):
            n1 = min(n, n0 + per_chunk)
            cols = im2col(x[n0:n1], kh, kw, (sh, sw), (ph, pw), dtype=plan.cols_dtype)
            counters += self._accumulate(plan, cols, out[n0:n1], _slice(u, n0, n1, per_image),
                                         batch_last=batch_last)
        return out.reshape(n, n_out, oh, ow), counters

    def linear(self, x_codes, out_dtype=None):
        """Run as a fully connected layer; see :func:`linear`."""
        if self.weights.ndim != 2:
            raise ShapeError(f"linear needs (J, K) weights, got {self.weights.shape}")
        fmt = self.datapath.act_fmt
        few = self._linear_few_outputs(x_codes, out_dtype)
        if few is not None:
            return few
        worst = self.plan(max(-fmt.min_code, fmt.max_code))
        if worst.path == "int8_gather" or (worst.path in ("float32", "int8")
                                           and not self.use_sparse):
            # any input in the format keeps the bound under 2^24 (2^31): check and cast in one
            # serial pass before the GEMM (Numba-only paths keep the parallel check: measured,
            # the serial cast made the sparse lenet5.fc2 0.18 -> 0.23 ms)
            x, x_max_abs = _cast_codes(x_codes, fmt, "x", 2, worst.cols_dtype)
        else:
            x, x_max_abs = _as_codes(x_codes, fmt, "x", 2)
        n, k = x.shape
        n_out = self.weights.shape[0]
        if self.weights.shape[1] != k:
            raise ShapeError(
                f"weights expect {self.weights.shape[1]} inputs, x has {k} (shape {x.shape})"
            )
        plan = self.plan(x_max_abs)
        out = np.empty((n, n_out, 1), _output_dtype(out_dtype, self.datapath.output_fmt))
        u = uniform_draws(self.datapath.rounding, out.size, self.datapath.seed)
        if self._runs_int8_mac(plan):
            counters = self._run_int8_mac(plan, x, out, u)
            return out.reshape(n, n_out), self._as_datapath_ran(plan, counters)
        lanes = _sparse_lanes(plan, self.datapath)
        # per-MAC registers of <= 62 bits run vectorised over the output features, unless many
        # weights are zero: that kernel skips zero inputs but not zero weights (lenet5.fc1,
        # 20-bit register, batch 256: it takes 4.4-6.9 ms at any density; the one over the
        # batch, which skips zero weights, 12 ms dense, 6.4 at density 0.5, 3.0 at 0.2), or
        # there are too few outputs to fill its vectors (lenet5.fc2, 10 outputs: 0.67-4.9 ms
        # over the outputs, 0.3 over the batch); those run over the batch on the zero-skipping
        # kernel's layout, as convolutions do
        over_outputs = (plan.path.startswith("per_mac") and self.datapath.acc_bits <= 62
                        and self.density > 0.35 and n_out >= 64)
        if lanes is not None and (self.use_sparse or (lanes[1] and not over_outputs)):
            x4 = x.reshape(n, k, 1, 1)  # a linear layer is a 1x1 convolution of a 1x1 image
            counters = self._run_sparse(plan, x4, (1, 1), (0, 0), (1, 1), out, u,
                                        every_weight=not self.use_sparse)
            return out.reshape(n, n_out), counters
        per_chunk = _images_per_chunk(k)
        counters = Counters(weight_bytes=self.weight_bytes())
        for n0 in range(0, n, per_chunk):
            n1 = min(n, n0 + per_chunk)
            # float and int8 paths multiply x @ w.T
            x_rows = (plan.path.startswith("float")
                      or plan.path in ("int8", "int8x2", "int8_gather") or over_outputs)
            if x_rows:
                cols = x[n0:n1].astype(plan.cols_dtype, copy=False)  # (N, K)
            else:
                cols = dense.transpose2d(x[n0:n1], plan.cols_dtype)  # (K, N)
            chunk_u = _slice(u, n0, n1, n_out)
            counters += self._accumulate(plan, cols, out[n0:n1], chunk_u, x_rows)
        return out.reshape(n, n_out), self._as_datapath_ran(plan, counters)

    def _as_datapath_ran(self, plan: _Plan, counters: Counters) -> Counters:
        """``counters`` of the dense host kernel as the simulated datapath's: on the
        zero-skipping datapath (run densely, filler zeros included, see _choose_plan and
        _run_int8_mac's callers) only the stored weights are executed MACs. (Other dense
        fallbacks, such as per-MAC registers wider than 62 bits, report the dense datapath
        they ran.)"""
        if not self.use_sparse or not set(counters.paths) <= {"int8", "int8_gather",
                                                               "per_mac_int8"}:
            return counters
        executed = self.compressed.nnz * (counters.outputs // self.matrix.shape[0])
        return dataclasses.replace(counters, executed_macs=executed,
                                   skipped_macs=counters.macs - executed,
                                   paths={f"sparse_{p}": n for p, n in counters.paths.items()})

    def _linear_few_outputs(self, x_codes, out_dtype):
        """A linear layer with few outputs in one fused pass (cast, exact sums, requantisation:
        :func:`dense.linear_few_outputs`, or :func:`sparse.linear_few_outputs` on the
        zero-skipping path), where every input the format allows keeps the sums exact in float
        lanes and the vectorised requantisation applies; None where it does not apply (the
        general path then also reports bad input)."""
        dp = self.datapath
        fmt = dp.act_fmt
        x = np.asarray(x_codes)
        n_out, fan_in = self.matrix.shape
        if (n_out > dense.FEW_OUTPUTS or x.ndim != 2 or x.size == 0 or x.shape[1] != fan_in
                or x.dtype.kind not in "iu" or x.dtype == np.uint64):
            return None
        plan = self.plan(max(-fmt.min_code, fmt.max_code))  # the worst case the format allows
        if plan.path not in ("float32", "float64"):
            return None
        acc_omode = dp.acc_overflow.code if dp.acc_bits is not None else -1
        rq = _fast_requant(acc_omode, dp.acc_frac_bits - dp.output_fmt.frac_bits, plan, dp)
        if rq is None:
            return None
        x = np.ascontiguousarray(x)
        out = np.empty((x.shape[0], n_out), _output_dtype(out_dtype, dp.output_fmt))
        cw = self.compressed if self.use_sparse else None
        if cw is not None and not cw.fills_blocks():
            path, executed = f"sparse_{plan.path}", cw.nnz * x.shape[0]
            used, col_pos = self._used_inputs()
            result = sparse.linear_few_outputs(x, cw.row_ptr, col_pos, used,
                                               self._values_as(plan.cols_dtype), self.bias, rq,
                                               dense.code_bytes(out))
        elif cw is not None:
            # the zero-skipping datapath where at most a quarter of the weights are zero: all
            # outputs run as one block over every input, as the blocks of four channels of
            # sparse.sparse_sum do (same rule), pruned weights as zeros (lenet5.fc2 at density
            # 1: 0.09 -> 0.045 ms)
            path, executed = f"sparse_{plan.path}", cw.nnz * x.shape[0]
            result = dense.linear_few_outputs(x, plan.weights, self.bias, rq,
                                              dense.code_bytes(out))
        else:
            path, executed = plan.path, out.size * fan_in
            result = dense.linear_few_outputs(x, plan.weights, self.bias, rq,
                                              dense.code_bytes(out))
        acc_events, sat_events, highest, lowest, x_lo, x_hi = result
        if x_lo < fmt.min_code or x_hi > fmt.max_code:
            check_codes(x, fmt, "x")  # raises, naming the first code out of range
        return out, Counters(
            macs=out.size * fan_in,
            acc_overflows=int(acc_events),
            out_saturations=int(sat_events),
            max_abs_acc=max(int(highest), -int(lowest)),
            outputs=out.size,
            executed_macs=executed,
            skipped_macs=out.size * fan_in - executed,
            paths={path: out.size},
            weight_bytes=self.weight_bytes(),
        )

    def _accumulate(self, plan: _Plan, cols: np.ndarray, out: np.ndarray, u: np.ndarray,
                    x_rows: bool = False, batch_last: bool = False):
        """Sums for one chunk -> output codes in ``out`` (N, J, P). Returns its Counters.

        ``cols`` is (K, M) with M = N * P, its columns ordered (image, position), or (position,
        image) with ``batch_last``; or, with ``x_rows`` (a linear layer on a float path or with
        a per-MAC register of <= 62 bits), the (N, K) input itself, multiplied as x @ w.T so
        that nothing needs a transpose (on the int8 path, int8 codes).
        """
        dp = self.datapath
        n_img, n_out, per_img = out.shape
        if plan.path.startswith("per_mac"):
            wrap = dp.acc_overflow is Overflow.WRAP
            if x_rows:  # a register of <= 62 bits, over the outputs (see linear)
                lo, hi, mask = _register(dp.acc_bits, plan.cols_dtype)
                sums, events = dense.dot_per_mac_rows(cols, self._transposed_as(plan.cols_dtype),
                                                      plan.start, lo, hi, mask, wrap,
                                                      self.w_max_abs)
            else:  # wider than 62 bits (narrower ones run on the zero-skipping kernel's layout)
                block = dense.block_size(cols.shape[1], numba.get_num_threads())
                sums, events = dense.dot_per_mac_int64(plan.weights, cols, plan.start,
                                                       dp.acc_bits, wrap, block)
            events += plan.start_overflowed * n_img * per_img
            bias = np.zeros(self.bias.shape, np.int64)
            acc_omode = -1
        else:
            if plan.path == "int64":
                _check_int64_fits(plan, cols, self.bias)
                block = dense.block_size(cols.shape[1], numba.get_num_threads())
                sums = dense.dot_int64(plan.weights, cols, block)
            elif plan.path == "int8":  # a linear layer (convolutions: _conv_int8)
                sums = np.empty((n_img, n_out), np.int32)
                int8.dot_rows(cols, plan.weights, sums)
            elif plan.path == "int8_gather":  # zero-skipping, a linear layer
                sums = np.empty((n_img, n_out), np.int32)
                sc = plan.weights
                int8_sparse.linear_sums(cols, sc.runs, sc.run_ptr, sc.step_ptr, sc.table,
                                        sc.corr, sc.reach, sums)
            elif plan.path == "int8x2":  # a linear layer (convolutions: _conv_int8_digits)
                sums = _digit_sums(cols, plan.weights, lambda x, packed, into: int8.dot_rows(
                    np.ascontiguousarray(x), packed, into), (n_img, n_out))
            elif x_rows:
                # BLAS on the contiguous (K, J) copy: numpy's transposed operand measured up to
                # 2x slower (lenet5.fc2, 256 x 500 @ 500 x 10: 0.098 -> 0.041 ms; fc1 0.86 -> 0.77)
                sums = cols @ self._transposed_as(plan.cols_dtype)
            else:
                sums = plan.weights @ cols
            events = 0
            bias = self.bias
            acc_omode = self._acc_omode
        return self._finish_chunk(plan, sums, events, bias, acc_omode, out, u, x_rows,
                                  batch_last)

    @property
    def _acc_omode(self) -> int:
        """The accumulator's overflow mode code for a final overflow, -1 for none."""
        dp = self.datapath
        return dp.acc_overflow.code if dp.acc_bits is not None else -1

    def _finish_chunk(self, plan: _Plan, sums, events, bias, acc_omode, out, u,
                      x_rows: bool = False, batch_last: bool = False) -> Counters:
        """Requantise one chunk's sums into ``out`` (N, J, P) and count. ``sums``: (N, J)
        with ``x_rows``; (J, P * N) with ``batch_last`` or P = 1; (N, J, P) from the int8
        convolution; else (J, N * P). ``events``: accumulator overflows already counted."""
        dp = self.datapath
        n_img, n_out, per_img = out.shape
        shift = dp.acc_frac_bits - dp.output_fmt.frac_bits
        if x_rows:  # (N, J): one (1, J) row per image, the bias along it
            acc_events, sat_events, highest, lowest = _finish(
                sums[:, None, :], bias, True, acc_omode, shift, plan, dp, u,
                out.reshape(n_img, 1, n_out),
                serial=plan.path.startswith("float") and out.size < _ONE_THREAD_BELOW,
            )  # fmt: skip
        elif sums.ndim == 3:  # (N, J, P) already
            acc_events, sat_events, highest, lowest = _finish(
                sums, bias, False, acc_omode, shift, plan, dp, u, out)
        elif batch_last or per_img == 1:  # (J, P * N)
            acc_events, sat_events, highest, lowest = _finish_batch_last(
                sums, bias, acc_omode, shift, plan, dp, u, out)
        else:  # (J, N * P) seen as (N, J, P)
            sums3 = sums.reshape(n_out, n_img, per_img).transpose(1, 0, 2)
            acc_events, sat_events, highest, lowest = _finish(
                sums3, bias, False, acc_omode, shift, plan, dp, u, out)
        return self._dense_counters(plan, out, int(events) + int(acc_events), sat_events,
                                    highest, lowest)

    def _dense_counters(self, plan: _Plan, out, acc_events, sat_events, highest,
                        lowest) -> Counters:
        """The Counters of one chunk ``out`` that a dense kernel computed: every MAC executed."""
        macs = out.size * self.matrix.shape[1]
        return Counters(
            macs=macs,
            acc_overflows=int(acc_events),
            out_saturations=int(sat_events),
            max_abs_acc=max(int(highest), -int(lowest)),
            outputs=out.size,
            executed_macs=macs,
            paths={plan.path: out.size},
        )

    def _conv_int8(self, plan: _Plan, x, stride, padding, out, u) -> Counters:
        """The convolution as int8 dot products, no im2col: dense (:func:`int8.conv_sums`) or,
        on the ``int8_gather`` path, zero-skipping (:func:`int8_sparse.conv_sums`), chunk by
        chunk of images; fills ``out`` (N, J, P)."""
        n, c = x.shape[:2]
        kh, kw = self.weights.shape[2:]
        fold = int8.folds(c, kw)
        per_chunk = _images_per_chunk(out[0].size)
        counters = Counters(weight_bytes=self.weight_bytes())
        dp = self.datapath
        # requantised inside the kernel where the vectorised requantisation applies
        rq = _fast_requant(self._acc_omode, dp.acc_frac_bits - dp.output_fmt.frac_bits, plan, dp)
        for n0 in range(0, n, per_chunk):
            n1 = min(n, n0 + per_chunk)
            chunk_out = out[n0:n1]
            sums = np.empty(chunk_out.shape if rq is None else (0, 0, 0), np.int32)
            codes = np.empty((0, 0, 0), np.uint8) if rq is None else dense.code_bytes(chunk_out)
            rq_args = sparse.NO_REQUANT if rq is None else rq
            if plan.path == "int8_gather":
                sc = plan.weights
                xflat, shape = int8_sparse.conv_input(x[n0:n1], padding, kw if fold else 1,
                                                      sc.reach)
                fused = int8_sparse.conv_sums(xflat, shape, sc.runs, sc.run_ptr, sc.step_ptr,
                                              sc.table, sc.corr, kh, 1 if fold else kw,
                                              *stride, self.bias, rq_args, codes, sums)
            else:
                xp, pixel_sums = int8.layout(x[n0:n1], padding, kw if fold else 1)
                fused = int8.conv_sums(xp, pixel_sums, plan.weights, kh, 1 if fold else kw,
                                       *stride, self.bias, rq_args, codes, sums)
            if rq is None:
                counters += self._finish_chunk(plan, sums, 0, self.bias, self._acc_omode,
                                               chunk_out, _slice(u, n0, n1, out[0].size))
            else:
                counters += self._dense_counters(plan, chunk_out, *fused)
        return counters

    def _conv_int8_digits(self, plan: _Plan, x, stride, padding, out, u) -> Counters:
        """The convolution of codes wider than a byte as int8 dot products of their digits
        (:func:`_digit_sums` over :func:`int8.conv_sums`), chunk by chunk of images; fills
        ``out`` (N, J, P)."""
        n = x.shape[0]
        kh, kw = self.weights.shape[2:]
        per_chunk = _images_per_chunk(out[0].size)
        counters = Counters(weight_bytes=self.weight_bytes())
        no_codes = np.empty((0, 0, 0), np.uint8)

        def conv(digits, packed, into):
            fold = int8.folds(digits.shape[1], kw)
            xp, pixel_sums = int8.layout(digits, padding, kw if fold else 1)
            int8.conv_sums(xp, pixel_sums, packed, kh, 1 if fold else kw, *stride, self.bias,
                           sparse.NO_REQUANT, no_codes, into)

        for n0 in range(0, n, per_chunk):
            n1 = min(n, n0 + per_chunk)
            chunk_out = out[n0:n1]
            sums = _digit_sums(x[n0:n1], plan.weights, conv, chunk_out.shape)
            counters += self._finish_chunk(plan, sums, 0, self.bias, self._acc_omode, chunk_out,
                                           _slice(u, n0, n1, out[0].size))
        return counters

    def _run_sparse(self, plan: _Plan, x, stride, padding, out_hw, out, u,
                    every_weight: bool = False) -> Counters:
        """The zero-skipping kernel over chunks of images; fills ``out`` (N, J, P).

        ``every_weight``: a dense layer with a per-MAC register on the same kernel and layout:
        every weight, zeros included, two or four output channels per pass, counted as the
        dense datapath. The zero-skipping datapath does the same where most weights are
        nonzero (density above _PAIRS_ABOVE: the shared loads win over the skipped zeros; a
        zero product changes no register), counted as zero-skipping: like sparse_sum's
        blocks of four, a shortcut of the host, not of the simulated datapath."""
        dp = self.datapath
        lanes, per_mac = _sparse_lanes(plan, dp)
        cw = self.compressed
        n, c, h, w = x.shape
        hp, wp = h + 2 * padding[0], w + 2 * padding[1]
        row_len = dense.input_row_length(wp, stride[1])
        paired = per_mac and (every_weight or self.density > _PAIRS_ABOVE)
        quad_rows = self._quad_rows_as(lanes) if paired else np.zeros((0, 1, 4), lanes)
        if paired:
            bases = self._bases_for((hp, wp), stride[1], every_weight=True)
            values = self._matrix_as(lanes).reshape(-1)
            row_ptr = np.arange(0, self.matrix.size + 1, max(1, self.matrix.shape[1]))
        else:
            bases = self._bases_for((hp, wp), stride[1])
            values = self._values_as(lanes)
            row_ptr = cw.row_ptr
        _, n_out, per_img = out.shape
        if per_mac:
            start, overflowed = self._starts_for(lanes)
            bias, acc_omode = np.zeros(n_out, np.int64), -1
            first_events = overflowed * per_img
            lo, hi, mask = _register(dp.acc_bits, lanes)
            wrap = dp.acc_overflow is Overflow.WRAP
        else:
            bias, first_events = self.bias, 0
            acc_omode = dp.acc_overflow.code if dp.acc_bits is not None else -1
        shift = dp.acc_frac_bits - dp.output_fmt.frac_bits
        # requantise each finished tile inside the kernel where the vectorised requantisation
        # applies and the codes are cheap to transpose: they come out batch-last, (J, P, N), and
        # are transposed as codes
        rq = _fast_requant(acc_omode, shift, plan, dp) if _codes_transpose_cheaply(out) else None
        no_codes = np.empty((0, 0), np.uint8)
        # the laid-out input and the sums of a chunk stay in L2 / L3 and are reused from the heap
        per_chunk = _images_per_chunk(max(c * hp * row_len, n_out * per_img))
        counters = Counters(weight_bytes=self.weight_bytes())
        path = plan.path if every_weight else f"sparse_{plan.path}"
        # at low density, exact sums in float32 lanes read int8 codes as they come (as a
        # quantised model passes them) and convert them in the kernel: a quarter of the bytes
        # to lay out and to stream from L2, where the kernel waits on L2. Denser, it waits on
        # arithmetic, and the conversions cost more than they save. Not for int16 codes, nor
        # wider ones narrowed: each input dtype is another compilation of the kernel.
        int8_in = (not per_mac and lanes is np.float32 and x.dtype == np.int8
                   and cw.density < _INT8_INPUTS_BELOW)
        store = np.int8 if int8_in else lanes
        for n0 in range(0, n, per_chunk):
            n1 = min(n, n0 + per_chunk)
            xt = dense.layout_input(x[n0:n1], padding, store, stride[1])
            if per_mac:
                tile, groups = sparse.tile_lanes(out_hw[0], out_hw[1] * (n1 - n0),
                                                 numba.get_num_threads(), cw.fan_in, xt.itemsize)
            else:
                tile, groups, columns = sparse.sum_tiles(out_hw[0], out_hw[1] * (n1 - n0),
                                                         numba.get_num_threads(), cw, n1 - n0,
                                                         values.itemsize, xt.itemsize)
            codes = no_codes if rq is None else np.empty((n_out, per_img * (n1 - n0)), out.dtype)
            rq_args = sparse.NO_REQUANT if rq is None else rq
            if per_mac:
                sums, events, *fused = sparse.sparse_per_mac(
                    xt, row_ptr, bases, values, out_hw, stride[0], row_len, start, wrap, lo,
                    hi, mask, plan.x_max_abs, tile, groups, rq_args, dense.code_bytes(codes),
                    paired, quad_rows)
            else:
                quads = self._quads_for(columns, (hp, wp), stride[1], lanes)
                sums, *fused = sparse.sparse_sum(
                    xt, self._chunks_for(columns), bases, values, quads, bias, rq_args,
                    dense.code_bytes(codes), out_hw, stride[0], row_len, tile, groups)
                events = 0
            chunk_out = out[n0:n1]
            if rq is not None:
                dense.transpose2d(codes.reshape(n_out * per_img, n1 - n0),
                                  out=chunk_out.reshape(n1 - n0, n_out * per_img))
                acc_events, sat_events, highest, lowest = fused
            else:
                acc_events, sat_events, highest, lowest = _finish_batch_last(
                    sums, bias, acc_omode, shift, plan, dp, _slice(u, n0, n1, n_out * per_img),
                    chunk_out)
            executed = (self.matrix.size if every_weight else cw.nnz) * per_img * (n1 - n0)
            counters += Counters(
                macs=chunk_out.size * cw.fan_in,
                acc_overflows=int(events) + int(acc_events) + first_events * (n1 - n0),
                out_saturations=int(sat_events),
                max_abs_acc=max(int(highest), -int(lowest)),
                outputs=chunk_out.size,
                executed_macs=executed,
                skipped_macs=chunk_out.size * cw.fan_in - executed,
                paths={path: chunk_out.size},
            )
        return counters

    def _bases_for(self, padded_hw, stride_w: int, every_weight: bool = False) -> np.ndarray:
        """Each stored weight's input row in the zero-skipping kernel's layout (with
        ``every_weight``: each column of the fan-in's), per input geometry (kept: the same layer
        sees the same image size call after call)."""
        cw = self.compressed
        key = ("bases", padded_hw, stride_w, every_weight)
        if key not in self._casts:
            cols = np.arange(cw.fan_in) if every_weight else cw.col_idx
            # a linear layer's (J, K) weights read input row k directly
            self._casts[key] = (cols if len(cw.shape) == 2 else
                                sparse.conv_bases(cw.shape, cols, padded_hw, stride_w))
        return self._casts[key]

    def _quads_for(self, columns: int, padded_hw, stride_w: int, dtype) -> tuple:
        """:meth:`sparse.CompressedWeights.quads` as :func:`sparse.sparse_sum` takes it: bases
        in the input geometry, values in the lane dtype (kept)."""
        key = ("quads", columns, padded_hw, stride_w, np.dtype(dtype))
        if key not in self._casts:
            cw = self.compressed
            blocked, ptr, cols, values = cw.quads(columns)
            bases = sparse.conv_bases(cw.shape, cols, padded_hw, stride_w)
            self._casts[key] = (blocked, ptr, bases, values.astype(dtype))
        return self._casts[key]

    def _used_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(the inputs some stored weight reads, ascending; each stored weight's position among
        them) for :func:`sparse.linear_few_outputs` (kept)."""
        if "used" not in self._casts:
            used = np.unique(self.compressed.col_idx)
            self._casts["used"] = (used, np.searchsorted(used, self.compressed.col_idx))
        return self._casts["used"]

    def _chunks_for(self, columns: int) -> np.ndarray:
        """The stored weights' chunk pointers for :func:`sparse.sparse_sum` (kept per chunk
        width)."""
        key = ("chunks", columns)
        if key not in self._casts:
            self._casts[key] = self.compressed.chunk_pointers(columns)
        return self._casts[key]

    def _starts_for(self, dtype):
        """The per_mac register's first value per output (the bias, overflow-checked)."""
        dp = self.datapath
        if dtype not in self._starts:
            acc_fmt = QFormat(dp.acc_bits, dp.acc_bits)
            start = requantize(self.bias, 0, acc_fmt, overflow=dp.acc_overflow)
            self._starts[dtype] = (start.astype(dtype), int((start != self.bias).sum()))
        return self._starts[dtype]


def _digit_sums(x, packed: tuple, dot, shape) -> np.ndarray:
    """Exact sums of products of codes of up to 16 bits, from int8 dot products of their
    base-256 digits (x = 256 x_hi + x_lo, w likewise, every digit in [-128, 127]):

        sum x w = 65536 sum x_hi w_hi + 256 sum (x_hi w_lo + x_lo w_hi) + sum x_lo w_lo

    the middle term as one dot product over the digits side by side (a fan-in twice as long).
    Each digit sum fits int32 (the caller checks the fan-in); the result is int64 of ``shape``.
    ``dot(digits, packed, into)`` fills int32 ``into`` (``shape``) with the dot products of
    input digits (the codes' shape) and one packed weight digit."""
    parts = int8.digits(x)  # high, (high, low), low
    sums = [np.empty(shape, np.int32) for _ in parts]
    for digits, weights, into in zip(parts, packed, sums, strict=True):
        dot(digits, weights, into)
    out = np.empty(shape, np.int64)
    int8.combine_digits(*(s.reshape(-1) for s in sums), out.reshape(-1))
    return out


def _per_mac_lanes(acc_bits: int, product_max: int, wrap: bool):
    """The lane dtype of a per-MAC register of ``acc_bits`` whose products stay within
    ``product_max``: float32 for a saturating register whose every value (register +
    product) is an integer below 2^24, so exact: float multiply-adds and clamps run about
    1.25-1.6x as fast as int32 ones (2 cores, see docs/results/kernels.md). A wrapping one
    needs a floor per MAC in float lanes (5x slower than int32's mask), so it stays integer:
    int32 while register + product fits (<= 30 bits), else int64. A saturating register wider
    than 30 bits whose values stay below 2^53 runs in float64 lanes (FMAs instead of 64-bit
    integer multiplies: 16-bit codes, 36-bit register, lenet5.conv2 0.33 -> 0.72 of the f32
    layer, fc1 0.09 -> 0.13, cifarnet.conv6 0.08 -> 0.11)."""
    if not wrap and (1 << acc_bits) + product_max < 1 << 24:
        return np.float32
    if acc_bits <= 30:
        return np.int32
    if not wrap and (1 << acc_bits) + product_max < 1 << 53:
        return np.float64
    return np.int64


def _register(acc_bits: int, lanes) -> tuple:
    """(lo, hi, 2^bits - 1) of an ``acc_bits``-wide two's-complement register, as ``lanes``."""
    return (lanes(-(1 << (acc_bits - 1))), lanes((1 << (acc_bits - 1)) - 1),
            lanes((1 << acc_bits) - 1))


def _sparse_lanes(plan: _Plan, dp: Datapath):
    """(lane dtype, per_mac) for the zero-skipping kernel, or None where it cannot be exact
    without the dense kernel's extra checks (exact sums that may exceed 2^63, per-MAC registers
    wider than 62 bits whose add could leave int64); those layers run densely."""
    if plan.path in ("float32", "float64"):
        return (np.float32 if plan.path == "float32" else np.float64), False
    if plan.path in ("int8", "int8x2", "int8_gather"):  # int8 dot products, their own kernels
        return None
    if plan.path == "int64":
        return (np.int64, False) if plan.acc_bound < 1 << 63 else None
    if plan.path == "per_mac_int64" and dp.acc_bits > 62:
        return None
    return plan.cols_dtype, True


def _check_int64_fits(plan: _Plan, cols: np.ndarray, bias: np.ndarray) -> None:
    """Refine the bound for the int64 path with a float64 |w| @ |cols| (rounding margin added)."""
    fan_in = cols.shape[0]
    est = np.abs(plan.weights).astype(np.float64) @ np.abs(cols).astype(np.float64)
    worst = float(est.max()) if est.size else 0.0
    worst *= 1.0 + (fan_in + 4) * 2.0**-52
    if worst + _max_abs(bias) >= 2.0**63:
        raise DatapathError(
            f"an exact accumulator sum may need more than 64 bits (bound ~2^{np.log2(worst):.1f}); "
            "fxsim holds exact sums in int64: use narrower formats, or a per_mac accumulator "
            "of at most 64 bits"
        )


def _fast_requant(acc_omode: int, shift: int, plan: _Plan, dp: Datapath) -> tuple | None:
    """The argument tuple of the vectorised requantisation (:func:`dense.fast_requant_args`)
    where the shift and the bound allow it (a right shift of 1..62 bits whose rounding offset
    cannot overflow int64, deterministic rounding); None where the general scalar kernel must
    run."""
    if not (dp.rounding is not Rounding.STOCHASTIC and 1 <= shift <= 62
            and plan.acc_bound + (1 << shift) < 1 << 63):
        return None
    lo, hi, bits, signed = format_args(dp.output_fmt)
    return dense.fast_requant_args(dp.rounding.code, shift, lo, hi, bits, signed,
                                   dp.overflow.code, dp.acc_bits or 0, acc_omode,
                                   plan.acc_bound)


def _finish(sums, bias, bias_last, acc_omode, shift, plan: _Plan, dp: Datapath, u, out,
            serial: bool = False):
    """Accumulator overflow + requantisation of raw sums: the vectorised kernel where
    :func:`_fast_requant` allows it, the general scalar one otherwise; on the calling thread
    alone when ``serial``."""
    rq = _fast_requant(acc_omode, shift, plan, dp)
    if rq is None:
        lo, hi, bits, signed = format_args(dp.output_fmt)
        kernel = dense.finish_serial if serial else dense.finish
        return kernel(sums, bias, bias_last, dp.acc_bits or 0, acc_omode, shift, lo, hi, bits,
                      signed, dp.rounding.code, dp.overflow.code, u, dense.code_bytes(out))
    if rq[11] and sums.flags.c_contiguous:
        # requantise_lanes row by row: its int32 kernel for 1- and 2-byte codes, the int64
        # pass for wider ones (dense.int32_kernel); a bias per lane as int32 (exact: rq[11]
        # bounds |sum + bias| < 2^31)
        lane_bias = bias.astype(np.int32) if bias_last else np.empty(0, np.int32)
        kernel = dense.finish_lanes_serial if serial else dense.finish_lanes
        return kernel(sums, bias, lane_bias, rq, dense.code_bytes(out))
    kernel = dense.finish_fast_serial if serial else dense.finish_fast
    return kernel(sums, bias, bias_last, rq, dense.code_bytes(out))


def _codes_transpose_cheaply(out: np.ndarray) -> bool:
    """Whether batch-last codes for ``out`` (N, J, P) are worth requantising in their own order
    and transposing: 1- and 2-byte codes move a word at a time, and with one position per image
    (a linear layer) the transpose is small. Wide codes with many positions are requantised in
    the output's order instead (2 cores, lenet5.conv1 sparse at density 0.1 with int64 codes:
    2.5-2.7 ms that way, 3.7 ms transposed)."""
    return out.itemsize <= 2 or out.shape[2] == 1


def _finish_batch_last(sums, bias, acc_omode, shift, plan: _Plan, dp: Datapath, u, out):
    """:func:`_finish` for batch-last sums (J, P * N) (or (J, P, N)) into ``out`` (N, J, P).

    Where the vectorised requantisation applies and the codes are narrow (or P = 1), each
    contiguous row of N sums is requantised in its own order and the codes are then transposed
    (:func:`dense.finish_fast_rows`, :func:`dense.transpose2d`): reading the sums in the
    output's order strides them by N and does not vectorise (2 cores, (50, 64, 256) float32
    sums to int8 codes 0.45 -> 0.33 ms, (64, 900, 128) 5.5 -> 2.9 ms, (500, 1, 256) 0.56 ->
    0.09 ms)."""
    n_img, n_out, per_img = out.shape
    rq = _fast_requant(acc_omode, shift, plan, dp) if _codes_transpose_cheaply(out) else None
    if rq is not None:
        codes = np.empty((n_out * per_img, n_img), out.dtype)
        result = dense.finish_fast_rows(sums.reshape(n_out * per_img, n_img), bias, per_img,
                                        rq, dense.code_bytes(codes))
        dense.transpose2d(codes, out=out.reshape(n_img, n_out * per_img))
        return result
    if per_img == 1:  # a linear layer: one (1, J) row per image, the bias along it
        sums3, bias_last = sums.reshape(n_out, n_img).T[:, None, :], True
        out = out.reshape(n_img, 1, n_out)
    else:
        sums3, bias_last = sums.reshape(n_out, per_img, n_img).transpose(2, 0, 1), False
    return _finish(sums3, bias, bias_last, acc_omode, shift, plan, dp, u, out)


# --------------------------------------------------------------------------------------------
# Public layer entry points
# --------------------------------------------------------------------------------------------


def _as_codes(codes, fmt: QFormat, name: str, ndim: int) -> tuple[np.ndarray, int]:
    """Validated, C-contiguous codes and their largest magnitude. Signed integer and
    uint8-uint32 codes keep their dtype (the kernels cast them to their lanes as they read
    them, so narrow codes are never widened to int64 in memory); others become int64."""
    arr = np.asarray(codes)
    if arr.ndim != ndim:
        raise ShapeError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    lo, hi = check_codes(arr, fmt, name)
    narrow = arr.dtype.kind == "i" or (arr.dtype.kind == "u" and arr.dtype.itemsize < 8)
    return (np.ascontiguousarray(arr) if narrow else np.ascontiguousarray(arr, dtype=np.int64),
            max(abs(lo), abs(hi)))


def _output_dtype(out_dtype, fmt: QFormat) -> np.dtype:
    """The dtype asked for the output codes: int64 by default, else a signed integer dtype
    that holds every code of ``fmt``."""
    if out_dtype is None:
        return np.dtype(np.int64)
    try:
        dtype = np.dtype(out_dtype)
    except TypeError as exc:
        raise FormatError(f"out_dtype must be a numpy integer dtype, got {out_dtype!r}") from exc
    return _checked_output_dtype(dtype, fmt)


@functools.lru_cache(maxsize=64)
def _checked_output_dtype(dtype: np.dtype, fmt: QFormat) -> np.dtype:
    """``dtype`` where it is a signed integer dtype that holds every code of ``fmt`` (cached:
    ``np.iinfo`` took a tenth of a small layer's call)."""
    info = np.iinfo(dtype) if dtype.kind == "i" else None
    if info is None or fmt.min_code < info.min or fmt.max_code > info.max:
        raise FormatError(
            f"out_dtype {dtype} cannot hold the output format {fmt} (codes {fmt.min_code} .. "
            f"{fmt.max_code}); use a signed integer dtype at least as wide as {code_dtype(fmt)}"
        )
    return dtype


def _cast_codes(codes, fmt: QFormat, name: str, ndim: int, dtype) -> tuple[np.ndarray, int]:
    """:func:`_as_codes` straight into ``dtype`` (exact once the range check passed: the caller
    picks a dtype that holds every code of ``fmt``), in one pass over the codes."""
    arr = np.asarray(codes)
    if arr.ndim != ndim or arr.size == 0 or arr.dtype.kind not in "iu" or arr.dtype == np.uint64:
        x, max_abs = _as_codes(arr, fmt, name, ndim)  # the errors, and the rare cases
        return x.astype(dtype), max_abs
    out = np.empty(arr.shape, dtype)
    lo, hi = dense.cast_min_max(np.ascontiguousarray(arr).reshape(-1), out.reshape(-1))
    if lo < fmt.min_code or hi > fmt.max_code:
        check_codes(arr, fmt, name)  # raises, naming the first code out of range
    return out, max(abs(int(lo)), abs(int(hi)))


def _aligned_bias(bias_codes, n_out: int, dp: Datapath) -> np.ndarray:
    if bias_codes is None:
        return np.zeros(n_out, np.int64)
    bias, _ = _as_codes(bias_codes, dp.bias_format, "bias", 1)
    bias = bias.astype(np.int64, copy=False)
    if bias.shape != (n_out,):
        raise ShapeError(f"bias must have shape ({n_out},), got {bias.shape}")
    # a left shift into a 64-bit word with the accumulator's fraction: exact unless it overflows
    word = QFormat(64, 64 - dp.acc_frac_bits)
    aligned, overflowed = requantize_with_count(bias, dp.bias_format.frac_bits, word)
    if overflowed:
        raise DatapathError("bias codes do not fit a 64-bit word once aligned to the accumulator")
    return aligned


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int | np.integer)
                             for v in pair):
        raise ShapeError(f"{name} must be an integer or a pair of integers, got {value!r}")
    return int(pair[0]), int(pair[1])


def prepare(w_codes, bias_codes, datapath: Datapath, mask=None) -> PreparedWeights:
    """Validate a layer's weights once, for many calls of ``.conv2d(x)`` or ``.linear(x)``.

    ``mask`` (boolean, the weights' shape) marks the weights pruning kept; pruned weights must
    be zero (a nonzero one is an error, not silently zeroed).
    """
    return PreparedWeights(w_codes, bias_codes, datapath, mask)


def conv2d(x_codes, w_codes, bias_codes, datapath: Datapath, stride=1, padding=0,
           out_dtype=None):
    """Bit-accurate 2-D convolution (cross-correlation) of integer codes.

    x_codes (N, C, H, W) in ``datapath.act_fmt``, any integer dtype (int8 codes are read as
    they are, never widened in memory); w_codes (J, C, KH, KW) in ``weight_fmt``; bias_codes
    (J,) in ``bias_format`` or None; zero padding. Returns (y_codes (N, J, OH, OW) in
    ``output_fmt``, :class:`Counters`). The codes are int64 unless ``out_dtype`` names a signed
    integer dtype that holds the output format (``fxsim.code_dtype(output_fmt)``: the
    narrowest, what a chain of layers passes on).
    """
    return PreparedWeights(w_codes, bias_codes, datapath).conv2d(x_codes, stride, padding,
                                                                 out_dtype)


def linear(x_codes, w_codes, bias_codes, datapath: Datapath, out_dtype=None):
    """Bit-accurate fully connected layer: y = x @ w.T + bias, in integers.

    x_codes (N, K) in ``act_fmt`` (any integer dtype); w_codes (J, K) in ``weight_fmt``;
    bias_codes (J,) or None. Returns (y_codes (N, J) in ``output_fmt``, int64 or ``out_dtype``
    as in :func:`conv2d`, :class:`Counters`).
    """
    return PreparedWeights(w_codes, bias_codes, datapath).linear(x_codes, out_dtype)


def _images_per_chunk(elements_per_image: int) -> int:
    """Images per chunk of a layer whose buffers hold ``elements_per_image`` per image:
    :data:`_CHUNK_ELEMENTS` in all, rounded down to a multiple of 8 images where there is room,
    so that 8-bit codes laid out batch-last fill whole 8-byte words and transpose a word at a
    time (:func:`fxsim.kernels.dense.transpose2d`)."""
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, elements_per_image))
    return per_chunk - per_chunk % 8 if per_chunk >= 8 else per_chunk


def _slice(u: np.ndarray, n0: int, n1: int, per_image: int) -> np.ndarray:
    return u[n0 * per_image : n1 * per_image] if u.size else u


def relu(codes: np.ndarray) -> np.ndarray:
    """ReLU on codes (exact): max(code, 0)."""
    return np.maximum(codes, 0)


def max_pool2d(codes, kernel=2, stride=None) -> np.ndarray:
    """Max pooling of int64 codes (N, C, H, W); exact, so the format is unchanged."""
    kernel = _pair(kernel, "kernel")
    stride = kernel if stride is None else _pair(stride, "stride")
    x = np.asarray(codes)
    _check_pool(x, kernel, stride)
    return dense.pool2d_codes(x, kernel, stride, True)


def avg_pool2d(codes, frac_bits: int, kernel=2, stride=None, fmt: QFormat | None = None,
               rounding="rnd_conv", overflow="sat"):
    """Average pooling of codes (N, C, H, W) carrying ``frac_bits`` fraction bits.

    When the window holds 2^s values and ``fmt`` is None the result is exact: the window sum,
    carrying ``frac_bits + s`` fraction bits. Otherwise the mean is requantised into ``fmt``
    (default for a non-power-of-two window: a 64-bit word with ``frac_bits`` fraction bits)
    with the given rounding. Returns (codes, their fraction bits).
    """
    kernel = _pair(kernel, "kernel")
    stride = kernel if stride is None else _pair(stride, "stride")
    x = np.asarray(codes)
    _check_pool(x, kernel, stride)
    sums = dense.pool2d_codes(x, kernel, stride, False)
    count = kernel[0] * kernel[1]
    extra = count.bit_length() - 1
    if count == 1 << extra:
        if fmt is None:
            return sums, frac_bits + extra
        return requantize(sums, frac_bits + extra, fmt, rounding, overflow), fmt.frac_bits
    if fmt is None:
        fmt = QFormat(64, 64 - frac_bits)
    return _divide_round(sums, count, frac_bits, fmt, Rounding.parse(rounding), overflow), (
        fmt.frac_bits
    )


def _divide_round(sums, count, frac_bits, fmt, rounding, overflow):
    """requantize(sums / count) exactly, for a window size that is not a power of two.

    Scale so the division is an integer one with a remainder, then let requantize see the
    quotient with two guard bits plus a sticky bit; that preserves every rounding decision.
    """
    if rounding is Rounding.STOCHASTIC:
        raise FormatError("stochastic rounding of a non-power-of-two average is not supported")
    shift_up = max(0, fmt.frac_bits - frac_bits)
    scaled = [int(v) << shift_up for v in sums.reshape(-1)]
    out = np.empty(len(scaled), np.int64)
    for i, v in enumerate(scaled):
        q, r = divmod(v, count)  # floor quotient, remainder >= 0
        # q carries frac_bits + shift_up fraction bits; add 2 guard bits and a sticky bit
        guard = (r * 4) // count
        sticky = 1 if (r * 4) % count else 0
        out[i] = (q << 3) | (guard << 1) | sticky
    from_frac = frac_bits + shift_up + 3
    return requantize(out.reshape(sums.shape), from_frac, fmt, rounding, overflow)


def _check_pool(x: np.ndarray, kernel, stride) -> None:
    if x.ndim != 4:
        raise ShapeError(f"pooling needs codes of shape (N, C, H, W), got {x.shape}")
    if x.dtype.kind not in "iu":
        raise ShapeError(f"pooling works on integer codes, got dtype {x.dtype}")
    if min(kernel) < 1 or min(stride) < 1:
        raise ShapeError(f"kernel and stride must be >= 1, got {kernel}, {stride}")
    if kernel[0] > x.shape[2] or kernel[1] > x.shape[3]:
        raise ShapeError(f"a {kernel} window does not fit a {x.shape[2:]} input")
