"""The host link in gateware: UART, deframer, input buffer, stream bridges, responder.

:class:`HostLink` implements the frame protocol of :mod:`fpga.protocol` on the board:

* **Deframer.** Hunts for 0xA5, reads ``cmd seq len``, checks ``len`` against the
  input buffer size at once (NAK LENGTH and back to hunting if too long), computes the
  CRC on the fly and abandons a frame whose bytes stop arriving for ``timeout_cycles``
  (NAK TIMEOUT). It cannot be stalled.
* **Input buffer.** The payload of a WRITE is written into a block-RAM buffer
  *tentatively* and committed only when the CRC matched, so a corrupted frame never
  reaches the accelerator. A WRITE that does not fit the free space is NAKed (BUSY),
  one whose ``seq`` equals the last committed WRITE's is a retransmission: it is
  acknowledged again and dropped. The ACK carries the free space (credit).
* **Stream bridges.** Committed bytes are routed to the input stream named by the
  WRITE's first payload byte and packed into beats (little-endian, ``ceil(bits/8)``
  bytes per beat); each output stream is unpacked into bytes into its own FIFO, which
  READ drains.
* **Responder.** Sends exactly one reply per accepted or rejected frame; a reply that
  arrives while one is still being sent is dropped and counted.
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, ResetInserter, Shape, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hw.common import StreamFIFO, check_int, check_pow2

from ..protocol import NAK, STATUS_FIELDS, SYNC, Cmd, Nak
from .uart import UARTRx, UARTTx

__all__ = ["HostLink", "crc16_byte", "stream_fields"]


def crc16_byte(crc, byte):
    """CRC-16/CCITT-FALSE register after shifting in ``byte`` (MSB first)."""
    c = crc
    for i in range(8):
        bit = c[15] ^ byte[7 - i]
        c = Cat(Const(0, 1), c[:15]) ^ Mux(bit, Const(0x1021, 16), Const(0, 16))
    return c


def stream_fields(shape) -> list[dict]:
    """The descriptor's field list of a stream payload shape (see ``PayloadCodec``)."""
    if isinstance(shape, data.StructLayout):
        fields = []
        for name, fld in shape:
            sub = fld.shape
            if isinstance(sub, data.ArrayLayout):
                elem = Shape.cast(sub.elem_shape)
                fields.append({"name": name, "offset": fld.offset, "width": elem.width,
                               "signed": elem.signed, "count": sub.length})
            else:
                s = Shape.cast(sub)
                fields.append({"name": name, "offset": fld.offset, "width": s.width,
                               "signed": s.signed, "count": 1})
        return sorted(fields, key=lambda f: f["offset"])
    s = Shape.cast(shape)
    return [{"name": "data", "offset": 0, "width": s.width, "signed": s.signed, "count": 1}]


class _Unpack(wiring.Component):
    """Bytes → beats of ``bits`` bits (little-endian)."""

    def __init__(self, shape):
        self.nbytes = (Shape.cast(shape).width + 7) // 8
        super().__init__({"i": In(stream.Signature(8)), "o": Out(stream.Signature(shape))})

    def elaborate(self, platform):
        m = Module()
        reg = Signal(8 * self.nbytes)
        count = Signal(range(self.nbytes + 1))
        m.d.comb += [self.i.ready.eq(count != self.nbytes), self.o.valid.eq(count == self.nbytes),
                     self.o.payload.eq(reg)]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += count.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [reg.eq(Cat(reg[8:], self.i.payload)), count.eq(count + 1)]
        return m


