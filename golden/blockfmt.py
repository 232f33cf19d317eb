"""Procrustes block-sparse weight format (golden model).

The Procrustes accelerator keeps each weight matrix in one block-sparse store.
The forward pass ``Y = W @ X`` walks it row-major. The backward pass
``dX = W.T @ dY`` walks the *same* store column-major, so nothing is
re-encoded between the phases. The RTL walkers in ``hw/procrustes`` read
exactly the layout below. This module is the reference for that layout.

GEMM form
---------
A weight is a 2-D matrix ``W[M, K]``: ``M`` output rows, ``K`` reduction
columns. A convolution kernel ``[O, I, kh, kw]`` becomes
``W[O, I*kh*kw]`` in C order (``lower_conv_weight``), so column
``k = (i*kh + u)*kw + v``. The activations go through ``im2col`` (below),
and then conv2d is ``W @ im2col(x)``.

Memory layout
-------------
Block size ``(bm, bk)``: each of ``bm`` and ``bk`` is 1, 2, 4 or 8; the RTL
supports only these powers of two. The default is ``(4, 4)``.

Block grid: ``GM = ceil(M / bm)`` block rows and ``GK = ceil(K / bk)`` block
columns, so ``nblocks = GM * GK``. Block ``b = bi * GK + bj`` (row-major over
the grid) covers rows ``bi*bm .. bi*bm+bm-1`` and columns
``bj*bk .. bj*bk+bk-1``. Edge blocks are padded with zeros logically: their
bits beyond ``M`` or ``K`` are always 0.

There are three integer arrays, each of fixed width:

``masks[nblocks]``
    One unsigned word of ``NB = bm*bk`` bits per block (numpy ``uint64``;
    ``NB <= 64``). Bit ``t = i*bk + j`` is set iff element ``(i, j)`` of the
    block, that is ``W[bi*bm + i, bj*bk + j]``, is non-zero.
``ptr[nblocks + 1]``
    Unsigned values (numpy ``uint32``). ``ptr[0] = 0``,
    ``ptr[b+1] = ptr[b] + popcount(masks[b])`` and ``ptr[nblocks] = nnz``.
    The hardware needs ``ptr_bits = max(1, nnz.bit_length())`` bits.
``values[nnz]``
    The non-zeros, stored block by block in block order and row-major inside
    each block (increasing bit ``t``). Their dtype is the input dtype.

Address rule. The value of element ``(i, j)`` of block ``b``, with
``t = i*bk + j`` and its bit set, is at::

    addr = ptr[b] + popcount(masks[b] & ((1 << t) - 1))

Both walks use only this rule. Neither needs a second copy of the weights.

Walk orders
-----------
These are the reference loops the RTL implements (``iter_rows_reference`` and
``iter_cols_reference`` are these loops written out):

* forward, row-major, output row ``m``, one PE row at a time: for ``bi``,
  for ``i < bm``, for ``bj``, for ``j < bk``; emit ``(bi*bm+i, bj*bk+j)``
  when bit ``i*bk+j`` of ``masks[bi*GK+bj]`` is set.
* backward, column-major, output row ``k`` of ``W.T``: for ``bj``,
  for ``j < bk``, for ``bi``, for ``i < bm``; the test is the same.

Conventions of ``im2col``
-------------------------
``x[N, C, H, W]`` with stride ``(sh, sw)`` and zero padding ``(ph, pw)``
gives ``Ho = (H + 2*ph - kh)//sh + 1`` and ``Wo = (W + 2*pw - kw)//sw + 1``.
The result ``X[C*kh*kw, N*Ho*Wo]`` has
``X[(c*kh + u)*kw + v, (n*Ho + oh)*Wo + ow] = xpad[n, c, oh*sh + u, ow*sw + v]``,
and conv2d is ``(W @ X).reshape(O, N, Ho, Wo)`` with axes 0 and 1 swapped
(``gemm_to_nchw``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "RTL_BLOCK_SIZES",
    "BlockSparse",
    "MemoryReport",
    "TransposedView",
    "Walk",
    "conv2d_gemm",
    "conv_output_size",
    "gemm_to_nchw",
    "im2col",
    "lower_conv_weight",
]

#: Block sizes (per dimension) that the RTL walker supports.
RTL_BLOCK_SIZES = (1, 2, 4, 8)


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            a = a.float()
        return a.numpy()
    return np.asarray(a)


def _check_block(block) -> tuple[int, int]:
    try:
        bm, bk = block
    except (TypeError, ValueError):
        raise ValueError(f"block must be a pair (bm, bk), got {block!r}") from None
    for name, v in (("bm", bm), ("bk", bk)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"block size {name} must be a positive integer, got {v!r}")
        if v not in RTL_BLOCK_SIZES:
            raise ValueError(
                f"block size {name} must be a power of two up to 8 (1, 2, 4 or 8; "
                f"the RTL supports only these), got {v}"
            )
    return int(bm), int(bk)


def _pair(name: str, v, minimum: int) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = (v, v)
    try:
        a, b = (int(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if a < minimum or b < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return a, b


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x).astype(np.int64)


@dataclass(frozen=True)
class MemoryReport:
    """Storage cost of a ``BlockSparse`` in bits, with the dense matrix for comparison."""

    mask_bits: int
    ptr_bits: int
    value_bits: int
    dense_bits: int

    @property
    def total_bits(self) -> int:
        return self.mask_bits + self.ptr_bits + self.value_bits

    @property
    def compression(self) -> float:
        """Dense size / block-sparse size (> 1 means the sparse store is smaller)."""
        return self.dense_bits / self.total_bits


class Walk:
    """The result of a walk: parallel arrays in visiting order.

    ``row``, ``col``: coordinates in ``W``; ``value``: the weight;
    ``addr``: the index into ``values`` that the walk computed with the
    ptr + popcount rule. Iterating gives ``(row, col, value)`` tuples.
    """

    __slots__ = ("row", "col", "value", "addr")

    def __init__(self, row, col, value, addr):
        self.row, self.col, self.value, self.addr = row, col, value, addr

    def __len__(self) -> int:
        return len(self.row)

    def __iter__(self):
        return zip(self.row.tolist(), self.col.tolist(), self.value.tolist())


class BlockSparse:
    """A 2-D weight ``W[M, K]`` in the Procrustes block format (see module docstring)."""

    def __init__(self, shape, block, masks, ptr, values):
        self.shape = (int(shape[0]), int(shape[1]))
        self.block = _check_block(block)
        self.masks = masks
        self.ptr = ptr
        self.values = values
        self._bits = None

    # ---- construction -------------------------------------------------
    @classmethod
    def encode(cls, w, block=(4, 4)) -> BlockSparse:
        """Encode a 2-D ``[M, K]`` matrix, or a 4-D conv kernel after lowering it to GEMM form.

        ``w`` is a numpy array or a torch tensor of any numeric dtype. An
        element is stored iff ``w != 0``.
        """
        bm, bk = _check_block(block)
        w = _to_numpy(w)
        if w.ndim == 4:
            w = lower_conv_weight(w)
        if w.ndim != 2:
            raise ValueError(
                f"w must be 2-D [M, K] or a 4-D conv kernel [O, I, kh, kw], got ndim={w.ndim}"
            )
        M, K = w.shape
        if M < 1 or K < 1:
            raise ValueError(f"w must have M >= 1 and K >= 1, got shape {w.shape}")
        GM, GK = -(-M // bm), -(-K // bk)
        nb, NB = GM * GK, bm * bk
        padded = np.zeros((GM * bm, GK * bk), dtype=w.dtype)
        padded[:M, :K] = w
        blocks = padded.reshape(GM, bm, GK, bk).transpose(0, 2, 1, 3).reshape(nb, NB)
        nz = blocks != 0
        weights = np.left_shift(np.uint64(1), np.arange(NB, dtype=np.uint64))
        masks = (nz * weights).sum(axis=1, dtype=np.uint64)
        counts = nz.sum(axis=1)
        if counts.sum() >= 2**32:
            raise ValueError(f"nnz must be < 2**32 for 32-bit ptr, got {int(counts.sum())}")
        ptr = np.zeros(nb + 1, dtype=np.uint32)
        np.cumsum(counts, out=ptr[1:])
        bs = cls((M, K), (bm, bk), masks, ptr, blocks[nz])
        bs._bits = nz
        return bs

    @classmethod
    def from_arrays(cls, shape, block, masks, ptr, values) -> BlockSparse:
        """Rebuild from the three stored arrays (e.g. a memory dump of the RTL) and check them."""
        bm, bk = _check_block(block)
        M, K = (int(s) for s in shape)
        if M < 1 or K < 1:
            raise ValueError(f"shape must have M >= 1 and K >= 1, got {tuple(shape)}")
        nb = -(-M // bm) * -(-K // bk)
        masks = np.asarray(masks, dtype=np.uint64)
        ptr = np.asarray(ptr, dtype=np.uint32)
        values = _to_numpy(values)
        if masks.shape != (nb,):
            raise ValueError(f"masks must have shape ({nb},), got {masks.shape}")
        if bm * bk < 64 and np.any(masks >> np.uint64(bm * bk)):
            raise ValueError(f"masks must fit in bm*bk = {bm * bk} bits")
        expect = np.zeros(nb + 1, dtype=np.int64)
        np.cumsum(_popcount(masks), out=expect[1:])
        if ptr.shape != (nb + 1,) or np.any(ptr != expect):
            raise ValueError("ptr must be the prefix sum of popcount(masks), len nblocks+1")
        if values.shape != (int(expect[-1]),):
            raise ValueError(f"values must have shape ({int(expect[-1])},), got {values.shape}")
        bs = cls((M, K), (bm, bk), masks, ptr, values)
        padded = bs._grid_bits()
        if padded[M:].any() or padded[:, K:].any():
            raise ValueError("masks must have no bits set outside the matrix in edge blocks")
        return bs

    # ---- basic properties -----------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """``(GM, GK)``: block rows and block columns."""
        (M, K), (bm, bk) = self.shape, self.block
        return -(-M // bm), -(-K // bk)

    @property
    def nblocks(self) -> int:
        GM, GK = self.grid
        return GM * GK

    @property
    def nnz(self) -> int:
        return int(self.ptr[-1])

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    def memory_bits(self, value_bits: int = 32, ptr_bits: int | None = None) -> MemoryReport:
        """Storage in bits: masks (bm*bk each), nblocks+1 pointers and nnz values.

        ``ptr_bits`` defaults to the fewest bits that hold ``nnz``.
        """
        if value_bits < 1:
            raise ValueError(f"value_bits must be >= 1, got {value_bits}")
        need = max(1, self.nnz.bit_length())
        if ptr_bits is None:
            ptr_bits = need
        if ptr_bits < need:
            raise ValueError(f"ptr_bits must be >= {need} to hold nnz={self.nnz}, got {ptr_bits}")
        bm, bk = self.block
        M, K = self.shape
        return MemoryReport(
            mask_bits=self.nblocks * bm * bk,
            ptr_bits=(self.nblocks + 1) * ptr_bits,
            value_bits=self.nnz * value_bits,
            dense_bits=M * K * value_bits,
        )

    # ---- bit tables (derived from masks only) ---------------------------
    def _block_bits(self) -> np.ndarray:
        """bool ``[nblocks, bm*bk]``: bit t of masks[b]."""
        if self._bits is None:
            NB = self.block[0] * self.block[1]
            sh = np.arange(NB, dtype=np.uint64)
            self._bits = ((self.masks[:, None] >> sh) & np.uint64(1)).astype(bool)
        return self._bits

    def _grid_bits(self) -> np.ndarray:
        """bool ``[GM*bm, GK*bk]``: the non-zero pattern of the padded matrix."""
        (GM, GK), (bm, bk) = self.grid, self.block
        g = self._block_bits().reshape(GM, GK, bm, bk).transpose(0, 2, 1, 3)
        return g.reshape(GM * bm, GK * bk)

    def _gather(self, blk: np.ndarray, bit: np.ndarray) -> Walk:
        """Coordinates and values of set bits ``(blk, bit)``, using the ptr + popcount rule."""
        GK = self.grid[1]
        bm, bk = self.block
        below = (np.left_shift(np.uint64(1), bit.astype(np.uint64))) - np.uint64(1)
        addr = self.ptr[blk].astype(np.int64) + _popcount(self.masks[blk] & below)
        row = (blk // GK) * bm + bit // bk
        col = (blk % GK) * bk + bit % bk
        return Walk(row, col, self.values[addr], addr)

    def _walk(self, transpose: bool) -> Walk:
        (GM, GK), (bm, bk) = self.grid, self.block
        g = self._block_bits().reshape(GM, GK, bm, bk)
        if transpose:  # visit as (bj, j, bi, i): column-major
            bj, j, bi, i = np.nonzero(g.transpose(1, 3, 0, 2))
        else:  # visit as (bi, i, bj, j): row-major
            bi, i, bj, j = np.nonzero(g.transpose(0, 2, 1, 3))
        return self._gather(bi * GK + bj, i * bk + j)

    # ---- decoding and walks ---------------------------------------------
    def decode(self) -> np.ndarray:
        """The dense ``[M, K]`` matrix (numpy, the values' dtype)."""
        M, K = self.shape
        wk = self.walk_rows()
        out = np.zeros((M, K), dtype=self.values.dtype)
        out[wk.row, wk.col] = wk.value
        return out

    def walk_rows(self) -> Walk:
        """All non-zeros in row-major order of ``W`` (the forward pass)."""
        return self._walk(transpose=False)

    def walk_cols(self) -> Walk:
        """All non-zeros in column-major order of ``W``, i.e. row-major order of ``W.T``.

        This is the backward pass. Each value is found through ptr + popcount,
        so the store is not re-encoded.
        """
        return self._walk(transpose=True)

    def row_counts(self) -> np.ndarray:
        """Non-zeros per row of ``W`` (int64, length M)."""
        return self._grid_bits().sum(axis=1)[: self.shape[0]].astype(np.int64)

    def col_counts(self) -> np.ndarray:
        """Non-zeros per column of ``W`` (int64, length K)."""
        return self._grid_bits().sum(axis=0)[: self.shape[1]].astype(np.int64)

    def _check_index(self, name: str, v: int, n: int) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < n:
            raise ValueError(f"{name} must be an integer in [0, {n - 1}], got {v!r}")
        return int(v)

    def row_nonzeros(self, m: int) -> list[tuple[int, object]]:
        """``[(col, value), ...]`` of row ``m`` in column order: what one PE row consumes
        for output row ``m`` in the forward pass."""
        m = self._check_index("m", m, self.shape[0])
        GK = self.grid[1]
        bm, bk = self.block
        bi, i = divmod(m, bm)
        blks = bi * GK + np.arange(GK)
        bj, j = np.nonzero(self._block_bits()[blks, i * bk : (i + 1) * bk])
        wk = self._gather(blks[bj], i * bk + j)
        return list(zip(wk.col.tolist(), wk.value.tolist()))

    def col_nonzeros(self, k: int) -> list[tuple[int, object]]:
        """``[(row, value), ...]`` of column ``k`` in row order: what one PE row consumes
        for output row ``k`` of ``W.T`` in the backward pass."""
        k = self._check_index("k", k, self.shape[1])
        GM, GK = self.grid
        bm, bk = self.block
        bj, j = divmod(k, bk)
        blks = np.arange(GM) * GK + bj
        bi, i = np.nonzero(self._block_bits()[blks][:, j::bk])
        wk = self._gather(blks[bi], i * bk + j)
        return list(zip(wk.row.tolist(), wk.value.tolist()))

    @property
    def T(self) -> TransposedView:
        """``W.T`` read from the same store (no re-encoding)."""
        return TransposedView(self)

    # ---- readable reference loops (what the RTL walkers do) --------------
    def _iter_reference(self, transpose: bool):
        (GM, GK), (bm, bk) = self.grid, self.block
        masks = [int(x) for x in self.masks]
        ptr = [int(x) for x in self.ptr]
        outer, inner = ((GK, bk), (GM, bm)) if transpose else ((GM, bm), (GK, bk))
        for a in range(outer[0]):
            for ai in range(outer[1]):
                for c in range(inner[0]):
                    for ci in range(inner[1]):
                        bi, i, bj, j = (c, ci, a, ai) if transpose else (a, ai, c, ci)
                        b, t = bi * GK + bj, i * bk + j
                        if masks[b] >> t & 1:
                            addr = ptr[b] + (masks[b] & ((1 << t) - 1)).bit_count()
                            yield bi * bm + i, bj * bk + j, self.values[addr].item()

    def iter_rows_reference(self):
        """Scalar loop of the forward walk, one ``(row, col, value)`` per non-zero."""
        return self._iter_reference(transpose=False)

    def iter_cols_reference(self):
        """Scalar loop of the transposed (backward) walk, one ``(row, col, value)`` each."""
        return self._iter_reference(transpose=True)

    def __repr__(self) -> str:
        return (
            f"BlockSparse(shape={self.shape}, block={self.block}, nnz={self.nnz}, "
            f"density={self.density:.3f})"
        )


class TransposedView:
    """``W.T`` over the same ``BlockSparse`` store: rows of the view are columns of ``W``."""

    def __init__(self, base: BlockSparse):
        self.base = base
        self.shape = (base.shape[1], base.shape[0])

    def decode(self) -> np.ndarray:
        return self.base.decode().T

    def walk_rows(self) -> Walk:
        wk = self.base.walk_cols()
        return Walk(wk.col, wk.row, wk.value, wk.addr)

    def row_counts(self) -> np.ndarray:
        return self.base.col_counts()

    def row_nonzeros(self, m: int) -> list[tuple[int, object]]:
        return self.base.col_nonzeros(m)

    @property
    def nnz(self) -> int:
        return self.base.nnz


# ---- convolution lowering -------------------------------------------------
def lower_conv_weight(w):
    """``[O, I, kh, kw]`` -> ``[O, I*kh*kw]`` (C order). Returns the same kind (numpy/torch)."""
    if w.ndim != 4:
        raise ValueError(f"w must be a 4-D conv kernel [O, I, kh, kw], got ndim={w.ndim}")
    return w.reshape(w.shape[0], -1)


def conv_output_size(h: int, w: int, kernel_size, stride=1, padding=0) -> tuple[int, int]:
    """``(Ho, Wo)`` of a conv over an ``h x w`` image (no dilation)."""
    kh, kw = _pair("kernel_size", kernel_size, 1)
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"kernel_size {(kh, kw)} must fit the padded input {(h + 2 * ph, w + 2 * pw)}"
        )
    return ho, wo


