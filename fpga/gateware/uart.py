"""8N1 UART receiver and transmitter with a fixed clock divisor (cycles per bit).

The receiver synchronizes ``rx`` with two flip-flops, checks the start bit at its middle
and samples each bit at its middle; a byte whose stop bit is low is dropped and counted
as a framing error. It cannot be stalled: ``o.valid`` is a one-cycle pulse (the link's
deframer is always ready). The transmitter takes bytes from a stream.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw.common import check_int

__all__ = ["UARTRx", "UARTTx"]

MAX_DIVISOR = 1 << 16


class UARTRx(wiring.Component):
    """``rx`` pin in, bytes out (``o``); ``framing_error`` pulses on a bad stop bit."""

    def __init__(self, divisor: int):
        self.divisor = check_int("divisor", divisor, 4, MAX_DIVISOR)
        super().__init__({
            "rx": In(1, init=1),
            "o": Out(stream.Signature(8, always_ready=True)),
            "framing_error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        sync1 = Signal(init=1)
        pin = Signal(init=1)
        m.d.sync += [sync1.eq(self.rx), pin.eq(sync1)]

        timer = Signal(range(self.divisor))
        bits = Signal(range(10))
        shreg = Signal(8)
        m.d.sync += [self.o.valid.eq(0), self.framing_error.eq(0)]

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~pin):
                    m.d.sync += timer.eq(self.divisor // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Elif(pin):  # a glitch, not a start bit
                    m.next = "IDLE"
                with m.Else():
                    m.d.sync += [timer.eq(self.divisor - 1), bits.eq(0)]
                    m.next = "DATA"
            with m.State("DATA"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Else():
                    m.d.sync += [timer.eq(self.divisor - 1), shreg.eq(Cat(shreg[1:], pin))]
                    m.d.sync += bits.eq(bits + 1)
                    with m.If(bits == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Else():
                    with m.If(pin):
                        m.d.sync += [self.o.payload.eq(shreg), self.o.valid.eq(1)]
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += self.framing_error.eq(1)
                        m.next = "BREAK"
            with m.State("BREAK"):  # wait for the line to go idle again
                with m.If(pin):
                    m.next = "IDLE"
        return m


class UARTTx(wiring.Component):
    """Bytes in (``i``), ``tx`` pin out; idle high."""

    def __init__(self, divisor: int):
        self.divisor = check_int("divisor", divisor, 4, MAX_DIVISOR)
        super().__init__({
            "i": In(stream.Signature(8)),
            "tx": Out(1, init=1),
        })

    def elaborate(self, platform):
        m = Module()
        timer = Signal(range(self.divisor))
        shreg = Signal(10, init=0x3FF)
        bits = Signal(range(11))
        m.d.comb += [self.tx.eq(shreg[0]), self.i.ready.eq(bits == 0)]
        with m.If(bits == 0):
            with m.If(self.i.valid):
                m.d.sync += [shreg.eq(Cat(Const(0, 1), self.i.payload, Const(1, 1))),
                             bits.eq(10), timer.eq(self.divisor - 1)]
        with m.Elif(timer != 0):
            m.d.sync += timer.eq(timer - 1)
        with m.Else():
            m.d.sync += [shreg.eq(Cat(shreg[1:], Const(1, 1))), bits.eq(bits - 1),
                         timer.eq(self.divisor - 1)]
        return m
