"""Elaboration parameters of the Procrustes array, validated, with the derived widths.

Everything the gateware and the host driver (``sim/tb/tb_procrustes_host.py``) must agree
on is here: the array size, the number formats of ``golden/PROCRUSTES_FIXED.md``, the block
size of the weight format, the depths of the on-chip buffers and the widths that follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common import check_int, check_pow2

__all__ = ["UPDATE_II_AREA", "Config"]

# cycles per element of the area configuration's serial update (hw/procrustes/top.py)
UPDATE_II_AREA = 15


def _log2(v: int) -> int:
    return v.bit_length() - 1


@dataclass(frozen=True)
class Config:
    """One configuration of the accelerator.

    ``rows`` x ``cols`` PEs (powers of two, 1..16). ``data_bits``/``acc_bits`` and the
    fractional bits are the contract's number formats. ``bm`` x ``bk`` is the block of the
    weight format (1, 2, 4 or 8 each). ``lanes`` blocks' masks are read per cycle by each
    format walker (the mask/pointer store is split into ``lanes`` skewed banks).
    Depths: ``blk_depth`` words per mask/pointer bank, ``val_depth`` weight values,
    ``x_depth`` words of the operand buffer (``cols`` lanes), ``g_depth`` words of the
    gradient buffer (``rows`` lanes), ``y_depth`` words of each PE row's result bank.
    ``fifo_depth`` groups fit in each walker's FIFO (2..16).
    ``area`` = 1 selects the area configuration for small FPGAs (the iCE40UP5K): the weight
    update runs one element at a time on one shared 16x16 multiplier (``UPDATE_II_AREA``
    cycles per element instead of 3; needs ``data_bits <= 16``); results are bit-identical.
    """

    rows: int = 4
    cols: int = 4
    data_bits: int = 16
    acc_bits: int = 32
    w_frac: int = 12
    x_frac: int = 8
    g_frac: int = 12
    bm: int = 4
    bk: int = 4
    lanes: int = 4
    blk_depth: int = 64
    val_depth: int = 2048
    x_depth: int = 512
    g_depth: int = 256
    y_depth: int = 256
    fifo_depth: int = 16
    area: int = 0

    def __post_init__(self):
        check_pow2("rows", self.rows, 1, 16)
        check_pow2("cols", self.cols, 1, 16)
        check_int("data_bits", self.data_bits, 4, 24)
        check_int("acc_bits", self.acc_bits, self.data_bits, 48)
        for name in ("w_frac", "x_frac", "g_frac"):
            check_int(name, getattr(self, name), 0, self.data_bits - 1)
        if self.g_frac + self.x_frac < self.w_frac:
            raise ValueError(f"g_frac + x_frac must be >= w_frac, not "
                             f"{self.g_frac} + {self.x_frac} < {self.w_frac}")
        check_pow2("bm", self.bm, 1, 8)
        check_pow2("bk", self.bk, 1, 8)
        check_pow2("lanes", self.lanes, 1, 8)
        check_int("blk_depth", self.blk_depth, 1, 65535)
        check_int("val_depth", self.val_depth, 1, 1 << 20)
        check_int("x_depth", self.x_depth, 1, 65535)
        check_int("g_depth", self.g_depth, 1, 65535)
        check_int("y_depth", self.y_depth, 1, 65535)
        check_int("fifo_depth", self.fifo_depth, 2, 16)
        check_int("area", self.area, 0, 1)
        if self.area and self.data_bits > 16:
            raise ValueError(f"data_bits must be in 4..16 with area=1 (the update's "
                             f"shared multiplier is 16x16), not {self.data_bits}")

    @property
    def update_ii(self) -> int:
        """Cycles per element of the weight update."""
        return UPDATE_II_AREA if self.area else 3

    # ---- derived -------------------------------------------------------------------
    @property
    def nb(self) -> int:
        """Bits per block mask."""
        return self.bm * self.bk

    @property
    def slice_bits(self) -> int:
        """Bits of one block's row (forward) or column (backward) slice, padded."""
        return max(self.bm, self.bk)

    @property
    def ptr_bits(self) -> int:
        """Width of a block pointer / value address."""
        return max(1, (self.val_depth - 1).bit_length())

    @property
    def mbw(self) -> int:
        """Width of a mask/pointer bank word: mask in the low bits, pointer above."""
        return self.nb + self.ptr_bits

    @property
    def word_bits(self) -> int:
        """Width of the ``din``/``dout`` data streams."""
        return max(self.cols * self.data_bits, self.rows * self.data_bits, self.mbw, 64, 32)

    @property
    def log_rows(self) -> int:
        return _log2(self.rows)

    @property
    def log_cols(self) -> int:
        return _log2(self.cols)

    @property
    def log_bm(self) -> int:
        return _log2(self.bm)

    @property
    def log_bk(self) -> int:
        return _log2(self.bk)

    @property
    def log_lanes(self) -> int:
        return _log2(self.lanes)

    @property
    def log_slice(self) -> int:
        return _log2(self.slice_bits)

    @property
    def wgrad_shift(self) -> int:
        return self.g_frac + self.x_frac - self.w_frac

    def grid(self, M: int, K: int) -> tuple[int, int]:
        """``(GM, GK)``: block rows and block columns of an ``M x K`` weight."""
        return -(-M // self.bm), -(-K // self.bk)

    def bank_words(self, M: int, K: int) -> int:
        """Words per mask/pointer bank that an ``M x K`` weight occupies."""
        GM, GK = self.grid(M, K)
        return GM * -(-GK // self.lanes)

    def block_location(self, bi: int, bj: int, GK: int, base: int = 0) -> tuple[int, int]:
        """``(bank, address)`` of block ``(bi, bj)``: the skewed layout that lets a row
        walk and a column walk both read ``lanes`` blocks per cycle."""
        gkl = -(-GK // self.lanes)
        return (bi + bj) % self.lanes, base + bi * gkl + bj // self.lanes
