"""The host side of the link: transports, the request/reply layer and the board API.

* A **transport** moves bytes: :class:`SerialTransport` (pyserial) for a real board;
  the simulation testbench plugs in its own object with the same two methods
  (``write(data)``, ``read(timeout) -> bytes``), as does :class:`FaultyTransport`,
  which injects bit errors, drops and garbage into what the host sends.
* :class:`Link` is stop-and-wait: one request, one reply, matched by ``seq``. A NAK, a
  corrupted reply or a timeout makes it wait for the line to go quiet and send the
  same frame again (same ``seq``: the board drops a retransmitted WRITE that it had
  already committed). A READ whose reply is lost cannot be repeated (its bytes have
  left the board's FIFO); that raises :class:`LinkError`.
* :class:`Board` reads the board's descriptor (INFO) and moves beats of named streams,
  with credit-based flow control from the free space the board reports.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .protocol import (
    Cmd,
    Deframer,
    Frame,
    FrameError,
    Nak,
    PayloadCodec,
    decode_status,
    encode_frame,
)

__all__ = ["Board", "FaultyTransport", "Link", "LinkError", "SerialTransport"]


class LinkError(RuntimeError):
    """The board did not answer correctly, even after retries."""


class SerialTransport:
    """A USB serial port (pyserial)."""

    def __init__(self, port: str, baud: int):
        import serial  # pyserial: only needed with real hardware

        try:
            self.serial = serial.Serial(port, baud, timeout=0)
        except serial.SerialException as e:
            raise LinkError(f"cannot open {port}: {e.strerror or e}") from None

    def write(self, data: bytes) -> None:
        self.serial.write(data)
        self.serial.flush()

    def read(self, timeout: float) -> bytes:
        self.serial.timeout = timeout
        first = self.serial.read(1)
        if not first:
            return b""
        return first + self.serial.read(self.serial.in_waiting)

    def close(self) -> None:
        self.serial.close()


class FaultyTransport:
    """Wraps a transport and corrupts what the host writes, reproducibly.

    Each written byte is, with the given probabilities, bit-flipped, dropped or followed
    by a garbage byte. ``faults`` counts what was injected.
    """

    def __init__(self, inner, *, flip: float = 0.0, drop: float = 0.0, garbage: float = 0.0,
                 seed: int = 0):
        import random

        for name, p in (("flip", flip), ("drop", drop), ("garbage", garbage)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), not {p}")
        self.inner, self.flip, self.drop, self.garbage = inner, flip, drop, garbage
        self.rng = random.Random(seed)
        self.faults = {"flip": 0, "drop": 0, "garbage": 0}

    def write(self, data: bytes) -> None:
        out = bytearray()
        for b in data:
            r = self.rng.random()
            if r < self.drop:
                self.faults["drop"] += 1
                continue
            if r < self.drop + self.flip:
                b ^= 1 << self.rng.randrange(8)
                self.faults["flip"] += 1
            out.append(b)
            if self.rng.random() < self.garbage:
                out.append(self.rng.randrange(256))
                self.faults["garbage"] += 1
        self.inner.write(bytes(out))

    def read(self, timeout: float) -> bytes:
        return self.inner.read(timeout)

    def __getattr__(self, name):  # e.g. a simulated transport's clock
        return getattr(self.inner, name)


@dataclass
class LinkStats:
    requests: int = 0
    retries: int = 0
    naks: dict = field(default_factory=dict)
    bad_replies: int = 0
    timeouts: int = 0


class Link:
    """Request/reply over a transport.

    ``reply_timeout`` (seconds) is how long the line may stay silent before a reply is
    given up on; it must exceed the board's partial-frame timeout, so that the board's
    NAK for a damaged request arrives in time. ``quiet`` is the silence that ends the
    draining of the line before a retransmission.
    """

    def __init__(self, transport, *, reply_timeout: float = 0.5, quiet: float | None = None,
                 retries: int = 8):
        if reply_timeout <= 0:
            raise ValueError(f"reply_timeout must be > 0, not {reply_timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        self.transport = transport
        # Seconds; a simulated transport supplies its own (simulation time).
        self.clock = getattr(transport, "now", time.monotonic)
        self.reply_timeout = reply_timeout
        self.quiet = reply_timeout / 4 if quiet is None else quiet
        self.retries = retries
        self.deframer = Deframer()
        self.stats = LinkStats()
        self._seq = 0
        self._last_write_seq: int | None = None
        self._pending: list = []

    def _next_seq(self, cmd: int) -> int:
        self._seq = (self._seq + 1) & 0xFF
        if cmd == Cmd.WRITE and self._seq == self._last_write_seq:
            self._seq = (self._seq + 1) & 0xFF  # never look like a retransmission
        return self._seq

    def _wait_reply(self, seq: int) -> Frame | FrameError | None:
        deadline = self.clock() + self.reply_timeout
        while True:
            while self._pending:
                ev = self._pending.pop(0)
                if isinstance(ev, FrameError) or ev.seq == seq:
                    return ev
                # a stale reply to an earlier attempt: ignore it
            left = deadline - self.clock()
            if left <= 0:
                return None
            data = self.transport.read(left)
            if data:  # a reply is arriving: the timeout counts silence, not length
                self._pending += self.deframer.feed(data)
                deadline = self.clock() + self.reply_timeout

    def _drain(self) -> None:
        """Read until the line has been quiet for ``quiet`` s; forget everything read."""
        while self.transport.read(self.quiet):
            pass
        self.deframer = Deframer()
        self._pending = []

    def request(self, cmd: int, payload: bytes = b"", *, retry: bool = True) -> bytes:
        """Send one request; the payload of its positive reply."""
        seq = self._next_seq(cmd)
        frame = encode_frame(cmd, seq, payload)
        self.stats.requests += 1
        attempts = self.retries + 1 if retry else 1
        last = "no reply"
        for attempt in range(attempts):
            if attempt:
                self.stats.retries += 1
            self.transport.write(frame)
            ev = self._wait_reply(seq)
            if isinstance(ev, Frame) and ev.cmd == (cmd | 0x80):
                if cmd == Cmd.WRITE:
                    self._last_write_seq = seq
                return ev.payload
            if isinstance(ev, Frame) and ev.is_nak:
                code = ev.nak_code
                self.stats.naks[code.name if code else "?"] = \
                    self.stats.naks.get(code.name if code else "?", 0) + 1
                if code in (Nak.BUSY, Nak.STREAM, Nak.COMMAND):  # only from intact frames
                    raise LinkError(f"board refused {Cmd(cmd).name}: {code.name}")
                last = f"NAK {code.name if code else ev.payload.hex()}"
            elif isinstance(ev, Frame):
                last = f"unexpected reply 0x{ev.cmd:02x}"
                self.stats.bad_replies += 1
            elif isinstance(ev, FrameError):
                last = f"corrupted reply ({ev.reason.name})"
                self.stats.bad_replies += 1
                if cmd == Cmd.READ:
                    raise LinkError("a READ reply was corrupted; its data is lost")
            else:
                self.stats.timeouts += 1
                if cmd == Cmd.READ and self.deframer.in_frame:
                    raise LinkError("a READ reply was truncated; its data is lost")
            self._drain()
        raise LinkError(f"{Cmd(cmd).name} failed after {attempts} attempts: {last}")


class Board:
    """The board behind a :class:`Link`: named streams, credits, counters."""

    def __init__(self, link: Link, *, max_read: int = 1024):
        self.link = link
        self.info = json.loads(link.request(Cmd.INFO).decode())
        self.inputs = {s["name"]: n for n, s in enumerate(self.info["inputs"])}
        self.outputs = {s["name"]: n for n, s in enumerate(self.info["outputs"])}
        self.codecs = {s["name"]: PayloadCodec(s["bits"], s["fields"])
                       for s in self.info["inputs"] + self.info["outputs"]}
        self.max_chunk = min(self.info["in_depth"] // 2, 512) - 1
        self.max_read = max_read
        self.free = self.info["in_depth"]

    @property
    def design(self) -> str:
        return self.info["design"]

    def clear(self) -> None:
        self.link.request(Cmd.CLEAR)
        self.free = self.info["in_depth"]

    def status(self) -> dict:
        st = decode_status(self.link.request(Cmd.STATUS))
        self.free = st["free"]
        return st

    def write(self, name: str, data: bytes) -> int:
        """Send as much of ``data`` as the credit allows; the number of bytes sent."""
        sid = self._index(self.inputs, name, "input")
        n = min(len(data), self.max_chunk, self.free - 1)
        if n <= 0:
            return 0
        reply = self.link.request(Cmd.WRITE, bytes([sid]) + data[:n])
        self.free = int.from_bytes(reply, "little")
        return n

    def read(self, name: str, max_bytes: int | None = None) -> bytes:
        sid = self._index(self.outputs, name, "output")
        m = self.max_read if max_bytes is None else max_bytes
        return self.link.request(Cmd.READ, bytes([sid]) + m.to_bytes(2, "little"))

    def transfer(self, inputs, expect: dict[str, int], *, ordered: bool = False,
                 max_idle: int = 200) -> dict[str, bytes]:
        """Send ``inputs`` and collect ``expect`` (stream name → byte count).

        ``inputs`` is either a dict (stream name → bytes), whose streams are written side
        by side, or, with ``ordered=True``, a sequence of ``(name, bytes)`` segments that
        are written strictly one after the other (for a device that must see a command
        before its data). Writes and reads are interleaved so that the accelerator never
        waits on a full output buffer; raises :class:`LinkError` after ``max_idle``
        rounds without progress.
        """
        segs = list(inputs.items()) if isinstance(inputs, dict) else list(inputs)
        queue = [[name, bytes(data)] for name, data in segs if data]
        got = {k: bytearray() for k in expect}
        idle = 0
        while queue or any(len(got[k]) < n for k, n in expect.items()):
            progress = self._write_round(queue, ordered)
            for name, n in expect.items():
                if len(got[name]) < n:
                    data = self.read(name, min(self.max_read, n - len(got[name])))
                    if data:
                        progress = True
                        got[name] += data
            if queue and not progress:
                self.status()  # refresh the credit
            idle = 0 if progress else idle + 1
            if idle > max_idle:
                short = {k: f"{len(got[k])}/{n}" for k, n in expect.items()}
                raise LinkError(f"no progress: {sum(len(d) for _, d in queue)} bytes in "
                                f"{len(queue)} segments unsent, received {short}")
        return {k: bytes(v) for k, v in got.items()}

    def _write_round(self, queue: list, ordered: bool) -> bool:
        """One round of writes from ``queue`` (consumed in place). Ordered: the head
        segment, then the next, for as long as the board grants credit. Otherwise: one
        write per pending segment. Returns whether anything was sent."""
        progress = False
        for seg in list(queue[:1] if ordered else queue):
            while True:
                sent = self.write(seg[0], seg[1])
                if not sent:
                    break
                progress = True
                seg[1] = seg[1][sent:]
                if not seg[1]:
                    queue.remove(seg)
                    if ordered and queue:
                        seg = queue[0]
                        continue
                    break
                if not ordered:
                    break
        return progress

    def _index(self, table: dict, name: str, what: str) -> int:
        if name not in table:
            raise ValueError(f"{what} stream must be one of {', '.join(table)}, not {name!r}")
        return table[name]
