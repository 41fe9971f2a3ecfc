import contextlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsim import QFormat, code_dtype, datapath
from fxsim.datapath import Datapath, prepare
from fxsim.errors import ShapeError
from fxsim.kernels import int8, int8_sparse, sparse
from fxsim.kernels.dense import FEW_OUTPUTS
from fxsim.kernels.sparse import CompressedWeights, random_mask

ROUNDINGS = ["trn", "trn_zero", "rnd", "rnd_zero", "rnd_min_inf", "rnd_inf", "rnd_conv"]
COUNTERS = ("macs", "acc_overflows", "out_saturations", "max_abs_acc", "outputs")


def with_kernel(dp: Datapath, kernel: str) -> Datapath:
    return Datapath(**{**dp.__dict__, "kernel": kernel})


def run_both(dp, w, b, x, mask, conv, stride=1, padding=0):
    dense_layer = prepare(w, b, with_kernel(dp, "dense"), mask)
    sparse_layer = prepare(w, b, with_kernel(dp, "sparse"), mask)
    if conv:
        y_d, c_d = dense_layer.conv2d(x, stride, padding)
        y_s, c_s = sparse_layer.conv2d(x, stride, padding)
    else:
        y_d, c_d = dense_layer.linear(x)
        y_s, c_s = sparse_layer.linear(x)
    assert np.array_equal(y_d, y_s)
    for key in COUNTERS:
        assert getattr(c_d, key) == getattr(c_s, key), key
    # int8 codes, as a quantised model passes them: the exact float32 sums read them as they
    # are at low density, here at any (only there, and not for the few-output kernels: each
    # input dtype compiles more)
    few = not conv and w.shape[0] <= FEW_OUTPUTS
    if "sparse_float32" in c_s.paths and code_dtype(dp.act_fmt) == np.int8 and not few:
        x8 = x.astype(np.int8)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(datapath, "_INT8_INPUTS_BELOW", 2.0)
            y8, c8 = (sparse_layer.conv2d(x8, stride, padding) if conv
                      else sparse_layer.linear(x8))
        assert np.array_equal(y8, y_d) and c8 == c_s
    # narrow codes out (int8, int16 or int32, as the output format needs): the zero-skipping
    # kernel then requantises inside (fused) and transposes the codes, or requantises in the
    # output's order (int32); the kernels write every code width through one compilation
    narrow = code_dtype(dp.output_fmt)
    if conv:
        y_n, c_n = sparse_layer.conv2d(x, stride, padding, out_dtype=narrow)
    else:
        y_n, c_n = sparse_layer.linear(x, out_dtype=narrow)
    assert y_n.dtype == narrow and np.array_equal(y_n, y_d) and c_n == c_s
    return c_d, c_s


def random_bias(rng, dp, n):
    fmt = dp.bias_format
    return rng.integers(fmt.min_code, fmt.max_code, n, endpoint=True) >> rng.integers(0, 40)


def check_mac_counters(c_s, w, positions):
    nnz = int(np.count_nonzero(w))
    assert c_s.executed_macs == nnz * positions
    assert c_s.executed_macs + c_s.skipped_macs == c_s.macs
    assert c_s.density == pytest.approx(nnz / w.size)


@contextlib.contextmanager
def kernel_variant(small_chunks: bool, quads: str, gather: bool = True):
    """With ``small_chunks``, the exact sums' kernel takes the fan-in one input channel (or
    input) per chunk, as few stored weights as the density allows; else chunks sized for speed
    (at these layer sizes: the whole fan-in at once). ``quads``: "all" runs every block of four
    output channels over its union of columns, "none" none, "auto" where it pays. Without
    ``gather``, codes of a byte take the float lanes, as on hosts without VBMI, instead of
    int8_sparse's kernels."""
    with pytest.MonkeyPatch.context() as patch:
        if not gather:
            patch.setattr(int8_sparse, "AVAILABLE", False)
        if small_chunks:
            patch.setattr(sparse, "CHUNK_BYTES", 1)
            patch.setattr(sparse, "QUAD_CHUNK_BYTES", 1)
            patch.setattr(sparse, "CHUNK_ENTRIES", 1)
        if quads != "auto":
            patch.setattr(sparse, "QUAD_COST", 0 if quads == "all" else 10**9)
        yield


