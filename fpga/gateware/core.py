"""The board core: an accelerator behind the host link, with cycle counters.

:class:`BoardCore` has only ``rx``/``tx`` pins (plus the sync domain's ``clk``/``rst``),
so the same gateware is a board top's contents (:mod:`fpga.boards`) and the device
under test of the end-to-end simulations. Every stream port of the accelerator becomes
a stream of the link, named after the port; other ports are left at their defaults.
"""

from __future__ import annotations

import json

from amaranth.hdl import Cat, Module, ResetInserter, Shape, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw.common import check_int

from ..protocol import STATUS_FIELDS
from .link import HostLink, stream_fields

__all__ = ["BoardCore", "accel_streams", "describe"]

PROTOCOL_VERSION = 1


def accel_streams(accel) -> tuple[list, list]:
    """``(inputs, outputs)`` of ``accel``: lists of ``(name, payload shape)``."""
    inputs, outputs = [], []
    for name, member in accel.signature.members.items():
        if member.is_signature and isinstance(member.signature, stream.Signature):
            shape = member.signature.members["payload"].shape
            (inputs if member.flow == In else outputs).append((name, shape))
    if not inputs or not outputs:
        raise ValueError("accelerator must have at least one input and one output stream")
    return inputs, outputs


def describe(accel, *, design: str, params: dict, clk_hz: int, divisor: int,
             timeout_cycles: int, in_depth: int, out_depth: int) -> dict:
    """The descriptor that INFO returns: everything the host needs to talk to the board."""
    inputs, outputs = accel_streams(accel)

    def streams(lst):
        return [{"name": n, "bits": Shape.cast(s).width, "fields": stream_fields(s)}
                for n, s in lst]

    return {"proto": PROTOCOL_VERSION, "design": design, "params": params, "clk_hz": clk_hz,
            "divisor": divisor, "timeout_cycles": timeout_cycles, "in_depth": in_depth,
            "out_depth": out_depth, "inputs": streams(inputs), "outputs": streams(outputs)}


class BoardCore(wiring.Component):
    """``accel`` behind a :class:`~fpga.gateware.link.HostLink` on the ``rx``/``tx`` pins.

    ``divisor`` is clock cycles per UART bit; ``timeout_cycles`` how long a partial
    frame may pause (default: 10 ms at ``clk_hz``).
    """

    def __init__(self, accel, *, design: str, params: dict, clk_hz: int, divisor: int,
                 timeout_cycles: int | None = None, in_depth: int = 1024,
                 out_depth: int = 512):
        self.accel = accel
        check_int("clk_hz", clk_hz, 1000, 10**9)
        if timeout_cycles is None:
            timeout_cycles = max(clk_hz // 100, 64 * divisor)
        self.inputs, self.outputs = accel_streams(accel)
        self.descriptor = describe(accel, design=design, params=params, clk_hz=clk_hz,
                                   divisor=divisor, timeout_cycles=timeout_cycles,
                                   in_depth=in_depth, out_depth=out_depth)
        info = json.dumps(self.descriptor, separators=(",", ":"), sort_keys=True).encode()
        self.link = HostLink(inputs=self.inputs, outputs=self.outputs, info=info,
                             divisor=divisor, timeout_cycles=timeout_cycles,
                             in_depth=in_depth, out_depth=out_depth)
        super().__init__({"rx": In(1, init=1), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        m = Module()
        link, accel = self.link, self.accel
        m.submodules.link = link
        m.submodules.accel = ResetInserter(link.clear)(accel)
        m.d.comb += [link.rx.eq(self.rx), self.tx.eq(link.tx)]
        for name, _ in self.inputs:
            wiring.connect(m, getattr(link, f"to_{name}"), getattr(accel, name))
        for name, _ in self.outputs:
            wiring.connect(m, getattr(accel, name), getattr(link, f"from_{name}"))

        cycle = Signal(32)  # free-running
        first_in = Signal(32)
        last_out = Signal(32)
        in_beats = Signal(32)
        out_beats = Signal(32)
        seen_in = Signal()
        fire_in = Signal()
        fire_out = Signal()
        for name, _ in self.inputs:
            s = getattr(accel, name)
            with m.If(s.valid & s.ready):
                m.d.comb += fire_in.eq(1)
        for name, _ in self.outputs:
            s = getattr(accel, name)
            with m.If(s.valid & s.ready):
                m.d.comb += fire_out.eq(1)
        m.d.sync += cycle.eq(cycle + 1)
        with m.If(link.clear):
            m.d.sync += [seen_in.eq(0), first_in.eq(0), last_out.eq(0), in_beats.eq(0),
                         out_beats.eq(0)]
        with m.Else():
            with m.If(fire_in):
                m.d.sync += in_beats.eq(in_beats + 1)
                with m.If(~seen_in):
                    m.d.sync += [seen_in.eq(1), first_in.eq(cycle)]
            with m.If(fire_out):
                m.d.sync += [out_beats.eq(out_beats + 1), last_out.eq(cycle)]

        values = {"first_in": first_in, "last_out": last_out,
                  "in_beats": in_beats, "out_beats": out_beats,
                  "crc_errors": link.crc_errors, "timeouts": link.timeouts,
                  "framing_errors": link.framing_errors,
                  "dropped_replies": link.dropped_replies, "free": link.free}
        m.d.comb += link.status.eq(Cat(*(values[name][:8 * nbytes]
                                         for name, nbytes in STATUS_FIELDS)))
        return m
