"""The boards: their amaranth-boards platforms, clocks, targets and programmers.

A board top (:class:`BoardTop`) puts a :class:`~fpga.gateware.core.BoardCore` on the
board's USB serial port (its ``uart`` resource) and runs it from the board oscillator.
Place and route is constrained to the *target* clock (the design targets of
``DESIGN.md``), not to the oscillator, so that the reported fmax answers whether the
design would run at the target; the bitstream itself runs at the oscillator's rate.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from amaranth.build import Clock, Resource
from amaranth.hdl import Elaboratable, Module
from amaranth.lib import io

__all__ = ["BOARDS", "BoardSpec", "BoardTop", "get_board", "make_platform", "synth_overrides"]


@dataclass(frozen=True)
class BoardSpec:
    name: str
    family: str  # ice40 | ecp5
    device: str
    platform: str  # "module:class" in amaranth_boards
    clk_resource: str
    clk_hz: int  # the oscillator the bitstream runs from
    target_mhz: float  # what place and route is asked for
    bitstream: str  # file name of the bitstream in the build directory
    baud: int  # default UART rate (the FTDI chips of both boards do 1 Mbaud)
    synth_opts: str
    script_after_read: str  # Yosys commands between reading the design and synthesis
    in_depth: int  # link input buffer, bytes
    out_depth: int  # each output FIFO, bytes
    programmer: tuple[str, ...]  # argv; {bitstream} is replaced; argv[0] may be $ENV

    def platform_class(self):
        module, _, attr = self.platform.partition(":")
        return getattr(importlib.import_module(module), attr)


BOARDS = {
    "icebreaker": BoardSpec(
        name="icebreaker", family="ice40", device="iCE40UP5K-SG48",
        platform="amaranth_boards.icebreaker:ICEBreakerPlatform", clk_resource="clk12",
        clk_hz=12_000_000, target_mhz=30.0, bitstream="top.bin", baud=1_000_000,
        # Amaranth's iCE40 flow leaves multipliers in LUTs unless Yosys gets -dsp, and
        # single-port RAM out of the SPRAMs unless it gets -spram. SPRAM cannot be
        # initialized and Amaranth gives every memory an (all-zero) init: memories named
        # *_spram (hw.cubist's frame buffer) lose it, the rest keep theirs.
        synth_opts="-dsp -spram",
        script_after_read=r"delete t:$meminit_v2 r:MEMID=*_spram %i",
        in_depth=1024, out_depth=512,
        programmer=("ICEPROG=iceprog", "{bitstream}")),
    "ulx3s": BoardSpec(
        name="ulx3s", family="ecp5", device="LFE5U-85F-6BG381C",
        platform="amaranth_boards.ulx3s:ULX3S_85F_Platform", clk_resource="clk25",
        clk_hz=25_000_000, target_mhz=100.0, bitstream="top.bit", baud=1_000_000,
        # a register whose signal has the keep attribute keeps its flip-flop: Yosys
        # merges identical registers (opt_merge) unless the cell itself is kept, and
        # Amaranth puts attributes on the wire (hw.procrustes replicates its broadcast
        # registers per PE row that way)
        synth_opts="", script_after_read=r"setattr -set keep 1 a:keep %ci1:+$dff[Q] t:$dff %i",
        in_depth=2048, out_depth=1024,
        programmer=("OPENFPGALOADER=openFPGALoader", "-b", "ulx3s", "{bitstream}")),
}


def get_board(name: str) -> BoardSpec:
    if name not in BOARDS:
        raise ValueError(f"board must be one of {', '.join(BOARDS)}, not {name!r}")
    return BOARDS[name]


def synth_overrides(spec: BoardSpec) -> dict:
    """The Yosys overrides of the board's Amaranth build plan (``synth_opts`` ...)."""
    opts = {}
    if spec.synth_opts:
        opts["synth_opts"] = spec.synth_opts
    if spec.script_after_read:
        opts["script_after_read"] = spec.script_after_read
    return opts


def make_platform(spec: BoardSpec, target_mhz: float | None = None):
    """The board's platform, its clock constrained to ``target_mhz`` (default: the spec's)."""
    base = spec.platform_class()
    mhz = spec.target_mhz if target_mhz is None else target_mhz
    resources = []
    for r in base.resources:
        if r.name == spec.clk_resource and r.number == 0:
            r = Resource(r.name, r.number, *r.ios, Clock(mhz * 1e6), r.attrs)
        resources.append(r)
    return type(f"{base.__name__}At{int(mhz)}MHz", (base,), {"resources": resources})()


class BoardTop(Elaboratable):
    """``core`` (a BoardCore) on the board's UART, clocked by its oscillator."""

    def __init__(self, core):
        self.core = core

    def elaborate(self, platform):
        m = Module()
        m.submodules.core = core = self.core
        uart = platform.request("uart", 0, dir="-")
        m.submodules.rx_buf = rx = io.Buffer("i", uart.rx)
        m.submodules.tx_buf = tx = io.Buffer("o", uart.tx)
        m.d.comb += [core.rx.eq(rx.i), tx.o.eq(core.tx)]
        return m