@st.composite
def layer_cases(draw):
    act = QFormat(draw(st.integers(2, 12)), draw(st.integers(0, 5)))
    weight = QFormat(draw(st.integers(2, 12)), draw(st.integers(-1, 3)))
    probe = Datapath(act, weight)
    acc_bits = draw(st.one_of(st.none(), st.integers(probe.product_bits, 64)))
    dp = Datapath(
        act, weight, out_fmt=QFormat(draw(st.integers(2, 16)), draw(st.integers(-2, 8))),
        acc_bits=acc_bits, acc_overflow=draw(st.sampled_from(["sat", "wrap"])),
        acc_mode=draw(st.sampled_from(["final", "per_mac"])),
        rounding=draw(st.sampled_from(ROUNDINGS)),
        overflow=draw(st.sampled_from(["sat", "wrap", "sat_zero", "sat_sym"])),
    )  # fmt: skip
    mask_kind = draw(st.sampled_from(["random", "dense", "single", "empty_rows", "none"]))
    return dp, mask_kind, draw(st.integers(0, 2**32 - 1))


def make_weights(rng, dp, shape, mask_kind):
    w = rng.integers(dp.weight_fmt.min_code, dp.weight_fmt.max_code, size=shape, endpoint=True)
    if mask_kind == "dense":
        mask = np.ones(shape, bool)
    elif mask_kind == "single":
        mask = np.zeros(shape, bool)
        mask.flat[rng.integers(mask.size)] = True
    elif mask_kind == "none":
        mask = np.zeros(shape, bool)
    else:
        mask = rng.random(shape) < rng.uniform(0.05, 0.9)
        if mask_kind == "empty_rows":
            mask[:: 2] = False
    return np.where(mask, w, 0), mask


@settings(max_examples=120, deadline=None)
@given(case=layer_cases(), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), batch=st.integers(1, 70),
       small_chunks=st.booleans(), quads=st.sampled_from(["auto", "all", "none"]),
       gather=st.booleans())
