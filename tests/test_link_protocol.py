"""The host link's frame codec in pure Python: CRC, framing, resync, timeouts, payloads."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpga.host import FaultyTransport, Link
from fpga.protocol import (
    SYNC,
    Cmd,
    Deframer,
    Frame,
    FrameError,
    Nak,
    PayloadCodec,
    crc16,
    decode_status,
    encode_frame,
)


def test_crc_is_ccitt_false():
    assert crc16(b"123456789") == 0x29B1  # the catalogue check value of CRC-16/CCITT-FALSE
    assert crc16(b"") == 0xFFFF


def test_frame_layout():
    f = encode_frame(Cmd.WRITE, 7, b"\x01\x02\x03")
    assert f[:5] == bytes([SYNC, Cmd.WRITE, 7, 3, 0])
    assert f[5:8] == b"\x01\x02\x03"
    assert int.from_bytes(f[8:], "big") == crc16(f[1:8])


frames = st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40)),
                  min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(frames, st.integers(0, 2**32 - 1))
def test_frames_survive_garbage_and_any_chunking(items, seed):
    rng = random.Random(seed)
    wire = bytearray()
    for cmd, seq, payload in items:
        wire += bytes(rng.choice([0x00, 0x13, 0xFF, 0x5A]) for _ in range(rng.randint(0, 5)))
        wire += encode_frame(cmd, seq, payload)
    d, events, pos = Deframer(), [], 0
    while pos < len(wire):
        n = rng.randint(1, 17)
        events += d.feed(bytes(wire[pos:pos + n]))
        pos += n
    assert events == [Frame(c, s, p) for c, s, p in items]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=30), st.integers(0, 10**6))
def test_a_bit_flip_is_never_accepted_and_the_next_frame_gets_through(payload, where):
    good = encode_frame(Cmd.STATUS, 9, b"ok")
    bad = bytearray(encode_frame(Cmd.WRITE, 3, payload))
    bit = where % (8 * (len(bad) - 1)) + 8  # anything after the sync byte
    bad[bit // 8] ^= 1 << (bit % 8)
    d = Deframer(timeout=1.0)
    events = d.feed(bytes(bad), now=0.0)
    assert not any(isinstance(e, Frame) for e in events), events
    # the next frame arrives after a pause longer than the timeout: it is received intact
    events += d.feed(good, now=5.0)
    assert events[-1] == Frame(Cmd.STATUS, 9, b"ok")
    assert all(isinstance(e, FrameError) for e in events[:-1])
    assert events[:-1], "the damaged frame must be reported, not silently lost"


def test_truncated_frame_times_out_and_too_long_is_rejected_at_the_header():
    d = Deframer(max_len=64, timeout=1.0)
    assert d.feed(encode_frame(Cmd.WRITE, 1, b"abcdef")[:-2], now=0.0) == []
    assert d.in_frame
    assert d.expire(0.5) == []
    assert d.expire(2.0) == [FrameError(Nak.TIMEOUT, Cmd.WRITE)]
    assert d.feed(bytes([SYNC, Cmd.WRITE, 2, 65, 0])) == [FrameError(Nak.LENGTH, Cmd.WRITE)]
    assert not d.in_frame


def test_payload_codec_round_trips_signed_arrays_and_flags():
    fields = [{"name": "data", "offset": 0, "width": 8, "signed": True, "count": 4},
              {"name": "last_token", "offset": 32, "width": 1, "signed": False, "count": 1},
              {"name": "last", "offset": 33, "width": 1, "signed": False, "count": 1}]
    c = PayloadCodec(34, fields)
    assert c.nbytes == 5
    beat = {"data": [-128, 127, -1, 0], "last_token": 1, "last": 0}
    raw = c.encode(beat)
    assert raw == bytes([0x80, 0x7F, 0xFF, 0x00, 0x01])
    assert c.decode(raw) == beat
    assert c.decode_all(c.encode_all([beat, beat])) == [beat, beat]
    with pytest.raises(ValueError, match="byte count must be a multiple of 5, not 7"):
        c.decode_all(b"\x00" * 7)
    with pytest.raises(ValueError, match="field data takes 4 values, not 3"):
        c.encode({"data": [1, 2, 3]})


@pytest.mark.parametrize("call, msg", [
    (lambda: encode_frame(256, 0), r"cmd must be in 0\.\.255, not 256"),
    (lambda: encode_frame(1, -1), r"seq must be in 0\.\.255, not -1"),
    (lambda: encode_frame(1, 0, bytes(65536)), r"payload length must be in 0\.\.65535"),
    (lambda: Deframer(max_len=70000), r"max_len must be in 0\.\.65535, not 70000"),
    (lambda: FaultyTransport(None, flip=1.5), r"flip must be in \[0, 1\), not 1\.5"),
    (lambda: Link(None, reply_timeout=0), r"reply_timeout must be > 0, not 0"),
    (lambda: decode_status(b"\x00"), r"status payload must be 26 bytes, not 1"),
])
def test_bad_arguments_are_refused(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


class _Loopback:
    """A transport whose 'board' answers every intact request with an empty ACK."""

    def __init__(self):
        self.d = Deframer(timeout=0.1)  # the board abandons a partial frame after 0.1 s
        self.out = b""
        self.t = 0.0

    def write(self, data):
        self._answer(self.d.feed(data, now=self.t))

    def _answer(self, events):
        for ev in events:
            if isinstance(ev, Frame):
                self.out += encode_frame(ev.cmd | 0x80, ev.seq, b"\x00\x01")
            else:
                self.out += encode_frame(0x7F, 0, bytes([ev.reason, 0]))

    def read(self, timeout):
        if not self.out:
            self.t += timeout
            self._answer(self.d.expire(self.t))
        data, self.out = self.out, b""
        return data

    def now(self):
        return self.t


def test_link_retries_through_injected_faults_and_counts_them():
    t = FaultyTransport(_Loopback(), flip=0.05, drop=0.02, garbage=0.05, seed=4)
    link = Link(t, reply_timeout=1.0, retries=30)
    for _ in range(50):
        assert link.request(Cmd.STATUS) == b"\x00\x01"
    assert sum(t.faults.values()) > 0
    assert link.stats.retries > 0
    assert link.stats.requests == 50
