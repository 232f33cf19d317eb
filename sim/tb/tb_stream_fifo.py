"""Testbench for hw.common StreamFIFO / SkidBuffer: every item arrives once, in order.

Parameters (from the runner): ``width``, ``count`` (items), ``seed``, ``gap`` (input
pause probability), ``stall`` (output backpressure probability), ``burst``.
"""

import random

import cocotb
from cocotb.triggers import ClockCycles, with_timeout

from sim.streams import RandomPauses, StreamSink, StreamSource
from sim.tbutil import cycle_counter, params, report_metric, start_clock_and_reset


@cocotb.test()
async def test_in_order_no_loss(dut):
    p = params()
    width, count, seed = p.get("width", 16), p.get("count", 1000), p.get("seed", 1)
    burst = p.get("burst", 4)
    await start_clock_and_reset(dut)
    src = StreamSource(dut, "i", dut.clk, pauses=RandomPauses(p.get("gap", 0.0), seed, burst))
    sink = StreamSink(dut, "o", dut.clk,
                      pauses=RandomPauses(p.get("stall", 0.0), seed + 1, burst))
    rng = random.Random(seed)
    items = [rng.getrandbits(width) for _ in range(count)]
    cycles = cycle_counter(dut.clk)
    src.send_all(items)
    # Generous bound: every item within 20 cycles on average, however the pauses fall.
    # A lost item would otherwise make recv_n wait forever.
    got = await with_timeout(sink.recv_n(count), 10 * (20 * count + 100), "ns")
    elapsed = cycles.count
    await ClockCycles(dut.clk, 20)
    assert not sink.items, f"{len(sink.items)} extra items appeared after the last one"
    assert sink.violations == [], sink.violations[:3]
    mismatches = [n for n, (a, b) in enumerate(zip(got, items)) if a != b]
    assert not mismatches, f"first mismatch at item {mismatches[0]}"
    report_metric("transfers", sink.count)
    report_metric("cycles", elapsed)
