"""Compressed (pruned) weights and zero-skipping kernels, bit-identical to the dense ones.

A sparse accelerator (EIE, SCNN) stores only the nonzero weights and never multiplies the
others. :class:`CompressedWeights` is that storage: CSR over output channels (or features),
with column indices into the flattened fan-in (input channel, kernel row, kernel column), in
the canonical MAC order.

The kernel needs no im2col. The input is transposed once to ``(C * Hp * Wp, N)`` with explicit
zero padding, so that a batch of images is one contiguous vector per input pixel. A stored
weight at (c, kh, kw) reads row ``base + oy * sh * Wp + ox * sw`` for output (oy, ox), where
``base = (c * Hp + kh) * Wp + kw``; with stride 1 the rows of one output row are adjacent, so
they form one contiguous run of ``OW * N`` values. A linear layer is the case Hp = Wp = 1, one
position, base = input index. Time is proportional to the stored weights times the output
positions: skipping is real, not simulated.

Every output sees its MACs in canonical order (stored weights are visited in index order), so
the per-MAC saturating and wrapping accumulators give exactly the dense kernels' results;
adding a skipped zero product would change neither an exact nor a saturated sum.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from fxsim.errors import ShapeError


class CompressedWeights:
    """CSR storage of a layer's nonzero weight codes.

    ``row_ptr`` (J + 1,) int64, ``col_idx`` (nnz,) int64 into the flattened fan-in,
    ``values`` (nnz,) int64 codes, ``shape`` the dense weight shape ((J, K) or (J, C, KH, KW)).
    Only nonzero codes are stored: a weight that survived pruning but quantised to 0 is skipped
    like a pruned one (a real compressor drops it too).
    """

    def __init__(self, w_codes: np.ndarray, mask: np.ndarray | None = None):
        w = np.asarray(w_codes)
        if mask is not None:
            check_mask(w, mask)
        flat = w.reshape(w.shape[0], -1)
        keep = flat != 0
        self.shape = w.shape
        self.row_ptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
        rows, cols = np.nonzero(keep)  # row-major: each row's indices ascend, canonical order
        del rows
        self.col_idx = cols.astype(np.int64)
        self.values = flat[keep].astype(np.int64)

    @property
    def n_out(self) -> int:
        return self.shape[0]

    @property
    def fan_in(self) -> int:
        return int(np.prod(self.shape[1:]))

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    @property
    def density(self) -> float:
        total = self.n_out * self.fan_in
        return self.nnz / total if total else 0.0

    def storage_bytes(self, weight_bits: int) -> dict[str, int]:
        """Bytes the weights take at ``weight_bits`` bits each, in four encodings.

        dense:   every weight.
        bitmask: one presence bit per weight + the nonzero values.
        csr:     values + a column index of ceil(log2 K) bits each + J + 1 row pointers of
                 ceil(log2(nnz + 1)) bits.
        eie:     EIE-style: each entry is a value + a 4-bit count of zeros before it; a gap of
                 16 or more zeros costs one filler entry (value 0) per 16 zeros; + J + 1 row
                 pointers of ceil(log2(entries + 1)) bits.
        """
        total = self.n_out * self.fan_in
        index_bits = max(1, math.ceil(math.log2(max(self.fan_in, 2))))
        pointer_bits = max(1, math.ceil(math.log2(self.nnz + 1)))
        entries = self.nnz + self._eie_fillers()
        eie_pointer_bits = max(1, math.ceil(math.log2(entries + 1)))
        bits = {
            "dense": total * weight_bits,
            "bitmask": total + self.nnz * weight_bits,
            "csr": self.nnz * (weight_bits + index_bits) + (self.n_out + 1) * pointer_bits,
            "eie": entries * (weight_bits + 4) + (self.n_out + 1) * eie_pointer_bits,
        }
        return {name: -(-b // 8) for name, b in bits.items()}

    def _eie_fillers(self) -> int:
        """Filler entries a 4-bit relative index needs: one per 16 zeros in a gap."""
        if self.nnz == 0:
            return 0
        previous = np.empty(self.nnz, np.int64)
        previous[0] = -1
        previous[1:] = self.col_idx[:-1]
        previous[self.row_ptr[:-1][self.row_ptr[:-1] < self.nnz]] = -1  # each row starts afresh
        gaps = self.col_idx - previous - 1  # zeros before each stored weight
        return int((gaps // 16).sum())


def random_mask(shape, density: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask keeping exactly ``round(density * size)`` weights chosen uniformly."""
    if not 0.0 < density <= 1.0:  # also rejects NaN
        raise ShapeError(f"density must be in (0, 1], got {density}")
    size = int(np.prod(shape))
    keep = np.zeros(size, bool)
    keep[rng.permutation(size)[: round(density * size)]] = True
    return keep.reshape(shape)


