"""The host link's frame format, on the host side (pure Python, no Amaranth).

A frame on the wire (both directions)::

    0xA5 | cmd | seq | len_lo | len_hi | payload[len] | crc_hi | crc_lo

``crc`` is CRC-16/CCITT-FALSE (polynomial 0x1021, initial value 0xFFFF, no reflection,
no final xor) over ``cmd .. payload``; the sync byte is not covered. ``len`` is
little-endian. Replies copy the request's ``seq``; a positive reply has ``cmd | 0x80``,
a negative one (NAK) has :data:`NAK` and a payload ``[code, cmd]``.

Resynchronization is length-based: outside a frame, every byte that is not ``0xA5`` is
dropped. A header whose ``len`` exceeds the receiver's maximum is rejected at once (the
receiver goes back to hunting for 0xA5). A frame that stops arriving is abandoned after
a timeout. The gateware deframer (:mod:`fpga.gateware.link`) implements the same rules;
:class:`Deframer` here is the host's copy, also used as the reference in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "NAK",
    "SYNC",
    "Cmd",
    "Deframer",
    "Frame",
    "FrameError",
    "Nak",
    "PayloadCodec",
    "STATUS_FIELDS",
    "crc16",
    "decode_status",
    "encode_frame",
]

SYNC = 0xA5
NAK = 0x7F
HEADER_LEN = 5  # sync, cmd, seq, len_lo, len_hi
OVERHEAD = HEADER_LEN + 2


class Cmd(IntEnum):
    """Requests from the host. The positive reply is ``cmd | 0x80``."""

    INFO = 0x01  # reply: the board's JSON descriptor
    WRITE = 0x02  # payload: stream index, bytes for that input stream; reply: u16 free space
    READ = 0x03  # payload: stream index, u16 max bytes; reply: up to max bytes of it
    STATUS = 0x04  # reply: counters (see fpga.gateware.link.STATUS_FIELDS)
    CLEAR = 0x05  # reset the accelerator, its buffers and the counters; reply: empty


class Nak(IntEnum):
    """Error codes of a NAK reply (first payload byte)."""

    CRC = 1  # the CRC did not match
    TIMEOUT = 2  # the frame stopped arriving before its end
    LENGTH = 3  # len is too long, or wrong for the command
    BUSY = 4  # a WRITE does not fit the free space of the input buffer
    COMMAND = 5  # unknown command
    STREAM = 6  # no such stream


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _table()


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE of ``data`` (``crc16(b"123456789") == 0x29B1``)."""
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def encode_frame(cmd: int, seq: int, payload: bytes = b"") -> bytes:
    """One frame, ready for the wire."""
    if not 0 <= cmd <= 0xFF:
        raise ValueError(f"cmd must be in 0..255, not {cmd}")
    if not 0 <= seq <= 0xFF:
        raise ValueError(f"seq must be in 0..255, not {seq}")
    if len(payload) > 0xFFFF:
        raise ValueError(f"payload length must be in 0..65535, not {len(payload)}")
    body = bytes([cmd, seq, len(payload) & 0xFF, len(payload) >> 8]) + bytes(payload)
    crc = crc16(body)
    return bytes([SYNC]) + body + bytes([crc >> 8, crc & 0xFF])


@dataclass(frozen=True)
class Frame:
    cmd: int
    seq: int
    payload: bytes

    @property
    def is_nak(self) -> bool:
        return self.cmd == NAK

    @property
    def nak_code(self) -> Nak | None:
        if not self.is_nak or not self.payload:
            return None
        try:
            return Nak(self.payload[0])
        except ValueError:
            return None


@dataclass(frozen=True)
class FrameError:
    """A frame that was detected and discarded: ``reason`` is a :class:`Nak` code."""

    reason: Nak
    cmd: int | None = None