def test_sparse_conv_is_bit_identical_to_dense(case, stride, padding, kernel, batch,
                                               small_chunks, quads, gather):
    # up to 70 images x 21 output columns: output rows longer than one task's tile of lanes
    dp, mask_kind, seed = case
    rng = np.random.default_rng(seed)
    w, mask = make_weights(rng, dp, (6, 3, *kernel), mask_kind)  # a block of 4 channels + 2
    b = random_bias(rng, dp, 6)
    x = rng.integers(dp.act_fmt.min_code, dp.act_fmt.max_code, (batch, 3, 6, 17), endpoint=True)
    with kernel_variant(small_chunks, quads, gather):
        _, c_s = run_both(dp, w, b, x, mask, conv=True, stride=stride, padding=padding)
    check_mac_counters(c_s, w, c_s.outputs // 6)


@settings(max_examples=120, deadline=None)
@given(case=layer_cases(), fan_in=st.integers(1, 50), batch=st.integers(1, 70),
       outputs=st.sampled_from([6, 30]), small_chunks=st.booleans(),
       quads=st.sampled_from(["auto", "all", "none"]), gather=st.booleans())
def test_sparse_linear_is_bit_identical_to_dense(case, fan_in, batch, outputs, small_chunks,
                                                 quads, gather):
    # 6 outputs: the fused few-output kernels; 30: the general ones (FEW_OUTPUTS = 24)
    dp, mask_kind, seed = case
    rng = np.random.default_rng(seed)
    w, mask = make_weights(rng, dp, (outputs, fan_in), mask_kind)
    b = random_bias(rng, dp, outputs)
    x = rng.integers(dp.act_fmt.min_code, dp.act_fmt.max_code, (batch, fan_in), endpoint=True)
    with kernel_variant(small_chunks, quads, gather):
        _, c_s = run_both(dp, w, b, x, mask, conv=False)
    check_mac_counters(c_s, w, batch)


# Every lane type of the sparse kernel, forced, with overflow actually happening.
BOTH = ("sat", "wrap")
SPARSE_PATHS = [
    ("sparse_float32", QFormat(8, 2), None, "final", BOTH),
    ("sparse_float64", QFormat(16, 4), None, "final", BOTH),
    ("sparse_int64", QFormat(28, 4), 60, "final", BOTH),
    ("sparse_per_mac_float32", QFormat(8, 2), 17, "per_mac", ("sat",)),
    ("sparse_per_mac_int32", QFormat(8, 2), 17, "per_mac", ("wrap",)),
    ("sparse_per_mac_int32", QFormat(12, 2), 25, "per_mac", BOTH),
    ("sparse_per_mac_float64", QFormat(16, 4), 32, "per_mac", ("sat",)),
    ("sparse_per_mac_int64", QFormat(16, 4), 32, "per_mac", ("wrap",)),
]


@pytest.mark.parametrize(("path", "fmt", "acc_bits", "mode", "acc_overflow"),
                         [(*case[:4], ovf) for case in SPARSE_PATHS for ovf in case[4]])
def test_each_sparse_lane_type(path, fmt, acc_bits, mode, acc_overflow, monkeypatch):
    monkeypatch.setattr(int8_sparse, "AVAILABLE", False)  # 8-bit codes: the float32 lanes
    rng = np.random.default_rng(len(path) + (acc_bits or 0))
    dp = Datapath(fmt, fmt, out_fmt=QFormat(16, 8), acc_bits=acc_bits, acc_mode=mode,
                  acc_overflow=acc_overflow)
    mask = random_mask((6, 4, 3, 3), 0.4, rng)
    w = np.where(mask, rng.integers(fmt.min_code, fmt.max_code, mask.shape, endpoint=True), 0)
    x = rng.integers(fmt.min_code, fmt.max_code, (9, 4, 7, 7), endpoint=True)
    b = rng.integers(-1000, 1000, 6)
    _, c_s = run_both(dp, w, b, x, mask, conv=True, padding=1)
    assert c_s.paths == {path: c_s.outputs}
    if mode == "per_mac":
        assert c_s.acc_overflows > 0


def test_wide_per_mac_registers_fall_back_to_dense_bit_identically():
    fmt = QFormat(32, 3)
    dp = Datapath(fmt, fmt, out_fmt=QFormat(16, 8), acc_bits=64, acc_mode="per_mac",
                  kernel="sparse")
    x = np.full((1, 16), fmt.max_code)
    w = np.full((1, 16), fmt.max_code)
    w[0, ::2] = 0
    y, counters = prepare(w, None, dp).linear(x)
    assert counters.paths == {"per_mac_int64": 1} and y.tolist() == [[8192]]


def test_auto_uses_sparse_below_the_threshold():
    from fxsim.datapath import SPARSE_DENSITY_THRESHOLD

    rng = np.random.default_rng(0)
    fmt = QFormat(8, 2)
    x = rng.integers(-128, 128, (4, 20))
    low = np.where(random_mask((10, 20), SPARSE_DENSITY_THRESHOLD["linear"] / 2, rng), 5, 0)
    high = np.full((10, 20), 5)
    _, c_low = prepare(low, None, Datapath(fmt, fmt)).linear(x)
    _, c_high = prepare(high, None, Datapath(fmt, fmt)).linear(x)
    assert next(iter(c_low.paths)).startswith("sparse_")
    assert not next(iter(c_high.paths)).startswith("sparse_")


@pytest.mark.parametrize("int8_mac", [False, True] if int8.AVAILABLE else [False])
def test_auto_skips_zeros_of_a_per_mac_convolution_below_its_own_threshold(int8_mac,
                                                                            monkeypatch):
    # a per-MAC register that can overflow: the same kernel either way, so skipping zeros
    # pays below the density where the dense one runs every weight (0.7), not only below 0.3.
    # On int8 dot products (int8_mac) the dense register runs faster, and skipping wins only
    # below its own threshold.
    from fxsim.datapath import SPARSE_DENSITY_THRESHOLD

    monkeypatch.setattr(int8, "AVAILABLE", int8_mac)
    rng = np.random.default_rng(1)
    fmt = QFormat(8, 2)
    x = rng.integers(-128, 128, (2, 4, 6, 6))
    # (16 bits: the few weights at low density must still be able to overflow it)
    dp = Datapath(fmt, fmt, acc_bits=16 if int8_mac else 17, acc_mode="per_mac")
    low = SPARSE_DENSITY_THRESHOLD["conv_per_mac_int8"] / 2 if int8_mac else 0.5
    runs = {}
    for density in (low, 0.5, 0.9):
        assert SPARSE_DENSITY_THRESHOLD["conv"] < 0.5 < SPARSE_DENSITY_THRESHOLD["conv_per_mac"]
        w = np.where(random_mask((3, 4, 3, 3), density, rng), 127, 0)
        y, c = prepare(w, None, dp).conv2d(x, padding=1)
        y_dense, c_dense = prepare(w, None, replace(dp, kernel="dense")).conv2d(x, padding=1)
        np.testing.assert_array_equal(y, y_dense)
        assert c.acc_overflows == c_dense.acc_overflows > 0
        runs[density] = next(iter(c.paths))
    if int8_mac:
        assert runs == {low: "sparse_per_mac_float32", 0.5: "per_mac_int8", 0.9: "per_mac_int8"}
    else:
        assert runs == {0.5: "sparse_per_mac_float32", 0.9: "per_mac_float32"}


# ---------------------------------------------------------------------------- storage


def test_storage_bytes_of_a_hand_worked_layer():
    # 2 rows of 40 weights at 8 bits; row 0 stores indices 0, 5, 39; row 1 stores nothing.
    w = np.zeros((2, 40), np.int64)
    w[0, [0, 5, 39]] = [3, -1, 7]
    cw = CompressedWeights(w)
    assert cw.nnz == 3 and cw.row_ptr.tolist() == [0, 3, 3] and cw.col_idx.tolist() == [0, 5, 39]
    sizes = cw.storage_bytes(8)
    assert sizes["dense"] == 80  # 80 weights x 8 bits
    assert sizes["bitmask"] == (80 + 3 * 8 + 7) // 8  # 80 presence bits + 3 values = 13
    # csr: 3 x (8 + 6 index bits) + 3 row pointers x 2 bits = 48 bits
    assert sizes["csr"] == 6
    # eie: gaps before the stored weights are 0, 4 and 33 zeros -> 33 // 16 = 2 fillers;
    # 5 entries x 12 bits + 3 pointers x 3 bits = 69 bits -> 9 bytes
    assert sizes["eie"] == 9


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 90), density=st.floats(0, 1),
       seed=st.integers(0, 2**32 - 1), bits=st.integers(1, 32))
