"""The link test design: a small stream unit that exercises the host link end to end.

It is honestly a test design, not an accelerator: every word on ``i`` comes back on
``o`` inverted (``data ^ 0xFFFF``), and at each word with ``last`` set, ``sum`` carries
the 16-bit sum and the count of the words of that packet (its golden model is
``fpga.apps.linktest_golden``). Two output streams of
different widths and rates, with backpressure, are what the link must handle.
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["LinkTest"]

WORD = data.StructLayout({"data": 16, "last": 1})
SUM = data.StructLayout({"sum": 16, "count": 16})


class LinkTest(wiring.Component):
    def __init__(self):
        super().__init__({
            "i": In(stream.Signature(WORD)),
            "o": Out(stream.Signature(WORD)),
            "sum": Out(stream.Signature(SUM)),
        })

    def elaborate(self, platform):
        m = Module()
        acc = Signal(16)
        count = Signal(16)
        o_free = ~self.o.valid | self.o.ready
        sum_free = ~self.sum.valid | self.sum.ready
        m.d.comb += self.i.ready.eq(o_free & (sum_free | ~self.i.payload.last))
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.sum.ready):
            m.d.sync += self.sum.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [self.o.valid.eq(1), self.o.payload.data.eq(self.i.payload.data ^ 0xFFFF),
                         self.o.payload.last.eq(self.i.payload.last)]
            with m.If(self.i.payload.last):
                m.d.sync += [self.sum.valid.eq(1),
                             self.sum.payload.sum.eq(acc + self.i.payload.data),
                             self.sum.payload.count.eq(count + 1), acc.eq(0), count.eq(0)]
            with m.Else():
                m.d.sync += [acc.eq(acc + self.i.payload.data), count.eq(count + 1)]
        return m