def im2col(x, kernel_size, stride=1, padding=0):
    """``x[N, C, H, W]`` -> ``X[C*kh*kw, N*Ho*Wo]`` (layout in the module docstring).

    numpy in gives numpy out. torch in gives torch out, and autograd works through it.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got ndim={x.ndim}")
    kh, kw = _pair("kernel_size", kernel_size, 1)
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, w, (kh, kw), (sh, sw), (ph, pw))
    if isinstance(x, torch.Tensor):
        xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
        win = xp.unfold(2, kh, sh).unfold(3, kw, sw)[:, :, :ho, :wo]  # N,C,Ho,Wo,kh,kw
        return win.permute(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * ho * wo)
    x = np.asarray(x)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    win = win[:, :, ::sh, ::sw][:, :, :ho, :wo]
    return win.transpose(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * ho * wo)


def gemm_to_nchw(y, n: int, ho: int, wo: int):
    """``Y[O, N*Ho*Wo]`` (the GEMM result) -> ``[N, O, Ho, Wo]``."""
    o = y.shape[0]
    if y.shape[1] != n * ho * wo:
        raise ValueError(f"y must have N*Ho*Wo = {n * ho * wo} columns, got {y.shape[1]}")
    y = y.reshape(o, n, ho, wo)
    return y.permute(1, 0, 2, 3) if isinstance(y, torch.Tensor) else y.transpose(1, 0, 2, 3)


def conv2d_gemm(x, w, stride=1, padding=0):
    """conv2d as ``lower_conv_weight(w) @ im2col(x)`` (the mapping the RTL uses)."""
    if w.ndim != 4 or x.ndim != 4 or w.shape[1] != x.shape[1]:
        raise ValueError(
            f"w [O, I, kh, kw] and x [N, I, H, W] must agree on I, got {tuple(w.shape)} "
            f"and {tuple(x.shape)}"
        )
    kh, kw = w.shape[2], w.shape[3]
    cols = im2col(x, (kh, kw), stride, padding)
    ho, wo = conv_output_size(x.shape[2], x.shape[3], (kh, kw), stride, padding)
    return gemm_to_nchw(lower_conv_weight(w) @ cols, x.shape[0], ho, wo)

