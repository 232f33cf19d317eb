"""The host interface of the Procrustes array: operations, buffer and register numbers,
and the ``data.StructLayout`` payloads of the command and response streams.

Every command produces exactly one response beat. ``LOAD`` consumes ``count`` words from
``din`` (none if the command is refused); ``UNLOAD`` produces ``count`` words on ``dout``
before its response.
"""

from __future__ import annotations

import enum

from amaranth.lib import data

__all__ = ["Buf", "Err", "Op", "Reg", "cmd_layout", "resp_layout", "sched_words"]


class Op(enum.IntEnum):
    NOP = 0
    LOAD = 1  # sel=Buf; addr, count (BLOCKS: m, k and addr = bank word base; count unused)
    UNLOAD = 2  # same fields; Y: arg = PE row (bank)
    SET = 3  # sel=Reg, arg = value
    GET = 4  # sel=Reg, response value = register
    FWD = 5  # Y = W·X; W [m, k] at blocks addr / values arg; X [k, n]
    BWD = 6  # dX = Wᵀ·dY; W [m, k]; dY [m, n] in the operand buffer
    WGRAD = 7  # dW = dY·Xᵀ; dYᵀ in the gradient buffer, Xᵀ in the operand buffer
    UPDATE = 8  # W' from W (blocks addr / values arg) and dW (result banks); re-encode
    # dWᵀ = X·dYᵀ: FWD with the activations X [m, k] in the block store (blocks addr /
    # values arg), dYᵀ [k, n] in the operand buffer, WGRAD's rounding: zero activations
    # cost no cycle; the result is in the FWD job layout (the host re-lays it for UPDATE)
    WGRADX = 9


class Buf(enum.IntEnum):
    BLOCKS = 0  # masks and pointers (block order in, skewed banks inside)
    VALUES = 1  # weight values
    X = 2  # operand buffer (cols lanes)
    G = 3  # gradient buffer (rows lanes)
    SCHED = 4  # schedule table: word 2r + h = range h of PE row r: (row, tile, jobs)
    Y = 5  # result bank of one PE row (arg)


class Reg(enum.IntEnum):
    LR = 0
    DECAY = 1
    SEED = 2
    BOUND = 3
    UP = 4
    DN = 5
    THETA = 6
    CYCLES = 7  # read only: cycles of all commands since reset (low 32 bits)
    NNZ = 8  # read only: non-zeros written by the last UPDATE
    TRACKED = 9  # read only: weights the last UPDATE tracked (theta < score)


class Err(enum.IntEnum):
    OK = 0
    BAD_OP = 1
    BAD_SEL = 2
    RANGE = 3  # a dimension is zero or a buffer would overflow


def cmd_layout() -> data.StructLayout:
    return data.StructLayout({
        "op": 4,
        "sel": 4,
        "addr": 16,
        "count": 16,
        "m": 16,
        "k": 16,
        "n": 16,
        "arg": 32,
    })


def resp_layout() -> data.StructLayout:
    return data.StructLayout({
        "op": 4,
        "err": 4,
        "value": 32,
        "cycles": 32,
    })


def sched_words(table) -> list[int]:
    """The ``SCHED`` buffer image of a schedule table ``[rows][2][(row, tile, jobs)]``
    (``golden.balance.Schedule.table()``): one word per PE row and range, 16 bits each
    field, row in the low bits."""
    words = []
    for ranges in table:
        for o, t, n in ranges:
            for name, v in (("row", o), ("tile", t), ("jobs", n)):
                if not 0 <= int(v) < 1 << 16:
                    raise ValueError(f"schedule {name} must be in 0..65535, not {v}")
            words.append(int(o) | int(t) << 16 | int(n) << 32)
    return words