class _Pack(wiring.Component):
    """Beats of ``bits`` bits → bytes (little-endian)."""

    def __init__(self, shape):
        self.nbytes = (Shape.cast(shape).width + 7) // 8
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(8))})

    def elaborate(self, platform):
        m = Module()
        reg = Signal(8 * self.nbytes)
        left = Signal(range(self.nbytes + 1))
        m.d.comb += [self.i.ready.eq(left == 0), self.o.valid.eq(left != 0),
                     self.o.payload.eq(reg[:8])]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += [reg.eq(reg >> 8), left.eq(left - 1)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [reg.eq(self.i.payload), left.eq(self.nbytes)]
        return m


class HostLink(wiring.Component):
    """The board side of the link, bridging to the given streams.

    ``inputs`` / ``outputs``: lists of ``(name, payload shape)`` of the accelerator's
    input and output streams; the link gets a member ``to_<name>`` (a stream source)
    for each input and ``from_<name>`` (a sink) for each output. ``info`` is the
    descriptor the INFO command returns (bytes). ``clear`` pulses on CLEAR: it resets
    the link's buffers here, and the board core resets the accelerator with it.
    """

    def __init__(self, *, inputs, outputs, info: bytes, divisor: int, timeout_cycles: int,
                 in_depth: int = 1024, out_depth: int = 512):
        self.divisor = check_int("divisor", divisor, 4, 1 << 16)
        self.timeout_cycles = check_int("timeout_cycles", timeout_cycles, 16 * divisor, 1 << 30)
        self.in_depth = check_pow2("in_depth", in_depth, 16, 32768)
        self.out_depth = check_int("out_depth", out_depth, 8, 32768)
        check_int("number of input streams", len(inputs), 1, 255)
        check_int("number of output streams", len(outputs), 1, 255)
        check_int("info length", len(info), 1, 0xFFFF)
        self.inputs, self.outputs, self.info = list(inputs), list(outputs), bytes(info)
        members = {"rx": In(1, init=1), "tx": Out(1, init=1), "clear": Out(1)}
        for name, shape in self.inputs:
            members[f"to_{name}"] = Out(stream.Signature(shape))
        for name, shape in self.outputs:
            members[f"from_{name}"] = In(stream.Signature(shape))
        members["crc_errors"] = Out(16)
        members["timeouts"] = Out(16)
        members["framing_errors"] = Out(16)
        members["dropped_replies"] = Out(16)
        members["free"] = Out(16)
        members["status"] = In(8 * sum(n for _, n in STATUS_FIELDS))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        D = self.in_depth
        clear = Signal()
        m.d.comb += self.clear.eq(clear)

        m.submodules.rx = rx = UARTRx(self.divisor)
        m.submodules.tx = tx = UARTTx(self.divisor)
        m.d.comb += [rx.rx.eq(self.rx), self.tx.eq(tx.tx)]

        # --- input buffer: 9-bit entries (bit 8 marks a frame's stream-index byte) ---
        m.submodules.inbuf = inbuf = Memory(shape=9, depth=D, init=[])
        wport = inbuf.write_port()
        rport = inbuf.read_port()
        wp = Signal(range(2 * D))  # tentative write pointer
        cp = Signal(range(2 * D))  # committed write pointer
        rp = Signal(range(2 * D))  # read pointer
        used = Signal(range(2 * D))
        free = Signal(16)  # registered: one cycle behind the pointers, always an underestimate
        m.d.comb += [used.eq((cp - rp)[:len(used)]), self.free.eq(free)]
        m.d.sync += free.eq(D - used)

        # --- unpackers / packers and output FIFOs (reset by CLEAR) ---
        unpacks, packs, fifos = [], [], []
        for name, shape in self.inputs:
            u = ResetInserter(clear)(_Unpack(shape))
            m.submodules[f"unpack_{name}"] = u
            wiring.connect(m, u.o, wiring.flipped(getattr(self, f"to_{name}")))
            unpacks.append(u)
        for name, shape in self.outputs:
            p = ResetInserter(clear)(_Pack(shape))
            f = ResetInserter(clear)(StreamFIFO(8, self.out_depth))
            m.submodules[f"pack_{name}"] = p
            m.submodules[f"outfifo_{name}"] = f
            wiring.connect(m, wiring.flipped(getattr(self, f"from_{name}")), p.i)
            wiring.connect(m, p.o, f.i)
            packs.append(p)
            fifos.append(f)

        # --- router: committed bytes → unpackers ---
        # The buffer's output is registered (READ) before anything branches on it: block
        # RAM clock-to-out into the unpackers' enables was the board's 89.7 MHz path.
        cur_sid = Signal(8)
        entry = Signal(9)
        m.d.comb += rport.addr.eq(rp[:len(rport.addr)])
        with m.FSM(name="router"):
            with m.State("ADDR"):
                with m.If((rp != cp) & ~clear):
                    m.next = "READ"
            with m.State("READ"):
                m.d.sync += entry.eq(rport.data)
                m.next = "DATA"
                with m.If(clear):  # rp is reset now: the byte read is stale
                    m.next = "ADDR"
            with m.State("DATA"):
                with m.If(clear):
                    m.next = "ADDR"
                with m.Elif(entry[8]):
                    m.d.sync += [cur_sid.eq(entry[:8]), rp.eq(rp + 1)]
                    m.next = "ADDR"
                with m.Else():
                    for n, u in enumerate(unpacks):
                        with m.If(cur_sid == n):
                            m.d.comb += [u.i.payload.eq(entry[:8]), u.i.valid.eq(1)]
                            with m.If(u.i.ready):
                                m.d.sync += rp.eq(rp + 1)
                                m.next = "ADDR"

        # --- reply request (deframer → responder) ---
        REPLY_NAK, REPLY_WRITE, REPLY_READ, REPLY_INFO, REPLY_STATUS, REPLY_EMPTY = range(6)
        req = Signal()  # pulses for one cycle
        req_kind = Signal(3)
        req_cmd = Signal(8)
        req_seq = Signal(8)
        req_code = Signal(8)

        # --- deframer ---
        crc = Signal(16)
        cmd = Signal(8)
        seq = Signal(8)
        length = Signal(16)
        count = Signal(16)
        args = Array(Signal(8, name=f"arg{n}") for n in range(3))
        err = Signal(8)
        crc_hi = Signal(8)
        crc_ok = Signal()
        last_wseq = Signal(8)
        last_wseq_valid = Signal()
        idle = Signal(range(self.timeout_cycles + 1))
        byte = rx.o.payload
        got = rx.o.valid
        m.d.sync += req.eq(0)
        with m.If(rx.framing_error):
            m.d.sync += self.framing_errors.eq(self.framing_errors + 1)

        def nak(code, kind=REPLY_NAK):
            m.d.sync += [req.eq(1), req_kind.eq(kind), req_cmd.eq(NAK), req_seq.eq(seq),
                         req_code.eq(code)]

        def timeout_check():  # last in each state, so that it wins
            with m.If(idle == self.timeout_cycles):
                nak(Nak.TIMEOUT)
                m.d.sync += self.timeouts.eq(self.timeouts + 1)
                m.next = "HUNT"

        with m.FSM(name="deframer") as deframer:
            with m.State("HUNT"):
                m.d.sync += idle.eq(0)
                with m.If(got & (byte == SYNC)):
                    m.d.sync += [crc.eq(0xFFFF), err.eq(0), count.eq(0), wp.eq(cp)]
                    m.next = "CMD"
            with m.State("CMD"):
                with m.If(got):
                    m.d.sync += [cmd.eq(byte), crc.eq(crc16_byte(crc, byte))]
                    m.next = "SEQ"
                timeout_check()
            with m.State("SEQ"):
                with m.If(got):
                    m.d.sync += [seq.eq(byte), crc.eq(crc16_byte(crc, byte))]
                    m.next = "LEN0"
                timeout_check()
            with m.State("LEN0"):
                with m.If(got):
                    m.d.sync += [length[:8].eq(byte), crc.eq(crc16_byte(crc, byte))]
                    m.next = "LEN1"
                timeout_check()
            with m.State("LEN1"):
                with m.If(got):
                    full = Cat(length[:8], byte)
                    m.d.sync += [length[8:].eq(byte), crc.eq(crc16_byte(crc, byte))]
                    with m.If(full > D):
                        nak(Nak.LENGTH)
                        m.next = "HUNT"
                    with m.Else():
                        with m.If((cmd == Cmd.WRITE) & (full > free)):
                            m.d.sync += err.eq(Nak.BUSY)
                        with m.If((cmd == Cmd.WRITE) & (full < 2)):
                            m.d.sync += err.eq(Nak.LENGTH)
                        m.next = "LEN_DONE"
                timeout_check()
            with m.State("LEN_DONE"):
                # one cycle (no byte can arrive this soon) to branch on the length
                with m.If(length == 0):
                    m.next = "CRC0"
                with m.Else():
                    m.next = "PAYLOAD"
                timeout_check()
            with m.State("PAYLOAD"):
                with m.If(got):
                    m.d.sync += [crc.eq(crc16_byte(crc, byte)), count.eq(count + 1)]
                    with m.If(count < 3):
                        m.d.sync += args[count[:2]].eq(byte)
                    with m.If((cmd == Cmd.WRITE) & (err == 0)):
                        with m.If((count == 0) & (byte >= len(self.inputs))):
                            m.d.sync += err.eq(Nak.STREAM)
                        with m.Else():
                            m.d.comb += [wport.addr.eq(wp[:len(wport.addr)]), wport.en.eq(1),
                                         wport.data.eq(Cat(byte, count == 0))]
                            m.d.sync += wp.eq(wp + 1)
                    with m.If(count + 1 == length):
                        m.next = "CRC0"
                timeout_check()
            with m.State("CRC0"):
                with m.If(got):
                    m.d.sync += crc_hi.eq(byte)
                    m.next = "CRC1"
                timeout_check()
            with m.State("CRC1"):
                with m.If(got):
                    m.d.sync += crc_ok.eq(Cat(byte, crc_hi) == crc)
                    m.next = "CHECK"
                timeout_check()
            with m.State("CHECK"):
                # the CRC comparison was registered in CRC1 (CRC compare -> reply decision
                # -> request registers was the board's 94.6 MHz path); no byte can arrive
                # a cycle after the last one
                m.next = "HUNT"
                with m.If(~crc_ok):
                    nak(Nak.CRC)
                    m.d.sync += self.crc_errors.eq(self.crc_errors + 1)
                with m.Elif(err != 0):
                    nak(err)
                with m.Elif(cmd == Cmd.WRITE):
                    m.d.sync += [req.eq(1), req_kind.eq(REPLY_WRITE), req_cmd.eq(cmd | 0x80),
                                 req_seq.eq(seq)]
                    with m.If(~last_wseq_valid | (last_wseq != seq)):
                        m.d.sync += [cp.eq(wp), last_wseq.eq(seq), last_wseq_valid.eq(1)]
                with m.Elif(cmd == Cmd.READ):
                    with m.If(length != 3):
                        nak(Nak.LENGTH)
                    with m.Elif(args[0] >= len(self.outputs)):
                        nak(Nak.STREAM)
                    with m.Else():
                        m.d.sync += [req.eq(1), req_kind.eq(REPLY_READ),
                                     req_cmd.eq(cmd | 0x80), req_seq.eq(seq)]
                with m.Elif((cmd == Cmd.INFO) | (cmd == Cmd.STATUS) | (cmd == Cmd.CLEAR)):
                    with m.If(length != 0):
                        nak(Nak.LENGTH)
                    with m.Else():
                        m.d.sync += [req.eq(1), req_cmd.eq(cmd | 0x80), req_seq.eq(seq),
                                     req_kind.eq(Mux(cmd == Cmd.INFO, REPLY_INFO,
                                                     Mux(cmd == Cmd.STATUS, REPLY_STATUS,
                                                         REPLY_EMPTY)))]
                        with m.If(cmd == Cmd.CLEAR):
                            m.d.sync += clear.eq(1)
                with m.Else():
                    nak(Nak.COMMAND)
        # A partial frame whose bytes stop arriving is abandoned (NAK TIMEOUT).
        with m.If(deframer.ongoing("HUNT") | got):
            m.d.sync += idle.eq(0)
        with m.Elif(idle != self.timeout_cycles):
            m.d.sync += idle.eq(idle + 1)

        # CLEAR: one-cycle pulse; empties the input buffer and forgets the last WRITE seq.
        with m.If(clear):
            m.d.sync += [clear.eq(0), rp.eq(0), cp.eq(0), wp.eq(0), last_wseq_valid.eq(0)]

        # --- responder ---
        busy = Signal()
        kind = Signal(3)
        rcmd = Signal(8)
        rseq = Signal(8)
        rlen = Signal(16)
        ridx = Signal(16)
        rcrc = Signal(16)
        word = Signal(16)  # ACK / NAK payload
        rsid = Signal(8)
        levels = Array(f.level for f in fifos)
        m.submodules.info = info = Memory(shape=8, depth=len(self.info), init=list(self.info))
        info_rd = info.read_port()
        info_q = Signal(8)  # the ROM's output registered (ROM -> muxes -> `cur` ran at 101 MHz)
        m.d.comb += info_rd.addr.eq(ridx)
        m.d.sync += info_q.eq(info_rd.data)

        # A CLEAR while a READ reply is being sent empties the FIFO the reply reads from.
        # The reply still sends the bytes its header promised (a shorter frame would take
        # the host's deframer out of step), but as zeros that pop nothing (the FIFO may
        # already hold new output), and with its CRC inverted, so the host rejects the
        # frame instead of taking zeros for data. Without this the responder waited for
        # bytes that would never come, and dropped every later reply.
        abort = Signal()
        with m.If(clear & busy & (kind == REPLY_READ)):
            m.d.sync += abort.eq(1)

        with m.If(req):
            with m.If(busy):
                m.d.sync += self.dropped_replies.eq(self.dropped_replies + 1)
            with m.Else():
                m.d.sync += [busy.eq(1), kind.eq(req_kind), rcmd.eq(req_cmd), rseq.eq(req_seq),
                             rsid.eq(args[0]), ridx.eq(0), abort.eq(0)]
                with m.Switch(req_kind):
                    with m.Case(REPLY_NAK):
                        m.d.sync += [rlen.eq(2), word.eq(Cat(req_code, cmd))]
                    with m.Case(REPLY_WRITE):
                        # the free space (credit) after this frame's commit
                        m.d.sync += [rlen.eq(2), word.eq(D - used)]
                    with m.Case(REPLY_READ):
                        level = levels[args[0]]
                        maxb = Cat(args[1], args[2])
                        m.d.sync += rlen.eq(Mux(level < maxb, level, maxb))
                    with m.Case(REPLY_INFO):
                        m.d.sync += rlen.eq(len(self.info))
                    with m.Case(REPLY_STATUS):
                        m.d.sync += rlen.eq(len(self.status) // 8)
                    with m.Case(REPLY_EMPTY):
                        m.d.sync += rlen.eq(0)

        header = Array([Const(SYNC, 8), rcmd, rseq, rlen[:8], rlen[8:]])
        hidx = Signal(3)
        nstatus = len(self.status) // 8
        status_bytes = Array(self.status[8 * n:8 * n + 8] for n in range(nstatus))
        # The chosen FIFO's valid and every FIFO's head byte, registered: only LATCH pops a
        # FIFO, so what was seen a cycle earlier is still the head when LATCH takes it
        # (FIFO block-RAM output and valid -> muxes -> `cur` / read enable ran at 90 MHz).
        fifo_valid = Array(f.o.valid for f in fifos)
        sel_valid = Signal()
        m.d.sync += sel_valid.eq(fifo_valid[rsid])
        fifo_data = Array(Signal(8, name=f"head{n}") for n in range(len(fifos)))
        m.d.sync += [fifo_data[n].eq(f.o.payload) for n, f in enumerate(fifos)]
        pay = Signal(8)
        pay_valid = Signal()
        with m.Switch(kind):
            with m.Case(REPLY_READ):
                m.d.comb += [pay.eq(Mux(abort, 0, fifo_data[rsid])),
                             pay_valid.eq(abort | sel_valid)]
            with m.Case(REPLY_INFO):
                m.d.comb += [pay.eq(info_q), pay_valid.eq(1)]
            with m.Case(REPLY_STATUS):  # read live: stable while the accelerator is idle
                m.d.comb += [pay.eq(status_bytes[ridx[:(nstatus - 1).bit_length()]]),
                             pay_valid.eq(1)]
            with m.Default():
                m.d.comb += [pay.eq(Mux(ridx[0], word[8:], word[:8])), pay_valid.eq(1)]

        # Every payload byte goes through a register (``cur``): FETCH waits two cycles for
        # the ROM, LATCH takes the byte (popping the FIFO for READ), SEND hands it to the
        # UART, so no path runs from a FIFO or ROM into the transmitter.
        cur = Signal(8)
        crc_out = Mux(abort, ~rcrc, rcrc)
        with m.FSM(name="responder"):
            with m.State("IDLE"):
                m.d.sync += hidx.eq(0)
                with m.If(busy):
                    m.next = "HEADER"
            with m.State("HEADER"):
                m.d.comb += [tx.i.payload.eq(header[hidx]), tx.i.valid.eq(1)]
                with m.If(tx.i.ready):
                    m.d.sync += hidx.eq(hidx + 1)
                    with m.If(hidx == 0):
                        m.d.sync += rcrc.eq(0xFFFF)
                    with m.Else():
                        m.d.sync += rcrc.eq(crc16_byte(rcrc, tx.i.payload))
                    with m.If(hidx == 4):
                        m.next = "HEADER_DONE"
            with m.State("HEADER_DONE"):
                with m.If(rlen == 0):
                    m.next = "CRC0"
                with m.Else():
                    m.next = "FETCH"
            with m.State("FETCH"):  # the INFO ROM: a cycle of read latency, one of register
                m.next = "FETCH2"
            with m.State("FETCH2"):
                m.next = "LATCH"
            with m.State("LATCH"):
                with m.If(pay_valid):
                    m.d.sync += cur.eq(pay)
                    for n, f in enumerate(fifos):
                        with m.If((kind == REPLY_READ) & (rsid == n) & ~abort):
                            m.d.comb += f.o.ready.eq(1)
                    m.next = "SEND"
            with m.State("SEND"):
                m.d.comb += [tx.i.payload.eq(cur), tx.i.valid.eq(1)]
                with m.If(tx.i.ready):
                    m.d.sync += [rcrc.eq(crc16_byte(rcrc, cur)), ridx.eq(ridx + 1)]
                    with m.If(ridx + 1 == rlen):
                        m.next = "CRC0"
                    with m.Else():
                        m.next = "FETCH"
            with m.State("CRC0"):
                m.d.comb += [tx.i.payload.eq(crc_out[8:]), tx.i.valid.eq(1)]
                with m.If(tx.i.ready):
                    m.next = "CRC1"
            with m.State("CRC1"):
                m.d.comb += [tx.i.payload.eq(crc_out[:8]), tx.i.valid.eq(1)]
                with m.If(tx.i.ready):
                    m.d.sync += busy.eq(0)
                    m.next = "IDLE"
        return m