def test_storage_counts_match_a_row_by_row_count(rows, cols, density, seed, bits):
    """sparse.nonzero_counts (what the datapath and the CSR report) against counting gaps row
    by row in Python: one EIE filler per 16 zeros before a stored weight, each row afresh."""
    from fxsim.kernels.sparse import nonzero_counts, storage_bytes

    rng = np.random.default_rng(seed)
    w = np.where(rng.random((rows, cols)) < density, rng.integers(1, 9, (rows, cols)), 0)
    stored = fillers = 0
    for row in w.tolist():
        previous = -1
        for k, value in enumerate(row):
            if value:
                stored += 1
                fillers += (k - previous - 1) // 16
                previous = k
    assert nonzero_counts(w.astype(np.int64)) == (stored, fillers)
    cw = CompressedWeights(w)
    assert (cw.nnz, cw.eie_fillers) == (stored, fillers)
    assert cw.storage_bytes(bits) == storage_bytes(rows, cols, stored, fillers, bits)


def test_compressed_format_is_canonical_csr():
    rng = np.random.default_rng(1)
    w = np.where(rng.random((5, 3, 2, 2)) < 0.3, rng.integers(-9, 9, (5, 3, 2, 2)), 0)
    cw = CompressedWeights(w)
    rebuilt = np.zeros((5, 12), np.int64)
    for j in range(5):
        lo, hi = cw.row_ptr[j], cw.row_ptr[j + 1]
        assert np.all(np.diff(cw.col_idx[lo:hi]) > 0)  # canonical (ascending) MAC order
        rebuilt[j, cw.col_idx[lo:hi]] = cw.values[lo:hi]
    assert np.array_equal(rebuilt.reshape(w.shape), w)
    assert cw.density == np.count_nonzero(w) / w.size


# ---------------------------------------------------------------------------- bad input


def test_bad_masks_are_rejected_with_where():
    fmt = QFormat(8, 2)
    dp = Datapath(fmt, fmt)
    w = np.array([[1, 0, 2], [0, 0, 3]])
    with pytest.raises(ShapeError, match=r"mask shape \(2, 2\) does not match weight shape"):
        prepare(w, None, dp, mask=np.ones((2, 2), bool))
    with pytest.raises(ShapeError, match="mask must be boolean, got dtype int64"):
        prepare(w, None, dp, mask=np.ones((2, 3), np.int64))
    with pytest.raises(ShapeError, match=r"weight at index \(1, 2\) is 3 but the mask prunes it"):
        prepare(w, None, dp, mask=np.array([[1, 0, 1], [0, 0, 0]], bool))


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_rejected(density):
    with pytest.raises(ShapeError, match=r"density must be in \(0, 1\]"):
        random_mask((4, 4), density, np.random.default_rng(0))


def test_random_mask_hits_the_density_exactly():
    mask = random_mask((50, 20, 5, 5), 0.1, np.random.default_rng(2))
    assert mask.sum() == 2500


@pytest.mark.parametrize("acc", [{}, {"acc_bits": 17, "acc_mode": "per_mac"},
                                 {"acc_bits": 17, "acc_mode": "per_mac", "acc_overflow": "wrap"}])
