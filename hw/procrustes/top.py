"""The Procrustes array: command decoder, buffers, PE rows, weight-update and encoder units.

See ``hw/procrustes/README.md`` for the dataflow of each phase and the command set.
"""

from __future__ import annotations

import functools
import operator

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .config import Config
from .layouts import Buf, Err, Op, Reg, cmd_layout, resp_layout
from .pe_row import MODE_BWD, MODE_FWD, MODE_WGRAD, PERow, abits, sat
from .units import MULT, Prng, QuantileStep

__all__ = ["Procrustes"]

_M32 = 0xFFFFFFFF
# widths of the registers that the area configuration keeps in a block RAM
RF_WIDTHS = {Reg.LR: 16, Reg.DECAY: 17, Reg.SEED: 32, Reg.BOUND: 16, Reg.UP: 32, Reg.DN: 32}


def _cneg(v, neg):
    """``-v`` if ``neg`` else ``v``, as ``(v ^ neg...) + neg`` on ``v``'s bits: the
    inversion folds into the adder's LUTs (one LUT per bit, no multiplexer)."""
    w = len(v)
    return (v.as_unsigned() ^ neg.replicate(w)) + neg


def _round_bit(p, s: int, neg):
    """The carry of the contract's rounding into ``p >> s``, for the magnitude ``p`` of a
    product of sign ``neg``: ``rshift(±p, s) = ±((p >> s) + _round_bit(p, s, neg))``.
    Half rounds up for a positive product (``p + 2^(s-1)``) and toward zero for a
    negative one (``p + 2^(s-1) - 1``: ties go toward +inf)."""
    return p[s - 1] & (~neg | p[:s - 1].any())


def area_counter_widths(c: Config) -> dict[str, int]:
    """Widths of the top level's counters in the area configuration. A command runs only
    after its range checks pass, so each counter stays below a buffer's depth: ``cnt``
    (a load's or unload's word, ``count <= depth``), ``bi``/``bj`` (block row < GM <=
    blk_depth, block column < GK <= lanes·blk_depth), ``i0`` (a check's index, a block's
    bit, or WGRAD's n <= x_depth), ``i1``/``xb`` (WGRAD's k-tiles and their operand base,
    KT·n <= x_depth), ``i2``/``gb`` (m-tiles, MT·n <= g_depth), ``elem`` (the update's
    element index, m·k <= val_depth, and the counts NNZ and TRACKED, at most m·k)."""
    bits = int.bit_length
    return {
        "cnt": bits(max(c.val_depth, c.x_depth, c.g_depth, c.y_depth, 2 * c.rows)),
        "bi": bits(c.blk_depth), "bj": bits(c.lanes * c.blk_depth),
        "i0": bits(max(5, c.nb, c.x_depth)), "i1": bits(c.x_depth), "i2": bits(c.g_depth),
        "xb": bits(c.x_depth), "gb": bits(c.g_depth), "elem": bits(c.val_depth),
    }


def area_field_limits(c: Config) -> dict[str, int]:
    """For each command field, the largest value that passes some single range check of
    the top level's ``CHECK`` (``arg`` as a value base or a PE row). The area
    configuration latches a larger field as ``2^w - 1``, ``w`` the width of ``limit +
    1``: every check is monotonic in each field and fails above its own limit, so the
    saturated value fails the same checks (the first failing one is the same) and every
    accepted command is unchanged, while the command register, the derived dimensions and
    the checks' arithmetic are ``w`` bits wide instead of 16 (32 for ``arg``)."""
    R, C, L = c.rows, c.cols, c.lanes
    depth = max(c.val_depth, c.x_depth, c.g_depth, c.y_depth, 2 * R)
    return {
        # GM·GKL <= blk_depth, BWD m·NT <= x_depth, WGRAD MT·n <= g_depth, MT·KT <=
        # y_depth, UPDATE m·k + arg <= val_depth
        "m": max(c.bm * c.blk_depth, c.x_depth, R * max(c.g_depth, c.y_depth), c.val_depth),
        # GM·GKL <= blk_depth, FWD k·NT <= x_depth, WGRAD KT·n <= x_depth, MT·KT <=
        # y_depth, UPDATE
        "k": max(c.bk * L * c.blk_depth, C * max(c.x_depth, c.y_depth), c.val_depth),
        # FWD/BWD ·NT <= x_depth, WGRAD MT·n <= g_depth, KT·n <= x_depth
        "n": max(C * c.x_depth, c.g_depth),
        "count": depth,  # count + addr <= depth of the buffer
        "addr": max(c.blk_depth, depth),
        "arg": max(c.val_depth, R),  # arg + 1 <= val_depth, arg + m·k <= val_depth, arg < R
    }


def _saturate(v, limit: int):
    """``v`` if it is at most ``2^w - 1`` (``w`` the width of ``limit + 1``), else that
    value, as ``w`` bits."""
    w = (limit + 1).bit_length()
    if w >= len(v):
        return v
    return Mux(v[w:].any(), (1 << w) - 1, v[:w])


