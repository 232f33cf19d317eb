"""Helpers used inside cocotb testbenches: parameters in, metrics out, clock and reset."""

from __future__ import annotations

import json
import os

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge

__all__ = ["params", "report_metric", "start_clock_and_reset", "cycle_counter"]


def params() -> dict:
    """The parameters the runner handed to this testbench (``simulate(params=...)``)."""
    return json.loads(os.environ.get("PROCUBE_PARAMS", "{}"))


def simulator() -> str:
    return os.environ.get("PROCUBE_SIMULATOR", "unknown")


def report_metric(name: str, value) -> None:
    """Record a metric (cycles, counts, ...) for the caller of ``simulate``."""
    path = os.environ.get("PROCUBE_METRICS")
    if not path:
        return
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[name] = value
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


async def start_clock_and_reset(dut, cycles: int = 2, period_ns: int = 10):
    """Start ``clk`` and hold the synchronous active-high ``rst`` for ``cycles``."""
    cocotb.start_soon(Clock(dut.clk, period_ns, unit="ns").start())
    dut.rst.value = 1
    await ClockCycles(dut.clk, cycles)
    dut.rst.value = 0
    await RisingEdge(dut.clk)


class cycle_counter:
    """Counts rising edges of ``clk`` from its creation on (for cycle metrics)."""

    def __init__(self, clk):
        self.clk = clk
        self.count = 0
        self._task = cocotb.start_soon(self._run())

    async def _run(self):
        while True:
            await RisingEdge(self.clk)
            self.count += 1