def test_output_rows_split_over_several_tiles(acc):
    from fxsim.kernels.sparse import MAX_TILE

    rng = np.random.default_rng(7)
    fmt = QFormat(8, 2)
    dp = Datapath(fmt, fmt, **acc)
    x = rng.integers(fmt.min_code, fmt.max_code, (90, 3, 6, 17), endpoint=True)
    w, mask = make_weights(rng, dp, (4, 3, 3, 1), "random")
    _, c_s = run_both(dp, w, random_bias(rng, dp, 4), x, mask, conv=True)
    assert MAX_TILE < 90 * 17  # each output row (17 columns x 90 images) is several tasks
    check_mac_counters(c_s, w, c_s.outputs // 4)


def test_chunk_pointers_split_every_row_at_the_chunk_boundaries():
    rng = np.random.default_rng(5)
    w = np.where(rng.random((7, 3, 2, 5)) < 0.4, rng.integers(1, 9, (7, 3, 2, 5)), 0)
    w[2] = 0  # a row with nothing stored
    cw = CompressedWeights(w)
    for columns in (1, 4, 10, 29, 30, 31):
        ptr = cw.chunk_pointers(columns)
        bounds = [*range(0, 30, columns), 30]
        assert ptr.shape == (7, len(bounds)) and ptr.dtype == np.int64
        for j in range(7):
            row = cw.col_idx[cw.row_ptr[j] : cw.row_ptr[j + 1]]
            expected = [cw.row_ptr[j] + int(np.sum(row < b)) for b in bounds]
            assert ptr[j].tolist() == expected


def test_quads_hold_every_weight_of_the_blocks_that_run_as_one():
    rng = np.random.default_rng(7)
    w = rng.integers(-9, 9, (11, 40)) * (rng.random((11, 40)) < 0.9)
    w[4:8] *= rng.random((4, 40)) < 0.3  # block 1: too sparse to run as one
    w[8:] = rng.integers(1, 9, (3, 40))  # the last block: 3 dense rows (+ 1 empty) still pay
    cw = CompressedWeights(w)
    for columns in (7, 40):
        blocked, ptr, cols, values = cw.quads(columns)
        assert blocked.tolist() == [True, False, True]
        bounds = [*range(0, 40, columns), 40]
        for b in range(3):
            block = np.zeros((4, 40), np.int64)
            for c in range(len(bounds) - 1):
                entries = slice(ptr[b, c], ptr[b, c + 1])
                assert np.all((cols[entries] >= bounds[c]) & (cols[entries] < bounds[c + 1]))
                assert np.all(np.diff(cols[entries]) > 0)
                block[:, cols[entries]] = values[entries].T
            expected = np.zeros((4, 40), np.int64)
            rows = w[4 * b : 4 * b + 4]
            expected[: len(rows)] = rows
            assert np.array_equal(block, expected if blocked[b] else 0 * expected), b


def test_sum_tiles_chunk_dense_rows_and_keep_sparse_ones_whole():
    from fxsim.kernels.sparse import ACC_BYTES, CHUNK_ENTRIES, sum_tiles, tile_lanes

    rng = np.random.default_rng(6)
    full = CompressedWeights(rng.integers(1, 9, (192, 192, 3, 3)))  # CifarNet conv6, density 1
    tile, groups, columns = sum_tiles(8, 8 * 128, 2, full, 128, 4)
    assert columns % 9 == 0 and 9 <= columns < full.fan_in and groups == 1
    assert full.n_out * tile * 4 <= ACC_BYTES < full.n_out * 2 * tile * 4  # sums stay in L2
    assert columns * full.nnz / full.n_out / full.fan_in >= CHUNK_ENTRIES
    pruned = CompressedWeights(np.where(rng.random((50, 20, 5, 5)) < 0.01, 3, 0))
    assert sum_tiles(8, 8 * 256, 2, pruned, 256, 4) == (*tile_lanes(8, 8 * 256, 2, 500, 4), 500)


def test_tile_lanes_fit_l2_and_give_every_thread_work():
    from fxsim.kernels.sparse import MAX_TILE, MIN_TILE, TILE_BYTES, tile_lanes

    assert tile_lanes(8, 8 * 256, 2, 500, 4) == (MAX_TILE, 1)
    wide, groups = tile_lanes(8, 8 * 256, 2, 1728, 4)  # CifarNet conv6's fan-in
    assert 1728 * wide * 4 <= TILE_BYTES < 1728 * 2 * wide * 4 and groups == 1
    # a linear layer, one row of 256 lanes: one tile, split by output channel over 2 threads
    assert tile_lanes(1, 256, 2, 800, 4) == (256, 2)
    assert tile_lanes(1, 10, 8, 800, 4) == (MIN_TILE, 8)
    assert tile_lanes(2, 700, 3, 100, 4) == (1024, 2)  # 2 tasks for 3 threads: 4 with groups
