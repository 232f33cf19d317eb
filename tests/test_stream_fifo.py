"""The shared stream FIFO and skid buffer, in cocotb on both simulators."""

import pytest
from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw.common import SkidBuffer, StreamFIFO
from hw.designs import build
from sim.runner import simulate, to_verilog

STRESS = dict(width=16, count=10000, gap=0.3, stall=0.4, burst=5, seed=11)


@pytest.mark.parametrize("make", [lambda: SkidBuffer(16), lambda: StreamFIFO(16, 8)],
                         ids=["skid", "fifo"])
def test_10000_transfers_under_gaps_and_backpressure(simulator, make):
    r = simulate(make(), test_module="sim.tb.tb_stream_fifo", simulator=simulator,
                 params=STRESS)
    assert r.passed, r.log.read_text()[-3000:] if r.log else r
    assert r.metrics["transfers"] == 10000


def test_full_rate_without_stalls(simulator):
    r = simulate(SkidBuffer(16), test_module="sim.tb.tb_stream_fifo", simulator=simulator,
                 params=dict(width=16, count=500, gap=0.0, stall=0.0, seed=2))
    assert r.passed
    # one transfer per cycle once the pipe is full: a few cycles of latency only
    assert r.metrics["cycles"] <= 500 + 5


class _Wire(wiring.Component):
    """A combinational pass-through: ``o.valid`` follows ``i.valid`` within the cycle, so it
    rises just after the falling edge at which the source raises ``i.valid``."""

    def __init__(self):
        super().__init__({"i": In(stream.Signature(16)), "o": Out(stream.Signature(16))})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [self.o.valid.eq(self.i.valid), self.o.payload.eq(self.i.payload),
                     self.i.ready.eq(self.o.ready)]
        seen = Signal(16)  # a register, so that the design has the clock the bench drives
        m.d.sync += seen.eq(seen + (self.o.valid & self.o.ready))
        return m


def test_a_combinational_path_loses_nothing(simulator):
    # The sink sleeps while valid is low; here valid rises between a falling edge and the
    # next rising one, and the beat must still be taken (or refused) in that cycle.
    r = simulate(_Wire(), test_module="sim.tb.tb_stream_fifo", simulator=simulator,
                 params=dict(STRESS, count=2000))
    assert r.passed, r.log.read_text()[-3000:] if r.log else r
    assert r.metrics["transfers"] == 2000


class _LossySlice(wiring.Component):
    """A deliberately broken register slice: it ignores o.ready, so it drops items."""

    def __init__(self):
        super().__init__({"i": In(stream.Signature(16)), "o": Out(stream.Signature(16))})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.i.ready.eq(1)
        m.d.sync += [self.o.valid.eq(self.i.valid), self.o.payload.eq(self.i.payload)]
        return m


class _UnstableSlice(SkidBuffer):
    """A broken slice that changes its payload while stalled (breaks the stream rules)."""

    def elaborate(self, platform):
        m = super().elaborate(platform)
        flip = Signal()
        m.d.sync += flip.eq(~flip)
        with m.If(self.o.valid & ~self.o.ready & flip):
            m.d.sync += self.o.payload.eq(self.o.payload + 1)
        return m


@pytest.mark.parametrize("broken", [_LossySlice, lambda: _UnstableSlice(16)],
                         ids=["lossy", "unstable"])
def test_testbench_catches_broken_buffers(broken):
    r = simulate(broken(), test_module="sim.tb.tb_stream_fifo", simulator="icarus"
                 if "icarus" in _sims() else "verilator",
                 params=dict(width=16, count=300, gap=0.2, stall=0.5, seed=5))
    assert not r.passed


def _sims():
    from sim.runner import available_simulators

    return available_simulators()


def test_verilog_is_byte_identical_across_conversions():
    a = to_verilog(build("fifo", width=24, depth=32), name="fifo")
    b = to_verilog(build("fifo", width=24, depth=32), name="fifo")
    assert a == b
    assert "src =" not in a  # no source locations that would differ between checkouts


@pytest.mark.parametrize("kwargs, msg", [
    (dict(width=16, depth=0), r"depth must be in 1\.\.65536, not 0"),
    (dict(width=0, depth=4), r"width must be in 1\.\.4096, not 0"),
    (dict(width=8, depth=4, kind="ring"), r"kind must be 'fifo' or 'skid'"),
])
def test_bad_parameters_are_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        build("fifo", **kwargs)
