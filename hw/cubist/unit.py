"""The CubistMerge spatial merge unit: ``golden/CUBIST_FIXED.md`` in gateware.

The micro-architecture is described in ``hw/cubist/README.md``. In short, five stages
run concurrently on up to three frames:

``IN``     takes ``cfg`` and the token beats, checks the frame, writes prefix tokens to the
           prefix buffer and grid tokens to the row buffer (a circular token buffer),
           and computes the horizontal keys (``KeyFront`` + ``KeyDivider``).
``H-RANK`` ranks the candidates of a row as their keys arrive (rank counters and
           parallel comparators) and writes the row's decision to ``hdec``.
``H-MERGE`` streams each decided row out of the row buffer, merging removed tokens into
           their destination on the fly, writes the merged row into the frame buffer
           (banked by row parity, double-buffered by frame) and computes the vertical keys
           against the line buffer of the previous merged row.
``V-RANK`` ranks the vertical candidates of every column (read-modify-write of a
           per-column rank word) and writes each column's decision to ``vdec``.
``OUT``    once a frame's vertical decisions are complete, emits the prefix tokens and the
           merged grid (a token reads its destination and a source in one pass; a
           three-way merge takes a second pass), and, concurrently, the merge map.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..common import StreamFIFO, check_int, check_pow2
from .keys import KeyDivider, KeyFront, clog2, lanes_of
from .layouts import (
    ERR_CONFIG,
    ERR_LAST_TOKEN,
    ERR_LONG,
    ERR_SHORT,
    cfg_layout,
    map_layout,
    status_layout,
    token_layout,
    um_cfg_layout,
)
from .rank import SerialRanker

__all__ = ["CubistMerge", "mm_lanes"]

SLOTS = 4  # per-frame slots of cfg / prefix / hdec; at most 3 frames in flight
MAX_IN_FLIGHT = 3
FIFO_DEPTH = 8


def mm_lanes(a, b, p: int, width: int):
    """Per lane: ``b`` if ``|b| > |a|`` else ``a`` (magnitudes with one extra bit)."""
    return pick_lanes(mag_flags(a, b, p, width)[0], a, b, p, width)


def mag_flags(a, b, p: int, width: int):
    """Per lane, from one set of compares: (``|b| > |a|``, ``|a| > |b|``), P bits each
    (what :func:`mm_lanes` decides for ``mm_lanes(a, b)`` and ``mm_lanes(b, a)``)."""
    ba, ab = [], []
    for x, y in zip(lanes_of(a, p, width), lanes_of(b, p, width)):
        # no negation in series with a compare: same signs compare the values, opposite
        # signs look at the sign of x + y (exact for -2^(width-1) too)
        sx, sy = x[-1], y[-1]
        s = x + y
        lt, gt, neg, pos = y < x, y > x, s < 0, s > 0
        ba.append(Mux(sx == sy, Mux(sx, lt, gt), Mux(sy, neg, pos)))
        ab.append(Mux(sx == sy, Mux(sx, gt, lt), Mux(sx, neg, pos)))
    return Cat(*ba), Cat(*ab)


def pick_lanes(sel, a, b, p: int, width: int):
    """Per lane: ``b`` where ``sel`` is set, else ``a``."""
    return Cat(*[Mux(sel[k], b[k * width:(k + 1) * width], a[k * width:(k + 1) * width])
                 for k in range(p)])


def _pipe(m, on: bool, name: str, **values) -> dict:
    """A pipeline stage: each value registered (``on``) or passed through."""
    if not on:
        return values
    out = {}
    for n, v in values.items():
        r = Signal(v.shape(), name=f"{name}_{n}")
        m.d.sync += r.eq(v)
        out[n] = r
    return out


def _bits(value, n: int):
    """The low ``n`` bits of an address field (n may be 0)."""
    return value[:n]


def rank_update(k, gts, ranks, rank_shape):
    """Insert candidate ``k`` among candidates ``0..k-1``, given ``gts[j]`` (its score
    ``>`` candidate j's, compared a stage earlier). Returns the new ranks: each earlier
    candidate with a lower score moves one place back; the new candidate's rank is the
    number of earlier candidates with a score at least as high (ties go to the earlier
    position)."""
    n = len(ranks)
    before = [k > j for j in range(n)]
    ahead = [Mux(before[j] & ~gts[j], 1, 0) for j in range(n)]
    count = sum(ahead[1:], ahead[0]) if ahead else Const(0)
    new = []
    for j, r in enumerate(ranks):
        bumped = Mux(before[j] & gts[j], r + 1, r)
        new.append(Mux(k == j, count, bumped)[:rank_shape])
    return new


class CubistMerge(wiring.Component):
    """CubistMerge spatial merge unit (bit-exact ``golden.cubist_fixed``).

    Parameters (checked here, ``ValueError`` naming the parameter and its range):
    ``h_max``, ``w_max`` (2..64), ``c`` (channels, 1..1024), ``lanes`` (power of two
    dividing ``c``), ``width`` (8 or 16), ``frac_bits`` (8..24), ``max_prefix`` (0..16),
    ``unmerge`` (include the unmerge unit), ``buffers`` (2: frame buffer double-buffered
    so frames overlap; 1: single frame buffer, half the memory, frames no longer fully
    overlapped), ``serial_mul`` (1: the key dividers' wide products by shift-add over
    B-1 cycles and the map's multiply in LUTs, so that only the 4P per-beat products
    use DSPs; needs B >= 2), ``shared_keys`` (1: one key front and one key divider serve
    both passes, the input and the horizontal merge taking turns cycle by cycle: half
 the throughput, half the multipliers; for the iCE40), ``area`` (1: the iCE40's
    area configuration: the ECP5 timing registers before the merges and the key front's
    second operand register left out, serial rankers (one comparison a cycle, the rank
    state in block RAM), memories without read-during-write logic; needs
    ``shared_keys=1`` and ``C/P >= max(H_max, W_max)//2 + 3``).
    """

    def __init__(self, *, h_max: int = 14, w_max: int = 14, c: int = 64, lanes: int = 4,
                 width: int = 8, frac_bits: int = 16, max_prefix: int = 4,
                 unmerge: bool = True, buffers: int = 2, serial_mul: int = 0,
                 shared_keys: int = 0, area: int = 0):
        self.h_max = check_int("h_max", h_max, 2, 64)
        self.w_max = check_int("w_max", w_max, 2, 64)
        self.c = check_int("c", c, 1, 1024)
        self.lanes = check_pow2("lanes", lanes, 1, self.c)
        if self.c % self.lanes:
            raise ValueError(f"lanes must be a power of two dividing c={self.c}, not {lanes}")
        if width not in (8, 16) or isinstance(width, bool):
            raise ValueError(f"width must be 8 or 16, not {width!r}")
        self.width = width
        self.frac_bits = check_int("frac_bits", frac_bits, 8, 24)
        self.max_prefix = check_int("max_prefix", max_prefix, 0, 16)
        if unmerge not in (0, 1, True, False):
            raise ValueError(f"unmerge must be 0 or 1, not {unmerge!r}")
        self.has_unmerge = bool(unmerge)
        if buffers not in (1, 2) or isinstance(buffers, bool):
            raise ValueError(f"buffers must be 1 or 2, not {buffers!r}")
        self.buffers = buffers
        self.beats = self.c // self.lanes
        if serial_mul not in (0, 1, True, False):
            raise ValueError(f"serial_mul must be 0 or 1, not {serial_mul!r}")
        if serial_mul and self.beats < 2:
            raise ValueError(f"serial_mul needs c/lanes >= 2 beats per token, not {self.beats}")
        self.serial_mul = bool(serial_mul)
        if shared_keys not in (0, 1, True, False):
            raise ValueError(f"shared_keys must be 0 or 1, not {shared_keys!r}")
        self.shared_keys = bool(shared_keys)
        if area not in (0, 1, True, False):
            raise ValueError(f"area must be 0 or 1, not {area!r}")
        if area and not shared_keys:
            raise ValueError("area=1 needs shared_keys=1")
        need = max(self.h_max, self.w_max) // 2 + 3
        if area and self.beats < need:
            raise ValueError(f"area=1 needs c/lanes >= max(h_max, w_max)//2 + 3 = {need} beats "
                             f"per token (one key per ranker pass), not {self.beats}")
        self.area = bool(area)
        tok = token_layout(width, lanes)
        sig = {
            "cfg": In(stream.Signature(cfg_layout())),
            "i": In(stream.Signature(tok)),
            "o": Out(stream.Signature(tok)),
            "map": Out(stream.Signature(map_layout(h_max, w_max))),
            "status": Out(stream.Signature(status_layout())),
        }
        if self.has_unmerge:
            sig.update({
                "um_cfg": In(stream.Signature(um_cfg_layout())),
                "um_i": In(stream.Signature(tok)),
                "um_map": In(stream.Signature(map_layout(h_max, w_max))),
                "um_o": Out(stream.Signature(tok)),
            })
        super().__init__(sig)

    # ------------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        P, WD, B, F = self.lanes, self.width, self.beats, self.frac_bits
        KW = F + 2
        CB = clog2(B)
        S_BITS = clog2(2 * self.w_max)
        S_BEATS = (1 << S_BITS) * B
        KH, KV = self.w_max // 2, self.h_max // 2
        RBH, RBV = max(1, clog2(KH + 1)), max(1, clog2(KV + 1))
        WB, HB, HH = clog2(self.w_max), clog2(self.h_max), clog2((self.h_max + 1) // 2)
        NB = self.buffers
        PB = clog2(self.max_prefix)
        LW = P * WD
        area = self.area
        # area: no memory's read ever meets a write to the same address in a cycle whose
        # read data is used (README, "Area configuration"), so Yosys needs no
        # read-during-write logic (a delayed write and a bypass mux per memory on iCE40)
        nrw = {"no_rw_check": 1} if area else None

        def bank_of(slot):  # the frame-buffer bank as an address field
            return slot[0:1] if NB == 2 else Const(0, 0)

        def bidx(slot):  # the frame-buffer bank as an index
            return slot[0] if NB == 2 else 0

        # ---- per-frame configuration slots ---------------------------------------
        names = ("h", "w", "r_h", "r_w", "prefix")
        # (area: each field only as wide as its largest allowed value)
        fw = dict(zip(names, (clog2(v + 1) for v in (self.h_max, self.w_max, KV, KH,
                                                      max(self.max_prefix, 1)))))
        slot_cfg = {n: Array(Signal(fw[n] if area else 8, name=f"slot{s}_{n}")
                             for s in range(SLOTS))
                    for n in names}
        fh, fwd = (fw["h"], fw["w"]) if area else (8, 8)  # per-frame bounds' widths
        slot_err = Array(Signal(name=f"slot{s}_err") for s in range(SLOTS))

        def cfg_of(slot):
            return {n: slot_cfg[n][slot] for n in names}

        in_flight = Signal(range(MAX_IN_FLIGHT + 1))
        in_flight_inc, in_flight_dec = Signal(), Signal()
        m.d.sync += in_flight.eq(in_flight + in_flight_inc - in_flight_dec)
        bank_free = Array(Signal(init=1, name=f"bank_free{b}") for b in range(NB))
        vdone = Array(Signal(name=f"vdone{b}") for b in range(NB))

        # ---- memories -------------------------------------------------------------
        m.submodules.rowbuf = rowbuf = Memory(shape=LW, depth=(1 << S_BITS) << CB, init=[],
                                              attrs=nrw)
        rb_w, rb_r = rowbuf.write_port(), rowbuf.read_port()
        if self.max_prefix:
            m.submodules.prefbuf = prefbuf = Memory(
                shape=LW, depth=SLOTS << (PB + CB), init=[], attrs=nrw)
            pf_w, pf_r = prefbuf.write_port(), prefbuf.read_port()
        m.submodules.hdec = hdec = Memory(shape=2 * KH, depth=SLOTS << HB, init=[], attrs=nrw)
        hd_w = hdec.write_port()
        hd_r_merge, hd_r_map = hdec.read_port(), hdec.read_port()
        fb_w, fb_r = [], []
        # one bank: H-MERGE writes and OUT reads a bank at different times, so each
        # parity's memory has a single-port shape (one address), which Yosys maps to
        # SB_SPRAM256KA on an iCE40UP (named *_spram: fpga/build.py drops their zero init,
        # which SPRAM cannot hold)
        spram = (NB == 1 and LW <= 32 and (NB << (HH + WB + CB)) <= 16384
                 and str(getattr(platform, "device", "")).startswith("iCE40UP"))
        fb_waddr = [Signal(HH + WB + CB + (NB == 2), name=f"fb{par}_waddr") for par in range(2)]
        fb_raddr = [Signal(HH + WB + CB + (NB == 2), name=f"fb{par}_raddr") for par in range(2)]
        for par in range(2):
            mem = Memory(shape=LW, depth=NB << (HH + WB + CB), init=[],
                         attrs={"ram_style": "huge"} if spram else None)
            m.submodules[f"frame{par}_spram" if spram else f"frame{par}"] = mem
            fb_w.append(mem.write_port())
            fb_r.append(mem.read_port())
            if NB == 1:
                shared_addr = Mux(fb_w[par].en, fb_waddr[par], fb_raddr[par])
                m.d.comb += [fb_w[par].addr.eq(shared_addr), fb_r[par].addr.eq(shared_addr),
                             fb_r[par].en.eq(~fb_w[par].en)]
            else:
                m.d.comb += [fb_w[par].addr.eq(fb_waddr[par]), fb_r[par].addr.eq(fb_raddr[par])]
        if not area:  # (area: the serial V ranker keeps its own memory)
            vword = KV * KW + KV * RBV + KV + KW
            m.submodules.vrank = vrank = Memory(shape=vword, depth=NB << WB, init=[])
            vr_w = vrank.write_port()
            vr_r = vrank.read_port(transparent_for=(vr_w,))
        m.submodules.vdec = vdec = Memory(shape=2 * KV, depth=NB << WB, init=[], attrs=nrw)
        vd_w = vdec.write_port()
        vd_r_tok, vd_r_map = vdec.read_port(), vdec.read_port()

        occ = Signal(range(S_BEATS + 1))
        occ_inc, occ_dec = Signal(), Signal()
        m.d.sync += occ.eq(occ + occ_inc - occ_dec)
        rows_ready = Signal(S_BITS + 2)
        rows_merged = Signal(S_BITS + 2)

        # ======================= key path ===========================================
        # Separate: one KeyFront + KeyDivider per pass. Shared: one of each, the input (H
        # beats) on even cycles and H-MERGE (V beats) on odd cycles; jobs tagged by pass.
        shared = self.shared_keys
        tdm = Signal()  # shared: 0 = IN's cycle, 1 = H-MERGE's cycle
        in_ok, mg_ok = (~tdm, tdm) if shared else (Const(1), Const(1))
        if shared:
            m.d.sync += tdm.eq(~tdm)
            m.submodules.kfront = kf = KeyFront(p=P, width=WD, beats=B, tokens=2 << WB,
                                                c=self.c, ways=2, product_regs=1,
                                                operand_regs=not area, mem_attrs=nrw)
            m.submodules.kdiv = kd = KeyDivider(dw=kf.dw, nw=kf.nw, frac_bits=F, beats=B,
                                                serial=self.serial_mul, queue=True,
                                                lean=area)

            def front_port(tokens):
                return SimpleNamespace(
                    valid=Signal(), data=Signal(LW), c=Signal(range(max(B, 2))),
                    tok=Signal(range(max(tokens, 2))), end=Signal(), has_prev=Signal())
            hfront, vfront = front_port(1), front_port(1 << WB)
            m.d.comb += [
                kf.valid.eq(hfront.valid | vfront.valid), kf.way.eq(vfront.valid),
                kf.data.eq(Mux(vfront.valid, vfront.data, hfront.data)),
                kf.c.eq(Mux(vfront.valid, vfront.c, hfront.c)),
                kf.tok.eq(Mux(vfront.valid, Cat(_bits(vfront.tok, WB), 1), 0)),
                kf.end.eq(Mux(vfront.valid, vfront.end, hfront.end)),
                kf.has_prev.eq(Mux(vfront.valid, vfront.has_prev, hfront.has_prev)),
                kd.valid.eq(kf.job_valid), kd.d.eq(kf.job_d), kd.na.eq(kf.job_na),
                kd.nb.eq(kf.job_nb), kd.tag.eq(kf.job_way)]
            hkey_v, vkey_v = kd.key_valid & ~kd.key_tag, kd.key_valid & kd.key_tag
            hkey = vkey = kd.key
        else:
            m.submodules.hfront = hfront = KeyFront(p=P, width=WD, beats=B, tokens=1, c=self.c)
            m.submodules.vfront = vfront = KeyFront(p=P, width=WD, beats=B, tokens=1 << WB,
                                                    c=self.c)
            m.submodules.hdiv = hdiv = KeyDivider(dw=hfront.dw, nw=hfront.nw, frac_bits=F,
                                                  beats=B, serial=self.serial_mul)
            m.submodules.vdiv = vdiv = KeyDivider(dw=vfront.dw, nw=vfront.nw, frac_bits=F,
                                                  beats=B, serial=self.serial_mul)
            for front, div in ((hfront, hdiv), (vfront, vdiv)):
                m.d.comb += [div.valid.eq(front.job_valid), div.d.eq(front.job_d),
                             div.na.eq(front.job_na), div.nb.eq(front.job_nb)]
            hkey_v, hkey, vkey_v, vkey = hdiv.key_valid, hdiv.key, vdiv.key_valid, vdiv.key

        # ======================= IN ==================================================
        cur = {n: Signal(8, name=f"in_{n}") for n in ("h", "w", "prefix")}
        err = Signal(3)
        good = Signal()
        ph = Signal()  # prefix phase
        pcnt = Signal(5)
        i_r, j_r = Signal(8), Signal(8)
        c_r = Signal(range(max(B, 2)))
        slot_in = Signal(2)
        frames = Signal(16)
        wr_slot = Signal(S_BITS)
        take, pad = Signal(), Signal()
        occ_ok = Signal()
        m.d.comb += occ_ok.eq(occ < S_BEATS)
        adv = take | pad
        end_tok = c_r == B - 1
        if area:
            # registered: i_r/j_r move at a token's end, its next end is >= B cycles later
            # (the compares in front of the error logic were a 25 MHz path)
            at_last = Signal()
            m.d.sync += at_last.eq((i_r == cur["h"] - 1) & (j_r == cur["w"] - 1))
            final = end_tok & ~ph & at_last
        else:
            final = end_tok & ~ph & (i_r == cur["h"] - 1) & (j_r == cur["w"] - 1)
        beat_data = Mux(take, self.i.payload.data.as_value(), 0)

        cfgp = self.cfg.payload
        bad_cfg = ((cfgp.h < 2) | (cfgp.h > self.h_max) | (cfgp.w < 2) | (cfgp.w > self.w_max)
                   | (cfgp.r_w > (cfgp.w >> 1)) | (cfgp.r_h > (cfgp.h >> 1))
                   | (cfgp.prefix > self.max_prefix))

        def set_err(code):
            with m.If(err == 0):
                m.d.sync += err.eq(code)
            m.d.sync += slot_err[slot_in].eq(1)

        with m.If(adv):
            with m.If(ph):
                if self.max_prefix:
                    m.d.comb += [pf_w.addr.eq(Cat(_bits(c_r, CB), _bits(pcnt, PB), slot_in)),
                                 pf_w.data.eq(beat_data), pf_w.en.eq(1)]
            with m.Else():
                m.d.comb += [rb_w.addr.eq(Cat(_bits(c_r, CB), wr_slot)), rb_w.data.eq(beat_data),
                             rb_w.en.eq(1), occ_inc.eq(1)]
                m.d.comb += [hfront.valid.eq(1), hfront.has_prev.eq(j_r != 0)]
            m.d.sync += c_r.eq(Mux(end_tok, 0, c_r + 1))
            with m.If(end_tok):
                with m.If(ph):
                    m.d.sync += pcnt.eq(pcnt + 1)
                    with m.If(pcnt == cur["prefix"] - 1):
                        m.d.sync += ph.eq(0)
                with m.Else():
                    m.d.sync += [wr_slot.eq(wr_slot + 1), j_r.eq(j_r + 1)]
                    with m.If(j_r == cur["w"] - 1):
                        m.d.sync += [j_r.eq(0), i_r.eq(i_r + 1)]
        m.d.comb += [hfront.data.eq(beat_data), hfront.c.eq(c_r), hfront.tok.eq(0),
                     hfront.end.eq(end_tok)]

        with m.If(self.status.valid & self.status.ready):
            m.d.sync += self.status.valid.eq(0)

        with m.FSM(name="in_fsm"):
            with m.State("IDLE"):
                m.d.comb += self.cfg.ready.eq(in_flight < MAX_IN_FLIGHT)
                with m.If(self.cfg.valid & (in_flight < MAX_IN_FLIGHT)):
                    m.d.sync += [cur["h"].eq(cfgp.h), cur["w"].eq(cfgp.w),
                                 cur["prefix"].eq(cfgp.prefix), ph.eq(cfgp.prefix != 0),
                                 pcnt.eq(0), i_r.eq(0), j_r.eq(0), c_r.eq(0)]
                    with m.If(bad_cfg):
                        m.d.sync += [err.eq(ERR_CONFIG), good.eq(0)]
                        m.next = "DROP"
                    with m.Else():
                        m.d.sync += [err.eq(0), good.eq(1), slot_err[slot_in].eq(0)]
                        for n in names:
                            m.d.sync += slot_cfg[n][slot_in].eq(getattr(cfgp, n))
                        m.d.comb += in_flight_inc.eq(1)
                        m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += [self.i.ready.eq((ph | occ_ok) & in_ok),
                             take.eq(self.i.valid & (ph | occ_ok) & in_ok)]
                with m.If(take):
                    last = self.i.payload.last
                    with m.If(last & ~final):
                        set_err(ERR_SHORT)
                        m.next = "PAD"
                    with m.Elif(final & ~last):
                        set_err(ERR_LONG)
                        m.next = "DROP"
                    with m.Elif(self.i.payload.last_token != end_tok):
                        set_err(ERR_LAST_TOKEN)
                    with m.If(final & last):
                        m.next = "FIN"
            with m.State("PAD"):
                m.d.comb += pad.eq((ph | occ_ok) & in_ok)
                with m.If(pad & final):
                    m.next = "FIN"
            with m.State("DROP"):
                m.d.comb += self.i.ready.eq(1)
                with m.If(self.i.valid & self.i.payload.last):
                    m.next = "FIN"
            with m.State("FIN"):
                with m.If(~self.status.valid):
                    m.d.sync += [self.status.valid.eq(1), self.status.payload.error.eq(err),
                                 self.status.payload.frame.eq(frames), frames.eq(frames + 1)]
                    with m.If(good):
                        m.d.sync += slot_in.eq(slot_in + 1)
                    m.next = "IDLE"

        # ======================= H keys and H-RANK ==================================
        h_scores = [Signal(signed(KW), name=f"hs{k}") for k in range(KH)]
        h_ranks = [Signal(RBH, name=f"hr{k}") for k in range(KH)]
        h_dirs = [Signal(name=f"hd{k}") for k in range(KH)]
        h_pend = Signal(signed(KW))
        n_h, row_h, slot_h = Signal(8), Signal(8), Signal(2, name="slot_h")
        hc = cfg_of(slot_h)
        # H-RANK in four stages (a key arrives at most every B cycles, but every loop
        # below closes within one stage, so B = 1 is hazard-free too):
        # S0 L/R and score; S1 compare with the earlier scores (scores written here);
        # S2 rank counters; S3 the row's decision into hdec.
        a_v, a_fin, a_right, a_end = Signal(), Signal(), Signal(), Signal()
        a_k, a_row, a_slot = Signal(range(max(KH, 2))), Signal(8), Signal(2)
        a_score = Signal(signed(KW))
        # slot_h's W-2, H-1, r_w and W/2, registered: a frame's first H key comes >= 2
        # cycles after slot_h moved to it (slot lookup -> compare was the 95.8 MHz path)
        hw2, hh1, hrw, hwh = (Signal(b, name=f"hk_{n}") for n, b in
                              (("w2", fwd), ("h1", fh), ("rw", fwd), ("wh", fwd)))
        m.d.sync += [hw2.eq(hc["w"] - 2), hh1.eq(hc["h"] - 1), hrw.eq(hc["r_w"]),
                     hwh.eq(hc["w"] >> 1)]
        a_rw, a_wh = Signal(8), Signal(8)
        h_last_n = n_h == hw2

        def next_h_key():  # the position of the next H key (row, slot)
            with m.If(h_last_n):
                m.d.sync += [n_h.eq(0), row_h.eq(row_h + 1)]
                with m.If(row_h == hh1):
                    m.d.sync += [row_h.eq(0), slot_h.eq(slot_h + 1)]
            with m.Else():
                m.d.sync += n_h.eq(n_h + 1)

        if area:
            # serial ranker: one comparison a cycle (keys come >= B >= KH + 3 cycles apart)
            m.submodules.hrank = hrk = SerialRanker(k=KH, key_bits=KW, tag_bits=HB + 2,
                                                    attrs=nrw)
            m.d.comb += [hrk.valid.eq(hkey_v), hrk.key.eq(hkey), hrk.n.eq(n_h),
                         hrk.last.eq(h_last_n), hrk.thr.eq(hrw),
                         hrk.tag.eq(Cat(_bits(row_h, HB), slot_h))]
            with m.If(hkey_v):
                next_h_key()
            with m.If(hrk.dec_valid):
                m.d.comb += [hd_w.addr.eq(hrk.dec_tag), hd_w.en.eq(1),
                             hd_w.data.eq(Cat(hrk.dec_removed, hrk.dec_dirs))]
                m.d.sync += rows_ready.eq(rows_ready + 1)
        else:
            with m.If(hkey_v):
                key = hkey
                odd = n_h[0]
                is_final = odd | h_last_n  # n <= W-2, so "n + 2 >= W" is "n = W-2"
                right = odd & (key > h_pend)
                with m.If(~is_final):
                    m.d.sync += h_pend.eq(key)
                m.d.sync += [a_fin.eq(is_final), a_right.eq(right), a_k.eq(n_h >> 1),
                             a_score.eq(Mux(right, key, Mux(odd, h_pend, key))),
                             a_end.eq(h_last_n), a_row.eq(row_h), a_slot.eq(slot_h),
                             a_rw.eq(hrw), a_wh.eq(hwh)]
                next_h_key()
            m.d.sync += a_v.eq(hkey_v)
            # S1: the new candidate against the scores of the earlier ones in this row
            b_v, b_end = Signal(), Signal()
            b_k, b_row, b_slot = Signal.like(a_k), Signal(8), Signal(2)
            b_gt = Signal(max(KH, 1))
            b_rw, b_wh, c_rw, c_wh = Signal(8), Signal(8), Signal(8), Signal(8)
            m.d.sync += [b_rw.eq(a_rw), b_wh.eq(a_wh), c_rw.eq(b_rw), c_wh.eq(b_wh)]
            m.d.sync += [b_v.eq(a_v & a_fin), b_end.eq(a_v & a_end), b_k.eq(a_k),
                         b_row.eq(a_row), b_slot.eq(a_slot),
                         b_gt.eq(Cat(*[a_score > h_scores[j] for j in range(KH)]))]
            with m.If(a_v & a_fin):
                for j in range(KH):
                    with m.If(a_k == j):
                        m.d.sync += [h_scores[j].eq(a_score), h_dirs[j].eq(a_right)]
            # S2: rank counters (rank_update); the row's directions are final here
            c_end, c_row, c_slot = Signal(), Signal(8), Signal(2)
            c_dirs = Signal(max(KH, 1))
            m.d.sync += [c_end.eq(b_end), c_row.eq(b_row), c_slot.eq(b_slot)]
            with m.If(b_end):
                m.d.sync += c_dirs.eq(Cat(*h_dirs))
            with m.If(b_v):
                m.d.sync += [h_ranks[j].eq(r)
                             for j, r in enumerate(rank_update(b_k, b_gt, h_ranks, RBH))]
            # S3: removed = rank < r_w, written with the directions
            with m.If(c_end):
                removed = Cat(*[(h_ranks[j] < c_rw) & (j < c_wh)
                                for j in range(KH)])
                m.d.comb += [hd_w.addr.eq(Cat(_bits(c_row, HB), c_slot)),
                             hd_w.data.eq(Cat(removed, c_dirs[:KH])), hd_w.en.eq(1)]
                m.d.sync += rows_ready.eq(rows_ready + 1)

        # ======================= H-MERGE ============================================
        m.submodules.tbuf = tbuf = Memory(shape=LW, depth=max(2, 1 << CB), init=[], attrs=nrw)
        t_w = tbuf.write_port()
        # (area: a beat is written 1 cycle after its issue, read >= B cycles after that
        # issue, and no read at issue meets the write of the same beat index)
        t_r = tbuf.read_port(transparent_for=() if area else (t_w,))
        row_m, slot_m = Signal(8), Signal(2)
        bank_m = bank_of(slot_m)
        # the merging frame's W and H, registered (slot_m is stable from IDLE to the row's end)
        mc = {n: Signal(b, name=f"hm_{n}") for n, b in (("w", fwd), ("h", fh))}
        m.d.sync += [mc[n].eq(slot_cfg[n][slot_m]) for n in mc]
        rm_mask, dr_mask = Signal(KH + 1), Signal(KH + 1)
        pos, col_i = Signal(8), Signal(8)
        c_m = Signal(range(max(B, 2)))
        rd_slot = Signal(S_BITS)
        m.d.comb += [hd_r_merge.addr.eq(Cat(_bits(row_m, HB), slot_m)),
                     rb_r.addr.eq(Cat(_bits(c_m, CB), rd_slot))]
        # roles of position `pos`
        podd = pos[0]
        kq = pos >> 1
        p_rem = podd & (rm_mask >> kq)[0]
        p_right = (dr_mask >> kq)[0]
        kl = (kq - 1).as_unsigned()  # candidate left of an even position
        src_l = ~podd & (pos >= 2) & (rm_mask >> kl)[0] & (dr_mask >> kl)[0]
        src_r = ~podd & (pos + 1 < mc["w"]) & (rm_mask >> kq)[0] & ~(dr_mask >> kq)[0]
        emits = ~(p_rem & p_right) & ~src_r
        issue = Signal()
        s1 = {n: Signal(name=f"hm1_{n}") for n in
              ("v", "odd", "rem", "right", "src_l", "src_r", "emit")}
        c1, col1, row1 = Signal(range(max(B, 2))), Signal(8), Signal(8)
        bank1 = Signal(1)
        m.d.sync += [s1["v"].eq(issue), s1["odd"].eq(podd), s1["rem"].eq(p_rem),
                     s1["right"].eq(p_right), s1["src_l"].eq(src_l), s1["src_r"].eq(src_r),
                     s1["emit"].eq(emits), c1.eq(c_m), col1.eq(col_i), row1.eq(row_m)]
        if NB == 2:
            m.d.sync += bank1.eq(bank_m)
        with m.FSM(name="hmerge"):
            with m.State("IDLE"):
                with m.If((rows_ready != rows_merged) & ((row_m != 0) | bank_free[bidx(slot_m)])):
                    with m.If(row_m == 0):
                        m.d.sync += bank_free[bidx(slot_m)].eq(0)
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.sync += [rm_mask.eq(hd_r_merge.data[:KH]), dr_mask.eq(hd_r_merge.data[KH:]),
                             pos.eq(0), c_m.eq(0), col_i.eq(0)]
                m.next = "RUN"
            with m.State("RUN"):
                with m.If(mg_ok):
                    m.d.comb += [issue.eq(1), occ_dec.eq(1)]
                    m.d.sync += c_m.eq(Mux(c_m == B - 1, 0, c_m + 1))
                    with m.If(c_m == B - 1):
                        m.d.sync += [rd_slot.eq(rd_slot + 1), pos.eq(pos + 1),
                                     col_i.eq(col_i + emits)]
                        with m.If(pos == mc["w"] - 1):
                            m.d.sync += [rows_merged.eq(rows_merged + 1),
                                         row_m.eq(row_m + 1)]
                            with m.If(row_m == mc["h"] - 1):
                                m.d.sync += [row_m.eq(0), slot_m.eq(slot_m + 1)]
                            m.next = "IDLE"
        # stage 1: the row buffer's output registered (T is read now, for stage 2);
        # stage 2: merge and emit
        # T: with B >= 2 it is read at issue and its output registered too (a parked
        # beat is written 2 cycles after its issue, B >= 2 cycles before it is read)
        early = B >= 2
        m.d.comb += t_r.addr.eq(_bits(c_m if early else c1, CB))
        if area:
            # H-MERGE issues every other cycle (shared keys), so the row buffer's and T's
            # outputs are read only at issue and held a second cycle: stage 1 compares the
            # magnitudes (flags registered), stage 2 picks the lanes (the merge and the
            # frame-buffer route were one 40 ns path); the merged beat reaches the key
            # front 2 cycles after its issue, on H-MERGE's (odd) cycles
            m.d.comb += [rb_r.en.eq(issue), t_r.en.eq(issue)]
            x, tv = rb_r.data, t_r.data
            t_over_x, x_over_t = mag_flags(x, tv, P, WD)
            sq = _pipe(m, True, "hm2", **s1, c=c1, col=col1, row=row1, bank=bank1,
                       tx=t_over_x, xt=x_over_t)
            even_v = Mux(sq["src_l"], pick_lanes(sq["tx"], x, tv, P, WD), x)
            odd_v = Mux(sq["rem"], pick_lanes(sq["xt"], tv, x, P, WD), x)
        else:
            sq = _pipe(m, True, "hm2", **s1, c=c1, col=col1, row=row1, bank=bank1,
                       x=rb_r.data, **({"t": t_r.data} if early else {}))
            x, tv = sq["x"], sq["t"] if early else t_r.data
            even_v = Mux(sq["src_l"], mm_lanes(x, tv, P, WD), x)
            odd_v = Mux(sq["rem"], mm_lanes(tv, x, P, WD), x)
        merged = Signal(LW)
        m.d.comb += merged.eq(Mux(sq["odd"], odd_v, even_v))
        write_t = sq["v"] & Mux(sq["odd"], sq["rem"] & sq["right"], sq["src_r"])
        m.d.comb += [t_w.addr.eq(_bits(sq["c"], CB)), t_w.data.eq(Mux(sq["odd"], x, even_v)),
                     t_w.en.eq(write_t)]
        # stage 3: the merged beat registered before the frame-buffer write and KeyFront(V)
        # (merge -> KeyFront(V)'s input register was the 101.8 MHz path); only the frame
        # buffer (read by OUT after vdone, which this beat's key precedes) sees it later.
        # Not with shared keys: H-MERGE's beats must reach the shared KeyFront on its own
        # (odd) cycles, and the iCE40 target (30 MHz) does not need the stage.
        s3 = _pipe(m, not shared, "hm3", v=sq["v"] & sq["emit"], c=sq["c"], col=sq["col"],
                   row=sq["row"], bank=sq["bank"], d=merged)
        emit1, c2, col2, row2, merged = s3["v"], s3["c"], s3["col"], s3["row"], s3["d"]
        for par in range(2):
            m.d.comb += [fb_waddr[par].eq(Cat(_bits(c2, CB), _bits(col2, WB), _bits(row2 >> 1, HH),
                                              s3["bank"][:1 if NB == 2 else 0])),
                         fb_w[par].data.eq(merged), fb_w[par].en.eq(emit1 & (row2[0] == par))]
        m.d.comb += [vfront.valid.eq(emit1), vfront.data.eq(merged), vfront.c.eq(c2),
                     vfront.tok.eq(_bits(col2, WB)), vfront.end.eq(c2 == B - 1),
                     vfront.has_prev.eq(row2 != 0)]

        # ======================= V keys and V-RANK ==================================
        n_v, col_v, slot_v = Signal(8), Signal(8), Signal(2)
        vc = cfg_of(slot_v)
        # W'-1 and H-2 of slot_v's frame, registered: a frame's first V key comes rows
        # after slot_v moved to it (slot lookup -> subtract -> compare was a 93 MHz path)
        vw1, vh2, vrh, vhh = Signal(fwd), Signal(fh), Signal(fh), Signal(fh)
        m.d.sync += [vw1.eq(vc["w"] - vc["r_w"] - 1), vh2.eq(vc["h"] - 2), vrh.eq(vc["r_h"]),
                     vhh.eq(vc["h"] >> 1)]
        v_last_n = n_v == vh2
        with m.If(vkey_v):
            m.d.sync += col_v.eq(col_v + 1)
            with m.If(col_v == vw1):
                m.d.sync += [col_v.eq(0), n_v.eq(n_v + 1)]
                with m.If(v_last_n):
                    m.d.sync += [n_v.eq(0), slot_v.eq(slot_v + 1)]
        if area:
            # serial ranker, one context per column (keys come >= B >= KV + 3 cycles apart)
            vctx = Cat(_bits(col_v, WB), bank_of(slot_v))
            m.submodules.vrank = vrk = SerialRanker(k=KV, key_bits=KW, ctx_bits=len(vctx),
                                                    tag_bits=3, attrs=nrw)
            m.d.comb += [vrk.valid.eq(vkey_v), vrk.key.eq(vkey), vrk.n.eq(n_v),
                         vrk.last.eq(v_last_n), vrk.thr.eq(vrh), vrk.ctx.eq(vctx),
                         vrk.tag.eq(Cat(col_v == vw1, slot_v))]
            m.d.comb += [vd_w.addr.eq(vrk.dec_ctx[:len(vctx)]),
                         vd_w.data.eq(Cat(vrk.dec_removed, vrk.dec_dirs)),
                         vd_w.en.eq(vrk.dec_valid)]
            with m.If(vrk.dec_valid & vrk.dec_tag[0]):
                m.d.sync += vdone[bidx(vrk.dec_tag[1:3])].eq(1)
        else:
            m.d.comb += vr_r.addr.eq(Cat(_bits(col_v, WB), bank_of(slot_v)))
            v1, key1 = Signal(), Signal(signed(KW))
            n1, vcol1, slot1, last1 = Signal(8), Signal(8), Signal(2), Signal()
            rh1, hh1v, lc1 = Signal(8), Signal(8), Signal()
            m.d.sync += [v1.eq(vkey_v), key1.eq(vkey), n1.eq(n_v), vcol1.eq(col_v),
                         slot1.eq(slot_v), last1.eq(v_last_n), rh1.eq(vrh), hh1v.eq(vhh),
                         lc1.eq(col_v == vw1)]
            # V-RANK: read-modify-write of the column's word. Stage 1: the word (memory output)
            # and the score; A: compare with the earlier scores; B: new ranks, word written.
            # Stages A and B are registered when a column's next key (at least B cycles later,
            # W' >= 1) reads after the write (B >= 3); otherwise they are one cycle, as for B < 3.
            # With shared keys (a 30 MHz iCE40 target) they are one cycle too: the two registered
            # copies of the rank word cost about 400 flip-flops.
            deep = B >= 3 and not shared
            word = vr_r.data
            off = 0
            v_scores = [word[off + j * KW: off + (j + 1) * KW].as_signed() for j in range(KV)]
            off += KV * KW
            v_ranks = [word[off + j * RBV: off + (j + 1) * RBV] for j in range(KV)]
            off += KV * RBV
            v_dirs = [word[off + j] for j in range(KV)]
            off += KV
            v_pend = word[off:off + KW].as_signed()
            vodd = n1[0]
            v_right = vodd & (key1 > v_pend)
            # n <= H-2, so "n + 2 >= H" is "n = H-2" (last1)
            sa = _pipe(m, deep, "va", v=v1, kv=(n1 >> 1)[:8], fin=vodd | last1,
                       right=v_right, score=Mux(v_right, key1, Mux(vodd, v_pend, key1)),
                       key=key1, pend=v_pend, col=vcol1, slot=slot1,
                       done=last1, rh=rh1, hh=hh1v, lc=lc1, scores=Cat(*v_scores),
                       ranks=Cat(*v_ranks),
                       dirs=Cat(*v_dirs))
            a_scores = [sa["scores"][j * KW:(j + 1) * KW].as_signed() for j in range(KV)]
            sb = _pipe(m, deep, "vb", **{n: sa[n] for n in sa if n != "scores"},
                       gts=Cat(*[sa["score"] > a_scores[j] for j in range(KV)]),
                       new_scores=Cat(*[Mux(sa["fin"] & (sa["kv"] == j), sa["score"], a_scores[j])
                                        for j in range(KV)]))
            b_ranks = [sb["ranks"][j * RBV:(j + 1) * RBV] for j in range(KV)]
            v_new_ranks = rank_update(sb["kv"], sb["gts"], b_ranks, RBV)
            new_ranks = [Mux(sb["fin"], v_new_ranks[j], b_ranks[j]) for j in range(KV)]
            new_dirs = [Mux(sb["fin"] & (sb["kv"] == j), sb["right"], sb["dirs"][j])
                        for j in range(KV)]
            new_pend = Mux(sb["fin"], sb["pend"], sb["key"])
            m.d.comb += [vr_w.addr.eq(Cat(_bits(sb["col"], WB), bank_of(sb["slot"]))),
                         vr_w.data.eq(Cat(sb["new_scores"], *new_ranks, *new_dirs, new_pend)),
                         vr_w.en.eq(sb["v"])]
            # stage D (after the loop): the column's decision into vdec
            d_v, d_col, d_slot = Signal(), Signal(8), Signal(2)
            d_ranks, d_dirs = Signal(KV * RBV), Signal(KV)
            d_rh, d_hh, d_lc = Signal(8), Signal(8), Signal()
            m.d.sync += [d_v.eq(sb["v"] & sb["done"]), d_col.eq(sb["col"]), d_slot.eq(sb["slot"]),
                         d_ranks.eq(Cat(*new_ranks)), d_dirs.eq(Cat(*new_dirs)), d_rh.eq(sb["rh"]),
                         d_hh.eq(sb["hh"]), d_lc.eq(sb["lc"])]
            v_removed = Cat(*[(d_ranks[j * RBV:(j + 1) * RBV] < d_rh) & (j < d_hh)
                              for j in range(KV)])
            m.d.comb += [vd_w.addr.eq(Cat(_bits(d_col, WB), bank_of(d_slot))),
                         vd_w.data.eq(Cat(v_removed, d_dirs)), vd_w.en.eq(d_v)]
            with m.If(d_v & d_lc):
                m.d.sync += vdone[bidx(d_slot)].eq(1)

        # ======================= OUT ================================================
        slot_o = Signal(2)
        bank_o = bank_of(slot_o)
        oc = cfg_of(slot_o)
        # the output grid's H', W', registered (slot_o changes a cycle before OUT can start)
        h2, w2 = Signal(fh), Signal(fwd)
        m.d.sync += [h2.eq(oc["h"] - oc["r_h"]), w2.eq(oc["w"] - oc["r_w"])]
        # likewise H-1, W-1, prefix-1 and prefix = 0 (no slot lookup before a compare)
        h1o, w1o, p1o, p0o = Signal(fh), Signal(fwd), Signal(8), Signal()
        m.d.sync += [h1o.eq(oc["h"] - 1), w1o.eq(oc["w"] - 1), p1o.eq(oc["prefix"] - 1),
                     p0o.eq(oc["prefix"] == 0)]
        tok_start, map_start = Signal(), Signal()
        tok_done, map_done = Signal(), Signal()
        with m.FSM(name="out_fsm"):
            with m.State("WAIT"):
                with m.If(vdone[bidx(slot_o)]):
                    m.d.sync += vdone[bidx(slot_o)].eq(0)
                    with m.If(slot_err[slot_o]):
                        m.next = "REL"
                    with m.Else():
                        m.d.comb += [tok_start.eq(1), map_start.eq(1)]
                        m.next = "RUN"
            with m.State("RUN"):
                with m.If(tok_done & map_done):
                    m.next = "REL"
            with m.State("REL"):
                m.d.sync += [bank_free[bidx(slot_o)].eq(1), slot_o.eq(slot_o + 1)]
                m.d.comb += in_flight_dec.eq(1)
                m.next = "WAIT"

        self._out_tokens(m, locals())
        self._out_map(m, locals())
        if self.has_unmerge:
            from .unmerge import Unmerge

            m.submodules.unmerge = um = Unmerge(h_max=self.h_max, w_max=self.w_max,
                                                lanes=P, width=WD, beats=B)
            for name in ("um_cfg", "um_i", "um_map"):
                port, inner = getattr(self, name), getattr(um, name[3:])
                m.d.comb += [inner.payload.eq(port.payload), inner.valid.eq(port.valid),
                             port.ready.eq(inner.ready)]
            m.d.comb += [self.um_o.payload.eq(um.o.payload), self.um_o.valid.eq(um.o.valid),
                         um.o.ready.eq(self.um_o.ready)]
        return m

    # ------------------------------------------------------------------------------
    def _out_tokens(self, m, env):
        """Prefix tokens, then the merged grid, into the ``o`` FIFO."""
        P, WD, B, LW, CB = env["P"], env["WD"], env["B"], env["LW"], env["CB"]
        KV, WB, HH, PB, NB = env["KV"], env["WB"], env["HH"], env["PB"], env["NB"]
        h2, w2, slot_o, bank_o = env["h2"], env["w2"], env["slot_o"], env["bank_o"]
        h1o, p1o, p0o = env["h1o"], env["p1o"], env["p0o"]
        fb_r, vd_r, fb_raddr = env["fb_r"], env["vd_r_tok"], env["fb_raddr"]
        depth = FIFO_DEPTH
        m.submodules.o_fifo = ofifo = StreamFIFO(token_layout(WD, P), depth)
        m.d.comb += [self.o.payload.eq(ofifo.o.payload), self.o.valid.eq(ofifo.o.valid),
                     ofifo.o.ready.eq(self.o.ready)]
        area, nrw = self.area, env["nrw"]
        m.submodules.ptr = ptrmem = Memory(shape=8, depth=1 << WB, init=[], attrs=nrw)
        ptr_w, ptr_r = ptrmem.write_port(), ptrmem.read_port()
        m.submodules.tbuf_o = tbo = Memory(shape=LW, depth=max(2, 1 << env["CB"]), init=[],
                                           attrs=nrw)
        to_w = tbo.write_port()
        to_r = tbo.read_port(transparent_for=() if area else (to_w,))

        # descriptor: one token (prefix p, or grid row e / column col with its sources)
        D = ("pre", "p", "e", "col", "hl", "hr", "last")
        nxt = {n: Signal(8, name=f"nxt_{n}") for n in D}
        nxt_v = Signal()
        pp, io, jo = Signal(5), Signal(8), Signal(8)
        m.d.comb += [vd_r.addr.eq(Cat(_bits(jo, WB), bank_o)), ptr_r.addr.eq(_bits(jo, WB))]
        # with B >= 3 beats a token, the read data is registered first (GREG): a
        # descriptor every 3 cycles still runs ahead of the beat engine
        dreg = B >= 3
        vd, e = vd_r.data, Mux(io == 0, 0, ptr_r.data)
        if dreg:
            vd_q, e_q = Signal(len(vd)), Signal(8)
            m.d.sync += [vd_q.eq(vd), e_q.eq(e)]
            vd, e = vd_q, e_q
        ke = e >> 1
        rmv, dv = vd[:KV], vd[KV:]
        e_even = ~e[0]
        kl = (ke - 1).as_unsigned()
        has_l = e_even & (e >= 2) & (rmv >> kl)[0] & (dv >> kl)[0]
        below_rm = e_even & (e < h1o) & (rmv >> ke)[0]
        has_r = below_rm & ~(dv >> ke)[0]
        e_next = Mux(below_rm, e + 2, e + 1)  # the column's next survivor row
        # with B >= 4, the sources are registered too (GDEC): a descriptor every 4 cycles
        # (the path ptr/vdec register -> sources -> ptr write ran at 92 MHz)
        ddec = B >= 4
        if ddec:
            dq = {n: Signal(w, name=f"dq_{n}") for n, w in (("e", 8), ("hl", 1), ("hr", 1),
                                                              ("en", 8))}
            m.d.sync += [dq["e"].eq(e), dq["hl"].eq(has_l), dq["hr"].eq(has_r),
                         dq["en"].eq(e_next)]
            e, has_l, has_r, e_next = dq["e"], dq["hl"], dq["hr"], dq["en"]
        pop = Signal()  # the beat engine takes `nxt`
        with m.If(pop):
            m.d.sync += nxt_v.eq(0)
        with m.FSM(name="tok_desc") as tfsm:
            with m.State("IDLE"):
                with m.If(env["tok_start"]):
                    m.d.sync += [pp.eq(0), io.eq(0), jo.eq(0)]
                    m.next = "PREF" if self.max_prefix else "GREAD"
            with m.State("PREF"):
                with m.If(p0o):
                    m.next = "GREAD"
                with m.Elif(~nxt_v | pop):
                    m.d.sync += [nxt_v.eq(1), nxt["pre"].eq(1), nxt["p"].eq(pp),
                                 nxt["last"].eq(0), pp.eq(pp + 1)]
                    with m.If(pp == p1o):
                        m.next = "GREAD"
            with m.State("GREAD"):
                m.next = "GREG" if dreg else "GCALC"
            if dreg:
                with m.State("GREG"):
                    m.next = "GDEC" if ddec else "GCALC"
            if ddec:
                with m.State("GDEC"):
                    m.next = "GCALC"
            with m.State("GCALC"):
                with m.If(~nxt_v | pop):
                    last_tok = (io == h2 - 1) & (jo == w2 - 1)
                    m.d.sync += [nxt_v.eq(1), nxt["pre"].eq(0), nxt["e"].eq(e),
                                 nxt["col"].eq(jo), nxt["hl"].eq(has_l), nxt["hr"].eq(has_r),
                                 nxt["last"].eq(last_tok)]
                    m.d.comb += [ptr_w.addr.eq(_bits(jo, WB)),
                                 ptr_w.data.eq(e_next), ptr_w.en.eq(1)]
                    m.d.sync += jo.eq(jo + 1)
                    with m.If(jo == w2 - 1):
                        m.d.sync += [jo.eq(0), io.eq(io + 1)]
                    m.next = "GREAD"
                    with m.If(last_tok):
                        m.next = "IDLE"

        # beat engine
        cur = {n: Signal(8, name=f"cur_{n}") for n in D}
        cur_v, pass_b = Signal(), Signal()
        cb = Signal(range(max(B, 2)))
        # used = FIFO level + beats in flight towards it, kept as one counter so that the
        # credit is a register bit, not an adder and a compare before `go` (95 MHz path)
        used = Signal(range(depth + 1))
        emit_now = cur["pre"][0] | pass_b | ~cur["hr"][0]
        credit = used < depth
        go = cur_v & (credit | ~emit_now)
        e_c = cur["e"]
        odd_row = Mux(pass_b | e_c[0], e_c >> 1, (e_c >> 1) - 1)
        bk = bank_o[:1 if NB == 2 else 0]
        cbc = Cat(_bits(cb, CB), _bits(cur["col"], WB))
        m.d.comb += [fb_raddr[0].eq(Cat(cbc, _bits(e_c >> 1, HH), bk)),
                     fb_raddr[1].eq(Cat(cbc, _bits(odd_row, HH), bk))]
        if self.max_prefix:
            m.d.comb += env["pf_r"].addr.eq(Cat(_bits(cb, CB), _bits(cur["p"], PB), slot_o))
        b1 = {n: Signal(name=f"ob1_{n}") for n in
              ("v", "pre", "passb", "eodd", "hl", "emit", "lt", "last")}
        cb1 = Signal(range(max(B, 2)))
        last_beat = cb == B - 1
        m.d.sync += [b1["v"].eq(go), b1["pre"].eq(cur["pre"][0]), b1["passb"].eq(pass_b),
                     b1["eodd"].eq(e_c[0]), b1["hl"].eq(cur["hl"][0]), b1["emit"].eq(emit_now),
                     b1["lt"].eq(last_beat),
                     b1["last"].eq(last_beat & cur["last"][0] & (pass_b | ~cur["hr"][0])),
                     cb1.eq(cb)]
        load_next = Signal()
        with m.If(go):
            m.d.sync += cb.eq(Mux(last_beat, 0, cb + 1))
            with m.If(last_beat):
                with m.If(~cur["pre"][0] & ~pass_b & cur["hr"][0]):
                    m.d.sync += pass_b.eq(1)
                with m.Else():
                    m.d.comb += load_next.eq(1)
        with m.If(~cur_v | load_next):
            m.d.comb += pop.eq(nxt_v)
            m.d.sync += [cur_v.eq(nxt_v), pass_b.eq(0), cb.eq(0)]
            m.d.sync += [cur[n].eq(nxt[n]) for n in D]
        # stage 1: the memories' outputs registered (T is read now, for stage 2);
        # stage 2: merge
        pre_data = env["pf_r"].data if self.max_prefix else Const(0, LW)
        early = B >= 2  # T read at issue, output registered (as in H-MERGE)
        m.d.comb += to_r.addr.eq(_bits(cb if early else cb1, CB))
        bq = _pipe(m, not area, "ob2", **b1, cb=cb1, ev=fb_r[0].data, od=fb_r[1].data,
                   pre_d=pre_data, **({"t": to_r.data} if early else {}))
        ev, od, tp = bq["ev"], bq["od"], bq["t"] if early else to_r.data
        dest = Mux(bq["eodd"], od, ev)
        if area:  # one merge: the second pass's first operand is T instead of dest
            # (a merge's destination is on an even row: ev, never od)
            mmv = mm_lanes(Mux(bq["passb"], tp, ev), od, P, WD)
            va = Mux(bq["hl"], mmv, dest)
            val = Mux(bq["pre"], bq["pre_d"], Mux(bq["passb"] | bq["hl"], mmv, dest))
        else:
            va = Mux(bq["hl"], mm_lanes(dest, od, P, WD), dest)
            vb = mm_lanes(tp, od, P, WD)
            val = Mux(bq["pre"], bq["pre_d"], Mux(bq["passb"], vb, va))
        m.d.comb += [to_w.addr.eq(_bits(bq["cb"], CB)), to_w.data.eq(va),
                     to_w.en.eq(bq["v"] & ~bq["emit"])]
        b2v, b2d, b2lt, b2l = Signal(), Signal(LW), Signal(), Signal()
        m.d.sync += [b2v.eq(bq["v"] & bq["emit"]), b2d.eq(val), b2lt.eq(bq["lt"]),
                     b2l.eq(bq["last"])]
        m.d.comb += [ofifo.i.valid.eq(b2v), ofifo.i.payload.data.eq(b2d),
                     ofifo.i.payload.last_token.eq(b2lt), ofifo.i.payload.last.eq(b2l)]
        m.d.sync += used.eq(used + (go & emit_now) - (ofifo.o.valid & ofifo.o.ready))
        m.d.comb += env["tok_done"].eq(tfsm.ongoing("IDLE") & ~cur_v & ~nxt_v & ~b1["v"] & ~bq["v"]
                                       & ~b2v)

    # ------------------------------------------------------------------------------
    def _out_map(self, m, env):
        """The merge map, H*W entries, concurrently with the tokens."""
        KH, KV, HB, WB = env["KH"], env["KV"], env["HB"], env["WB"]
        w2, slot_o, bank_o = env["w2"], env["slot_o"], env["bank_o"]
        h1o, w1o = env["h1o"], env["w1o"]
        hd_r, vd_r = env["hd_r_map"], env["vd_r_map"]
        depth = 4 if self.area else FIFO_DEPTH  # (area: half the flip-flops)
        m.submodules.map_fifo = mfifo = StreamFIFO(map_layout(self.h_max, self.w_max), depth)
        m.d.comb += [self.map.payload.eq(mfifo.o.payload), self.map.valid.eq(mfifo.o.valid),
                     mfifo.o.ready.eq(self.map.ready)]
        ip, jp, oidx = Signal(8), Signal(8), Signal(8)
        rm, dr = Signal(KH + 1), Signal(KH + 1)
        used = Signal(range(depth + 1))  # FIFO level + entries in flight, as for `o`
        credit = used < depth
        m.d.comb += hd_r.addr.eq(Cat(_bits(ip, HB), slot_o))
        issue = Signal()
        jodd = jp[0]
        kj = jp >> 1
        rem_h = jodd & (rm >> kj)[0]
        right = (dr >> kj)[0]
        jprime = Mux(rem_h & ~right, oidx - 1, oidx)
        m.d.comb += vd_r.addr.eq(Cat(_bits(jprime, WB), bank_o))
        s1v, s1i, s1j, s1l = Signal(), Signal(8), Signal(8), Signal()
        m.d.sync += [s1v.eq(issue), s1i.eq(ip), s1j.eq(jprime),
                     s1l.eq((ip == h1o) & (jp == w1o))]
        with m.FSM(name="map_fsm") as mfsm:
            with m.State("IDLE"):
                with m.If(env["map_start"]):
                    m.d.sync += ip.eq(0)
                    m.next = "ROWREAD"
            with m.State("ROWREAD"):
                m.next = "ROWLATCH"
            with m.State("ROWLATCH"):
                m.d.sync += [rm.eq(hd_r.data[:KH]), dr.eq(hd_r.data[KH:]), jp.eq(0),
                             oidx.eq(0)]
                m.next = "RUN"
            with m.State("RUN"):
                with m.If(credit):
                    m.d.comb += issue.eq(1)
                    m.d.sync += [jp.eq(jp + 1), oidx.eq(oidx + ~rem_h)]
                    with m.If(jp == w1o):
                        m.d.sync += ip.eq(ip + 1)
                        m.next = "ROWREAD"
                        with m.If(ip == h1o):
                            m.next = "IDLE"
        # stage 1: vertical position from the column's decision
        vd = vd_r.data
        rmv, dv = vd[:KV], vd[KV:]
        ki = (s1i >> 1)[:max(1, clog2(KV + 1))]
        low = ((Const(1, KV + 1) << ki) - 1)[:KV]
        masked = rmv & low
        rv = sum((masked[j] for j in range(1, KV)), masked[0]) if KV else Const(0)
        rem_v = s1i[0] & (rmv >> ki)[0]
        up = rem_v & ~(dv >> ki)[0]
        s2v, s2i, s2j, s2l = Signal(), Signal(8), Signal(8), Signal()
        m.d.sync += [s2v.eq(s1v), s2i.eq(s1i - rv - up), s2j.eq(s1j), s2l.eq(s1l)]
        # W' registered (constant over a frame); stage 3: i'*W' registered (a DSP with its
        # output register); stage 4: + j'
        # (i' < H_max and W' <= W_max: the product's operands are only as wide as those)
        w2r = Signal(clog2(self.w_max + 1))
        m.d.sync += w2r.eq(w2)
        i2 = s2i[:max(HB, 1)]
        if self.serial_mul:  # shift-add: no `*`, so Yosys gives it no DSP
            terms = [Mux(w2r[b], i2 << b, 0) for b in range(len(w2r))]
            prod = sum(terms[1:], terms[0])
        else:
            prod = i2 * w2r
        s3v, s3p, s3j, s3l = Signal(), Signal(16), Signal(8), Signal()
        m.d.sync += [s3v.eq(s2v), s3p.eq(prod), s3j.eq(s2j), s3l.eq(s2l)]
        s4v, s4x, s4l = Signal(), Signal(16), Signal()
        m.d.sync += [s4v.eq(s3v), s4x.eq(s3p + s3j), s4l.eq(s3l)]
        m.d.comb += [mfifo.i.valid.eq(s4v), mfifo.i.payload.index.eq(s4x),
                     mfifo.i.payload.last.eq(s4l)]
        m.d.sync += used.eq(used + issue - (mfifo.o.valid & mfifo.o.ready))
        m.d.comb += env["map_done"].eq(mfsm.ongoing("IDLE") & ~s1v & ~s2v & ~s3v & ~s4v)
