"""Accelerators a board can carry, and the configuration each board uses by default.

``linktest`` is the link's own test design (:mod:`fpga.gateware.linktest`); ``cubist``
and ``procrustes`` come from the design registry :mod:`hw.designs`.
"""

from __future__ import annotations

from hw import designs as hw_designs

__all__ = ["BOARD_DEFAULTS", "DESIGNS", "board_params", "make_accel", "sim_core"]

DESIGNS = ("linktest", "cubist", "procrustes")

# Per board, the parameters that fit (see fpga/README.md for the numbers).
# The merge unit goes on the boards without its unmerge unit (the host can unmerge); on
# the iCEBreaker in its area configuration (hw/cubist/README.md, "Area configuration"),
# which fits the UP5K alone but not beside the UART link.
# Procrustes: 8x8 PEs on the ULX3S-85F; on the iCEBreaker the smallest array with small
# buffers in the area configuration (issue #6): a 2-deep walker FIFO (the UP5K has no
# LUT-RAM, a 16-deep one was 2925 FFs), one mask lane, 2x2 blocks (the 64-word block
# store still covers the 256 values; 4-bit masks instead of 16-bit ones in the walker
# and its FIFO), the serial weight update on one shared multiplier and the area
# configuration's narrow counters (area=1, 15 cycles per element). Out of context it
# places and routes: 5266 of 5280 LC, 7/30 EBR, 3/8 DSP, but 24.60 MHz against 30 (hw/
# procrustes/README.md, "On the boards"); with the UART link (6801 LC) it does not fit.
BOARD_DEFAULTS = {
    "icebreaker": {"cubist": {"unmerge": 0, "buffers": 1, "serial_mul": 1, "shared_keys": 1,
                              "area": 1},
                   "procrustes": {"rows": 1, "cols": 1, "val_depth": 256, "x_depth": 64,
                                  "y_depth": 64, "fifo_depth": 2, "lanes": 1, "bm": 2,
                                  "bk": 2, "area": 1}},
    "ulx3s": {"cubist": {"unmerge": 0}, "procrustes": {"rows": 8, "cols": 8}},
}


def board_params(board: str, design: str, params: dict | None = None) -> dict:
    """The board's default parameters of ``design``, overridden by ``params``."""
    return {**BOARD_DEFAULTS.get(board, {}).get(design, {}), **(params or {})}


def make_accel(design: str, params: dict | None = None):
    """``(component, full parameters)`` of ``design``."""
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {', '.join(DESIGNS)}, not {design!r}")
    params = dict(params or {})
    if design == "linktest":
        from .gateware.linktest import LinkTest

        if params:
            raise ValueError(f"linktest has no parameter {sorted(params)[0]!r}")
        return LinkTest(), {}
    d = hw_designs.get(design)
    full = {**d.defaults(), **params}
    try:
        return d.build(**full), full
    except hw_designs.DesignUnavailable as e:
        raise ValueError(str(e)) from None


def sim_core(design: str, params: dict | None = None, *, divisor: int = 4,
             timeout_bytes: int = 40, in_depth: int = 256, out_depth: int = 128,
             clk_hz: int = 100_000_000):
    """A :class:`BoardCore` for simulation: a fast UART (``divisor`` cycles per bit) and a
    partial-frame timeout of ``timeout_bytes`` byte times."""
    from .gateware.core import BoardCore

    accel, full = make_accel(design, params)
    return BoardCore(accel, design=design, params=full, clk_hz=clk_hz, divisor=divisor,
                     timeout_cycles=timeout_bytes * 10 * divisor, in_depth=in_depth,
                     out_depth=out_depth)
