"""One PE row: its format walker, its ``cols`` MACs and its share of the buffers.

Dataflow (output-stationary): the row computes one output row ``o`` for one tile of
``cols`` minibatch columns at a time (a *job*). The walker streams the non-zero weights of
that output row (forward: row ``o`` of W; backward: column ``o`` of W, from the same
store), one per cycle; every PE multiplies the weight with its own lane of the operand
word ``X[j, tile]`` and accumulates. A job's result word goes to this row's result bank at
the next sequential address (jobs run output row by output row, tile by tile inside).

Pipeline:

* ``S0`` walks the PE row's two job ranges (output row, tile, group) and addresses the
  ``lanes`` mask/pointer banks; a group is ``lanes`` consecutive blocks along the walk
  (bank skew: block ``(bi, bj)`` lives in bank ``(bi + bj) mod lanes``, so the blocks of
  a group are in distinct banks whichever way the walk goes). Issue is credit-based (at
  most ``fifo_depth`` groups out), so nothing after ``S0`` stalls. A one-group walk
  issues one entry per output row for all its tiles in the range (``reps`` jobs).
* ``S1`` registers the bank words in lane order.
* ``S2`` cuts the row slice (forward) or column slice (backward) out of each block mask;
  ``S3`` (the slice and its any-bit OR registered) drops groups without a set bit and
  pushes the rest into a small FIFO with their result position. A job without any
  non-zero is dropped too: its results are never written in the run, and a result word
  below the run's last position that was not written since the start reads as zero.
* the emitter pops groups and emits one set bit per cycle (lowest first: the contract's
  order), replaying a group ``reps`` times (one tile each); it moves to the next group in
  the cycle it emits the last bit of this one.
* ``E`` computes the value address ``val_base + ptr[b] + popcount(mask[b] & ((1 << t)-1))``
  and the operand address (registered in ``A``, which reads both memories); ``D1``
  registers the memories' outputs, ``DM`` multiplies, ``D2`` accumulates with
  saturation (the default configuration registers the multipliers' operands and
  products once more: ``DM2`` and ``DP``, two more cycles). A job's first element
  restarts the accumulators and writes the previous job's result (rounded and
  saturated, through a register) at its position; an end marker flushes the last one.

In the weight-gradient mode the walker is idle and the top-level sequencer drives the
element stage directly (dense: ``dY[m, n]`` from the gradient buffer, ``Xᵀ[n, tile]``).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, fifo, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .config import Config

__all__ = ["MODE_BWD", "MODE_FWD", "MODE_WGRAD", "PERow", "round_sat", "sat"]

MODE_FWD, MODE_BWD, MODE_WGRAD = 0, 1, 2


def sat(m: Module, v, bits: int, name: str):
    """``min(max(v, -2^(bits-1)), 2^(bits-1)-1)`` as a new signed signal."""
    out = Signal(signed(bits), name=name)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    with m.If(v > hi):
        m.d.comb += out.eq(hi)
    with m.Elif(v < lo):
        m.d.comb += out.eq(lo)
    with m.Else():
        m.d.comb += out.eq(v)
    return out


def round_sat(m: Module, acc, shifts: tuple[int, int], sel, bits: int, name: str):
    """The contract's ``sat(rshift(acc, s), bits)`` for ``s = shifts[sel]`` (``rshift``:
    arithmetic, round half up), without a full-width adder.

    ``(acc + 2^(s-1)) >> s`` is ``v + r`` with ``v = acc >> s`` and ``r = acc[s-1]``; and
    ``sat(v + r)`` is ``v + r`` when ``v`` fits ``bits`` signed bits (saturated at the
    top when ``v`` is the largest value and ``r`` is set), else the bound on ``v``'s
    side. So the shift is chosen first (a multiplexer over the bits) and only a
    ``bits``-wide increment remains, with an all-equal test of the bits above.
    """
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    vs, rs, fits = [], [], []
    for s in shifts:
        v = acc.as_signed() >> s
        vb = Signal(signed(bits), name=f"{name}_v{s}")
        m.d.comb += vb.eq(v)
        vs.append(vb)
        rs.append(acc[s - 1] if s > 0 else Const(0))
        top = v[bits - 1:] if len(v) > bits else None
        fits.append(Const(1) if top is None else
                    ((top == 0) | (top == (1 << len(top)) - 1)))
    v = Signal(signed(bits), name=f"{name}_v")
    r, ok = Signal(name=f"{name}_r"), Signal(name=f"{name}_ok")
    m.d.comb += [v.eq(Mux(sel, vs[1], vs[0])), r.eq(Mux(sel, rs[1], rs[0])),
                 ok.eq(Mux(sel, fits[1], fits[0]))]
    out = Signal(signed(bits), name=name)
    with m.If(~ok):
        m.d.comb += out.eq(Mux(acc[-1], lo, hi))
    with m.Elif(r & (v == hi)):
        m.d.comb += out.eq(hi)
    with m.Else():
        m.d.comb += out.eq(v + r)
    return out


def abits(depth: int) -> int:
    """Address bits of a memory of ``depth`` words (at least one)."""
    return max(1, (depth - 1).bit_length())


def area_widths(c: Config) -> tuple[int, int, int, int, int]:
    """Widths of the walk's counters in the area configuration, from the top level's
    range checks (a run starts only if they pass): ``(OW, TW, JW, GW, LW)`` hold an output
    row up to the rows of the weight (``GM·GKL <= blk_depth``: ``m <= bm·blk_depth``,
    ``k <= bk·lanes·blk_depth``), a tile up to ``NT <= x_depth``, a job count up to
    ``y_depth``, a group up to ``blk_depth`` and a block row/column count up to
    ``lanes·blk_depth``."""
    return ((max(c.bm, c.bk * c.lanes) * c.blk_depth).bit_length(), c.x_depth.bit_length(),
            c.y_depth.bit_length(), c.blk_depth.bit_length(),
            (c.lanes * c.blk_depth).bit_length())


def entry_layout(c: Config) -> data.StructLayout:
    """A group in the walker FIFO (operand addresses and result positions are only as
    wide as their memories' addresses; ``reps`` counts up to ``y_depth`` jobs)."""
    xb, yb = abits(c.x_depth), abits(c.y_depth)
    if c.area:  # the area configuration carries opbase + xbase as one field (opbase)
        return data.StructLayout({
            "bits": c.lanes * c.slice_bits, "masks": c.lanes * c.nb,
            "ptrs": c.lanes * c.ptr_bits, "sub": 3, "opbase": xb, "first": 1, "null": 1,
            "end": 1, "pos": yb, "reps": yb + 1})
    return data.StructLayout({
        "bits": c.lanes * c.slice_bits,
        "masks": c.lanes * c.nb,
        "ptrs": c.lanes * c.ptr_bits,
        "sub": 3,
        "opbase": xb,
        "xbase": xb,
        "first": 1,
        "null": 1,
        "end": 1,
        "pos": yb,
        "reps": yb + 1,
    })


class PERow(wiring.Component):
    """PE row ``index`` of an array of configuration ``cfg``.

    Owns its replica of the mask/pointer banks, the value memory and the operand buffer
    (every replica is written by the same broadcast load), and its result bank.
    """

    def __init__(self, cfg: Config, index: int = 0):
        self.cfg = c = cfg
        self.index = index
        D, C, L = c.data_bits, c.cols, c.lanes
        super().__init__({
            # run control and phase configuration (held stable during a run). The default
            # configuration registers ``start`` and ``ext`` here (the top level drives
            # them a cycle ahead) and ``mode`` is the run's mode, held from the decode
            "start": In(1),
            "mode": In(2),
            "gshift": In(1),  # FWD walk with the weight gradient's rounding (WGRADX)
            "ng": In(16),
            "lim": In(16),
            "gkl": In(16),
            "nt": In(16),
            "xstride": In(16),
            "blk_base": In(16),
            "val_base": In(c.ptr_bits),
            # schedule: two job ranges, each (first row, first tile, jobs)
            "o0": In(16), "t0": In(16), "n0": In(16),
            "o1": In(16), "t1": In(16), "n1": In(16),
            "done": Out(1),
            # dense weight-gradient elements from the top-level sequencer
            "sq_valid": In(1), "sq_first": In(1), "sq_end": In(1),
            "sq_xaddr": In(16),
            "g_lane": In(signed(D)),
            # broadcast writes (loads and the encoder)
            "bw_en": In(L), "bw_addr": In(16), "bw_data": In(c.mbw),
            "vw_en": In(1), "vw_addr": In(c.ptr_bits), "vw_data": In(D),
            "xw_en": In(1), "xw_addr": In(16), "xw_data": In(C * D),
            # external reads (unload, update, encoder) while not running
            "ext": In(1),
            "ext_baddr": In(16), "bdata": Out(L * c.mbw),
            "ext_vaddr": In(c.ptr_bits), "vdata": Out(D),
            "ext_xaddr": In(16), "xdata": Out(C * D),
            "y_raddr": In(16),
            "y_wen": In(C), "y_waddr": In(16), "y_wdata": In(C * D),
        } | ({"ydata": Out(C * D)} if c.area else {
            # one lane of the result word, registered, zero unless this row is picked:
            # the top level ORs the rows' lanes (the update, the encoder and the unload
            # take D bits from each row, not the whole word); the pick comes a cycle
            # ahead of the word (registered here), the lane is cut from the bank's output
            "y_pick": In(1), "y_pick_lane": In(max(1, (C - 1).bit_length())),
            "ylane": Out(D),
        }))

    def elaborate(self, platform):
        c = self.cfg
        m = Module()
        D, A_, C, L, S, NB, PB = (c.data_bits, c.acc_bits, c.cols, c.lanes, c.slice_bits,
                                 c.nb, c.ptr_bits)
        # address widths: block banks, operand buffer, result bank (address arithmetic
        # wraps like the memories' ports); job counts reach y_depth (one more bit)
        BB, XB, YB = abits(c.blk_depth), abits(c.x_depth), abits(c.y_depth)
        # The phase configuration is held stable by the top level from before ``start``
        # to the end of the run: registered copies keep its decoding (and the wires
        # from the top level) off the walker's paths. ``mode`` is used through its copy
        # from the cycle after ``start`` on. The area configuration (a 30 MHz iCE40, where
        # every flip-flop is a logic cell) uses the held values directly, and its walk
        # counters are only as wide as the top level's range checks let them grow
        # (``area_widths``); the default configuration keeps 16 bits.
        OW, TW, JW, GW, LW = area_widths(c) if c.area else (16,) * 5
        # The default configuration keeps every row's copy of the broadcast configuration
        # (``keep``: Yosys would merge the rows' identical registers into one that drives
        # the whole die), and registers ``start``, ``ext`` and the run's mode here.
        kp = {} if c.area else {"keep": 1}
        mode_r = Signal(2, attrs=kp)
        ng_m1, nt_m1, lim = (Signal(w, name=n, attrs=kp) for w, n in
                             ((GW, "ng_m1"), (TW, "nt_m1"), (LW, "lim_r")))
        gkl = Signal(BB, name="gkl_r", attrs=kp)
        blk_base = Signal(BB, name="blk_base_r", attrs=kp)
        xstride = Signal(XB, name="xstride_r", attrs=kp)
        val_base = Signal(c.ptr_bits, attrs=kp)
        o0, t0, n0 = Signal(OW), Signal(TW), Signal(JW)
        o1, t1, n1 = Signal(OW), Signal(TW), Signal(JW)
        nt_r = Signal(TW, attrs=kp)
        if c.area:
            has1, one_group, gshift = Signal(), Signal(), Signal()
        else:
            has1, one_group, gshift = (Signal(name=n, attrs=kp)
                                       for n in ("has1", "one_group", "gshift"))
        if c.area:
            start, ext, mode_in = self.start, self.ext, self.mode
            m.d.sync += mode_r.eq(self.mode)
        else:
            # start and ext arrive a cycle ahead; the mode is the run's, taken at start
            # (and held after the run: nothing reads it then)
            start = Signal(name="start_r", attrs=kp)
            ext = Signal(name="ext_r", init=1, attrs=kp)
            mode_in = Signal(2, name="mode_in", attrs=kp)
            m.d.sync += [start.eq(self.start), ext.eq(self.ext), mode_in.eq(self.mode)]
            with m.If(start):
                m.d.sync += mode_r.eq(mode_in)
        cfg_dom = m.d.comb if c.area else m.d.sync
        cfg_dom += [
            ng_m1.eq(self.ng - 1), nt_m1.eq(self.nt - 1),
            nt_r.eq(self.nt),
            lim.eq(self.lim), gkl.eq(self.gkl), xstride.eq(self.xstride),
            blk_base.eq(self.blk_base), val_base.eq(self.val_base),
            o0.eq(self.o0), t0.eq(self.t0), n0.eq(self.n0),
            o1.eq(self.o1), t1.eq(self.t1), n1.eq(self.n1),
        ]
        # (registered in both: they decide the walk's start, one step after the top
        # level's state decoding)
        m.d.sync += [has1.eq(self.n1 != 0), one_group.eq(self.ng == 1)]
        if c.area:
            has0 = Signal()
            m.d.sync += has0.eq(self.n0 != 0)
        else:
            has0 = Signal(attrs=kp)
            m.d.sync += has0.eq(n0 != 0)
        # the rounding is taken at the start and held: the last result of a walk is
        # written after ``done`` (see D2), when the top level may hold the next command
        # the result word's rounding (WGRAD and WGRADX), registered in the default
        # configuration: it selects in every lane's rounding
        wg_round = None if c.area else Signal(attrs=kp)
        with m.If(start):
            m.d.sync += gshift.eq(self.gshift)
            if not c.area:
                m.d.sync += wg_round.eq((mode_in == MODE_WGRAD) | self.gshift)
        mode_bwd = mode_r == MODE_BWD
        wgrad = mode_r == MODE_WGRAD

        # ---- memories -------------------------------------------------------------
        banks = []
        for b in range(L):
            mem = Memory(shape=unsigned(c.mbw), depth=c.blk_depth, init=[])
            m.submodules[f"bank{b}"] = mem
            banks.append(mem)
        m.submodules.vals = vals = Memory(shape=unsigned(D), depth=c.val_depth, init=[])
        m.submodules.xmem = xmem = Memory(shape=unsigned(C * D), depth=c.x_depth, init=[])
        m.submodules.ymem = ymem = Memory(shape=unsigned(C * D), depth=c.y_depth, init=[])

        brd = [b.read_port() for b in banks]
        bwr = [b.write_port() for b in banks]
        vrd, vwr = vals.read_port(), vals.write_port()
        xrd, xwr = xmem.read_port(), xmem.write_port()
        yrd, ywr = ymem.read_port(), ymem.write_port(granularity=D)

        for b in range(L):
            m.d.comb += [bwr[b].en.eq(self.bw_en[b]), bwr[b].addr.eq(self.bw_addr),
                         bwr[b].data.eq(self.bw_data)]
        m.d.comb += [
            vwr.en.eq(self.vw_en), vwr.addr.eq(self.vw_addr), vwr.data.eq(self.vw_data),
            xwr.en.eq(self.xw_en), xwr.addr.eq(self.xw_addr), xwr.data.eq(self.xw_data),
            self.bdata.eq(Cat(*[p.data for p in brd])),
            self.vdata.eq(vrd.data), self.xdata.eq(xrd.data),
            yrd.addr.eq(self.y_raddr),
        ]


        # ---- range set-up, ahead of the run ----------------------------------------
        # Both schedule ranges' starting state is formed continuously from the
        # registered configuration, which the top level holds stable from the command's
        # decode on (at least five cycles before ``start``): the block-row base, the
        # operand base of the range's first job (a range may start inside an output
        # row), the backward walk's per-bank column bases, and the job counts. So a range
        # starts issuing in the cycle after ``start`` (or after the previous range's last
        # issue) with no set-up cycle. The two products share one multiplier pair,
        # alternating between the ranges (``ph``); every step is registered.
        ph = Signal()
        m.d.sync += ph.eq(~ph)
        po, pt = Mux(ph, o1, o0), Mux(ph, t1, t0)
        pbj = po >> c.log_bk
        su_ph, su_rowmul, su_xb, su_bjw = Signal(), Signal(BB), Signal(XB), Signal(BB)
        su_lgv = [Signal(BB, name=f"su_lgv{b}") for b in range(L)]
        m.d.sync += [su_ph.eq(ph), su_rowmul.eq((po >> c.log_bm) * gkl),
                     su_xb.eq(pt * xstride), su_bjw.eq(pbj >> c.log_lanes)]
        for b in range(L):
            lane = ((b - pbj) & (L - 1)) if L > 1 else Const(0)
            with m.Switch(lane):
                for l in range(L):
                    with m.Case(l):
                        if c.area:
                            m.d.sync += su_lgv[b].eq(gkl * l)
                        else:  # shifts and adds (a DSP block per row otherwise)
                            m.d.sync += su_lgv[b].eq(sum(gkl << k for k in range(l.bit_length())
                                                         if l >> k & 1))
        # per range: bases (rb: block-row base, xb0: operand base, cb: column bases) and
        # job counts (reps0: jobs of the first issue, left0: jobs after it, lnt0: left0
        # minus a full row of tiles, for the replayed walk's next row)
        rb = [Signal(BB, name=f"rb{h}") for h in range(2)]
        xb0 = [Signal(XB, name=f"xb0_{h}") for h in range(2)]
        cb = [[Signal(BB, name=f"cb{h}_{b}") for b in range(L)] for h in range(2)]
        ntl = [Signal(TW, name=f"ntl{h}") for h in range(2)]
        reps0 = [Signal(JW, name=f"reps0_{h}") for h in range(2)]
        left0 = [Signal(JW, name=f"left0_{h}") for h in range(2)]
        NW = max(JW, TW) + 2 if c.area else 18  # signed: jobs left minus a row of tiles
        lnt0 = [Signal(signed(NW), name=f"lnt0_{h}") for h in range(2)]
        for hh, (th, nh) in enumerate(((t0, n0), (t1, n1))):
            with m.If(su_ph == hh):
                m.d.sync += [rb[hh].eq(blk_base + su_rowmul), xb0[hh].eq(su_xb)]
                m.d.sync += [cb[hh][b].eq(blk_base + su_bjw + su_lgv[b]) for b in range(L)]
            m.d.sync += [
                ntl[hh].eq(nt_r - th),
                reps0[hh].eq(Mux(one_group, Mux(ntl[hh] < nh, ntl[hh], nh), 1)),
                left0[hh].eq(nh - reps0[hh]),
                lnt0[hh].eq(nh - reps0[hh] - nt_r),
            ]
        if not c.area:
            # the walk's compares as flags, set with the counters (see S0): each range's
            # first tile is the last one (tl0), its first issue leaves no job (lz0); the
            # configuration is held long enough for these to settle before start
            tl0 = [Signal(name=f"tl0_{h}") for h in range(2)]
            lz0 = [Signal(name=f"lz0_{h}") for h in range(2)]
            ng_m2, nt_m2 = Signal(GW, attrs=kp), Signal(TW, attrs=kp)
            nt_one = Signal(attrs=kp)
            m.d.sync += [ng_m2.eq(self.ng - 2), nt_m2.eq(self.nt - 2), nt_one.eq(self.nt == 1)]
            for hh, th in enumerate((t0, t1)):
                m.d.sync += [tl0[hh].eq(th == nt_m1), lz0[hh].eq(left0[hh] == 0)]

        # ---- S0: walk (output row, tile, group), address the banks ---------------
        # Issue is credit-based: a group is issued only while the FIFO has a slot for it
        # counting the groups in flight (S1, S2, S3), so nothing after S0 ever stalls and the
        # issue decision depends on one register (no path from the mask banks back into
        # S0). A credit returns when its group is popped by the emitter or dropped in S3.
        h = Signal()
        o = Signal(OW)
        t = Signal(TW)
        g = Signal(GW)
        xbase = Signal(XB)
        rowbase = Signal(BB)
        gbase = Signal(BB)
        seen = Signal()
        # jobs of the current issue (a replayed row's tiles, else 1), jobs of the range
        # after it, and that minus a full row of tiles (its sign picks the next row's
        # reps without a compare on the issue path)
        reps = Signal(JW)
        left = Signal(JW)
        lnt = Signal(signed(NW))
        credits = Signal(range(c.fifo_depth + 1), init=c.fifo_depth)
        # backward: bank b's word of the group is colb[b] + gbase, where
        # colb[b] = blk_base + (bj >> log_lanes) + gkl·((b - bj) mod lanes); kept by
        # rotating when bj steps by one, loaded from the range's set-up at its start
        colb = [Signal(BB, name=f"colb{b}") for b in range(L)]

        s1 = Signal(data.StructLayout({
            "valid": 1, "end": 1, "rot": max(1, c.log_lanes), "sub": 3, "lvalid": L,
            "last_g": 1, "opbase": XB, **({} if c.area else {"xbase": XB}),
            "reps": YB + 1}))
        issue = Signal()
        pop, drop = Signal(), Signal()  # credits returned this cycle

        bi = o >> c.log_bm
        bj = o >> c.log_bk
        for b in range(L):
            addr = Mux(mode_bwd, colb[b] + gbase, rowbase + g)
            m.d.comb += [brd[b].addr.eq(Mux(ext, self.ext_baddr, addr)),
                         brd[b].en.eq(1)]

        if c.area:
            last_g = g == ng_m1
            last_t = t == nt_m1
            left_zero = left == 0
            has_credit = credits != 0
        else:
            # registered flags (g == ng - 1, t == nt - 1, left == 0, credits != 0), each
            # set where its counter is: the issue decision is a few LUTs from registers
            last_g, last_t, left_zero, has_credit = (
                Signal(name=n) for n in ("last_g_r", "last_t_r", "left_zero_r", "has_credit_r"))
        o_next = o + 1
        log_sx_fwd, log_sx_bwd = c.log_bk, c.log_bm
        gl = g << c.log_lanes

        def load_range(hh):
            return [h.eq(hh), o.eq((o0, o1)[hh]), t.eq((t0, t1)[hh]),
                    rowbase.eq(rb[hh]), xbase.eq(xb0[hh]), reps.eq(reps0[hh]),
                    left.eq(left0[hh]), lnt.eq(lnt0[hh])] + \
                [colb[b].eq(cb[hh][b]) for b in range(L)] + \
                ([] if c.area else [last_t.eq(tl0[hh]), left_zero.eq(lz0[hh])])

        m.d.sync += s1.valid.eq(0)
        if c.area:
            m.d.sync += credits.eq(credits - issue + pop + drop)
        else:
            credits_nx = Signal.like(credits)
            m.d.comb += credits_nx.eq(credits - issue + pop + drop)
            m.d.sync += [credits.eq(credits_nx), has_credit.eq(credits_nx != 0)]
        with m.FSM(name="walk"):
            with m.State("IDLE"):
                with m.If(start & (mode_in != MODE_WGRAD)):
                    m.d.sync += [g.eq(0), gbase.eq(0), seen.eq(0), credits.eq(c.fifo_depth)]
                    if not c.area:
                        m.d.sync += [last_g.eq(one_group), has_credit.eq(1)]
                    with m.If(has0):
                        m.d.sync += load_range(0)
                        m.next = "ISSUE"
                    with m.Elif(has1):
                        m.d.sync += load_range(1)
                        m.next = "ISSUE"
                    with m.Else():
                        m.next = "END"
            with m.State("ISSUE"):
                m.d.comb += issue.eq(has_credit)
                with m.If(issue):
                    opbase = Mux(mode_bwd, g << (c.log_lanes + log_sx_bwd),
                                 g << (c.log_lanes + log_sx_fwd))
                    m.d.sync += [
                        s1.valid.eq(1), s1.end.eq(0),
                        s1.rot.eq(Mux(mode_bwd, bj, bi)),
                        s1.sub.eq(Mux(mode_bwd, o & (c.bk - 1), o & (c.bm - 1))),
                        s1.lvalid.eq(Cat(*[(gl + l) < lim for l in range(L)])),
                        s1.last_g.eq(last_g),
                        # (the area configuration carries opbase + xbase as one field)
                        s1.opbase.eq(opbase + xbase if c.area else opbase),
                        *([] if c.area else [s1.xbase.eq(xbase)]),
                        s1.reps.eq(reps),
                    ]
                    with m.If(~last_g):
                        m.d.sync += [g.eq(g + 1), gbase.eq(gbase + (gkl << c.log_lanes))]
                        if not c.area:
                            m.d.sync += last_g.eq(g == ng_m2)
                    with m.Else():
                        m.d.sync += [g.eq(0), gbase.eq(0)]
                        if not c.area:
                            m.d.sync += last_g.eq(one_group)
                        with m.If(~last_t & ~one_group):
                            m.d.sync += [t.eq(t + 1), xbase.eq(xbase + xstride)]
                            if not c.area:
                                m.d.sync += last_t.eq(t == nt_m2)
                        with m.Else():
                            m.d.sync += [t.eq(0), xbase.eq(0), o.eq(o_next)]
                            if not c.area:
                                m.d.sync += last_t.eq(nt_one)
                            with m.If(~mode_bwd & ((o_next & (c.bm - 1)) == 0)):
                                m.d.sync += rowbase.eq(rowbase + gkl)
                            with m.If(mode_bwd & ((o_next & (c.bk - 1)) == 0)):
                                # bj steps by one: bank b takes bank b-1's lane offset,
                                # and the word offset bj >> log_lanes steps at a wrap
                                carry = (((o_next >> c.log_bk) & (L - 1)) == 0) \
                                    if L > 1 else Const(1)
                                for b in range(L):
                                    m.d.sync += colb[b].eq(colb[(b - 1) % L] + carry)
                        # the next issue's jobs: a replayed row takes min(nt, left) tiles
                        with m.If(one_group):
                            neg = lnt < 0
                            m.d.sync += [reps.eq(Mux(neg, left, nt_r)),
                                         left.eq(Mux(neg, 0, lnt)), lnt.eq(lnt - nt_r)]
                            if not c.area:
                                m.d.sync += left_zero.eq(neg | (lnt.as_unsigned()[:JW] == 0))
                        with m.Else():
                            m.d.sync += left.eq(left - 1)
                            if not c.area:
                                m.d.sync += left_zero.eq(left == 1)
                        with m.If(left_zero):
                            with m.If(~h & has1):
                                m.d.sync += load_range(1)  # no gap between the ranges
                            with m.Else():
                                m.next = "END"
            with m.State("END"):
                m.d.comb += issue.eq(has_credit)
                with m.If(issue):
                    m.d.sync += [s1.valid.eq(1), s1.end.eq(1), s1.reps.eq(1)]
                    m.next = "WAIT"
            with m.State("WAIT"):
                with m.If(self.done):
                    m.next = "IDLE"

        # ---- S1: the bank words arrive (unregistered BRAM output); rotate them into
        # lane order and register (S2) -----------------------------------------------
        s2 = Signal(s1.shape(), name="s2")
        s2w = [Signal(c.mbw, name=f"s2w{l}") for l in range(L)]
        m.d.sync += s2.eq(s1)
        bank_words = [brd[b].data for b in range(L)]
        if not c.area and L > 1:
            # the default configuration registers the banks' outputs as they are (a block
            # RAM's output has a long clock-to-out) and rotates them in S2
            s2raw = [Signal(c.mbw, name=f"s2raw{b}") for b in range(L)]
            m.d.sync += [s2raw[b].eq(bank_words[b]) for b in range(L)]
            for l in range(L):
                with m.Switch((s2.rot + l) & (L - 1)):
                    for b in range(L):
                        with m.Case(b):
                            m.d.comb += s2w[l].eq(s2raw[b])
        for l in range(L if c.area or L == 1 else 0):
            if L > 1:
                with m.Switch((s1.rot + l) & (L - 1)):
                    for b in range(L):
                        with m.Case(b):
                            m.d.sync += s2w[l].eq(bank_words[b])
            else:
                m.d.sync += s2w[l].eq(bank_words[0])

        # ---- S2: slice the masks (registered with their any-bit OR in S3) -----------
        q = fifo.SyncFIFO(width=entry_layout(c).size, depth=c.fifo_depth)
        m.submodules.fifo = q
        ent = Signal(entry_layout(c))
        bits = []
        for l in range(L):
            mask = s2w[l][:NB]
            lvalid = s2.lvalid[l]
            for s in range(S):
                fb = Const(0) if s >= c.bk else mask.bit_select((s2.sub << c.log_bk) + s, 1)
                bb = Const(0) if s >= c.bm else mask.bit_select((s << c.log_bk) + s2.sub, 1)
                bits.append(lvalid & Mux(mode_bwd, bb, fb))
        # ---- S3: drop empty groups, push the rest (never stalls) --------------------
        # the push decision is a register away from the walk direction's slice
        # multiplexer (one more cycle in flight per group: the FIFO's credits cover it)
        s3 = Signal(s1.shape(), name="s3")
        s3w = [Signal(c.mbw, name=f"s3w{l}") for l in range(L)]
        s3bits = Signal(L * S)
        nonempty = Signal()
        m.d.sync += [s3.eq(s2), s3bits.eq(Cat(*bits)), nonempty.eq(Cat(*bits).any())]
        m.d.sync += [s3w[l].eq(s2w[l]) for l in range(L)]
        need_push = Signal()
        # a job without any non-zero is not pushed and costs the emitter nothing; its
        # result positions (reps of them for a replayed row) are never written in the
        # run, which is what makes them read back as zero (see the null flags)
        posc = Signal(YB + 1)  # result position (job number in this PE row) of S3's job
        m.d.comb += [
            need_push.eq(s3.valid & (s3.end | nonempty)),
            drop.eq(s3.valid & ~need_push),
            ent.bits.eq(Mux(s3.end, 0, s3bits)),
            ent.masks.eq(Cat(*[w[:NB] for w in s3w])),
            ent.ptrs.eq(Cat(*[w[NB:] for w in s3w])),
            ent.sub.eq(s3.sub), ent.opbase.eq(s3.opbase),
            *([] if c.area else [ent.xbase.eq(s3.xbase)]),
            ent.first.eq(s3.end | ~seen),
            ent.null.eq(s3.end),
            ent.end.eq(s3.end),
            ent.pos.eq(posc), ent.reps.eq(s3.reps),
            q.w_data.eq(ent.as_value()),
            q.w_en.eq(need_push),
        ]
        with m.If(s3.valid & ~s3.end):
            with m.If(s3.last_g):
                m.d.sync += [seen.eq(0), posc.eq(posc + s3.reps)]
            with m.Elif(nonempty):
                m.d.sync += seen.eq(1)

        # ---- emitter: one set bit per cycle ---------------------------------------
        G = Signal(entry_layout(c))
        gv = Signal()
        p = Signal(range(L * S))
        for i in reversed(range(L * S)):
            with m.If(G.bits[i]):
                m.d.comb += p.eq(i)
        remaining = G.bits & (G.bits - 1)
        lane = p >> c.log_slice if L > 1 else Const(0)
        s_idx = p & (S - 1)
        mask_sel = Signal(NB)
        ptr_sel = Signal(PB)
        with m.Switch(lane):
            for l in range(L):
                with m.Case(l):
                    m.d.comb += [mask_sel.eq(G.masks[l * NB:(l + 1) * NB]),
                                 ptr_sel.eq(G.ptrs[l * PB:(l + 1) * PB])]
        t_fwd = (G.sub << c.log_bk) | s_idx
        t_bwd = (s_idx << c.log_bk) | G.sub
        op_fwd = G.opbase + ((lane << c.log_bk) | s_idx)
        op_bwd = G.opbase + ((lane << c.log_bm) | s_idx)

        E = Signal(data.StructLayout({
            "valid": 1, "null": 1, "first": 1, "end": 1, "ptr": PB, "mask": NB,
            "t": max(1, (NB - 1).bit_length()), "opidx": XB, "xbase": XB, "pos": YB}))
        last_rep = G.reps[1:] == 0  # reps <= 1
        load_next = ~gv | G.null | ((remaining == 0) & last_rep)
        m.d.comb += pop.eq(load_next & q.r_rdy)  # one assignment: no X in Icarus
        bits0 = Signal(L * S)  # the group's bits, for a replay
        qv = Signal(entry_layout(c))
        m.d.comb += qv.eq(q.r_data)
        t_g = Mux(mode_bwd, t_bwd, t_fwd)
        m.d.sync += [
            E.valid.eq(gv), E.null.eq(G.null), E.first.eq(G.first), E.end.eq(G.end),
            E.pos.eq(G.pos), E.opidx.eq(Mux(mode_bwd, op_bwd, op_fwd)),
        ]
        if not c.area:
            m.d.sync += [E.ptr.eq(ptr_sel), E.mask.eq(mask_sel), E.t.eq(t_g),
                         E.xbase.eq(G.xbase)]
        else:
            # the area configuration forms both addresses here (a 30 MHz iCE40 has the
            # time): E holds the value address in ``ptr`` and the operand address in
            # ``opidx`` (opbase holds xbase) instead of the mask, bit, pointer and bases
            # they come from
            below_g = Cat(*[mask_sel[i] & (i < t_g) for i in range(NB)])
            m.d.sync += E.ptr.eq((val_base + ptr_sel + sum(below_g[i] for i in range(NB)))[:PB])
        gx = G.opbase if c.area else G.xbase  # the operand base a replay steps
        with m.If(load_next):
            m.d.comb += q.r_en.eq(q.r_rdy)
            m.d.sync += [G.eq(q.r_data), gv.eq(q.r_rdy), bits0.eq(qv.bits)]
        with m.Elif(remaining == 0):  # replay for the next tile
            m.d.sync += [G.bits.eq(bits0), G.first.eq(1), G.reps.eq(G.reps - 1),
                         gx.eq(gx + xstride),
                         G.pos.eq(G.pos + 1)]
        with m.Else():
            m.d.sync += [G.bits.eq(remaining), G.first.eq(0)]

        # ---- E: addresses, registered (A) before they reach the memories -------------
        ctl = data.StructLayout({"valid": 1, "null": 1, "first": 1, "end": 1, "pos": YB})
        A = Signal(data.StructLayout({"ctl": ctl, "vaddr": PB, "xaddr": XB}))
        below = Cat(*[E.mask[i] & (i < E.t) for i in range(NB)])
        popc = sum(below[i] for i in range(NB))
        m.d.sync += [
            A.ctl.valid.eq(E.valid), A.ctl.null.eq(E.null), A.ctl.first.eq(E.first),
            A.ctl.end.eq(E.end), A.ctl.pos.eq(E.pos),
            A.vaddr.eq((val_base + E.ptr + popc)[:PB] if not c.area else E.ptr),
            A.xaddr.eq(E.xbase + E.opidx if not c.area else E.opidx),
        ]
        # ---- A: read value and operand ----------------------------------------------
        xaddr = Mux(wgrad, self.sq_xaddr, A.xaddr)
        m.d.comb += [
            vrd.addr.eq(Mux(ext, self.ext_vaddr, A.vaddr)),
            xrd.addr.eq(Mux(ext, self.ext_xaddr, xaddr)),
        ]
        D1 = Signal(ctl)
        with m.If(wgrad):
            m.d.sync += [D1.valid.eq(self.sq_valid), D1.null.eq(0),
                         D1.first.eq(self.sq_first), D1.end.eq(self.sq_end)]
        with m.Else():
            m.d.sync += D1.eq(A.ctl)

        # ---- D1: the memories' outputs, registered as the multiplier's operands ------
        # (no reset in the area configuration: the iCE40's SB_MAC16 takes the operand
        # and product registers then, it has no synchronous reset)
        nr = bool(c.area)
        w = Signal(signed(D), reset_less=nr)
        xw = Signal(C * D, reset_less=nr)
        DM = Signal(ctl)
        if c.area:
            m.d.sync += [
                DM.eq(D1), xw.eq(xrd.data),
                w.eq(Mux(wgrad, self.g_lane, Mux(D1.null, 0, vrd.data.as_signed()))),
            ]
        else:  # (the value memory's output registered as it is, chosen a stage later)
            w_g, w_null = Signal(signed(D), name="w_g"), Signal(name="w_null")
            m.d.sync += [DM.eq(D1), xw.eq(xrd.data), w.eq(vrd.data.as_signed()),
                         w_g.eq(self.g_lane), w_null.eq(D1.null)]
        # The default configuration registers each side of the multipliers twice: the
        # DSP blocks sit in their own rows of the die, away from the memories and from
        # the accumulators (+2 cycles from D1 to D2; a walk's done is raised at G, the
        # weight gradient's at D2)
        mw, mx = w, xw
        if not c.area:
            mw, mx, DM2 = Signal(signed(D), name="w2"), Signal(C * D, name="xw2"), Signal(ctl)
            m.d.sync += [mw.eq(Mux(wgrad, w_g, Mux(w_null, 0, w))), mx.eq(xw), DM2.eq(DM)]

        # ---- DM: multiply -----------------------------------------------------------
        D2 = Signal(ctl)
        prods = [Signal(signed(2 * D), name=f"p{i}", reset_less=nr) for i in range(C)]
        padd = prods  # the products the accumulators add
        if c.area:
            m.d.sync += D2.eq(DM)
        else:
            DP = Signal(ctl)
            padd = [Signal(signed(2 * D), name=f"pr{i}") for i in range(C)]
            m.d.sync += [DP.eq(DM2), D2.eq(DP)] + [padd[i].eq(prods[i]) for i in range(C)]
        for i in range(C):
            m.d.sync += prods[i].eq(mw * mx[i * D:(i + 1) * D].as_signed())

        # ---- D2: accumulate; results (and external writes) go to the bank through a
        # register stage -------------------------------------------------------------
        accs = [Signal(signed(A_), name=f"acc{i}") for i in range(C)]
        have = Signal()
        wptr = Signal(YB)  # weight gradient: results in sequence
        cur = Signal(YB)  # forward/backward: result position of the job in D2
        # the result word: rounded by w_frac (forward/backward) or by the weight
        # gradient's shift (WGRAD, WGRADX), one increment per lane
        if c.area:
            wg_round = Signal()
            m.d.comb += wg_round.eq(wgrad | gshift)
        outs = [round_sat(m, accs[i], (c.w_frac, c.wgrad_shift), wg_round, D, f"y{i}")
                for i in range(C)]
        pe_write = Signal()
        with m.If(D2.valid):
            with m.If(D2.first | D2.end):
                m.d.comb += pe_write.eq(have)
                m.d.sync += [have.eq(~D2.end), cur.eq(D2.pos)]
                with m.If(have):
                    m.d.sync += wptr.eq(wptr + 1)
            for i in range(C):
                base = Mux(D2.first, 0, accs[i])
                if c.area and 2 * D <= A_:
                    # the sum has one bit more than the accumulator: it overflows when
                    # its top two bits differ (only those two fan out of the adder, so
                    # each sum bit packs with its flip-flop in an iCE40 logic cell)
                    sm = Signal(signed(A_ + 1), name=f"accs{i}")
                    m.d.comb += sm.eq(base + padd[i])
                    ovf = sm[A_] ^ sm[A_ - 1]
                    m.d.sync += accs[i].eq(Mux(ovf, Mux(sm[A_], -(1 << (A_ - 1)),
                                                        (1 << (A_ - 1)) - 1), sm[:A_]))
                else:
                    m.d.sync += accs[i].eq(sat(m, base + padd[i], A_, f"accn{i}"))
            if c.area:
                with m.If(D2.end & wgrad):
                    m.d.sync += self.done.eq(1)
        if not c.area:
            # the weight gradient's done from the end marker two stages before D2 (so the
            # run is as long as with one register each side of the multipliers); its last
            # result is written two cycles later, while the top level responds
            with m.If(DM2.valid & DM2.end & wgrad):
                m.d.sync += self.done.eq(1)
        # a walk's done rises when the emitter holds its end marker (G): the last
        # result's remaining stages (E .. D2, the write) land while the top level
        # responds and the next command is decoded and checked (at least nine cycles),
        # and the last element reads its value and operand (A) in the cycle done shows,
        # two cycles before the rows' read ports go back to the host
        with m.If(gv & G.end & ~wgrad):
            m.d.sync += self.done.eq(1)
        yw_en, yw_addr, yw_data = Signal(C), Signal(YB), Signal(C * D)
        pe_data = Cat(*[v.as_unsigned()[:D] for v in outs])
        if c.area:
            with m.If(pe_write):
                m.d.sync += [yw_en.eq((1 << C) - 1), yw_addr.eq(Mux(wgrad, wptr, cur)),
                             yw_data.eq(pe_data)]
            with m.Else():
                m.d.sync += [yw_en.eq(self.y_wen), yw_addr.eq(self.y_waddr),
                             yw_data.eq(self.y_wdata)]
            m.d.comb += [ywr.en.eq(yw_en), ywr.addr.eq(yw_addr), ywr.data.eq(yw_data)]
        else:
            # the top level's writes (a load word or the update's W': data, address and
            # this row's lane enables) arrive registered there, the data and the address
            # on buses shared by every row: a row registers its own results and picks
            # between the two (its own first)
            pw = Signal()
            m.d.sync += pw.eq(pe_write)
            with m.If(pe_write):
                m.d.sync += [yw_addr.eq(Mux(wgrad, wptr, cur)), yw_data.eq(pe_data)]
            m.d.comb += [ywr.en.eq(Mux(pw, (1 << C) - 1, self.y_wen)),
                         ywr.addr.eq(Mux(pw, yw_addr, self.y_waddr)),
                         ywr.data.eq(Mux(pw, yw_data, self.y_wdata))]
        with m.If(start):
            m.d.sync += [self.done.eq(0), have.eq(0), wptr.eq(0), posc.eq(0)]

        # ---- null results ---------------------------------------------------------
        # A run covers this row's result positions 0 .. posc - 1 in order, each either
        # written by D2 (a job with a non-zero) or never (a null job). So a word reads as
        # zero when it is below posc and has not been written since the run's start.
        # The written flags are LUT-RAM rows of 16 (read-modify-write of one row per
        # write, a second copy for the read side) with a valid bit per row, so a run's
        # start clears them all at once.
        lg = max(1, (c.y_depth - 1).bit_length())
        wb = min(4, lg - 1)  # word bits of a flag row (at least two rows)
        nrows = 1 << (lg - wb)
        wflag = Memory(shape=unsigned(1 << wb), depth=nrows, init=[])
        m.submodules.wflag = wflag
        fw_port = wflag.write_port()
        frmw, frd = wflag.read_port(domain="comb"), wflag.read_port(domain="comb")
        row_ok = Signal(nrows)
        wrow, wbit = ywr.addr[wb:lg], ywr.addr[:wb]
        wr_any = Signal()
        m.d.comb += [
            wr_any.eq(ywr.en.any()),
            frmw.addr.eq(wrow),
            fw_port.en.eq(wr_any), fw_port.addr.eq(wrow),
            fw_port.data.eq(Mux(row_ok.bit_select(wrow, 1), frmw.data, 0)
                            | (Const(1, 1 << wb) << wbit)),
        ]
        with m.If(start):
            m.d.sync += row_ok.eq(0)
        with m.Elif(wr_any):
            m.d.sync += row_ok.eq(row_ok | (Const(1, nrows) << wrow))
        # the result bank's output is registered: it goes to the top level's update,
        # encoder and unload (a word arrives two cycles after its address); the flag is
        # looked up with the read, so it is registered like the memory's output
        rrow, rbit = self.y_raddr[wb:lg], self.y_raddr[:wb]
        written = row_ok.bit_select(rrow, 1) & frd.data.bit_select(rbit, 1)
        ynull_q = Signal()
        m.d.comb += frd.addr.eq(rrow)
        if c.area:
            m.d.sync += [ynull_q.eq((self.y_raddr < posc) & ~written),
                         self.ydata.eq(Mux(ynull_q, 0, yrd.data))]
        else:
            # the picked lane is cut from the bank's output and registered (the pick, a
            # cycle ahead, registered too): no word-wide register
            m.d.sync += ynull_q.eq((self.y_raddr < posc) & ~written)
            pick, pick_lane = Signal(), Signal.like(self.y_pick_lane)
            m.d.sync += [pick.eq(self.y_pick), pick_lane.eq(self.y_pick_lane)]
            lane = Signal(D)
            with m.Switch(pick_lane):
                for i in range(C):
                    with m.Case(i):
                        m.d.comb += lane.eq(yrd.data[i * D:(i + 1) * D])
            ylane = Signal(D)
            m.d.sync += ylane.eq(Mux(pick & ~ynull_q, lane, 0))
            m.d.comb += self.ylane.eq(ylane)
        return m
