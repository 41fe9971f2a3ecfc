"""Compressed (pruned) weights and zero-skipping kernels, bit-identical to the dense ones.

A sparse accelerator (EIE, SCNN) stores only the nonzero weights and never multiplies the
others. :class:`CompressedWeights` is that storage: CSR over output channels (or features),
with column indices into the flattened fan-in (input channel, kernel row, kernel column), in
the canonical MAC order.

The kernel needs no im2col. The input is transposed once to ``(C * Hp * Wp, N)`` with explicit
zero padding, so that a batch of images is one contiguous vector per input pixel. A stored
weight at (c, kh, kw) then reads row ``base + offset[p]`` for output position p, where
``base = (c * Hp + kh) * Wp + kw`` and ``offset[p] = oy * sh * Wp + ox * sw``. A linear layer is
the case Hp = Wp = 1, one position, base = input index. Time is proportional to the stored
weights times the output positions: skipping is real, not simulated.

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
        fillers = 0
        for j in range(self.n_out):
            idx = self.col_idx[self.row_ptr[j] : self.row_ptr[j + 1]]
            gaps = np.diff(np.concatenate([[-1], idx])) - 1  # zeros before each stored weight
            fillers += int((gaps // 16).sum())
        return fillers


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


def layout_input(x: np.ndarray, padding, dtype) -> np.ndarray:
    """(N, C, H, W) -> (C * Hp * Wp, N) in ``dtype``, zero-padded: one batch vector per pixel."""
    n, c, h, w = x.shape
    ph, pw = padding
    out = np.zeros((c, h + 2 * ph, w + 2 * pw, n), dtype)
    out[:, ph : ph + h, pw : pw + w, :] = x.transpose(1, 2, 3, 0)
    return out.reshape(-1, n)


def conv_bases(cw: CompressedWeights, padded_hw) -> np.ndarray:
    """Row offset of each stored weight's (c, kh, kw) in the padded input layout."""
    _, _, kh, kw = cw.shape
    hp, wp = padded_hw
    c, rest = np.divmod(cw.col_idx, kh * kw)
    ki, kj = np.divmod(rest, kw)
    return (c * hp + ki) * wp + kj


def conv_offsets(out_hw, stride, padded_w: int) -> np.ndarray:
    """Row offset of each output position (oy, ox) in the padded input layout."""
    oh, ow = out_hw
    oy, ox = np.meshgrid(np.arange(oh), np.arange(ow), indexing="ij")
    return (oy * stride[0] * padded_w + ox * stride[1]).reshape(-1).astype(np.int64)


@njit(cache=True, parallel=True)
def sparse_sum(xt, row_ptr, bases, values, offsets, block):
    """Exact zero-skipping sums ``sums[j, p, n]`` over the stored weights of row j.

    ``xt`` (R, N) is the laid-out input and ``values`` the stored weights, both in the lane
    dtype (float32, float64 or int64), where the caller's bound makes every partial sum exact.
    Returns sums (J, P, N) in that dtype.
    """
    n_out = row_ptr.size - 1
    n_pos = offsets.size
    n_img = xt.shape[1]
    n_blocks = (n_img + block - 1) // block
    sums = np.empty((n_out, n_pos, n_img), xt.dtype)
    for task in prange(n_out * n_blocks):
        j = task // n_blocks
        n0 = (task % n_blocks) * block
        width = min(block, n_img - n0)
        acc = np.zeros((n_pos, width), xt.dtype)
        for idx in range(row_ptr[j], row_ptr[j + 1]):
            wv = values[idx]
            base = bases[idx]
            for p in range(n_pos):
                src = xt[base + offsets[p], n0 : n0 + width]
                dst = acc[p]
                for t in range(width):
                    dst[t] += wv * src[t]
        sums[j, :, n0 : n0 + width] = acc
    return sums


@njit(cache=True, parallel=True)
def sparse_per_mac(xt, row_ptr, bases, values, offsets, start, wrap, lo, hi, mask, block):
    """Zero-skipping per-MAC register: saturates (or wraps, with ``wrap``) after every MAC.

    Integer lanes (int32 or int64): every product fits the register [lo, hi] and register +
    product fits the lane dtype (the caller checks). ``start`` (J,) holds each register's first
    value (the aligned, overflow-checked bias); ``mask`` is 2^bits - 1. Returns (sums (J, P, N)
    int64, overflow events).
    """
    n_out = row_ptr.size - 1
    n_pos = offsets.size
    n_img = xt.shape[1]
    n_blocks = (n_img + block - 1) // block
    sums = np.empty((n_out, n_pos, n_img), np.int64)
    tasks = n_out * n_blocks
    events = np.zeros(tasks, np.int64)
    for task in prange(tasks):
        j = task // n_blocks
        n0 = (task % n_blocks) * block
        width = min(block, n_img - n0)
        acc = np.empty((n_pos, width), xt.dtype)
        acc[:, :] = start[j]
        hits = np.zeros(width, np.int32)  # per lane: at most nnz(row) x positions events
        for idx in range(row_ptr[j], row_ptr[j + 1]):
            wv = values[idx]
            base = bases[idx]
            for p in range(n_pos):
                src = xt[base + offsets[p], n0 : n0 + width]
                dst = acc[p]
                if wrap:
                    for t in range(width):
                        s = dst[t] + wv * src[t]
                        c = ((s - lo) & mask) + lo
                        hits[t] += np.int32(c != s)
                        dst[t] = c
                else:
                    for t in range(width):
                        s = dst[t] + wv * src[t]
                        c = min(max(s, lo), hi)
                        hits[t] += np.int32(c != s)
                        dst[t] = c
        sums[j, :, n0 : n0 + width] = acc
        events[task] = np.int64(hits.sum())
    return sums, events.sum()