class Procrustes(wiring.Component):
    """The accelerator top level.

    Ports: ``cmd`` (stream of :func:`~.layouts.cmd_layout`), ``din`` / ``dout`` (data
    words of ``cfg.word_bits``), ``resp`` (stream of :func:`~.layouts.resp_layout`, one
    beat per command) and ``busy``.
    """

    def __init__(self, cfg: Config | None = None, **params):
        self.cfg = cfg if cfg is not None else Config(**params)
        c = self.cfg
        super().__init__({
            "cmd": In(stream.Signature(cmd_layout())),
            "din": In(stream.Signature(c.word_bits)),
            "dout": Out(stream.Signature(c.word_bits)),
            "resp": Out(stream.Signature(resp_layout())),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        c = self.cfg
        m = Module()
        R, C, L, D, NB, PB = c.rows, c.cols, c.lanes, c.data_bits, c.nb, c.ptr_bits
        def lane_of(v):
            return v[:c.log_lanes] if L > 1 else Const(0, 1)

        rows = []
        for r in range(R):
            pr = PERow(c, r)
            m.submodules[f"row{r}"] = pr
            rows.append(pr)
        row0 = rows[0]

        m.submodules.gbuf = gbuf = Memory(shape=R * D, depth=c.g_depth, init=[])
        grd, gwr = gbuf.read_port(), gbuf.write_port()
        g_r = Signal(R * D)  # grd.data, registered (see the weight-gradient sequencer)

        # Counter widths: 16 and 32 bits in the default configuration; the area
        # configuration (an iCE40, where every flip-flop is a logic cell) sizes them from
        # the buffers, as far as a command that passed the range checks can take them
        # (area_counter_widths)
        aw = area_counter_widths(c) if c.area else None
        CW, BIW, BJW, I0W, I1W, I2W, XW, GW, UW, NW = (
            (aw["cnt"], aw["bi"], aw["bj"], aw["i0"], aw["i1"], aw["i2"], aw["xb"], aw["gb"],
             aw["elem"], aw["elem"]) if c.area else (32, 16, 16, 16, 16, 16, 16, 16, 16, 32))
        BRW, YRW = (abits(c.blk_depth), abits(c.y_depth)) if c.area else (16, 16)
        UIW = aw["elem"] if c.area else 32

        # ---- registers ---------------------------------------------------------------
        cmd = Signal(cmd_layout())
        regs = {Reg.LR: Signal(16), Reg.DECAY: Signal(17), Reg.SEED: Signal(32),
                Reg.BOUND: Signal(16), Reg.UP: Signal(32), Reg.DN: Signal(32),
                Reg.THETA: Signal(32, init=0), Reg.CYCLES: Signal(32), Reg.NNZ: Signal(NW),
                Reg.TRACKED: Signal(NW)}
        rf = rf_w = None
        if c.area:
            # the update's constants (LR, DECAY, SEED, BOUND, UP, DN) in a block RAM
            # instead of 145 flip-flops: SET writes it, GET and the serial update read it
            # (the update's steps address the constant they need a cycle ahead, and SEED
            # otherwise); THETA, which the update writes, stays a register
            for r_ in RF_WIDTHS:
                del regs[r_]
            m.submodules.regfile = rfm = Memory(shape=32, depth=8, init=[])
            rf, rf_w = rfm.read_port(), rfm.write_port()
            m.d.comb += rf.addr.eq(Mux(cmd.op == Op.UPDATE, Reg.SEED, cmd.sel[:3]))
        # schedule table: word 2r + h = range h of PE row r, (row, tile, jobs) 16 bits each
        sched = [Signal(48, name=f"sched{i >> 1}_{i & 1}") for i in range(2 * R)]
        err = Signal(4)
        sched_bad = Signal()
        cyc = Signal(32)
        value = Signal(32)

        # derived dimensions (latched in DECODE)
        GM, GK, GKL, NT, KT, MT = (Signal(16, name=n) for n in
                                   ("GM", "GK", "GKL", "NT", "KT", "MT"))
        if c.area:
            # a dimension divided by one is the command's field (or GK) itself: no copy
            for dim, div, same in ((GM, c.bm, cmd.m), (GK, c.bk, cmd.k), (GKL, L, GK),
                                   (NT, C, cmd.n), (KT, C, cmd.k), (MT, R, cmd.m)):
                if div == 1:
                    m.d.comb += dim.eq(same)

        # shared multipliers, only for one-time set-up products: operands registered when
        # a state sets them, product registered, read two cycles later
        # (without a reset in the area configuration: Yosys then folds the operand and
        # product registers into the iCE40's SB_MAC16, which has no synchronous reset)
        nr = bool(c.area)
        ma, mb = Signal(16, reset_less=nr), Signal(16, reset_less=nr)
        mul1 = Signal(32, reset_less=nr)
        na, nb2 = Signal(16, reset_less=nr), Signal(16, reset_less=nr)
        mul2 = Signal(32, reset_less=nr)
        if c.area:  # zero unless a state sets them (no enable: SB_MAC16 input registers)
            m.d.sync += [ma.eq(0), mb.eq(0)]
        m.d.sync += [mul1.eq(ma * mb), mul2.eq(na * nb2)]
        # block-store row bases kept by counting, not by multiplying: brow = bi·GKL (loads,
        # unloads, encoder), ubrow = (um >> log_bm)·GKL and yrow = (um >> log_rows)·KT
        # (update, um counting down), ebase = ((bi·bm) >> log_rows)·KT (encoder)
        brow, ubrow, yrow, ebase = (Signal(w, name=n) for w, n in
                                    ((BRW, "brow"), (BRW, "ubrow"), (YRW, "yrow"),
                                     (YRW, "ebase")))

        # the range checks' own multiplier, pipelined: operands registered (issue), product
        # registered, then compared; a check issued at cycle t is decided at t + 2
        ck_a, ck_b, ck_add, ck_lim = Signal(16), Signal(16), Signal(32), Signal(32)
        ck_v, ck_v2, ck_p = Signal(), Signal(), Signal(32)
        # every limit is below 2^LW: a product that reaches it is out of range
        LW = max(c.blk_depth, c.val_depth, c.x_depth, c.g_depth, c.y_depth,
                 2 * R).bit_length()
        if not c.area:
            # "a·b + add <= lim" as "add <= lim and a·b <= lim - add": the subtraction runs
            # beside the product (t + 1), so the decision at t + 2 is one LW-bit compare
            # (the add and compare in series set the 8x8 ECP5 critical path, 13.88 ns)
            ck_neg, ck_rem = Signal(), Signal(LW)
            m.d.sync += [ck_v.eq(0), ck_v2.eq(ck_v), ck_p.eq(ck_a * ck_b),
                         ck_neg.eq(ck_add > ck_lim), ck_rem.eq(ck_lim - ck_add)]
        else:
            # the area configuration's checks run on the first set-up multiplier (ma·mb,
            # the same timing: operands registered at issue, product two cycles later),
            # which the serial update shares too; the command states never overlap
            ck_add2, ck_lim2 = Signal(32), Signal(32)
            m.d.sync += [ck_v.eq(0), ck_v2.eq(ck_v), ck_add2.eq(ck_add), ck_lim2.eq(ck_lim)]
            ck_a, ck_b, ck_p = ma, mb, mul1
        ck_bad = Signal()
        if not c.area:
            m.d.comb += ck_bad.eq(ck_v2 & (ck_neg | ck_p[LW:].any() | (ck_p[:LW] > ck_rem)))
        else:
            # the sum is formed on LW bits (the additions are saturated fields)
            m.d.comb += ck_bad.eq(ck_v2 & (ck_p[LW:].any()
                                           | ((ck_p[:LW] + ck_add2) > ck_lim2)))

        running = Signal()  # PE rows own their memories' read ports
        running_r = None
        if c.area:
            ext_r = Signal(init=1)  # registered: the rows' address multiplexers select on it
            m.d.sync += ext_r.eq(~running)
            m.d.comb += [r_.ext.eq(ext_r) for r_ in rows]
        else:  # each PE row registers its own copy
            m.d.comb += [r_.ext.eq(~running) for r_ in rows]
            running_r = Signal()
            m.d.sync += running_r.eq(running)

        # broadcast write buses and external read addresses (defaults: nothing written),
        # registered once here before they fan out to every PE row: a write lands, and a
        # read address reaches the memories, one cycle after the state that drives it
        bw_en, bw_addr, bw_data = Signal(L), Signal(16), Signal(c.mbw)
        vw_en, vw_addr, vw_data = Signal(), Signal(PB), Signal(D)
        xw_en, xw_addr, xw_data = Signal(), Signal(16), Signal(C * D)
        ext_baddr, ext_vaddr, ext_xaddr, y_raddr = Signal(16), Signal(PB), Signal(16), Signal(16)
        bus = [bw_en, bw_addr, bw_data, vw_en, vw_addr, vw_data, xw_en, xw_addr, xw_data,
               ext_baddr, ext_vaddr, ext_xaddr, y_raddr]
        bus_r = [Signal.like(v, name=f"{v.name}_r") for v in bus]
        m.d.sync += [r_.eq(v) for r_, v in zip(bus_r, bus)]
        (bw_en_r, bw_addr_r, bw_data_r, vw_en_r, vw_addr_r, vw_data_r, xw_en_r, xw_addr_r,
         xw_data_r, ext_baddr_r, ext_vaddr_r, ext_xaddr_r, y_raddr_r) = bus_r
        if c.area:
            # a 30 MHz iCE40 needs no register on the write buses: a load's or the
            # encoder's write lands a cycle earlier, before anything reads that memory
            # (the read addresses stay registered: every read is timed by them)
            (bw_en_r, bw_addr_r, bw_data_r, vw_en_r, vw_addr_r, vw_data_r, xw_en_r,
             xw_addr_r, xw_data_r) = bus[:9]
        for pr in rows:
            m.d.comb += [
                pr.bw_en.eq(bw_en_r), pr.bw_addr.eq(bw_addr_r), pr.bw_data.eq(bw_data_r),
                pr.vw_en.eq(vw_en_r), pr.vw_addr.eq(vw_addr_r), pr.vw_data.eq(vw_data_r),
                pr.xw_en.eq(xw_en_r), pr.xw_addr.eq(xw_addr_r), pr.xw_data.eq(xw_data_r),
                pr.ext_baddr.eq(ext_baddr_r), pr.ext_vaddr.eq(ext_vaddr_r),
                pr.ext_xaddr.eq(ext_xaddr_r), pr.y_raddr.eq(y_raddr_r),
            ]
        if c.area:
            ydata = Array([pr.ydata for pr in rows])
            ywd = None
        else:
            # Result words never cross to the top level whole: each row registers the
            # pick (row selected, lane) one cycle ahead of its registered result word and
            # offers that lane alone (zero if not picked); the top level ORs the rows'
            # lanes (D bits, not an 8:1 multiplexer of C·D-bit words). The update (pick
            # at P2, lane at P3), the encoder (EN2, EN3) and the unload (one lane a cycle)
            # never overlap. Writes into the result banks (a Y load word, the update's
            # W') go out on one registered bus shared by the rows; only the enables are
            # per row.
            ydata = None
            pick, pick_row = Signal(), Signal(max(1, c.log_rows))
            pick_lane = Signal(max(1, c.log_cols))
            for r, pr in enumerate(rows):
                m.d.comb += [pr.y_pick.eq(pick & (pick_row == r)), pr.y_pick_lane.eq(pick_lane)]
            ylane = Signal(D)
            m.d.comb += ylane.eq(functools.reduce(operator.or_, [pr.ylane for pr in rows]))
            ywd, ywd_r = Signal(C * D), Signal(C * D)
            m.d.sync += ywd_r.eq(ywd)
            for pr in rows:
                m.d.comb += pr.y_wdata.eq(ywd_r)
        # the result banks' write enables (per row) and address: the area configuration
        # drives the rows' ports (registered in the rows); the default registers them
        # here, with the data (one bus for the address)
        ywen_t, ywaddr_t = [pr.y_wen for pr in rows], [pr.y_waddr for pr in rows]
        if not c.area:
            ywen_c = [Signal(C, name=f"ywen{r}") for r in range(R)]
            ywen_r = [Signal(C, name=f"ywen{r}_r") for r in range(R)]
            ywaddr_c, ywaddr_r = Signal(16, name="ywaddr"), Signal(16, name="ywaddr_r")
            m.d.sync += [a.eq(b) for a, b in zip(ywen_r, ywen_c)] + [ywaddr_r.eq(ywaddr_c)]
            for r, pr in enumerate(rows):
                m.d.comb += [pr.y_wen.eq(ywen_r[r]), pr.y_waddr.eq(ywaddr_r)]
            ywen_t, ywaddr_t = ywen_c, [ywaddr_c] * R
        row_done = Cat(*[pr.done for pr in rows]).all()
        start = Signal()
        if not c.area:
            # the rows' done flags, ANDed and registered (a run's end is seen a cycle
            # later); the flags of the previous run are still up in the start cycle
            row_done_r = Signal()
            m.d.sync += row_done_r.eq(row_done & ~start)
            row_done = row_done_r

        # phase configuration of the PE rows (combinational from the latched command)
        op = cmd.op
        is_bwd = op == Op.BWD
        mode = Signal(2)
        # the default configuration's rows register start a cycle ahead (start_next: the
        # command decoder's step into RUNSTART or WGSTART) and take the run's mode from
        # the command (held from the decode)
        start_next = Signal()
        run_mode = Mux(op == Op.WGRAD, MODE_WGRAD, Mux(is_bwd, MODE_BWD, MODE_FWD))
        for r, pr in enumerate(rows):
            m.d.comb += [
                pr.start.eq(start if c.area else start_next),
                pr.mode.eq(mode if c.area else run_mode), pr.gshift.eq(op == Op.WGRADX),
                pr.ng.eq(Mux(is_bwd, (GM + L - 1) >> c.log_lanes, GKL)),
                pr.lim.eq(Mux(is_bwd, GM, GK)),
                pr.gkl.eq(GKL), pr.nt.eq(NT),
                pr.xstride.eq(Mux(is_bwd, cmd.m, cmd.k)),
                pr.blk_base.eq(cmd.addr), pr.val_base.eq(cmd.arg),
                pr.o0.eq(sched[2 * r][0:16]), pr.t0.eq(sched[2 * r][16:32]),
                pr.n0.eq(sched[2 * r][32:48]),
                pr.o1.eq(sched[2 * r + 1][0:16]), pr.t1.eq(sched[2 * r + 1][16:32]),
                pr.n1.eq(sched[2 * r + 1][32:48]),
                pr.g_lane.eq(g_r[r * D:(r + 1) * D].as_signed()),
            ]

        # counters shared by the sequencing states
        cnt = Signal(CW)
        bi, bj = Signal(BIW), Signal(BJW)
        i0, i1, i2 = Signal(I0W), Signal(I1W), Signal(I2W)  # generic loop counters
        xb, gb = Signal(XW), Signal(GW)

        # ---- weight-gradient sequencer outputs (registered) ------------------------
        sq_valid, sq_first, sq_end = Signal(), Signal(), Signal()
        sq_xaddr, sq_gaddr = Signal(16), Signal(16)
        m.d.sync += [sq_valid.eq(0), sq_end.eq(0)]
        # the gradient word is read one cycle ahead and registered here before it fans
        # out to the PE rows; the operand address and the element's flags follow a cycle
        # later, so both words reach the rows' multipliers together
        sq_d = Signal(data.StructLayout({"valid": 1, "first": 1, "end": 1, "xaddr": 16}))
        m.d.sync += [g_r.eq(grd.data), sq_d.valid.eq(sq_valid), sq_d.first.eq(sq_first),
                     sq_d.end.eq(sq_end), sq_d.xaddr.eq(sq_xaddr)]
        for pr in rows:
            m.d.comb += [pr.sq_valid.eq(sq_d.valid), pr.sq_first.eq(sq_d.first),
                         pr.sq_end.eq(sq_d.end), pr.sq_xaddr.eq(sq_d.xaddr)]

        # ---- update pipeline ----------------------------------------------------------
        # One element every three cycles, through stages P1..P8 (one simple step each:
        # the memories' outputs and every product are registered before they are used),
        # then the quantile step (Q1, Q2). Element issued at u (UPD, uph = 0):
        #   u+1 P1  block-store and result-bank addresses reach the memories; w0 product
        #   u+2 P2  the bank word arrives, registered
        #   u+3 P3  popcount below the bit, decay·w0; the dW word arrives, its lane
        #           registered
        #   u+4 P4  value address (to the memories at u+5); lr·dW
        #   u+6 P6  the value arrives, registered
        #   u+7 P7  w1 = sat(W - step)
        #   u+8 P8  score |w1 - dw0| into the quantile step; done at u+10 (Q2)
        m.submodules.prng = prng = Prng()
        if not c.area:
            m.submodules.qstep = qstep = QuantileStep(D + 2)
        u_issue = Signal()
        um, uk = Signal(UW), Signal(UW)
        uidx = Signal(UIW)
        hx = Signal(32)  # uidx·MULT mod 2^32, stepped down by MULT per element
        if not c.area:
            uph = Signal(2)  # issue phase in UPD (0: issue)
        else:
            uph = Signal(range(c.update_ii))
        if not c.area:
            ulay = data.StructLayout({
                "valid": 1, "t": max(1, (NB - 1).bit_length()), "bank": max(1, c.log_lanes),
                "ybank": max(1, c.log_rows), "lane": max(1, c.log_cols), "yaddr": 16, "u": 32,
                "bmask": NB, "bptr": PB, "popc": NB.bit_length(), "set": 1, "dw": signed(D),
                "w0": signed(D + 1), "step": signed(D + 1), "dw0": signed(D + 1),
                "wold": signed(D), "w1": signed(D)})
            P = [None] + [Signal(ulay, name=f"P{k}") for k in range(1, 9)]
            m.d.sync += P[1].valid.eq(0)
            for k in range(1, 8):
                m.d.sync += P[k + 1].eq(P[k])

            # issue: addresses of W[m, k] (block store) and dW[m, k] (result bank m mod R)
            u_bi, u_bj = um >> c.log_bm, uk >> c.log_bk
            with m.If(u_issue):
                m.d.comb += [
                    ext_baddr.eq(cmd.addr + ubrow + (u_bj >> c.log_lanes)),
                    y_raddr.eq(yrow + (uk >> c.log_cols)),
                ]
                m.d.sync += [
                    P[1].valid.eq(1),
                    P[1].t.eq(((um & (c.bm - 1)) << c.log_bk) | (uk & (c.bk - 1))),
                    P[1].bank.eq((u_bi + u_bj) & (L - 1)),
                    P[1].ybank.eq(um & (R - 1)), P[1].lane.eq(uk & (C - 1)),
                    P[1].yaddr.eq(yrow + (uk >> c.log_cols)),
                    P[1].u.eq(prng.u),  # the PRNG runs in the issue cycle
                    hx.eq(hx - MULT),  # idx·MULT for the next (one lower) index: no multiplier
                ]
            m.d.comb += [prng.hx.eq(hx), prng.seed.eq(regs[Reg.SEED])]
            # P1: w0 = rshift(s·bound, 15), s = (u >> 16) - 2^15
            s16 = Signal(signed(17))
            m.d.comb += s16.eq(P[1].u[16:32] - 32768)
            m.d.sync += P[2].w0.eq((s16 * regs[Reg.BOUND] + (1 << 14)) >> 15)
            # P2: the bank word of W[m, k] and the dW lane, registered
            bword = Signal(c.mbw)
            with m.Switch(P[2].bank):
                for b in range(L):
                    with m.Case(b):
                        m.d.comb += bword.eq(row0.bdata[b * c.mbw:(b + 1) * c.mbw])
            m.d.sync += [P[3].bmask.eq(bword[:NB]), P[3].bptr.eq(bword[NB:])]
            # P3: popcount below the element's bit; decayed w0; the dW lane (cut from the
            # result bank's output and registered in the PE row), registered
            below = Cat(*[P[3].bmask[i] & (i < P[3].t) for i in range(NB)])
            # (the pick is set from P1, registered in the row with the word's arrival at
            # P2; the row's registered lane is here)
            with m.If(P[1].valid):
                m.d.comb += [pick.eq(1), pick_row.eq(P[1].ybank), pick_lane.eq(P[1].lane)]
            dw_lane = Signal(signed(D))
            m.d.comb += dw_lane.eq(ylane.as_signed())
            m.d.sync += [
                P[4].popc.eq(sum(below[i] for i in range(NB))),
                P[4].set.eq(P[3].bmask.bit_select(P[3].t, 1)),
                P[4].dw0.eq((regs[Reg.DECAY] * P[3].w0 + (1 << 15)) >> 16),
                P[4].dw.eq(dw_lane),
            ]
            # P4: the SGD step
            m.d.sync += P[5].step.eq((regs[Reg.LR] * P[4].dw + (1 << 15)) >> 16)
            # P4: the value address (registered on the bus, read at P5, data at P6)
            with m.If(P[4].valid):
                m.d.comb += ext_vaddr.eq(cmd.arg + P[4].bptr + P[4].popc)
            # P6: W (zero if the bit is clear), registered
            m.d.sync += P[7].wold.eq(Mux(P[6].set, row0.vdata.as_signed(), 0))
            # P7: w1 = sat(W - step)
            m.d.sync += P[8].w1.eq(sat(m, P[7].wold - P[7].step, D, "w1"))
            # P8: score, threshold (three cycles; Q1 and Q2 carry the element meanwhile),
            # write W' in place of dW
            U3 = P[8]
            diff = Signal(signed(D + 3))
            m.d.comb += [
                diff.eq(U3.w1 - U3.dw0),
                qstep.start.eq(U3.valid),
                qstep.theta.eq(regs[Reg.THETA]), qstep.up.eq(regs[Reg.UP]),
                qstep.dn.eq(regs[Reg.DN]),
                qstep.score.eq(Mux(diff < 0, -diff, diff)),
            ]
            Q1, Q2 = Signal(ulay, name="Q1"), Signal(ulay, name="Q2")
            m.d.sync += [Q1.eq(U3), Q2.eq(Q1)]
            wnew = Mux(qstep.tracked, Q2.w1, Q2.dw0)
            for r in range(R):
                with m.If(qstep.done & (Q2.ybank == r)):
                    m.d.comb += [ywen_t[r].eq(Const(1, C) << Q2.lane), ywaddr_t[r].eq(Q2.yaddr)]
            with m.If(qstep.done):
                m.d.comb += ywd.eq(Cat(*[wnew[:D]] * C))
            with m.If(qstep.done):
                m.d.sync += regs[Reg.THETA].eq(qstep.theta_next)
                with m.If(qstep.tracked):
                    m.d.sync += regs[Reg.TRACKED].eq(regs[Reg.TRACKED] + 1)
            upd_busy = Cat(*[P[k].valid for k in range(1, 9)], Q1.valid, Q2.valid).any()
        else:
            upd_busy = self._serial_update(m, rows, row0, regs, ydata, prng, u_issue, um, uk,
                                           hx, cmd, ext_baddr, y_raddr, ext_vaddr, ubrow,
                                           yrow, (ma, mb, mul1), rf)

        # ---- encoder pipeline -------------------------------------------------------
        # issue (ENC): result-bank address; EN1: at the memories; EN3: the word arrives
        # (registered in the PE row), its lane registered; EN4: the block's mask, pointer
        # and value writes
        e_issue = Signal()
        elay = data.StructLayout({
            "valid": 1, "inside": 1, "tt": max(1, (NB - 1).bit_length()), "last": 1,
            "ybank": max(1, c.log_rows), "lane": max(1, c.log_cols),
            "bank": max(1, c.log_lanes), "baddr": 16, "ev": D})
        EN1, EN2, EN3, EN4 = (Signal(elay, name=n) for n in ("EN1", "EN2", "EN3", "EN4"))
        m.d.sync += [EN1.valid.eq(0), EN2.eq(EN1), EN3.eq(EN2), EN4.eq(EN3)]
        e_m = (bi << c.log_bm) | (i0 >> c.log_bk)
        e_k = (bj << c.log_bk) | (i0 & (c.bk - 1))
        if c.bm > R:  # the block's row e_m may cross PE-row tiles: add (d >> log_rows)·KT
            dsteps = (i0 >> c.log_bk) >> c.log_rows
            eoff = sum(Mux(dsteps[b], KT << b, 0) for b in range(max(1, c.log_bm - c.log_rows)))
        else:
            eoff = 0
        with m.If(e_issue):
            m.d.comb += y_raddr.eq(ebase + eoff + (e_k >> c.log_cols))
            m.d.sync += [
                EN1.valid.eq(1), EN1.inside.eq((e_m < cmd.m) & (e_k < cmd.k)),
                EN1.tt.eq(i0), EN1.last.eq(i0 == NB - 1), EN1.ybank.eq(e_m & (R - 1)),
                EN1.lane.eq(e_k & (C - 1)), EN1.bank.eq((bi + bj) & (L - 1)),
                EN1.baddr.eq(cmd.addr + brow + (bj >> c.log_lanes)),
            ]
        if c.area:
            eword = ydata[EN3.ybank]
            with m.Switch(EN3.lane):
                for i in range(C):
                    with m.Case(i):
                        m.d.sync += EN4.ev.eq(eword[i * D:(i + 1) * D])
        else:
            with m.If(EN1.valid):
                m.d.comb += [pick.eq(1), pick_row.eq(EN1.ybank), pick_lane.eq(EN1.lane)]
            m.d.sync += EN4.ev.eq(ylane)
        ev = EN4.ev
        if c.area:
            enz = EN4.inside & (ev != 0)
        else:  # (the value's zero test a stage earlier)
            en4_nz = Signal()
            m.d.sync += en4_nz.eq(ylane != 0)
            enz = EN4.inside & en4_nz
        blkmask = Signal(NB)
        blkptr = Signal(PB + 1)
        nnz = Signal(NW)
        newmask = blkmask | (enz.as_unsigned() << EN4.tt)[:NB]
        with m.If(EN4.valid):
            with m.If(enz):
                m.d.comb += [vw_en.eq(1), vw_addr.eq(cmd.arg + nnz), vw_data.eq(ev)]
                m.d.sync += nnz.eq(nnz + 1)
            with m.If(EN4.last):
                m.d.comb += [bw_en.eq(Const(1, L) << EN4.bank), bw_addr.eq(EN4.baddr),
                             bw_data.eq(Cat(newmask, blkptr[:PB]))]
                m.d.sync += [blkmask.eq(0), blkptr.eq(nnz + enz)]
            with m.Else():
                m.d.sync += blkmask.eq(newmask)
        enc_busy = EN1.valid | EN2.valid | EN3.valid | EN4.valid

        uword, uword_r = Signal(c.word_bits), Signal(c.word_bits)
        ulane = Signal(max(1, c.log_cols))  # lane of a result word being unloaded
        unloading = Signal()
        gaddr_unload = Signal(16)

        if not c.area:  # a schedule word's load, registered (LOAD)
            sch_we, sch_idx, sch_word = Signal(), Signal(33), Signal(48)
            m.d.sync += sch_we.eq(0)
            with m.If(sch_we):
                for i in range(2 * R):
                    with m.If(sch_idx == i):
                        m.d.sync += sched[i].eq(sch_word)
            usidx = Signal(33)  # a schedule word's unload index, registered (UADDR)

        # ---- command FSM ---------------------------------------------------------------
        with m.If(~self.resp.valid):
            m.d.sync += cyc.eq(cyc + 1)
        m.d.comb += self.busy.eq(1)
        with m.FSM(name="ctl"):
            with m.State("IDLE"):
                m.d.comb += [self.cmd.ready.eq(1), self.busy.eq(0)]
                with m.If(self.cmd.valid):
                    m.d.sync += [cmd.eq(self.cmd.payload), cyc.eq(1), err.eq(0),
                                 value.eq(0)]
                    if c.area:
                        # the fields, saturated (area_field_limits); a SET (which always
                        # succeeds when its register number is known) writes its full
                        # 32-bit argument here, as nothing else needs more than the
                        # saturated one
                        pl = self.cmd.payload
                        lims = area_field_limits(c)
                        m.d.sync += [cmd[f].eq(_saturate(pl[f], lims[f]))
                                     for f in ("m", "k", "n", "count", "addr", "arg")]
                        with m.If(pl.op == Op.SET):
                            with m.Switch(pl.sel):
                                with m.Case(Reg.THETA):
                                    m.d.sync += regs[Reg.THETA].eq(pl.arg)
                                for reg in RF_WIDTHS:
                                    with m.Case(reg):
                                        m.d.comb += [rf_w.en.eq(1), rf_w.addr.eq(reg),
                                                     rf_w.data.eq(pl.arg[:RF_WIDTHS[reg]])]
                    m.next = "DECODE"
            with m.State("DECODE"):
                mm, kk, nn = cmd.m, cmd.k, cmd.n
                gk = (kk + c.bk - 1) >> c.log_bk
                for dim, div, full in (
                        (GM, c.bm, (mm + c.bm - 1) >> c.log_bm), (GK, c.bk, gk),
                        (GKL, L, (gk + L - 1) >> c.log_lanes),
                        (NT, C, (nn + C - 1) >> c.log_cols),
                        (KT, C, (kk + C - 1) >> c.log_cols),
                        (MT, R, (mm + R - 1) >> c.log_rows)):
                    # (the area configuration's dimensions divided by one are the fields
                    # themselves, see above)
                    if not c.area or div > 1:
                        m.d.sync += dim.eq(full)
                m.d.sync += i0.eq(0)
                known = Signal()
                dims = Signal()  # the dimensions the operation uses are non-zero
                sel_ok = Signal()
                with m.Switch(op):
                    with m.Case(Op.NOP):
                        m.d.comb += [known.eq(1), dims.eq(1), sel_ok.eq(1)]
                    with m.Case(Op.LOAD, Op.UNLOAD):
                        m.d.comb += [known.eq(1), sel_ok.eq(cmd.sel <= Buf.Y)]
                        m.d.comb += dims.eq(Mux(cmd.sel == Buf.BLOCKS, (mm != 0) & (kk != 0),
                                                cmd.count != 0))
                    with m.Case(Op.SET):
                        m.d.comb += [known.eq(1), dims.eq(1), sel_ok.eq(cmd.sel <= Reg.THETA)]
                    with m.Case(Op.GET):
                        m.d.comb += [known.eq(1), dims.eq(1), sel_ok.eq(cmd.sel <= Reg.TRACKED)]
                    with m.Case(Op.FWD, Op.BWD, Op.WGRAD, Op.WGRADX):
                        m.d.comb += [known.eq(1), sel_ok.eq(1),
                                     dims.eq((mm != 0) & (kk != 0) & (nn != 0))]
                    with m.Case(Op.UPDATE):
                        m.d.comb += [known.eq(1), sel_ok.eq(1), dims.eq((mm != 0) & (kk != 0))]
                with m.If(~known):
                    m.d.sync += err.eq(Err.BAD_OP)
                    m.next = "RESP"
                with m.Elif(~sel_ok):
                    m.d.sync += err.eq(Err.BAD_SEL)
                    m.next = "RESP"
                with m.Elif(~dims):
                    m.d.sync += err.eq(Err.RANGE)
                    m.next = "RESP"
                with m.Else():
                    m.next = "CHECK"

            with m.State("CHECK"):
                # up to three checks "a·b + add <= limit", issued one per cycle at i0 = 0..2
                # and decided two cycles later (i0 = 2..4); leaves at i0 = 5
                one = Const(1, 16)
                carg = _saturate(cmd.arg, area_field_limits(c)["arg"]) if c.area else cmd.arg
                blk = (GM, GKL, cmd.addr, c.blk_depth)
                tables = {
                    Op.FWD: [blk, (cmd.k, NT, 0, c.x_depth), (one, one, carg, c.val_depth)],
                    Op.WGRADX: [blk, (cmd.k, NT, 0, c.x_depth),
                                (one, one, carg, c.val_depth)],
                    Op.BWD: [blk, (cmd.m, NT, 0, c.x_depth), (one, one, carg, c.val_depth)],
                    Op.WGRAD: [(MT, cmd.n, 0, c.g_depth), (KT, cmd.n, 0, c.x_depth),
                               (MT, KT, 0, c.y_depth)],
                    Op.UPDATE: [blk, (cmd.m, cmd.k, carg, c.val_depth),
                                (MT, KT, 0, c.y_depth)],
                }
                per_buf = {
                    Buf.BLOCKS: blk, Buf.VALUES: (one, cmd.count, cmd.addr, c.val_depth),
                    Buf.X: (one, cmd.count, cmd.addr, c.x_depth),
                    Buf.G: (one, cmd.count, cmd.addr, c.g_depth),
                    Buf.SCHED: (one, cmd.count, cmd.addr, 2 * R),
                    Buf.Y: (one, cmd.count, cmd.addr, c.y_depth),
                }

                def emit(entry):
                    a, b, ad, li = entry
                    m.d.sync += [ck_a.eq(a), ck_b.eq(b), ck_add.eq(ad), ck_lim.eq(li),
                                 ck_v.eq(1)]

                with m.Switch(op):
                    for o_, lst in tables.items():
                        with m.Case(o_):
                            with m.Switch(i0):
                                for n_, entry in enumerate(lst):
                                    with m.Case(n_):
                                        emit(entry)
                    with m.Case(Op.LOAD, Op.UNLOAD):
                        with m.If(i0 == 0):
                            with m.Switch(cmd.sel):
                                for b_, entry in per_buf.items():
                                    with m.Case(b_):
                                        emit(entry)
                        with m.If((i0 == 1) & (cmd.sel == Buf.Y)):
                            emit((one, one, carg, R))
                # the schedule table (FWD/BWD), every PE row at once, no multiplier: a
                # non-empty range starts inside the output rows and tiles, and a PE row's
                # jobs fit its result bank
                out_rows = Mux(is_bwd, cmd.k, cmd.m)
                sbad_now = []
                for r in range(R):
                    lo, hi = sched[2 * r], sched[2 * r + 1]
                    for w in (lo, hi):
                        sbad_now.append((w[32:48] != 0) & ((w[0:16] >= out_rows)
                                                           | (w[16:32] >= NT)))
                    sbad_now.append((lo[32:48] + hi[32:48]) > c.y_depth)
                if c.area:
                    m.d.sync += sched_bad.eq(Cat(*sbad_now).any())
                else:  # (two stages: the table and the fields are held through CHECK)
                    sbad_rows = Signal(len(sbad_now))
                    m.d.sync += [sbad_rows.eq(Cat(*sbad_now)), sched_bad.eq(sbad_rows.any())]
                m.d.sync += i0.eq(i0 + 1)
                walks = (op == Op.FWD) | (op == Op.BWD) | (op == Op.WGRADX)
                with m.If(ck_bad | ((i0 == 5) & walks & sched_bad)):
                    m.d.sync += err.eq(Err.RANGE)
                    m.next = "RESP"
                with m.Elif(i0 == 5):
                    m.d.sync += [i0.eq(0), cnt.eq(0), bi.eq(0), bj.eq(0), brow.eq(0)]
                    with m.Switch(op):
                        with m.Case(Op.LOAD):
                            m.next = "LOAD"
                        with m.Case(Op.UNLOAD):
                            m.next = "UADDR"
                        with m.Case(Op.SET):
                            m.next = "SET"
                        with m.Case(Op.GET):
                            m.next = "GET"
                        with m.Case(Op.FWD, Op.BWD, Op.WGRADX):
                            if not c.area:
                                m.d.comb += start_next.eq(1)
                            m.next = "RUNSTART"
                        with m.Case(Op.WGRAD):
                            if not c.area:
                                m.d.comb += start_next.eq(1)
                            m.next = "WGSTART"
                        with m.Case(Op.UPDATE):
                            m.next = "UPDSTART"
                        with m.Default():
                            m.next = "RESP"

            with m.State("RUNSTART"):
                # (the area configuration's rows take start from here; the default's from
                # start_next, a cycle ahead)
                m.d.comb += [start.eq(1), mode.eq(Mux(is_bwd, MODE_BWD, MODE_FWD)),
                             running.eq(1)]
                m.next = "RUNWAIT"
            with m.State("RUNWAIT"):
                m.d.comb += [running.eq(1),
                             mode.eq(Mux(op == Op.WGRAD, MODE_WGRAD,
                                         Mux(is_bwd, MODE_BWD, MODE_FWD)))]
                with m.If(row_done):
                    m.next = "RESP"

            with m.State("WGSTART"):
                m.d.comb += [start.eq(1), mode.eq(MODE_WGRAD), running.eq(1)]
                m.d.sync += [i0.eq(0), i1.eq(0), i2.eq(0), xb.eq(0), gb.eq(0)]
                m.next = "WG"
            with m.State("WG"):
                # for m-tile i2, k-tile i1, n = i0: dYᵀ[n, m-tile] and Xᵀ[n, k-tile]
                m.d.comb += [mode.eq(MODE_WGRAD), running.eq(1)]
                m.d.sync += [sq_valid.eq(1), sq_first.eq(i0 == 0), sq_xaddr.eq(xb + i0),
                             sq_gaddr.eq(gb + i0)]
                m.d.sync += i0.eq(i0 + 1)
                with m.If(i0 == cmd.n - 1):
                    m.d.sync += [i0.eq(0), i1.eq(i1 + 1), xb.eq(xb + cmd.n)]
                    with m.If(i1 == KT - 1):
                        m.d.sync += [i1.eq(0), xb.eq(0), i2.eq(i2 + 1), gb.eq(gb + cmd.n)]
                        with m.If(i2 == MT - 1):
                            m.next = "WGEND"
            with m.State("WGEND"):
                m.d.comb += [mode.eq(MODE_WGRAD), running.eq(1)]
                m.d.sync += [sq_valid.eq(1), sq_first.eq(1), sq_end.eq(1)]
                m.next = "RUNWAIT"

            with m.State("LOAD"):
                m.d.comb += self.din.ready.eq(1)
                word = self.din.payload
                last = Signal()
                m.d.comb += last.eq(cnt == cmd.count - 1)
                with m.If(self.din.valid):
                    m.d.sync += cnt.eq(cnt + 1)
                    with m.Switch(cmd.sel):
                        with m.Case(Buf.BLOCKS):
                            m.d.comb += [bw_en.eq(Const(1, L) << lane_of(bi + bj)),
                                         bw_addr.eq(cmd.addr + brow + (bj >> c.log_lanes)),
                                         bw_data.eq(word[:c.mbw])]
                            m.d.comb += last.eq((bi == GM - 1) & (bj == GK - 1))
                            m.d.sync += bj.eq(bj + 1)
                            with m.If(bj == GK - 1):
                                m.d.sync += [bj.eq(0), bi.eq(bi + 1), brow.eq(brow + GKL)]
                        with m.Case(Buf.VALUES):
                            m.d.comb += [vw_en.eq(1), vw_addr.eq(cmd.addr + cnt),
                                         vw_data.eq(word[:D])]
                        with m.Case(Buf.X):
                            m.d.comb += [xw_en.eq(1), xw_addr.eq(cmd.addr + cnt),
                                         xw_data.eq(word[:C * D])]
                        with m.Case(Buf.G):
                            m.d.comb += [gwr.en.eq(1), gwr.addr.eq(cmd.addr + cnt),
                                         gwr.data.eq(word[:R * D])]
                        with m.Case(Buf.SCHED):
                            if c.area:
                                for i in range(2 * R):
                                    with m.If(cmd.addr + cnt == i):
                                        m.d.sync += sched[i].eq(word[:48])
                            else:  # written a cycle later, from registers (below)
                                m.d.sync += [sch_we.eq(1), sch_idx.eq(cmd.addr + cnt),
                                             sch_word.eq(word[:48])]
                        with m.Case(Buf.Y):
                            for r, pr in enumerate(rows):
                                with m.If(cmd.arg == r):
                                    m.d.comb += [ywen_t[r].eq((1 << C) - 1),
                                                 ywaddr_t[r].eq(cmd.addr + cnt)]
                                    if c.area:
                                        m.d.comb += pr.y_wdata.eq(word[:C * D])
                            if not c.area:
                                m.d.comb += ywd.eq(word[:C * D])
                    with m.If(last):
                        m.next = "RESP"

            # unload: the address is set in UADDR (on the registered bus in UWAIT; the
            # word, registered in the PE row for Y, is there in ULATCH), the word is
            # registered and offered in UDATA
            with m.State("UADDR"):
                m.d.comb += unloading.eq(1)
                if not c.area:
                    m.d.sync += usidx.eq(cmd.addr + cnt)
                m.next = "UWAIT"
            with m.State("UWAIT"):
                m.d.comb += unloading.eq(1)
                if not c.area:  # a result word's first lane is picked (the row registers
                    # the pick, then the lane, cut from the bank's output, in ULATCH)
                    m.d.comb += [pick.eq(cmd.sel == Buf.Y), pick_row.eq(cmd.arg),
                                 pick_lane.eq(0)]
                m.next = "UWAIT2"
            with m.State("UWAIT2"):  # the result banks' outputs are registered
                m.d.comb += unloading.eq(1)
                if not c.area:  # the second lane
                    m.d.comb += [pick.eq(cmd.sel == Buf.Y), pick_row.eq(cmd.arg),
                                 pick_lane.eq(1 % C)]
                m.next = "ULATCH"
            with m.State("ULATCH"):
                m.d.comb += unloading.eq(1)
                if c.area:
                    m.d.sync += uword_r.eq(uword)
                    m.next = "UDATA"
                else:
                    # a result word comes a lane a cycle (cols cycles), shifted in from
                    # the top so that lane 0 ends at the bottom; the lane after next is
                    # picked (the bank's address is held, so is its output)
                    with m.If(cmd.sel == Buf.Y):
                        m.d.comb += [pick.eq(1), pick_row.eq(cmd.arg), pick_lane.eq(ulane + 2)]
                        m.d.sync += [uword_r.eq(Cat(uword_r[D:C * D], ylane)),
                                     ulane.eq(ulane + 1)]
                        with m.If(ulane == C - 1):
                            m.d.sync += ulane.eq(0)
                            m.next = "UDATA"
                    with m.Else():
                        m.d.sync += uword_r.eq(uword)
                        m.next = "UDATA"
            with m.State("UDATA"):
                m.d.comb += [self.dout.valid.eq(1), self.dout.payload.eq(uword_r)]
                with m.If(self.dout.ready):
                    m.d.sync += cnt.eq(cnt + 1)
                    last = Mux(cmd.sel == Buf.BLOCKS, (bi == GM - 1) & (bj == GK - 1),
                               cnt == cmd.count - 1)
                    with m.If(cmd.sel == Buf.BLOCKS):
                        m.d.sync += bj.eq(bj + 1)
                        with m.If(bj == GK - 1):
                            m.d.sync += [bj.eq(0), bi.eq(bi + 1), brow.eq(brow + GKL)]
                    with m.If(last):
                        m.next = "RESP"
                    with m.Else():
                        m.next = "UADDR"

            with m.State("SET"):
                if not c.area:  # (the area configuration wrote it when it took the command)
                    with m.Switch(cmd.sel):
                        for reg in (Reg.LR, Reg.DECAY, Reg.SEED, Reg.BOUND, Reg.UP, Reg.DN,
                                    Reg.THETA):
                            with m.Case(reg):
                                m.d.sync += regs[reg].eq(cmd.arg)
                m.next = "RESP"
            with m.State("GET"):
                with m.Switch(cmd.sel):
                    for reg, sig in regs.items():
                        with m.Case(reg):
                            m.d.sync += value.eq(sig)
                    if rf is not None:  # addressed by cmd.sel since the command's decode
                        for reg in RF_WIDTHS:
                            with m.Case(reg):
                                m.d.sync += value.eq(rf.data)
                m.next = "RESP"

            # set-up products on the shared (registered) multipliers: the element index
            # uidx = M·K-1 (the last element is visited first), the row bases of element
            # uidx, and hx = uidx·MULT mod 2^32 = lo·MULT + (hi·MULT_lo << 16)
            with m.State("UPDSTART"):
                m.d.sync += [ma.eq(cmd.m), mb.eq(cmd.k), na.eq(GM - 1), nb2.eq(GKL),
                             um.eq(cmd.m - 1), uk.eq(cmd.k - 1), regs[Reg.TRACKED].eq(0)]
                m.next = "UPDS1"
            with m.State("UPDS1"):
                m.d.sync += [na.eq((cmd.m - 1) >> c.log_rows), nb2.eq(KT)]
                m.next = "UPDS2"
            with m.State("UPDS2"):
                idx = mul1 - 1
                m.d.sync += [uidx.eq(idx), ubrow.eq(mul2), ma.eq(idx[:16]),
                             mb.eq(MULT & 0xFFFF), na.eq(idx[:16]), nb2.eq(MULT >> 16)]
                m.next = "UPDS3"
            with m.State("UPDS3"):
                m.d.sync += [yrow.eq(mul2), ma.eq(uidx[16:32]), mb.eq(MULT & 0xFFFF)]
                m.next = "UPDS4"
            with m.State("UPDS4"):
                m.d.sync += hx.eq(mul1 + (mul2[:16] << 16))
                m.next = "UPDS5"
            with m.State("UPDS5"):
                m.d.sync += [hx.eq(hx + (mul1[:16] << 16)), uph.eq(0)]
                m.next = "UPD"
            with m.State("UPD"):
                # one element every three cycles: the quantile step's serial dependence
                m.d.sync += uph.eq(Mux(uph == c.update_ii - 1, 0, uph + 1))
                with m.If(uph == 0):
                    m.d.comb += u_issue.eq(1)
                    m.d.sync += [uidx.eq(uidx - 1), uk.eq(uk - 1)]
                    with m.If(uk == 0):
                        m.d.sync += [uk.eq(cmd.k - 1), um.eq(um - 1)]
                        with m.If((um & (c.bm - 1)) == 0):
                            m.d.sync += ubrow.eq(ubrow - GKL)
                        with m.If((um & (R - 1)) == 0):
                            m.d.sync += yrow.eq(yrow - KT)
                    with m.If(uidx == 0):
                        m.next = "UPDDRAIN"
            with m.State("UPDDRAIN"):
                m.d.sync += [bi.eq(0), bj.eq(0), i0.eq(0), nnz.eq(0), blkmask.eq(0),
                             blkptr.eq(0), brow.eq(0), ebase.eq(0)]
                with m.If(~upd_busy):
                    m.next = "ENC"
            with m.State("ENC"):
                # block order: (bi, bj), bit i0 of the block
                m.d.comb += e_issue.eq(1)
                m.d.sync += i0.eq(i0 + 1)
                with m.If(i0 == NB - 1):
                    m.d.sync += [i0.eq(0), bj.eq(bj + 1)]
                    with m.If(bj == GK - 1):
                        m.d.sync += [bj.eq(0), bi.eq(bi + 1), brow.eq(brow + GKL)]
                        if c.bm >= R:
                            m.d.sync += ebase.eq(ebase + (KT << (c.log_bm - c.log_rows)))
                        else:
                            with m.If(((bi + 1) & (R // c.bm - 1)) == 0):
                                m.d.sync += ebase.eq(ebase + KT)
                        with m.If(bi == GM - 1):
                            m.next = "ENCDRAIN"
            with m.State("ENCDRAIN"):
                with m.If(~enc_busy):
                    m.d.sync += [value.eq(nnz), regs[Reg.NNZ].eq(nnz)]
                    m.next = "RESP"

            with m.State("RESP"):
                m.d.comb += [
                    self.resp.valid.eq(1), self.resp.payload.op.eq(cmd.op),
                    self.resp.payload.err.eq(err), self.resp.payload.value.eq(value),
                    self.resp.payload.cycles.eq(cyc),
                ]
                with m.If(self.resp.ready):
                    m.d.sync += regs[Reg.CYCLES].eq(regs[Reg.CYCLES] + cyc)
                    m.next = "IDLE"
        # unload: the address is presented in UADDR and held until ULATCH (same counters)
        # every source's output registered before the multiplier (like the result banks'
        # in the PE rows): all of them are there in ULATCH
        if not c.area:
            u_b, u_v, u_x, u_g = (Signal.like(v, name=n) for v, n in (
                (row0.bdata, "u_b"), (row0.vdata, "u_v"), (row0.xdata, "u_x"),
                (grd.data, "u_g")))
            m.d.sync += [u_b.eq(row0.bdata), u_v.eq(row0.vdata), u_x.eq(row0.xdata),
                         u_g.eq(grd.data)]
        else:
            # the area configuration leaves these timing registers out: the addresses are
            # held from UADDR to ULATCH, so the memories' outputs are still valid there
            # (read one cycle after the registered address, as in UWAIT2)
            u_b, u_v, u_x, u_g = row0.bdata, row0.vdata, row0.xdata, grd.data
        with m.If(unloading):
            with m.Switch(cmd.sel):
                with m.Case(Buf.BLOCKS):
                    m.d.comb += ext_baddr.eq(cmd.addr + brow + (bj >> c.log_lanes))
                    bsel = Signal(max(1, c.log_lanes))
                    m.d.comb += bsel.eq((bi + bj) & (L - 1))
                    with m.Switch(bsel):
                        for b in range(L):
                            with m.Case(b):
                                m.d.comb += uword.eq(u_b[b * c.mbw:(b + 1) * c.mbw])
                with m.Case(Buf.VALUES):
                    m.d.comb += [ext_vaddr.eq(cmd.addr + cnt), uword.eq(u_v)]
                with m.Case(Buf.X):
                    m.d.comb += [ext_xaddr.eq(cmd.addr + cnt), uword.eq(u_x)]
                with m.Case(Buf.G):
                    m.d.comb += [gaddr_unload.eq(cmd.addr + cnt), uword.eq(u_g)]
                with m.Case(Buf.SCHED):
                    six = (cmd.addr + cnt) if c.area else usidx
                    m.d.comb += uword.eq(Array(sched)[six[:c.log_rows + 1]])
                with m.Case(Buf.Y):
                    m.d.comb += y_raddr.eq(cmd.addr + cnt)
                    if c.area:
                        m.d.comb += uword.eq(ydata[cmd.arg[:max(1, c.log_rows)]])
        # (the default configuration selects on running registered: the sequencer's
        # first address is registered too, and the unload comes long after a run)
        m.d.comb += grd.addr.eq(Mux(running if c.area else running_r, sq_gaddr, gaddr_unload))
        return m

    def _serial_update(self, m, rows, row0, regs, ydata, prng, u_issue, um, uk, hx, cmd,
                       ext_baddr, y_raddr, ext_vaddr, ubrow, yrow, mul, rf):
        """The area configuration's weight update: one element at a time, every product
        on one shared 16x16 unsigned multiplier (operands and product registered), so the
        update takes one DSP instead of twelve and no pipeline registers per stage.

        Signed products are formed from magnitudes: ``rshift(-p, s)`` is
        ``-((p + 2^(s-1) - 1) >> s)`` (the contract's ties round toward +inf), so each
        rounding is one add on the magnitude and a conditional negation. Steps of an
        element issued at ``u`` (``st[k]`` is high at ``u + k``; the memory reads are timed
        as in the pipelined update, and each address is held while its word is used, so
        no memory word is copied into a register; the constants LR ... DN come from a
        block RAM, addressed a step ahead):

        ======  ==============================================================
        u       addresses of W[m, k] and dW[m, k] (as the pipelined issue); ``u``
        u+1     multiply ``|s|·bound`` (``s = (u >> 16) - 2^15``)
        u+2     the bank word arrives (valid to u+5)
        u+3     ``|w0|``; multiply ``lr·|dW|``; popcount, bit; the dW word
                (valid to u+4)
        u+4     value address (held at u+5); multiply ``|w0|·decay[15:0]``
        u+5     ``step``
        u+6     ``dw0`` (``decay[16]`` adds ``|w0| << 16``); the value arrives
                (valid to u+7)
        u+7     ``w1 = sat(W - step)`` (W zero if the bit is clear)
        u+8     ``tracked = theta < |w1 - dw0| << 16``
        u+9..12 multiply the four 16x16 partial products of ``theta·c`` (c = up or dn)
        u+11..13 sum ``(p00 >> 16) + p01 + p10``
        u+14    the new theta (``theta ± (p11 + (mid >> 16))``), W' written, done
        ======  ==============================================================
        """
        c = self.cfg
        R, C, L, D, NB = c.rows, c.cols, c.lanes, c.data_bits, c.nb
        NS = c.update_ii
        assert NS == 15, "the step table below is 15 cycles long"
        st = Signal(NS, name="ust")  # one-hot: the element's step (bit 0 is the issue)
        m.d.comb += st[0].eq(u_issue)
        m.d.sync += st[1:].eq(st[:-1])

        # the shared multiplier (the set-up and range checks' first one, idle during the
        # elements): operands set in step k, product read in step k + 2
        am_a, am_b, am_p = mul

        E = Signal(data.StructLayout({
            "t": max(1, (NB - 1).bit_length()), "bank": max(1, c.log_lanes),
            "ybank": max(1, c.log_rows), "lane": max(1, c.log_cols), "yaddr": 16,
            "baddr": abits(c.blk_depth), "uhi": 16, "neg": 1,
            "popc": NB.bit_length(), "set": 1, "dwneg": 1, "dw0": signed(D + 1),
            "step": signed(D + 1), "w1": signed(D), "tracked": 1}),
            name="UE")
        acc = Signal(34, name="uacc")

        # step 0: issue (the addresses as in the pipelined update). The addresses are held
        # (block store to step 3, result bank to step 1, value memory steps 4-5), so the
        # memories' outputs stay valid for the steps that use them and are not copied
        # into registers: the bank word at steps 2-5, the dW word at 3-4, W at 6-7
        u_bi, u_bj = um >> c.log_bm, uk >> c.log_bk
        with m.If(st[1] | st[2] | st[3]):
            m.d.comb += ext_baddr.eq(E.baddr)
        with m.If(st[1]):
            m.d.comb += y_raddr.eq(E.yaddr)
        with m.If(st[0]):
            baddr = Signal(16, name="ubaddr")
            m.d.comb += [
                baddr.eq(cmd.addr + ubrow + (u_bj >> c.log_lanes)), ext_baddr.eq(baddr),
                y_raddr.eq(yrow + (uk >> c.log_cols)),
            ]
            m.d.sync += [
                E.baddr.eq(baddr),
                E.t.eq(((um & (c.bm - 1)) << c.log_bk) | (uk & (c.bk - 1))),
                E.bank.eq((u_bi + u_bj) & (L - 1)),
                E.ybank.eq(um & (R - 1)), E.lane.eq(uk & (C - 1)),
                E.yaddr.eq(yrow + (uk >> c.log_cols)),
                E.uhi.eq(prng.u[16:32]),
                hx.eq(hx - MULT),
            ]
        # the constants come from the block RAM ``rf`` (read one cycle after its address):
        # SEED by default, BOUND for step 1, LR for step 3, DECAY for steps 4 and 6, UP or
        # DN for steps 9..12
        with m.If(st[0]):
            m.d.comb += rf.addr.eq(Reg.BOUND)
        with m.If(st[2]):
            m.d.comb += rf.addr.eq(Reg.LR)
        with m.If(st[3] | st[5]):
            m.d.comb += rf.addr.eq(Reg.DECAY)
        m.d.comb += [prng.hx.eq(hx), prng.seed.eq(rf.data)]
        # step 1: |s|·bound; s = uhi - 2^15 is negative when uhi's MSB is clear
        with m.If(st[1]):
            neg = ~E.uhi[15]
            m.d.sync += [E.neg.eq(neg), am_b.eq(rf.data[:16]),
                         am_a.eq(_cneg(E.uhi[:15], neg))]  # 2^15 - uhi if negative
        # the bank word (steps 2-5) and the dW word's lane (steps 3-4)
        bword = Signal(c.mbw, name="ubword")
        with m.Switch(E.bank):
            for b in range(L):
                with m.Case(b):
                    m.d.comb += bword.eq(row0.bdata[b * c.mbw:(b + 1) * c.mbw])
        yword = ydata[E.ybank]
        dw_lane = Signal(signed(D), name="udw_lane")
        with m.Switch(E.lane):
            for i in range(C):
                with m.Case(i):
                    m.d.comb += dw_lane.eq(yword[i * D:(i + 1) * D].as_signed())
        # step 3: |w0| = rshift(|s|·bound, 15) on the magnitude (kept in ``uhi``, which
        # step 1 has used); lr·|dW| (|w0| goes to the multiplier from its register, a
        # step later: no path from the multiplier's output back into its input);
        # popcount below the bit
        with m.If(st[3]):
            w0mag = Signal(16, name="uw0mag")
            m.d.comb += w0mag.eq((am_p >> 15) + _round_bit(am_p, 15, E.neg))
            below = Cat(*[bword[i] & (i < E.t) for i in range(NB)])
            m.d.sync += [E.uhi.eq(w0mag),
                         am_a.eq(rf.data[:16]), am_b.eq(_cneg(dw_lane, dw_lane < 0)[:16]),
                         E.dwneg.eq(dw_lane < 0),
                         E.popc.eq(sum(below[i] for i in range(NB))),
                         E.set.eq(bword[:NB].bit_select(E.t, 1))]
        # steps 4-5: value address (data at u+6 and u+7); step 4: |w0|·decay
        with m.If(st[4] | st[5]):
            m.d.comb += ext_vaddr.eq(cmd.arg + bword[NB:] + E.popc)
        with m.If(st[4]):
            m.d.sync += [am_a.eq(E.uhi), am_b.eq(rf.data[:16])]
        # step 5: step = rshift(lr·dW, 16)
        with m.If(st[5]):
            sneg = E.dwneg
            smag = Signal(17, name="ustepmag")
            m.d.comb += smag.eq((am_p >> 16) + _round_bit(am_p, 16, sneg))
            m.d.sync += E.step.eq(_cneg(smag, sneg))
        # step 6: dw0 = rshift(decay·w0, 16), decay = decay[15:0] + decay[16]·2^16
        with m.If(st[6]):
            dmag = Signal(17, name="udw0mag")
            m.d.comb += dmag.eq((am_p >> 16) + Mux(rf.data[16], E.uhi, 0)
                                + _round_bit(am_p, 16, E.neg))
            m.d.sync += E.dw0.eq(_cneg(dmag, E.neg))
        # step 7: w1 = sat(W - step), W zero if the bit is clear
        with m.If(st[7]):
            wold = Mux(E.set, row0.vdata.as_signed(), 0)
            m.d.sync += E.w1.eq(sat(m, wold - E.step, D, "uw1"))
        # step 8: the score and the compare
        theta = regs[Reg.THETA]
        with m.If(st[8]):
            diff = Signal(signed(D + 3), name="udiff")
            score = Signal(D + 2, name="uscore")
            trk = Signal(name="utrk")
            m.d.comb += [diff.eq(E.w1 - E.dw0), score.eq(_cneg(diff, diff < 0)),
                         trk.eq(theta < (score << 16)),
                         rf.addr.eq(Mux(trk, Reg.UP, Reg.DN))]
            m.d.sync += E.tracked.eq(trk)
        with m.If(st[9] | st[10] | st[11]):
            m.d.comb += rf.addr.eq(Mux(E.tracked, Reg.UP, Reg.DN))
        # steps 9..12: theta·c as four partial products (lo·lo, lo·hi, hi·lo, hi·hi)
        cq = rf.data
        for k, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            with m.If(st[9 + k]):
                m.d.sync += [am_a.eq(theta[16 * i:16 * i + 16]),
                             am_b.eq(cq[16 * j:16 * j + 16])]
        with m.If(st[11]):
            m.d.sync += acc.eq(am_p >> 16)
        with m.If(st[12] | st[13]):
            m.d.sync += acc.eq(acc + am_p)
        # step 14: the new theta, W' in place of dW
        # theta ± hi as one adder: theta + (hi ^ ~tracked) + ~tracked (the conditional
        # negation folds into the adder's LUTs); a carry out of an increase saturates
        hi = Signal(33, name="uhi_sum")
        dn = ~E.tracked
        nsum = Signal(34, name="unsum")
        m.d.comb += [hi.eq(am_p + (acc >> 16)),
                     nsum.eq(theta + (hi ^ dn.replicate(33)) + dn)]
        wnew = Mux(E.tracked, E.w1, E.dw0)
        for r, pr in enumerate(rows):
            with m.If(st[14] & (E.ybank == r)):
                m.d.comb += [pr.y_wen.eq(Const(1, C) << E.lane), pr.y_waddr.eq(E.yaddr),
                             pr.y_wdata.eq(Cat(*[wnew[:D]] * C))]
        with m.If(st[14]):
            m.d.sync += theta.eq(Mux(E.tracked & nsum[32:].any(), _M32, nsum[:32]))
            with m.If(E.tracked):
                m.d.sync += regs[Reg.TRACKED].eq(regs[Reg.TRACKED] + 1)
        return st[1:].any()
