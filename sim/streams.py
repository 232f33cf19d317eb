"""cocotb drivers and monitors for Amaranth ``lib.stream`` interfaces.

A stream named ``i`` on a converted component shows up as the ports ``i__payload``,
``i__valid`` and ``i__ready``. :class:`StreamSource` drives one, :class:`StreamSink`
receives one and checks the stream rules on the way: once ``valid`` is up it stays up,
with the payload unchanged, until the transfer happens.

Backpressure and gaps come from a pluggable pause generator (:class:`RandomPauses`),
seeded, so the same testbench runs with and without stalls and every run can be
reproduced.

Timing discipline: both sides change their outputs just after the falling edge and
decide whether a transfer happens in the ``ReadOnly`` phase before the next rising edge,
so the result does not depend on how a simulator orders events at the clock edge.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable

import cocotb
from cocotb.triggers import Event, FallingEdge, ReadOnly, RisingEdge
from cocotb.utils import get_sim_time

__all__ = [
    "NoPauses",
    "RandomPauses",
    "StreamSink",
    "StreamSource",
    "StructCodec",
    "pack_lanes",
    "unpack_lanes",
]


class NoPauses:
    """Never pause: full rate."""

    def __call__(self) -> bool:
        return False


class RandomPauses:
    """Pause with probability ``prob`` each cycle, in bursts of 1..``max_burst`` cycles."""

    def __init__(self, prob: float, seed: int = 0, max_burst: int = 1):
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"prob must be in [0, 1), not {prob}")
        if max_burst < 1:
            raise ValueError(f"max_burst must be >= 1, not {max_burst}")
        self.prob = prob
        self.max_burst = max_burst
        self._rng = random.Random(seed)
        self._left = 0

    def __call__(self) -> bool:
        if self._left > 0:
            self._left -= 1
            return True
        if self.prob and self._rng.random() < self.prob:
            self._left = self._rng.randint(1, self.max_burst) - 1
            return True
        return False


def pack_lanes(values: Iterable[int], width: int) -> int:
    """Pack integers (signed or not) into one word, element 0 in the low bits."""
    word, mask = 0, (1 << width) - 1
    for n, v in enumerate(values):
        word |= (int(v) & mask) << (n * width)
    return word


def unpack_lanes(word: int, width: int, count: int, signed: bool = True) -> list[int]:
    """Inverse of :func:`pack_lanes`."""
    mask, out = (1 << width) - 1, []
    for n in range(count):
        v = (word >> (n * width)) & mask
        if signed and v >> (width - 1):
            v -= 1 << width
        out.append(v)
    return out


class StructCodec:
    """Packs and unpacks dict payloads for a flat struct of integer fields.

    ``fields`` is a list of ``(name, width, signed)`` in layout order (first field in the
    low bits), which is how Amaranth lays out a ``data.StructLayout``. Use
    :meth:`from_layout` to take it from the gateware's own layout object.
    """

    def __init__(self, fields: list[tuple[str, int, bool]]):
        self.fields = []
        offset = 0
        for name, width, signed in fields:
            self.fields.append((name, offset, width, signed))
            offset += width
        self.width = offset

    @classmethod
    def from_layout(cls, layout) -> StructCodec:
        from amaranth.hdl import Shape

        fields = []
        for name, fld in sorted(layout, key=lambda item: item[1].offset):
            shape = Shape.cast(fld.shape)
            fields.append((name, fld.width, shape.signed))
        codec = cls(fields)
        ordered = sorted(layout, key=lambda item: item[1].offset)
        for (name, offset, _, _), (_, fld) in zip(codec.fields, ordered):
            if offset != fld.offset:
                raise ValueError(f"field {name} is not packed contiguously")
        return codec

    def encode(self, item: dict) -> int:
        word = 0
        for name, offset, width, _ in self.fields:
            word |= (int(item.get(name, 0)) & ((1 << width) - 1)) << offset
        return word

    def decode(self, word: int) -> dict:
        out = {}
        for name, offset, width, signed in self.fields:
            v = (word >> offset) & ((1 << width) - 1)
            if signed and v >> (width - 1):
                v -= 1 << width
            out[name] = v
        return out


def _ports(dut, name):
    return (getattr(dut, f"{name}__payload"), getattr(dut, f"{name}__valid"),
            getattr(dut, f"{name}__ready"))


class StreamSource:
    """Drives a stream input of the DUT from a queue of items."""

    def __init__(self, dut, name: str, clk, *, pauses: Callable[[], bool] | None = None,
                 codec: StructCodec | None = None):
        self.payload, self.valid, self.ready = _ports(dut, name)
        self.clk = clk
        self.pauses = pauses or NoPauses()
        self.codec = codec
        self.queue: deque = deque()
        self.count = 0
        self._idle = Event()
        self._idle.set()
        self._queued = Event()
        self.valid.value = 0
        self._task = cocotb.start_soon(self._run())

    def send(self, item) -> None:
        """Queue one item (an int, or a dict when a codec is given)."""
        self.queue.append(item)
        self._idle.clear()
        self._queued.set()

    def send_all(self, items: Iterable) -> None:
        for item in items:
            self.send(item)

    async def wait_idle(self) -> None:
        """Wait until every queued item has been transferred."""
        while self.queue or not self._idle.is_set():
            await self._idle.wait()

    def _encode(self, item) -> int:
        return self.codec.encode(item) if self.codec is not None else int(item)

    async def _run(self):
        current = None
        while True:
            await FallingEdge(self.clk)
            if current is None and self.queue and not self.pauses():
                current = self.queue.popleft()
                self.payload.value = self._encode(current)
            self.valid.value = int(current is not None)
            if current is None and not self.queue:
                # Idle with valid low: sleep until send() queues an item, then take it
                # at the next falling edge, as the polling did. (Polling woke an idle
                # source twice a cycle, as costly as a busy one.) The pause generator
                # is asked only while an item waits, so the stall pattern is unchanged.
                self._queued.clear()
                await self._queued.wait()
                continue
            await ReadOnly()
            if current is not None and int(self.ready.value):
                current = None
                self.count += 1
                if not self.queue:
                    self._idle.set()


class StreamSink:
    """Receives a stream output of the DUT, with random backpressure and rule checks."""

    def __init__(self, dut, name: str, clk, *, pauses: Callable[[], bool] | None = None,
                 codec: StructCodec | None = None, check_rules: bool = True):
        self.payload, self.valid, self.ready = _ports(dut, name)
        self.name = name
        self.clk = clk
        self.pauses = pauses or NoPauses()
        self.codec = codec
        self.check_rules = check_rules
        self.items: deque = deque()
        self.count = 0
        self.violations: list[str] = []
        self._arrived = Event()
        self.ready.value = 0
        self._task = cocotb.start_soon(self._run())

    async def recv(self):
        """The next received item, waiting for it if needed."""
        while not self.items:
            self._arrived.clear()
            await self._arrived.wait()
        return self.items.popleft()

    async def recv_n(self, n: int) -> list:
        return [await self.recv() for _ in range(n)]

    def _decode(self, word: int):
        return self.codec.decode(word) if self.codec is not None else word

    async def _run(self):
        held = None  # payload of a valid beat that was not accepted last cycle
        open_cycle = False  # woken after a falling edge, before the rising one
        while True:
            if not open_cycle:
                await FallingEdge(self.clk)
            ready = not self.pauses()
            self.ready.value = int(ready)
            await ReadOnly()
            valid = self.valid.value.is_resolvable and int(self.valid.value)
            if self.check_rules and held is not None:
                if not valid:
                    self.violations.append(f"{self.name}: valid dropped before transfer "
                                           f"at {get_sim_time('ns')} ns")
                elif self.payload.value.to_unsigned() != held:
                    self.violations.append(f"{self.name}: payload changed while stalled "
                                           f"at {get_sim_time('ns')} ns")
            held = None
            if valid:
                word = self.payload.value.to_unsigned()
                if ready:
                    self.items.append(self._decode(word))
                    self.count += 1
                    self._arrived.set()
                else:
                    held = word
            open_cycle = False
            if not valid:
                # Sleep until valid rises (polling woke an idle sink twice a cycle; the
                # pause generator is now asked once per cycle from the first beat on).
                # Registered, valid rises with the clock: then ready is set at the next
                # falling edge, as the polling did. Through a combinational path from an
                # input the bench drives at a falling edge, it rises with the clock low:
                # that cycle is still open, and ready (held while asleep) is set now.
                await RisingEdge(self.valid)
                open_cycle = not (self.clk.value.is_resolvable and int(self.clk.value))