def check_mask(w: np.ndarray, mask) -> None:
    """Reject a mask that does not describe ``w``: wrong shape or dtype, or weights it prunes
    that are not zero. (fxsim rejects rather than zeroes them: a nonzero pruned weight means
    the model and its mask disagree, and silently changing weights would hide that.)"""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ShapeError(f"mask must be boolean, got dtype {mask.dtype}")
    if mask.shape != w.shape:
        raise ShapeError(f"mask shape {mask.shape} does not match weight shape {w.shape}")
    stray = (~mask) & (w != 0)
    if stray.any():
        index = tuple(int(i) for i in np.argwhere(stray)[0])
        raise ShapeError(
            f"weight at index {index} is {w[index]} but the mask prunes it; "
            f"{int(stray.sum())} pruned weights are nonzero"
        )


@njit(cache=True, parallel=True)
def _layout(x, ph, pw, out):
    n_img, chans, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    for row in prange(chans * hp):
        c = row // hp
        iy = row % hp - ph
        for ix in range(-pw, w + pw):
            dst = out[(c * hp + iy + ph) * wp + ix + pw]
            if iy < 0 or iy >= h or ix < 0 or ix >= w:
                dst[:] = 0
            else:
                for n in range(n_img):
                    dst[n] = x[n, c, iy, ix]
    return out


def layout_input(x: np.ndarray, padding, dtype) -> np.ndarray:
    """(N, C, H, W) -> (C * Hp * Wp, N) in ``dtype``, zero-padded: one batch vector per pixel.

    Values are cast on the fly (exact for codes the caller has bounded)."""
    n, c, h, w = x.shape
    ph, pw = padding
    out = np.empty((c * (h + 2 * ph) * (w + 2 * pw), n), dtype)
    return _layout(np.ascontiguousarray(x), ph, pw, out)


def conv_bases(cw: CompressedWeights, padded_hw) -> np.ndarray:
    """Row offset of each stored weight's (c, kh, kw) in the padded input layout."""
    _, _, kh, kw = cw.shape
    hp, wp = padded_hw
    c, rest = np.divmod(cw.col_idx, kh * kw)
    ki, kj = np.divmod(rest, kw)
    return (c * hp + ki) * wp + kj


@njit(cache=True, inline="always")
def _segment(xflat, row, n_img, length):
    return xflat[row * n_img : row * n_img + length]


