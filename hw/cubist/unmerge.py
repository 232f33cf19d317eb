"""The unmerge unit: restore the full H*W grid from the merged grid and the merge map.

``cfg`` (h, w, r_h, r_w) opens a frame; the merged grid tokens (``i``, delimited by
``last``) are stored; then each map entry (``map``, delimited by ``last``) makes one
output token on ``o``: the stored token at that index (``unmerge_fixed`` without prefix).
A configuration out of range for the unit drops the frame's tokens and map entries and
emits nothing. A map index beyond the stored tokens reads whatever that slot holds.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..common import StreamFIFO
from .keys import clog2
from .layouts import map_layout, token_layout, um_cfg_layout

__all__ = ["Unmerge"]

FIFO_DEPTH = 4


class Unmerge(wiring.Component):
    def __init__(self, *, h_max: int, w_max: int, lanes: int, width: int, beats: int):
        self.h_max, self.w_max, self.lanes, self.width, self.beats = \
            h_max, w_max, lanes, width, beats
        tok = token_layout(width, lanes)
        super().__init__({
            "cfg": In(stream.Signature(um_cfg_layout())),
            "i": In(stream.Signature(tok)),
            "map": In(stream.Signature(map_layout(h_max, w_max))),
            "o": Out(stream.Signature(tok)),
        })

    def elaborate(self, platform):
        m = Module()
        B, CB = self.beats, clog2(self.beats)
        TB = clog2(self.h_max * self.w_max)
        lw = self.lanes * self.width
        m.submodules.buf = buf = Memory(shape=lw, depth=1 << (TB + CB), init=[])
        wp, rp = buf.write_port(), buf.read_port()
        m.submodules.fifo = fifo = StreamFIFO(token_layout(self.width, self.lanes), FIFO_DEPTH)
        m.d.comb += [self.o.payload.eq(fifo.o.payload), self.o.valid.eq(fifo.o.valid),
                     fifo.o.ready.eq(self.o.ready)]
        cfg = self.cfg.payload
        bad = Signal()
        tok = Signal(TB)
        c = Signal(range(max(B, 2)))
        idx = Signal(TB)
        is_last = Signal()
        busy = Signal()
        inflight = Signal(range(FIFO_DEPTH + 1))
        credit = (fifo.level + inflight) < FIFO_DEPTH
        issue = Signal()
        m.d.comb += [wp.addr.eq(Cat(c[:CB], tok)), wp.data.eq(self.i.payload.data.as_value()),
                     rp.addr.eq(Cat(c[:CB], idx))]
        with m.FSM(name="um"):
            with m.State("IDLE"):
                m.d.comb += self.cfg.ready.eq(1)
                with m.If(self.cfg.valid):
                    m.d.sync += [bad.eq((cfg.h < 2) | (cfg.h > self.h_max) | (cfg.w < 2)
                                        | (cfg.w > self.w_max) | (cfg.r_w > (cfg.w >> 1))
                                        | (cfg.r_h > (cfg.h >> 1))),
                                 tok.eq(0), c.eq(0)]
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(self.i.valid):
                    m.d.comb += wp.en.eq(~bad)
                    m.d.sync += c.eq(c + 1)
                    with m.If(c == B - 1):
                        m.d.sync += [c.eq(0), tok.eq(tok + 1)]
                    with m.If(self.i.payload.last):
                        m.d.sync += [c.eq(0), busy.eq(0)]
                        m.next = "EMIT"
            with m.State("EMIT"):
                m.d.comb += self.map.ready.eq(~busy)
                with m.If(~busy & self.map.valid):
                    m.d.sync += [idx.eq(self.map.payload.index), is_last.eq(self.map.payload.last),
                                 busy.eq(~bad), c.eq(0)]
                    with m.If(bad & self.map.payload.last):
                        m.next = "IDLE"
                with m.If(busy & credit):
                    m.d.comb += issue.eq(1)
                    m.d.sync += c.eq(c + 1)
                    with m.If(c == B - 1):
                        m.d.sync += [c.eq(0), busy.eq(0)]
                        with m.If(is_last):
                            m.next = "IDLE"
        v1, lt1, l1 = Signal(), Signal(), Signal()
        m.d.sync += [v1.eq(issue), lt1.eq(c == B - 1), l1.eq((c == B - 1) & is_last)]
        m.d.comb += [fifo.i.valid.eq(v1), fifo.i.payload.data.eq(rp.data),
                     fifo.i.payload.last_token.eq(lt1), fifo.i.payload.last.eq(l1)]
        m.d.sync += inflight.eq(inflight + issue - v1)
        return m
