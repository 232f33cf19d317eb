"""Stream buffering shared by both accelerators.

* :class:`SkidBuffer`: two registers; full throughput, and ``i.ready`` is a register,
  so it cuts the combinational ready path between two stream stages.
* :class:`StreamFIFO`: a memory-backed FIFO of ``depth`` entries with stream ports
  (Amaranth's ``SyncFIFOBuffered`` inside, whose storage maps to block RAM).

Neither has a combinational path from ``i.valid`` to ``i.ready`` or from ``o.ready`` to
``i.ready``.
"""

from __future__ import annotations

from amaranth.hdl import Module, Shape, Signal
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from .check import check_int

__all__ = ["SkidBuffer", "StreamFIFO"]


def _payload_shape(shape):
    if isinstance(shape, (data.Layout, Shape)):
        return shape
    if isinstance(shape, int):
        check_int("shape", shape, 1, 4096)
        return shape
    try:
        return Shape.cast(shape)
    except TypeError:
        raise ValueError(f"shape must be a width, Shape or data.Layout, not {shape!r}") from None


class SkidBuffer(wiring.Component):
    """A two-entry stream register slice with registered ``i.ready``."""

    def __init__(self, shape):
        self.shape = _payload_shape(shape)
        super().__init__({
            "i": In(stream.Signature(self.shape)),
            "o": Out(stream.Signature(self.shape)),
        })

    def elaborate(self, platform):
        m = Module()
        skid = Signal.like(self.i.payload, name="skid")
        skid_valid = Signal()
        m.d.comb += self.i.ready.eq(~skid_valid)
        with m.If(self.o.ready | ~self.o.valid):
            with m.If(skid_valid):
                m.d.sync += [self.o.payload.eq(skid), self.o.valid.eq(1), skid_valid.eq(0)]
            with m.Else():
                m.d.sync += self.o.valid.eq(self.i.valid)
                with m.If(self.i.valid):
                    m.d.sync += self.o.payload.eq(self.i.payload)
        with m.Elif(self.i.valid & self.i.ready):
            m.d.sync += [skid.eq(self.i.payload), skid_valid.eq(1)]
        return m


class StreamFIFO(wiring.Component):
    """A FIFO of ``depth`` payloads (1..65536) between two streams."""

    def __init__(self, shape, depth: int):
        self.shape = _payload_shape(shape)
        self.depth = check_int("depth", depth, 1, 65536)
        super().__init__({
            "i": In(stream.Signature(self.shape)),
            "o": Out(stream.Signature(self.shape)),
            "level": Out(range(depth + 1)),
        })

    def elaborate(self, platform):
        m = Module()
        width = Shape.cast(self.shape).width
        m.submodules.fifo = q = fifo.SyncFIFOBuffered(width=width, depth=self.depth)
        m.d.comb += [
            q.w_data.eq(self.i.payload.as_value() if hasattr(self.i.payload, "as_value")
                        else self.i.payload),
            q.w_en.eq(self.i.valid),
            self.i.ready.eq(q.w_rdy),
            self.o.payload.eq(q.r_data),
            self.o.valid.eq(q.r_rdy),
            q.r_en.eq(self.o.ready),
            self.level.eq(q.level),
        ]
        return m