@njit(cache=True, parallel=True)
def sparse_sum(xt, row_ptr, bases, values, out_hw, stride, padded_w):
    """Exact zero-skipping sums ``sums[n, j, p]`` over the stored weights of row j.

    ``xt`` (R, N) is the laid-out input and ``values`` the stored weights, both in the lane
    dtype (float32, float64 or int64), where the caller's bound makes every partial sum exact.
    Each task is one output channel over all N images: with stride 1 the inputs of one output
    row are ``OW * N`` contiguous values, so one stored weight is one long vector update per
    output row. Four stored weights are applied per pass. Returns sums (J, P, N).
    """
    n_out = row_ptr.size - 1
    n_img = xt.shape[1]
    oh, ow = out_hw
    sh, sw = stride
    xflat = xt.reshape(-1)
    seg = ow * n_img if sw == 1 else n_img  # contiguous values per (output row, segment)
    n_seg = 1 if sw == 1 else ow
    sums = np.empty((n_out, oh * ow, n_img), xt.dtype)
    for j in prange(n_out):
        acc = np.zeros((oh * n_seg, seg), xt.dtype)
        idx, last = row_ptr[j], row_ptr[j + 1]
        while idx < last:
            group = min(4, last - idx)
            w0 = values[idx]
            w1 = values[idx + 1] if group > 1 else values[idx]
            w2 = values[idx + 2] if group > 2 else values[idx]
            w3 = values[idx + 3] if group > 3 else values[idx]
            for oy in range(oh):
                for g in range(n_seg):
                    shift = oy * sh * padded_w + g * sw
                    dst = acc[oy * n_seg + g]
                    x0 = _segment(xflat, bases[idx] + shift, n_img, seg)
                    if group == 4:
                        x1 = _segment(xflat, bases[idx + 1] + shift, n_img, seg)
                        x2 = _segment(xflat, bases[idx + 2] + shift, n_img, seg)
                        x3 = _segment(xflat, bases[idx + 3] + shift, n_img, seg)
                        for t in range(seg):
                            dst[t] += w0 * x0[t] + w1 * x1[t] + w2 * x2[t] + w3 * x3[t]
                    else:
                        for t in range(seg):
                            dst[t] += w0 * x0[t]
            idx += 4 if group == 4 else 1
        sums[j] = acc.reshape(oh * ow, n_img)
    return sums


@njit(cache=True, inline="always")
def _sat_add(acc, product, lo, hi):
    """Saturating register add: (new register value, 1 if it overflowed else 0) as int32."""
    s = acc + product
    c = min(max(s, lo), hi)
    return c, np.int32(c != s)


@njit(cache=True, inline="always")
def _wrap_add(acc, product, lo, mask):
    """Wrapping register add of a two's-complement register [lo, -lo - 1], mask = 2^bits - 1."""
    s = acc + product
    c = ((s - lo) & mask) + lo
    return c, np.int32(c != s)


@njit(cache=True, parallel=True)
def sparse_per_mac(xt, row_ptr, bases, values, out_hw, stride, padded_w, start, wrap, lo, hi,
                   mask):
    """Zero-skipping per-MAC register: saturates (or wraps, with ``wrap``) after every MAC.

    Same layout and tasks as :func:`sparse_sum`. Integer lanes (int32 or int64): every product
    fits the register [lo, hi] and register + product fits the lane dtype (the caller checks).
    ``start`` (J,) holds each register's first value (the aligned, overflow-checked bias);
    ``mask`` is 2^bits - 1. Every output still takes its MACs one after another in canonical
    order. Returns (sums (J, P, N) int64, overflow events).
    """
    n_out = row_ptr.size - 1
    n_img = xt.shape[1]
    oh, ow = out_hw
    sh, sw = stride
    xflat = xt.reshape(-1)
    seg = ow * n_img if sw == 1 else n_img
    n_seg = 1 if sw == 1 else ow
    sums = np.empty((n_out, oh * ow, n_img), np.int64)
    events = np.zeros(n_out, np.int64)
    for j in prange(n_out):
        acc = np.empty((oh * n_seg, seg), xt.dtype)
        acc[:, :] = start[j]
        hits = np.zeros(seg, np.int32)  # per lane: at most nnz(row) x oh x n_seg events
        for idx in range(row_ptr[j], row_ptr[j + 1]):
            wv = values[idx]
            for oy in range(oh):
                for g in range(n_seg):
                    src = _segment(xflat, bases[idx] + oy * sh * padded_w + g * sw, n_img, seg)
                    dst = acc[oy * n_seg + g]
                    if wrap:
                        for t in range(seg):
                            a, h = _wrap_add(dst[t], wv * src[t], lo, mask)
                            hits[t] += h
                            dst[t] = a
                    else:
                        for t in range(seg):
                            a, h = _sat_add(dst[t], wv * src[t], lo, hi)
                            hits[t] += h
                            dst[t] = a
        sums[j] = acc.reshape(oh * ow, n_img)
        events[j] = np.int64(hits.sum())
    return sums, events.sum()
