"""Tests for golden.blockfmt: layout, round trip, walks, conv lowering, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from golden.blockfmt import (
    RTL_BLOCK_SIZES,
    BlockSparse,
    conv2d_gemm,
    conv_output_size,
    gemm_to_nchw,
    im2col,
    lower_conv_weight,
)

DTYPES = [np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8]


def random_matrix(seed, m, k, density, dtype):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        lo = 0 if np.issubdtype(dtype, np.unsignedinteger) else -100
        w = rng.integers(lo, 100, size=(m, k)).astype(dtype)
        w[w == 0] = 1
    else:
        w = (rng.standard_normal((m, k)) + 3.0).astype(dtype)  # never 0
    w[rng.random((m, k)) >= density] = 0
    return w


matrices = st.builds(
    random_matrix,
    seed=st.integers(0, 2**31),
    m=st.integers(1, 37),
    k=st.integers(1, 37),
    density=st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]) | st.floats(0, 1),
    dtype=st.sampled_from(DTYPES),
)
blocks = st.tuples(st.sampled_from(RTL_BLOCK_SIZES), st.sampled_from(RTL_BLOCK_SIZES))


# ---- layout -----------------------------------------------------------------
def test_layout_hand_worked():
    # 3x5 with 2x4 blocks: grid 2x2, edge blocks padded.
    w = np.array(
        [
            [1, 0, 0, 2, 3],
            [0, 4, 0, 0, 0],
            [0, 0, 5, 0, 6],
        ],
        dtype=np.int16,
    )
    bs = BlockSparse.encode(w, block=(2, 4))
    assert bs.grid == (2, 2) and bs.nblocks == 4
    # block 0 rows 0-1 cols 0-3: (0,0)->bit0, (0,3)->bit3, (1,1)->bit5
    # block 1 rows 0-1 col 4: (0,0)->bit0
    # block 2 row 2 cols 0-3: (0,2)->bit2
    # block 3 row 2 col 4: (0,0)->bit0
    assert bs.masks.dtype == np.uint64
    assert bs.masks.tolist() == [0b101001, 0b1, 0b100, 0b1]
    assert bs.ptr.tolist() == [0, 3, 4, 5, 6]
    assert bs.values.tolist() == [1, 2, 4, 3, 5, 6]
    assert bs.values.dtype == np.int16
    # address rule: block 0, element (1,1) = bit 5 -> ptr[0] + popcount(0b01001) = 2
    wk = bs.walk_cols()
    assert wk.value[wk.row.tolist().index(1)] == 4
    assert wk.addr[wk.row.tolist().index(1)] == 2


def test_default_block_is_4x4():
    bs = BlockSparse.encode(np.eye(9))
    assert bs.block == (4, 4) and bs.grid == (3, 3)
    assert bs.masks[0] == (1 | 1 << 5 | 1 << 10 | 1 << 15)


# ---- round trip -------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(w=matrices, block=blocks)
def test_encode_decode_round_trip(w, block):
    bs = BlockSparse.encode(w, block=block)
    out = bs.decode()
    assert out.dtype == w.dtype
    np.testing.assert_array_equal(out, w)
    assert bs.nnz == np.count_nonzero(w) == len(bs.values)
    assert bs.density == pytest.approx(np.count_nonzero(w) / w.size)
    pop = np.bitwise_count(bs.masks).astype(np.int64)
    np.testing.assert_array_equal(np.diff(bs.ptr.astype(np.int64)), pop)
    assert bs.ptr[0] == 0 and len(bs.ptr) == bs.nblocks + 1
    nbits = block[0] * block[1]
    if nbits < 64:
        assert not np.any(bs.masks >> np.uint64(nbits))
    again = BlockSparse.from_arrays(bs.shape, block, bs.masks, bs.ptr, bs.values)
    np.testing.assert_array_equal(again.decode(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.float16])
def test_encode_torch_input(dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(13, 21, generator=g) * 4).to(dtype)
    w[torch.rand(13, 21, generator=g) < 0.6] = 0
    bs = BlockSparse.encode(w, block=(8, 2))
    np.testing.assert_array_equal(bs.decode(), w.float().numpy())
    assert bs.nnz == int((w != 0).sum())


def test_negative_zero_is_zero_and_nan_is_stored():
    w = np.array([[-0.0, np.nan], [0.0, 1.0]])
    bs = BlockSparse.encode(w, block=(2, 2))
    assert bs.nnz == 2 and bs.masks.tolist() == [0b1010]


# ---- walks ------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(w=matrices, block=blocks)
def test_walk_rows_is_dense_row_major(w, block):
    bs = BlockSparse.encode(w, block=block)
    wk = bs.walk_rows()
    r, c = np.nonzero(w)
    np.testing.assert_array_equal(wk.row, r)
    np.testing.assert_array_equal(wk.col, c)
    np.testing.assert_array_equal(wk.value, w[r, c])
    np.testing.assert_array_equal(bs.values[wk.addr], wk.value)


@settings(max_examples=100, deadline=None)
@given(w=matrices, block=blocks)
def test_walk_cols_is_transpose_row_major(w, block):
    bs = BlockSparse.encode(w, block=block)
    wk = bs.walk_cols()
    wt = w.T
    r_t, c_t = np.nonzero(wt)  # row-major non-zeros of W.T
    np.testing.assert_array_equal(wk.col, r_t)
    np.testing.assert_array_equal(wk.row, c_t)
    np.testing.assert_array_equal(wk.value, wt[r_t, c_t])
    # every stored value is read exactly once
    np.testing.assert_array_equal(np.sort(wk.addr), np.arange(bs.nnz))
    tv = bs.T
    assert tv.shape == wt.shape and tv.nnz == bs.nnz
    np.testing.assert_array_equal(tv.decode(), wt)
    twk = tv.walk_rows()
    np.testing.assert_array_equal(twk.row, r_t)
    np.testing.assert_array_equal(twk.col, c_t)


@settings(max_examples=40, deadline=None)
@given(w=matrices, block=blocks)
def test_reference_loops_match_vectorized_walks(w, block):
    bs = BlockSparse.encode(w, block=block)
    assert list(bs.iter_rows_reference()) == list(bs.walk_rows())
    assert list(bs.iter_cols_reference()) == list(bs.walk_cols())


@settings(max_examples=60, deadline=None)
@given(w=matrices, block=blocks)
def test_counts_and_per_row_lists(w, block):
    bs = BlockSparse.encode(w, block=block)
    np.testing.assert_array_equal(bs.row_counts(), np.count_nonzero(w, axis=1))
    np.testing.assert_array_equal(bs.col_counts(), np.count_nonzero(w, axis=0))
    np.testing.assert_array_equal(bs.T.row_counts(), np.count_nonzero(w, axis=0))
    for m in {0, w.shape[0] // 2, w.shape[0] - 1}:
        (cols,) = np.nonzero(w[m])
        assert bs.row_nonzeros(m) == list(zip(cols.tolist(), w[m, cols].tolist()))
    for k in {0, w.shape[1] // 2, w.shape[1] - 1}:
        (rows,) = np.nonzero(w[:, k])
        assert bs.col_nonzeros(k) == list(zip(rows.tolist(), w[rows, k].tolist()))
        assert bs.T.row_nonzeros(k) == bs.col_nonzeros(k)


def test_walks_do_not_use_the_dense_matrix():
    w = random_matrix(5, 19, 23, 0.4, np.float32)
    bs = BlockSparse.encode(w, block=(4, 8))
    rebuilt = BlockSparse.from_arrays(bs.shape, bs.block, bs.masks, bs.ptr, bs.values)
    r, c = np.nonzero(w.T)
    wk = rebuilt.walk_cols()
    np.testing.assert_array_equal(wk.value, w.T[r, c])


# ---- memory -----------------------------------------------------------------
def test_memory_bits_hand_worked():
    w = np.zeros((8, 8), dtype=np.float32)
    w[0, 0] = w[5, 6] = w[7, 7] = 1.0
    rep = BlockSparse.encode(w).memory_bits(value_bits=32)
    # 4 blocks x 16 mask bits, 5 pointers x 2 bits (nnz=3), 3 x 32 value bits
    assert (rep.mask_bits, rep.ptr_bits, rep.value_bits) == (64, 10, 96)
    assert rep.total_bits == 170 and rep.dense_bits == 2048
    assert rep.compression == pytest.approx(2048 / 170)
    assert BlockSparse.encode(w).memory_bits(16, ptr_bits=32).ptr_bits == 160


def test_compression_tracks_density():
    sparse = BlockSparse.encode(random_matrix(0, 64, 288, 0.1, np.float32))
    dense = BlockSparse.encode(random_matrix(0, 64, 288, 1.0, np.float32))
    assert sparse.memory_bits(32).compression > 5
    assert dense.memory_bits(32).compression < 1  # the metadata costs something


# ---- conv lowering ----------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 4),
    o=st.integers(1, 5),
    h=st.integers(3, 9),
    wd=st.integers(3, 9),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    seed=st.integers(0, 1000),
)
def test_conv_as_gemm_matches_torch(n, c, o, h, wd, kh, kw, stride, padding, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, wd, generator=g, dtype=torch.float64)
    w = torch.randn(o, c, kh, kw, generator=g, dtype=torch.float64)
    w[torch.rand(w.shape, generator=g) < 0.5] = 0
    ref = torch.nn.functional.conv2d(x, w, stride=stride, padding=padding)
    torch.testing.assert_close(conv2d_gemm(x, w, stride, padding), ref)
    out = conv2d_gemm(x.numpy(), w.numpy(), stride, padding)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-12, atol=1e-12)
    # the sparse store of the lowered kernel drives the same GEMM
    bs = BlockSparse.encode(w)  # 4-D input is lowered
    assert bs.shape == (o, c * kh * kw)
    cols = im2col(x.numpy(), (kh, kw), stride, padding)
    ho, wo = ref.shape[2:]
    y = np.zeros((o, cols.shape[1]))
    wk = bs.walk_rows()
    np.add.at(y, wk.row, wk.value[:, None] * cols[wk.col])
    np.testing.assert_allclose(gemm_to_nchw(y, n, ho, wo), ref.numpy(), rtol=1e-12, atol=1e-12)


def test_im2col_layout_and_int_dtype():
    x = np.arange(2 * 2 * 3 * 3, dtype=np.int32).reshape(2, 2, 3, 3)
    cols = im2col(x, 2, stride=1, padding=0)
    assert cols.shape == (2 * 2 * 2, 2 * 2 * 2) and cols.dtype == np.int32
    # row (c*kh+u)*kw+v, column (n*Ho+oh)*Wo+ow  ->  x[n, c, oh+u, ow+v]
    assert cols[(1 * 2 + 1) * 2 + 0, (1 * 2 + 0) * 2 + 1] == x[1, 1, 0 + 1, 1 + 0]
    w = np.arange(3 * 2 * 2 * 2, dtype=np.int32).reshape(3, 2, 2, 2) - 10
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double())
    np.testing.assert_array_equal(conv2d_gemm(x, w), ref.numpy().astype(np.int32))
    assert lower_conv_weight(w).shape == (3, 8)
    np.testing.assert_array_equal(lower_conv_weight(w)[1, 5], w[1, 1, 0, 1])


def test_im2col_torch_keeps_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g)
    conv2d_gemm(x, w, 2, 1).square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    torch.nn.functional.conv2d(x, w, stride=2, padding=1).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)


# ---- bad input --------------------------------------------------------------
@pytest.mark.parametrize(
    "block, match",
    [
        ((0, 4), "block size bm must be a positive integer, got 0"),
        ((4, -2), "block size bk must be a positive integer, got -2"),
        ((3, 4), r"bm must be a power of two up to 8 \(1, 2, 4 or 8; the RTL"),
        ((4, 16), r"bk must be a power of two up to 8"),
        ((4,), r"block must be a pair \(bm, bk\)"),
        ((2.0, 4), "bm must be a positive integer"),
    ],
)
def test_bad_block(block, match):
    with pytest.raises(ValueError, match=match):
        BlockSparse.encode(np.ones((4, 4)), block=block)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (1, 2, 3, 4, 5)])
def test_bad_ndim(shape):
    with pytest.raises(ValueError, match=r"w must be 2-D \[M, K\] or a 4-D conv kernel"):
        BlockSparse.encode(np.ones(shape))


def test_other_bad_input():
    bs = BlockSparse.encode(np.eye(5))
    with pytest.raises(ValueError, match=r"w must have M >= 1 and K >= 1"):
        BlockSparse.encode(np.ones((0, 3)))
    with pytest.raises(ValueError, match=r"m must be an integer in \[0, 4\], got 5"):
        bs.row_nonzeros(5)
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 4\], got -1"):
        bs.col_nonzeros(-1)
    with pytest.raises(ValueError, match=r"ptr_bits must be >= 3 to hold nnz=5, got 2"):
        bs.memory_bits(32, ptr_bits=2)
    with pytest.raises(ValueError, match="value_bits must be >= 1"):
        bs.memory_bits(0)
    with pytest.raises(ValueError, match="ptr must be the prefix sum"):
        BlockSparse.from_arrays(bs.shape, bs.block, bs.masks, bs.ptr + 1, bs.values)
    with pytest.raises(ValueError, match="no bits set outside the matrix"):
        masks = bs.masks.copy()
        masks[-1] = np.uint64(1 << 15)  # row 7, col 7 of a 5x5 matrix (same popcount)
        BlockSparse.from_arrays(bs.shape, bs.block, masks, bs.ptr, bs.values)
    with pytest.raises(ValueError, match=r"stride must be >= 1"):
        im2col(np.ones((1, 1, 4, 4)), 3, stride=0)
    with pytest.raises(ValueError, match=r"padding must be >= 0"):
        im2col(np.ones((1, 1, 4, 4)), 3, padding=-1)
    with pytest.raises(ValueError, match=r"kernel_size \(5, 5\) must fit the padded input"):
        conv_output_size(4, 4, 5)
    with pytest.raises(ValueError, match=r"x must be 4-D \[N, C, H, W\]"):
        im2col(np.ones((4, 4)), 3)
    with pytest.raises(ValueError, match=r"w must be a 4-D conv kernel"):
        lower_conv_weight(np.ones((4, 4)))
