"""The simulated board: host → UART → link → accelerator → link → UART → host.

The DUT is a :class:`fpga.gateware.core.BoardCore` (only ``rx``/``tx`` pins). A UART
model bit-bangs ``rx`` and samples ``tx`` at the DUT's baud rate; :class:`SimTransport`
hands those bytes to the *real* host driver (:mod:`fpga.host`), which runs in a cocotb
bridge thread and waits in simulation time.

Parameters: ``divisor`` (clock cycles per bit), ``period_ns``, ``timeout_cycles`` (the
board's partial-frame timeout), ``app`` and ``app_args`` (see :mod:`fpga.apps`),
``faults`` (``FaultyTransport`` keyword arguments), ``seed``.
"""

from __future__ import annotations

from collections import deque

import cocotb
from cocotb.task import bridge, resume
from cocotb.triggers import Event, FallingEdge, First, Timer
from cocotb.utils import get_sim_time

from fpga import apps
from fpga.host import Board, FaultyTransport, Link
from fpga.protocol import NAK, Cmd, Nak, decode_status, encode_frame
from sim.tbutil import params, report_metric, start_clock_and_reset


class SimUart:
    """The host end of the serial line, at ``bit_ns`` per bit."""

    def __init__(self, dut, bit_ns: int):
        self.dut, self.bit_ns = dut, bit_ns
        self.to_dut: deque[int] = deque()
        self.from_dut = bytearray()
        self.arrived = Event()
        self.queued = Event()
        self.stop_bit_errors = 0
        dut.rx.value = 1
        cocotb.start_soon(self._drive())
        cocotb.start_soon(self._sample())

    def send(self, data: bytes) -> None:
        self.to_dut.extend(data)
        self.queued.set()

    async def _drive(self):
        while True:
            while not self.to_dut:
                self.queued.clear()
                await self.queued.wait()
            byte = self.to_dut.popleft()
            for bit in [0] + [(byte >> n) & 1 for n in range(8)] + [1]:
                self.dut.rx.value = bit
                await Timer(self.bit_ns, unit="ns")

    async def _sample(self):
        while True:
            await FallingEdge(self.dut.tx)
            await Timer(self.bit_ns // 2, unit="ns")
            if int(self.dut.tx.value):
                continue  # a glitch
            byte = 0
            for n in range(8):
                await Timer(self.bit_ns, unit="ns")
                byte |= int(self.dut.tx.value) << n
            await Timer(self.bit_ns, unit="ns")
            if not int(self.dut.tx.value):
                self.stop_bit_errors += 1
            self.from_dut.append(byte)
            self.arrived.set()

    async def read(self, timeout_ns: int) -> bytes:
        if not self.from_dut:
            self.arrived.clear()
            await First(self.arrived.wait(), Timer(max(1, timeout_ns), unit="ns"))
        data = bytes(self.from_dut)
        self.from_dut.clear()
        return data


class SimTransport:
    """The host driver's transport: blocking calls that run the simulation."""

    def __init__(self, uart: SimUart):
        self.uart = uart

    def write(self, data: bytes) -> None:
        self.uart.send(data)

    def read(self, timeout: float) -> bytes:
        return resume(self.uart.read)(int(timeout * 1e9))

    def now(self) -> float:
        return get_sim_time("ns") * 1e-9


async def _setup(dut):
    p = params()
    period = p.get("period_ns", 10)
    await start_clock_and_reset(dut, period_ns=period)
    return p, SimUart(dut, p["divisor"] * period)


async def _reply(uart: SimUart, frame: bytes, wait_ns: int) -> list:
    from fpga.protocol import Deframer

    uart.send(frame)
    d, events = Deframer(), []
    end = get_sim_time("ns") + wait_ns
    while get_sim_time("ns") < end and not events:
        events += d.feed(await uart.read(int(end - get_sim_time("ns"))))
    return events


@cocotb.test()
async def test_frames_errors_and_resync(dut):
    """Hand-made frames: every kind of damage gets its NAK, and the link recovers."""
    p, uart = await _setup(dut)
    if not p.get("raw", True):
        return
    byte_ns = 10 * p["divisor"] * p.get("period_ns", 10)
    wait = p["timeout_cycles"] * p.get("period_ns", 10) + 2000 * byte_ns

    async def expect(frame, cmd, seq, code=None):
        ev = await _reply(uart, frame, wait)
        assert len(ev) == 1, f"expected one reply, got {ev}"
        f = ev[0]
        assert f.seq == seq and f.cmd == cmd, f"got {f}, expected cmd 0x{cmd:02x} seq {seq}"
        if code is not None:
            assert f.payload[0] == code, f"NAK code {f.payload[0]}, expected {code}"
        return f

    info = await expect(encode_frame(Cmd.INFO, 1), Cmd.INFO | 0x80, 1)
    assert b'"design"' in info.payload

    good = encode_frame(Cmd.STATUS, 2)
    # a flipped bit in the payload region → CRC
    bad = bytearray(good)
    bad[2] ^= 0x10
    await expect(bytes(bad), NAK, 0x12, Nak.CRC)
    # a flipped CRC byte
    bad = bytearray(good)
    bad[-1] ^= 0x01
    await expect(bytes(bad), NAK, 2, Nak.CRC)
    # truncated: the board times out
    await expect(encode_frame(Cmd.WRITE, 3, b"\x00\x01\x02\x03")[:-3], NAK, 3, Nak.TIMEOUT)
    # too long for the input buffer: rejected at the header
    await expect(bytes([0xA5, Cmd.WRITE, 4, 0xFF, 0xFF]), NAK, 4, Nak.LENGTH)
    # garbage (with no 0xA5), then a good frame: resynchronized
    await expect(bytes([0x00, 0x13, 0x5A, 0xFF]) + good, Cmd.STATUS | 0x80, 2)
    # unknown command, bad stream index, READ with a wrong length
    await expect(encode_frame(0x33, 5), NAK, 5, Nak.COMMAND)
    await expect(encode_frame(Cmd.WRITE, 6, b"\x09\x00\x00\x00"), NAK, 6, Nak.STREAM)
    await expect(encode_frame(Cmd.READ, 7, b"\x00"), NAK, 7, Nak.LENGTH)
    # a WRITE, then its retransmission (same seq): acknowledged, committed once
    nbytes = (p["in_bits"] + 7) // 8
    payload = bytes([0]) + bytes(range(1, nbytes + 1))
    a = await expect(encode_frame(Cmd.WRITE, 8, payload), Cmd.WRITE | 0x80, 8)
    b = await expect(encode_frame(Cmd.WRITE, 8, payload), Cmd.WRITE | 0x80, 8)
    st = await expect(encode_frame(Cmd.STATUS, 9), Cmd.STATUS | 0x80, 9)
    status = decode_status(st.payload)
    assert status["in_beats"] == 1, status
    assert status["crc_errors"] == 2 and status["timeouts"] == 1, status
    report_metric("free_after_write", int.from_bytes(a.payload, "little"))
    report_metric("free_after_retransmission", int.from_bytes(b.payload, "little"))
    report_metric("status", status)
    assert uart.stop_bit_errors == 0


@cocotb.test()
async def test_clear_during_read_reply(dut):
    """A CLEAR that arrives while a READ reply is on the wire: that reply is rejected by
    its CRC (never taken for data), and the link answers and works normally after it."""
    p, uart = await _setup(dut)
    if not p.get("clear_during_read"):
        return
    from fpga.protocol import Deframer, Frame, FrameError

    byte_ns = 10 * p["divisor"] * p.get("period_ns", 10)
    nbytes = (p["in_bits"] + 7) // 8
    words = [(0x1234 + 977 * n) & 0xFFFF for n in range(20)]

    def beats(ws):
        return b"".join(w.to_bytes(nbytes, "little") for w in ws)  # ``last`` = 0

    async def until_quiet(quiet_bytes: int) -> bytes:
        out = bytearray()
        while data := await uart.read(quiet_bytes * byte_ns):
            out += data
        return bytes(out)

    ev = await _reply(uart, encode_frame(Cmd.WRITE, 1, bytes([0]) + beats(words)),
                      200 * byte_ns)
    assert [(e.cmd, e.seq) for e in ev] == [(Cmd.WRITE | 0x80, 1)], ev
    await Timer(20 * byte_ns, unit="ns")  # the echoes reach the output FIFO
    n = len(words) * nbytes
    uart.send(encode_frame(Cmd.READ, 2, bytes([0]) + n.to_bytes(2, "little")))
    got = bytearray()
    while len(got) < 8:  # the header and a few payload bytes are out
        got += await uart.read(100 * byte_ns)
        assert got, "no reply to READ"
    uart.send(encode_frame(Cmd.CLEAR, 3))
    got += await until_quiet(3 * n)
    events = Deframer().feed(bytes(got))
    # the READ reply, cut short by the CLEAR: it keeps its promised length and fails its
    # CRC (the CLEAR's own reply, if any, was dropped while the READ reply was going out)
    assert len(events) == 1 and isinstance(events[0], FrameError), events
    assert events[0].reason == Nak.CRC and events[0].cmd == Cmd.READ | 0x80, events
    assert len(got) == 5 + n + 2, len(got)
    # the link answers again, and a new job runs normally
    st = await _reply(uart, encode_frame(Cmd.STATUS, 4), 200 * byte_ns)
    assert len(st) == 1 and isinstance(st[0], Frame) and st[0].seq == 4, st
    status = decode_status(st[0].payload)
    report_metric("status", status)
    more = [0x00FF, 0xA5A5]
    ev = await _reply(uart, encode_frame(Cmd.WRITE, 5, bytes([0]) + beats(more)), 200 * byte_ns)
    assert [(e.cmd, e.seq) for e in ev] == [(Cmd.WRITE | 0x80, 5)], ev
    await Timer(20 * byte_ns, unit="ns")
    m = len(more) * nbytes
    ev = await _reply(uart, encode_frame(Cmd.READ, 6, bytes([0]) + (4 * m).to_bytes(2, "little")),
                      200 * byte_ns)
    assert len(ev) == 1 and isinstance(ev[0], Frame) and ev[0].seq == 6, ev
    assert ev[0].payload == beats([w ^ 0xFFFF for w in more]), ev[0].payload.hex()


@cocotb.test()
async def test_host_driver(dut):
    """The host driver runs an app through the simulated board, checked against golden."""
    p, uart = await _setup(dut)
    if not p.get("app"):
        return
    period = p.get("period_ns", 10)
    byte_s = 10 * p["divisor"] * period * 1e-9
    board_timeout_s = p["timeout_cycles"] * period * 1e-9

    @bridge
    def host():
        transport = SimTransport(uart)
        if p.get("faults"):
            transport = FaultyTransport(transport, **p["faults"])
        # A reply must come within the board's timeout plus the longest reply.
        link = Link(transport, reply_timeout=board_timeout_s + 1200 * byte_s,
                    quiet=board_timeout_s + 20 * byte_s, retries=p.get("retries", 20))
        board = Board(link, max_read=p.get("max_read", 1024))
        report = apps.APPS[p["app"]](board, **p.get("app_args", {}))
        faults = transport.faults if isinstance(transport, FaultyTransport) else {}
        return report, faults

    report, faults = await host()
    for line in report.lines():
        dut._log.info(line)
    report_metric("passed", report.passed)
    report_metric("mismatches", report.mismatches)
    report_metric("items", report.items)
    report_metric("beats_in", report.beats_in)
    report_metric("beats_out", report.beats_out)
    report_metric("cycles", report.cycles)
    report_metric("link", report.link)
    report_metric("faults", faults)
    assert report.passed, report.first_error