class Deframer:
    """Byte stream in, :class:`Frame` / :class:`FrameError` events out.

    ``max_len`` is the longest payload accepted; ``timeout`` is how long (in the units
    of the ``now`` argument of :meth:`feed`) a frame may pause before it is abandoned.
    Garbage between frames is dropped silently and counted in :attr:`dropped`.
    """

    def __init__(self, max_len: int = 0xFFFF, timeout: float | None = None):
        if not 0 <= max_len <= 0xFFFF:
            raise ValueError(f"max_len must be in 0..65535, not {max_len}")
        self.max_len = max_len
        self.timeout = timeout
        self.dropped = 0
        self._buf = bytearray()
        self._last: float | None = None

    @property
    def in_frame(self) -> bool:
        return bool(self._buf)

    def expire(self, now: float) -> list[FrameError]:
        """Abandon a partial frame that has been silent for longer than the timeout."""
        if (self._buf and self.timeout is not None and self._last is not None
                and now - self._last > self.timeout):
            cmd = self._buf[1] if len(self._buf) > 1 else None
            self._buf.clear()
            return [FrameError(Nak.TIMEOUT, cmd)]
        return []

    def feed(self, data: bytes, now: float | None = None) -> list[Frame | FrameError]:
        events: list[Frame | FrameError] = []
        if now is not None:
            events += self.expire(now)
            self._last = now
        buf = self._buf
        for byte in data:
            if not buf:
                if byte == SYNC:
                    buf.append(byte)
                else:
                    self.dropped += 1
                continue
            buf.append(byte)
            if len(buf) == HEADER_LEN:
                length = buf[3] | buf[4] << 8
                if length > self.max_len:
                    events.append(FrameError(Nak.LENGTH, buf[1]))
                    buf.clear()
                continue
            if len(buf) > HEADER_LEN:
                length = buf[3] | buf[4] << 8
                if len(buf) == OVERHEAD + length:
                    body = bytes(buf[1:HEADER_LEN + length])
                    got = buf[-2] << 8 | buf[-1]
                    if crc16(body) == got:
                        events.append(Frame(buf[1], buf[2], body[4:]))
                    else:
                        events.append(FrameError(Nak.CRC, buf[1]))
                    buf.clear()
        return events


# Fields of a STATUS reply, in order, little-endian: (name, bytes).
STATUS_FIELDS = (
    ("first_in", 4),  # cycle of the first accelerator input transfer since CLEAR
    ("last_out", 4),  # cycle of the latest accelerator output transfer
    ("in_beats", 4),  # accelerator input transfers since CLEAR
    ("out_beats", 4),  # accelerator output transfers since CLEAR
    ("crc_errors", 2),  # frames rejected for their CRC
    ("timeouts", 2),  # partial frames abandoned
    ("framing_errors", 2),  # bytes with a bad stop bit
    ("dropped_replies", 2),  # replies dropped because one was still being sent
    ("free", 2),  # free bytes in the input buffer
)
STATUS_LEN = sum(n for _, n in STATUS_FIELDS)


def decode_status(payload: bytes) -> dict:
    if len(payload) != STATUS_LEN:
        raise ValueError(f"status payload must be {STATUS_LEN} bytes, not {len(payload)}")
    out, pos = {}, 0
    for name, n in STATUS_FIELDS:
        out[name] = int.from_bytes(payload[pos:pos + n], "little")
        pos += n
    return out


class PayloadCodec:
    """Beats of one stream ↔ bytes, from the field list in the board's descriptor.

    ``fields`` holds dicts ``{"name", "offset", "width", "signed", "count"}`` (``count``
    elements of ``width`` bits for an array field, else 1); a beat is a dict of ints (or
    of lists for array fields), sent in ``ceil(bits / 8)`` little-endian bytes.
    """

    def __init__(self, bits: int, fields: list[dict]):
        self.bits = bits
        self.nbytes = (bits + 7) // 8
        self.fields = fields

    def encode(self, beat: dict) -> bytes:
        word = 0
        for f in self.fields:
            v = beat.get(f["name"], 0)
            vals = list(v) if f["count"] > 1 else [v]
            if len(vals) != f["count"]:
                raise ValueError(f"field {f['name']} takes {f['count']} values, not {len(vals)}")
            mask = (1 << f["width"]) - 1
            for n, x in enumerate(vals):
                word |= (int(x) & mask) << (f["offset"] + n * f["width"])
        return word.to_bytes(self.nbytes, "little")

    def decode(self, raw: bytes) -> dict:
        word = int.from_bytes(raw, "little")
        out = {}
        for f in self.fields:
            vals = []
            for n in range(f["count"]):
                x = (word >> (f["offset"] + n * f["width"])) & ((1 << f["width"]) - 1)
                if f["signed"] and x >> (f["width"] - 1):
                    x -= 1 << f["width"]
                vals.append(x)
            out[f["name"]] = vals if f["count"] > 1 else vals[0]
        return out

    def encode_all(self, beats) -> bytes:
        return b"".join(self.encode(b) for b in beats)

    def decode_all(self, raw: bytes) -> list[dict]:
        if len(raw) % self.nbytes:
            raise ValueError(f"byte count must be a multiple of {self.nbytes}, not {len(raw)}")
        return [self.decode(raw[i:i + self.nbytes]) for i in range(0, len(raw), self.nbytes)]
